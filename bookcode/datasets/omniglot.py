"""Omniglot (Lake et al. 2015): 1623 handwritten characters from 50 alphabets,
20 drawings each.

Splits:

- ``"train" | "val" | "test" | "trainval"``: the split of Vinyals et al. (2016)
  as used by Snell et al. (2017): 1028 / 172 / 423 characters, each rotation by
  0, 90, 180 and 270 degrees its own class (4112 / 688 / 1692 classes).
- ``"background" | "evaluation"``: Lake's original split, 964 / 659
  characters from 30 / 20 alphabets, without rotations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..episodes import ClassDataset
from ._files import (
    ENV_VAR,
    DatasetNotFoundError,
    atomic_save_npz,
    cache_dir,
    download_and_extract,
    find,
)

URLS = {
    "background": (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip",
        "68d2efa1b9178cc56df9314c21c6e718",
    ),
    "evaluation": (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip",
        "6b91aef0f799c5bb55b94e3f2daec811",
    ),
}

# The Vinyals split is a split by alphabet, except Gurmukhi, whose characters
# 1-41 are training and 42-45 test characters.
VINYALS_VAL_ALPHABETS = (
    "Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)",
)  # fmt: skip
VINYALS_TEST_ALPHABETS = (
    "Gurmukhi", "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian",
    "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar",
    "Tibetan", "ULOG",
)  # fmt: skip
GURMUKHI_FIRST_TEST_CHARACTER = 42
ROTATIONS = (0, 90, 180, 270)
SPLITS = ("train", "val", "test", "trainval", "background", "evaluation")


def vinyals_split_of(alphabet: str, character: int) -> str:
    """Which part of the Vinyals split a character belongs to: train, val or test."""
    if alphabet == "Gurmukhi":
        return "test" if character >= GURMUKHI_FIRST_TEST_CHARACTER else "train"
    if alphabet in VINYALS_TEST_ALPHABETS:
        return "test"
    if alphabet in VINYALS_VAL_ALPHABETS:
        return "val"
    return "train"


def _folder(part: str, data_dir) -> Path:
    relative = f"omniglot/images_{part}"
    found = find(relative, data_dir)
    if found is not None:
        return found
    url, md5 = URLS[part]
    try:
        return download_and_extract(url, cache_dir() / relative, md5=md5, strip=f"images_{part}")
    except DatasetNotFoundError as error:
        raise DatasetNotFoundError(
            f"Omniglot images_{part} not found and not downloadable: {error}\n"
            f"Expected the folder <dir>/omniglot/images_{part}/<Alphabet>/characterNN/*.png "
            f"with <dir> given by data_dir= or ${ENV_VAR}."
        ) from error


def _load_part(part: str, image_size: int, data_dir) -> tuple[np.ndarray, list[str]]:
    """All characters of one original part as uint8 (chars, 20, size, size), strokes 255."""
    cache = cache_dir() / "processed" / f"omniglot_{part}_{image_size}.npz"
    if cache.exists():
        with np.load(cache) as stored:
            return stored["images"], stored["names"].tolist()
    from PIL import Image

    folder = _folder(part, data_dir)
    names, images = [], []
    for character_dir in sorted(folder.glob("*/character*")):
        files = sorted(character_dir.glob("*.png"))
        if len(files) != 20:
            raise ValueError(
                f"{character_dir} has {len(files)} drawings instead of 20: the copy of "
                "Omniglot is incomplete; delete it and download again"
            )
        drawings = []
        for f in files:
            with Image.open(f) as img:
                grey = img.convert("L").resize((image_size, image_size), Image.LANCZOS)
            drawings.append(255 - np.asarray(grey))
        names.append(f"{character_dir.parent.name}/{character_dir.name}")
        images.append(np.stack(drawings))
    if not names:
        raise DatasetNotFoundError(f"{folder} holds no Omniglot characters")
    images = np.stack(images)
    atomic_save_npz(cache, images=images, names=np.array(names))
    return images, names


def omniglot(split: str = "train", image_size: int = 28, data_dir=None) -> ClassDataset:
    """Omniglot as a :class:`ClassDataset` of float32 images (N, size, size, 1),
    strokes 1 and background 0.

    The first call decodes the PNG files (or downloads them) and caches the
    resized arrays, so later calls take about a second.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown Omniglot split {split!r}; choose one of {SPLITS}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if split in ("background", "evaluation"):
        images, names = _load_part(split, image_size, data_dir)
        classes = [(i, name, 0) for i, name in enumerate(names)]
        source = images
    else:
        wanted = ("train", "val") if split == "trainval" else (split,)
        parts = [_load_part(p, image_size, data_dir) for p in ("background", "evaluation")]
        source = np.concatenate([p[0] for p in parts])
        all_names = parts[0][1] + parts[1][1]
        classes = []
        for i, name in enumerate(all_names):
            alphabet, character = name.split("/")
            if vinyals_split_of(alphabet, int(character.removeprefix("character"))) in wanted:
                classes += [(i, f"{name}/rot{r:03d}", r) for r in ROTATIONS]
        classes.sort(key=lambda c: c[1])
    x = np.empty((len(classes) * 20, image_size, image_size, 1), np.float32)
    for j, (i, _, rotation) in enumerate(classes):
        drawings = np.rot90(source[i], k=rotation // 90, axes=(1, 2))
        x[j * 20 : (j + 1) * 20, ..., 0] = drawings / np.float32(255)
    y = np.repeat(np.arange(len(classes)), 20)
    return ClassDataset(x=x, y=y, class_names=[c[1] for c in classes])
