"""Where datasets live, and one helper that downloads, verifies and extracts.

Data is looked for, in order: an explicit ``data_dir=``, the folder named by
the environment variable ``BOOKCODE_DATA``, and the project's cache (``data/``
in a checkout of the project, else ``~/.cache/bookcode``). If none has it, it
is downloaded from its canonical URL into the cache, checked, and extracted
atomically (into a temporary folder that is renamed into place at the end), so
an interrupted or corrupt download never leaves a half-written dataset.
Processed arrays (``.npz``) are written to the cache only, never next to the
source files, which may be read-only or shared.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

ENV_VAR = "BOOKCODE_DATA"


class DatasetNotFoundError(FileNotFoundError):
    """No local copy of a dataset, and it could not be downloaded."""


class CorruptDownloadError(ValueError):
    """A downloaded archive failed its checksum or could not be extracted."""


def cache_dir() -> Path:
    """The folder for downloads and processed arrays (created if needed)."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").exists() and (checkout / "data").is_dir():
        path = checkout / "data"
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bookcode"
    path.mkdir(parents=True, exist_ok=True)
    return path


def search_dirs(data_dir=None) -> list[Path]:
    """The folders to look in, in order of preference."""
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    dirs.append(cache_dir())
    return dirs


def find(relative: str, data_dir=None) -> Path | None:
    """The first existing ``<dir>/<relative>`` among :func:`search_dirs`, or None."""
    for base in search_dirs(data_dir):
        candidate = base / relative
        if candidate.exists():
            return candidate
    return None


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_and_extract(url: str, target: Path, md5: str | None = None, strip: str = "") -> Path:
    """Download the archive at ``url`` and extract it so that it becomes ``target``.

    ``strip`` names a top-level folder inside the archive whose contents are
    what ``target`` should hold (for archives that wrap everything in one
    folder). The archive is checked against ``md5`` when given. On any failure
    nothing is left behind and a clear error is raised.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        archive = Path(tmp) / "archive"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except (urllib.error.URLError, OSError) as error:
            raise DatasetNotFoundError(
                f"could not download {url} ({error}).\n"
                f"Without a network, put an extracted copy at {target} or in a folder "
                f"named by the environment variable {ENV_VAR} (or pass data_dir=)."
            ) from error
        if md5 is not None:
            actual = md5sum(archive)
            if actual != md5:
                raise CorruptDownloadError(
                    f"checksum mismatch for {url}: expected md5 {md5}, got {actual}. "
                    "The download was removed; try again, or place a good copy by hand."
                )
        extracted = Path(tmp) / "extracted"
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z:
                    z.extractall(extracted)
            else:
                with tarfile.open(archive) as t:
                    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                    t.extractall(extracted, **safe)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
            raise CorruptDownloadError(
                f"the archive from {url} is corrupt or partial ({error}). "
                "It was removed; try again."
            ) from error
        source = extracted / strip if strip else extracted
        if not source.is_dir():
            raise CorruptDownloadError(f"the archive from {url} has no folder {strip!r}")
        if target.exists():  # another process finished first
            return target
        os.replace(source, target)
    return target


def atomic_save_npz(path: Path, **arrays) -> None:
    """Write an ``.npz`` file atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            import numpy as np

            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
