"""Open a chapter in Google Colab (or another hosted Jupyter): the badge and
the install snippet every chapter notebook carries.

The badge goes under the title in the notebook's first markdown cell and in
the README's chapter table; the snippet opens the notebook's first code
cell. Where ``bookcode`` is importable (a checkout after ``make lab``, a
conda environment) the snippet does nothing and prints nothing; elsewhere it
installs ``bookcode`` from the repository with ``pip``, which adds only the
dependencies that are missing (Colab already has TensorFlow, Keras, NumPy,
matplotlib and Pillow). The datasets then download from their canonical URLs
into ``~/.cache/bookcode`` (see :mod:`bookcode.datasets`).

The repository's address is the one constant :data:`REPOSITORY`. Add or
refresh the badge and snippet of notebooks (idempotent; only cell sources
change, outputs are kept) and of the README's table with::

    python -m bookcode.colab chapters/*.ipynb README.md

The exact forms (what ``tests/test_colab.py`` checks)::

    [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/<owner>/<repo>/blob/main/chapters/<notebook>.ipynb)

    try:  # on Colab or another hosted Jupyter: install bookcode (and only what is missing)
        import bookcode
    except ImportError:
        %pip install --quiet "bookcode @ git+https://github.com/<owner>/<repo>"
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPOSITORY = "https://github.com/OWNER/hands-on-meta-learning-runnable"
"""Where the project is published. No public address existed when this was
written: ``OWNER`` is a placeholder to replace (then run this module on the
notebooks and the README, as above)."""
BRANCH = "main"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
_BADGE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
_SNIPPET_START = "try:  # on Colab or another hosted Jupyter"


def colab_url(notebook: str, repository: str = REPOSITORY, branch: str = BRANCH) -> str:
    """Colab's address of ``chapters/<notebook>`` in the repository on GitHub."""
    match = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)/?", repository)
    if not match:
        raise ValueError(
            f"the repository must be https://github.com/<owner>/<repo>, got {repository!r}"
        )
    name = Path(notebook).name
    return f"https://colab.research.google.com/github/{match[1]}/blob/{branch}/chapters/{name}"


def badge(notebook: str, repository: str = REPOSITORY) -> str:
    """The Markdown badge that opens ``notebook`` in Colab."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook, repository)})"


def install_snippet(repository: str = REPOSITORY) -> str:
    """The lines that open a chapter's first code cell (ending with a blank line)."""
    return (
        f"{_SNIPPET_START}: install bookcode (and only what is missing)\n"
        "    import bookcode\n"
        "except ImportError:\n"
        f'    %pip install --quiet "bookcode @ git+{repository.rstrip("/")}"\n'
        "\n"
    )


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _with_badge(source: str, notebook: str, repository: str) -> str:
    """``source`` (a first markdown cell) with the badge on the line after the title."""
    line = badge(notebook, repository)
    if _BADGE.search(source):
        return _BADGE.sub(lambda _: line, source, count=1)
    lines = _lines(source)
    if not lines or not lines[0].startswith("#"):
        raise ValueError(f"{notebook}: the first markdown cell must start with the title")
    title = lines[0] if lines[0].endswith("\n") else lines[0] + "\n"
    return "".join([title, "\n", line + "\n"] + lines[1:])


def _with_snippet(source: str, repository: str) -> str:
    """``source`` (a first code cell) opening with the install snippet."""
    if source.startswith(_SNIPPET_START):
        end = source.find("\n\n")
        source = source[end + 2 :] if end >= 0 else ""
    return install_snippet(repository) + source


def apply_to_notebook(path, repository: str = REPOSITORY) -> bool:
    """Add or refresh the badge and the snippet in a notebook file (cell
    sources only; outputs, ids and execution counts stay). Returns whether
    the file changed. The JSON is written as nbformat writes it."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    markdown = next((c for c in nb["cells"] if c["cell_type"] == "markdown"), None)
    code = next((c for c in nb["cells"] if c["cell_type"] == "code"), None)
    if markdown is None or code is None:
        raise ValueError(f"{path}: a chapter needs a markdown title cell and a code cell")
    for cell, new in (
        (markdown, _with_badge("".join(markdown["source"]), path.name, repository)),
        (code, _with_snippet("".join(code["source"]), repository)),
    ):
        cell["source"] = _lines(new)
    updated = json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text


def apply_to_readme(path, repository: str = REPOSITORY) -> bool:
    """Put the badge after the notebook link of every row of the README's
    chapter table (rows starting ``| [name](chapters/name.ipynb)``)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    row = re.compile(
        r"^(\| \[[^\]]+\]\(chapters/([^)]+\.ipynb)\))( \[!\[Open In Colab\][^|]*?)?( \|)", re.M
    )
    updated = row.sub(lambda m: f"{m[1]} {badge(m[2], repository)}{m[4]}", text)
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m bookcode.colab chapters/*.ipynb README.md", file=sys.stderr)
        return 2
    for name in paths:
        apply = apply_to_readme if name.endswith(".md") else apply_to_notebook
        print(f"{name}: {'updated' if apply(name) else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
