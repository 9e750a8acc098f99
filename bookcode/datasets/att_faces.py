"""The AT&T (ORL) face database (Samaria & Harter 1994): 40 subjects, 10 grey
images each, 112 x 92 pixels. Credit: Olivetti Research Laboratory."""

from __future__ import annotations

import numpy as np

from ..episodes import ClassDataset
from ._files import ENV_VAR, DatasetNotFoundError, cache_dir, download_and_extract, find

URL = "http://www.cl.cam.ac.uk/Research/DTG/attarchive/pub/data/att_faces.zip"
NUM_SUBJECTS = 40
SPLITS = ("all", "train", "test")


def _folder(data_dir):
    found = find("att_faces", data_dir)
    if found is not None:
        return found
    try:
        # No checksum is published for this archive; the contents are checked below.
        return download_and_extract(URL, cache_dir() / "att_faces")
    except DatasetNotFoundError as error:
        raise DatasetNotFoundError(
            f"AT&T faces not found and not downloadable: {error}\n"
            f"Expected <dir>/att_faces/s1..s40/1..10.pgm with <dir> given by data_dir= "
            f"or ${ENV_VAR}."
        ) from error


def att_faces(split: str = "all", num_train_subjects: int = 30, image_size=None, data_dir=None):
    """AT&T faces as a :class:`ClassDataset` of float32 images (N, H, W, 1) in [0, 1].

    The split is by subject: ``"train"`` holds subjects s1..s<num_train_subjects>,
    ``"test"`` the others, so test faces belong to people never seen in
    training. ``image_size=(H, W)`` resizes (the originals are 112 x 92).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if not 0 < num_train_subjects < NUM_SUBJECTS:
        raise ValueError(f"num_train_subjects must be in 1..{NUM_SUBJECTS - 1}")
    from PIL import Image

    folder = _folder(data_dir)
    subjects = {
        "all": range(1, NUM_SUBJECTS + 1),
        "train": range(1, num_train_subjects + 1),
        "test": range(num_train_subjects + 1, NUM_SUBJECTS + 1),
    }[split]
    images, labels = [], []
    for label, subject in enumerate(subjects):
        for take in range(1, 11):
            path = folder / f"s{subject}" / f"{take}.pgm"
            if not path.exists():
                raise DatasetNotFoundError(f"{path} is missing: the AT&T faces copy is incomplete")
            with Image.open(path) as img:
                img = img.convert("L")
                if image_size is not None:
                    img = img.resize((image_size[1], image_size[0]), Image.LANCZOS)
                images.append(np.asarray(img, np.float32) / 255)
            labels.append(label)
    x = np.stack(images)[..., None]
    return ClassDataset(x=x, y=np.array(labels), class_names=[f"s{s}" for s in subjects])
