"""Every chapter notebook is committed executed top to bottom, without errors."""

import json
from pathlib import Path

import pytest

CHAPTERS = sorted((Path(__file__).resolve().parents[1] / "chapters").glob("*.ipynb"))


def test_there_are_chapters():
    assert CHAPTERS, "no notebooks in chapters/"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_notebook_stored_executed_in_order(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "run Restart & Run All before committing"
    for cell in code:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", f"stored error in {path.name}"
            text = "".join(output.get("text", ""))
            assert "Traceback" not in text
    assert any(
        "parameters" in c.get("metadata", {}).get("tags", []) for c in code
    ), "a cell tagged 'parameters' holds the profile-dependent settings"
