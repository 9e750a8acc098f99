"""Notebook validation settings (nbval): compare only what is deterministic.
Under pytest-xdist (``make test`` runs two processes) each process gets its
share of the cores for TensorFlow's kernels, so that they do not compete.
Unit tests run TensorFlow's oneDNN CPU kernels, as the notebooks do
(``bookcode.notebook.setup``), unless ``TF_ENABLE_ONEDNN_OPTS`` says otherwise."""

import os
import platform

if platform.machine().lower() in ("x86_64", "amd64"):  # before any test imports TensorFlow
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:  # before any test imports TensorFlow; notebook kernels inherit it
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))


def pytest_collectstart(collector):
    # stderr (TensorFlow's notices, warnings) and rich outputs are never compared.
    if getattr(collector, "path", None) is not None and collector.path.suffix == ".ipynb":
        collector.skip_compare += ("stderr", "text/html", "image/png", "application/javascript")
