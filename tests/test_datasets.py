"""Dataset loaders on the real data (``$BOOKCODE_DATA``) and the download path
on archives served from this machine."""

import functools
import hashlib
import http.server
import importlib
import io
import os
import threading
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bookcode.datasets import (
    CorruptDownloadError,
    DatasetNotFoundError,
    _files,
    att_faces,
    download_and_extract,
    omniglot,
    spoken_digits,
)
from bookcode.datasets.omniglot import vinyals_split_of

# the module, not the function of the same name that bookcode.datasets exports
omniglot_module = importlib.import_module("bookcode.datasets.omniglot")

DATA = os.environ.get("BOOKCODE_DATA")
needs_data = pytest.mark.skipif(
    not DATA or not Path(DATA, "omniglot").is_dir(), reason="set BOOKCODE_DATA to the datasets"
)


@needs_data
@pytest.mark.parametrize("split, classes", [("train", 4112), ("val", 688), ("test", 1692)])
def test_omniglot_vinyals_split_matches_reference_lists(split, classes):
    ds = omniglot(split)
    reference = Path(DATA, "omniglot/splits/vinyals", f"{split}.txt").read_text().split()
    assert ds.num_classes == classes
    assert ds.class_names == sorted(reference)
    assert ds.x.shape == (classes * 20, 28, 28, 1) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.examples_per_class(), 20)


@needs_data
def test_omniglot_pixels_strokes_are_one_and_rotations_rotate():
    ds = omniglot("test")
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert ds.x.mean() < 0.25  # mostly background (0), strokes are 1
    names = ds.class_names
    base = names.index("Kannada/character01/rot000")
    turned = names.index("Kannada/character01/rot090")
    a = ds.x[ds.indices_of(base)][0, ..., 0]
    b = ds.x[ds.indices_of(turned)][0, ..., 0]
    np.testing.assert_allclose(np.rot90(a), b)


@needs_data
def test_omniglot_background_evaluation_split():
    assert omniglot("background").num_classes == 964
    assert omniglot("evaluation").num_classes == 659
    assert omniglot("background", image_size=14).x.shape[1:] == (14, 14, 1)


def test_vinyals_rule():
    assert vinyals_split_of("Gurmukhi", 41) == "train"
    assert vinyals_split_of("Gurmukhi", 42) == "test"
    assert vinyals_split_of("Hebrew", 3) == "val"
    assert vinyals_split_of("Latin", 3) == "train"
    assert vinyals_split_of("Tengwar", 1) == "test"


def test_omniglot_bad_arguments():
    with pytest.raises(ValueError, match="unknown Omniglot split 'training'"):
        omniglot("training")
    with pytest.raises(ValueError, match="image_size"):
        omniglot("train", image_size=0)


@needs_data
def test_att_faces_split_by_subject():
    train, test = att_faces("train"), att_faces("test")
    assert train.num_classes == 30 and test.num_classes == 10
    assert train.x.shape == (300, 112, 92, 1) and test.x.shape == (100, 112, 92, 1)
    assert not set(train.class_names) & set(test.class_names)
    assert att_faces("all", image_size=(56, 46)).x.shape == (400, 56, 46, 1)
    with pytest.raises(ValueError, match="unknown split"):
        att_faces("validation")


@needs_data
def test_spoken_digits_grouping_and_metadata():
    by_digit = spoken_digits()
    assert by_digit.x.shape == (3000, 8000) and by_digit.num_classes == 10
    np.testing.assert_array_equal(by_digit.examples_per_class(), 300)
    by_speaker = spoken_digits(group_by="speaker")
    np.testing.assert_array_equal(by_speaker.examples_per_class(), 500)
    assert np.abs(by_digit.x).max() <= 1.0 and np.abs(by_digit.x).max() > 0.1
    unseen = by_digit.where(by_digit.metadata["digit"] >= 6)
    assert unseen.class_names == ["6", "7", "8", "9"]
    with pytest.raises(ValueError, match="group_by"):
        spoken_digits(group_by="take")


# --- the download path, served from 127.0.0.1 -------------------------------


def make_zip(files: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return buffer.getvalue()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_good_archive(server, tmp_path):
    root, url = server
    payload = make_zip({"wrap/a.txt": "hello", "wrap/sub/b.txt": "world"})
    (root / "good.zip").write_bytes(payload)
    target = tmp_path / "cache" / "thing"
    md5 = hashlib.md5(payload).hexdigest()
    download_and_extract(f"{url}/good.zip", target, md5=md5, strip="wrap")
    assert (target / "a.txt").read_text() == "hello"
    assert (target / "sub/b.txt").read_text() == "world"
    assert sorted(p.name for p in target.parent.iterdir()) == ["thing"]  # no leftovers


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path):
    root, url = server
    (root / "good.zip").write_bytes(make_zip({"a.txt": "x"}))
    target = tmp_path / "cache" / "thing"
    with pytest.raises(CorruptDownloadError, match="checksum mismatch"):
        download_and_extract(f"{url}/good.zip", target, md5="0" * 32)
    assert list(target.parent.iterdir()) == []


def test_download_corrupt_archive_leaves_nothing(server, tmp_path):
    root, url = server
    (root / "bad.zip").write_bytes(make_zip({"a.txt": "x" * 1000})[:-40])  # truncated
    target = tmp_path / "cache" / "thing"
    with pytest.raises(CorruptDownloadError, match="corrupt or partial"):
        download_and_extract(f"{url}/bad.zip", target)
    assert list(target.parent.iterdir()) == []


def test_no_network_and_no_copy_says_where_to_put_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(_files.urllib.request, "urlopen", offline)
    monkeypatch.setenv(_files.ENV_VAR, str(tmp_path / "empty"))
    monkeypatch.setattr(_files, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(omniglot_module, "cache_dir", lambda: tmp_path / "cache")
    with pytest.raises(DatasetNotFoundError, match="BOOKCODE_DATA") as error:
        omniglot("background", data_dir=tmp_path / "nowhere", image_size=27)
    assert "omniglot/images_background" in str(error.value)
    assert not (tmp_path / "cache" / "omniglot" / "images_background").exists()


def test_omniglot_downloads_into_cache_when_missing(server, tmp_path, monkeypatch):
    """The whole path: canonical URL (here a local server) -> checksum -> extract -> load."""
    from PIL import Image

    root, url = server
    files = {}
    for c in (1, 2):
        for d in range(1, 21):
            img = Image.new("1", (105, 105), 1)
            img.putpixel((50, 50 + c), 0)
            png = io.BytesIO()
            img.save(png, format="PNG")
            files[f"images_background/Latin/character0{c}/{c:02d}_{d:02d}.png"] = png.getvalue()
    payload = make_zip(files)
    (root / "images_background.zip").write_bytes(payload)
    module = omniglot_module
    monkeypatch.setitem(
        module.URLS,
        "background",
        (f"{url}/images_background.zip", hashlib.md5(payload).hexdigest()),
    )
    monkeypatch.delenv(_files.ENV_VAR, raising=False)
    monkeypatch.setattr(module, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(module, "find", lambda relative, data_dir: None)
    ds = omniglot("background", image_size=8)
    assert ds.class_names == ["Latin/character01", "Latin/character02"]
    assert ds.x.shape == (40, 8, 8, 1) and ds.x.max() > 0
    assert (tmp_path / "cache/processed/omniglot_background_8.npz").exists()
    assert omniglot("background", image_size=8).num_classes == 2  # second load from cache
