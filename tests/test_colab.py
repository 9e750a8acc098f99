"""Colab and other hosted Jupyter: every chapter carries the "Open in Colab"
badge and the install snippet of :mod:`bookcode.colab`, and the snippet
installs ``bookcode`` (and nothing that is already there) where it is
missing, offline: the "repository" is a local git repository of this
checkout, which git reaches through a URL rewrite (``insteadOf``), and pip
may use no package index.

Templates to copy into a new chapter (or run
``python -m bookcode.colab chapters/NN_name.ipynb README.md``), with
``REPOSITORY`` from :mod:`bookcode.colab`:

- first markdown cell, on the line after the title:
  ``[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/<owner>/<repo>/blob/main/chapters/NN_name.ipynb)``
- first code cell, before everything else::

    try:  # on Colab or another hosted Jupyter: install bookcode (and only what is missing)
        import bookcode
    except ImportError:
        %pip install --quiet "bookcode @ git+https://github.com/<owner>/<repo>"
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from bookcode import colab

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
FIX = "run `python -m bookcode.colab chapters/{name} README.md`"


def _first(nb, kind):
    return "".join(next(c for c in nb["cells"] if c["cell_type"] == kind)["source"])


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_chapter_has_the_badge_and_the_snippet(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    title_cell = _first(nb, "markdown")
    assert colab.badge(path.name) in title_cell, FIX.format(name=path.name)
    assert title_cell.splitlines()[2] == colab.badge(path.name), "the badge goes under the title"
    assert _first(nb, "code").startswith(colab.install_snippet()), FIX.format(name=path.name)


def test_every_chapter_has_a_badge_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in CHAPTERS if colab.badge(p.name) not in readme]
    assert not missing, f"no Colab badge in README.md's table for {missing}: " + FIX.format(
        name="..."
    )


def test_applying_twice_changes_sources_only_once(tmp_path):
    source = CHAPTERS[0]
    copy = tmp_path / source.name
    shutil.copy(source, copy)
    nb = json.loads(source.read_text(encoding="utf-8"))
    colab.apply_to_notebook(copy)
    assert not colab.apply_to_notebook(copy)
    changed = json.loads(copy.read_text(encoding="utf-8"))
    assert [c.get("outputs") for c in changed["cells"]] == [c.get("outputs") for c in nb["cells"]]
    assert [c.get("id") for c in changed["cells"]] == [c.get("id") for c in nb["cells"]]
    other = colab.REPOSITORY.replace("OWNER", "someone-else")
    if other != colab.REPOSITORY:  # a new address replaces the old one everywhere
        assert colab.apply_to_notebook(copy, repository=other)
        text = copy.read_text(encoding="utf-8")
        assert colab.REPOSITORY + '"' not in text and other in text


def test_bad_repository_is_refused():
    with pytest.raises(ValueError, match="github.com/<owner>/<repo>"):
        colab.colab_url("00.ipynb", repository="https://example.org/x")


def test_the_snippet_does_nothing_where_bookcode_is_installed():
    """With bookcode importable the snippet prints nothing and never calls pip
    (here ``%pip`` is a magic that fails if it is called)."""
    code = f"""
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
def pip(line):
    raise SystemExit("pip was called")
shell.register_magic_function(pip, "line", "pip")
result = shell.run_cell({colab.install_snippet()!r})
result.raise_error()
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


@pytest.fixture
def colab_like(tmp_path):
    """A Python environment with every dependency of bookcode but not bookcode
    (like Colab): a venv whose only extra path holds links to this
    environment's packages, minus bookcode's."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    packages = Path(sysconfig.get_paths()["purelib"])
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in packages.iterdir():
        if "bookcode" not in entry.name:
            (deps / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "deps.pth").write_text(str(deps) + "\n")
    return python, Path(site)


def _local_repository(tmp_path) -> Path:
    """A git repository with this checkout's package files. Offline, pip
    builds with this environment's setuptools (on Colab it fetches a current
    one); one older than 77 does not read the SPDX form ``license = "MIT"``,
    so the snapshot spells it as a table there."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "README.md", repo / "README.md")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pyproject = re.sub(
            r'^license = "([^"]+)"$', r'license = {text = "\1"}', pyproject, flags=re.MULTILINE
        )
    (repo / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    shutil.copytree(
        ROOT / "bookcode", repo / "bookcode", ignore=shutil.ignore_patterns("__pycache__")
    )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run(git + args, cwd=repo, check=True, capture_output=True, timeout=60)
    return repo


def test_the_snippet_installs_bookcode_offline_where_it_is_missing(colab_like, tmp_path):
    python, site = colab_like
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PIP_", "GIT_", "PYTHON", "VIRTUAL_ENV"))
    }
    missing = subprocess.run(
        [python, "-c", "import bookcode"], capture_output=True, cwd=tmp_path, env=env, check=False
    )
    assert missing.returncode != 0, "bookcode must not be importable before the install"
    repo = _local_repository(tmp_path)
    before = {p.name for p in site.iterdir()}
    env.update(
        # git fetches "the repository" from the local copy; pip has no index at all
        GIT_CONFIG_COUNT="1",
        GIT_CONFIG_KEY_0=f"url.{repo.as_uri()}.insteadOf",
        GIT_CONFIG_VALUE_0=colab.REPOSITORY,
        PIP_NO_INDEX="1",
        PIP_NO_BUILD_ISOLATION="0",  # build with this environment's setuptools
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    code = f"""
from IPython.core.interactiveshell import InteractiveShell
result = InteractiveShell.instance().run_cell({colab.install_snippet()!r})
result.raise_error()
import bookcode, bookcode.notebook
from bookcode.datasets import _files
print(bookcode.__file__)
print(_files.cache_dir())
"""
    out = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith(str(site)), "bookcode was not installed into the environment"
    # datasets are downloaded to the user's cache, not next to the package
    assert lines[-1] == str(tmp_path / "cache" / "bookcode")
    added = {p.name for p in site.iterdir()} - before
    assert {n.split("-")[0] for n in added} == {"bookcode"}, (
        f"installed more than bookcode: {added}"
    )


def test_the_repository_address_is_set():
    if "OWNER" in colab.REPOSITORY:
        pytest.skip(
            f"bookcode.colab.REPOSITORY is a placeholder ({colab.REPOSITORY}): set it to the "
            "published repository and run python -m bookcode.colab chapters/*.ipynb README.md"
        )
    assert colab.REPOSITORY.startswith("https://github.com/")
