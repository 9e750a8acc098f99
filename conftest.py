"""Notebook validation settings (nbval): compare only what is deterministic."""


def pytest_collectstart(collector):
    # stderr (TensorFlow's notices, warnings) and rich outputs are never compared.
    if getattr(collector, "path", None) is not None and collector.path.suffix == ".ipynb":
        collector.skip_compare += ("stderr", "text/html", "image/png", "application/javascript")
