"""The Free Spoken Digit Dataset (Jackson et al., v1.0.10): 3000 recordings of
the digits 0-9 by 6 speakers, 50 takes each, 8 kHz mono. CC BY-SA 4.0."""

from __future__ import annotations

import wave

import numpy as np

from ..episodes import ClassDataset
from ._files import ENV_VAR, DatasetNotFoundError, cache_dir, download_and_extract, find

URL = "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/v1.0.10.tar.gz"
SAMPLE_RATE = 8000
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
GROUPS = ("digit", "speaker")


def _recordings(data_dir):
    found = find("fsdd/recordings", data_dir)
    if found is not None:
        return found
    try:
        # No checksum is published for this archive; the contents are checked below.
        root = download_and_extract(
            URL, cache_dir() / "fsdd", strip="free-spoken-digit-dataset-1.0.10"
        )
    except DatasetNotFoundError as error:
        raise DatasetNotFoundError(
            f"Free Spoken Digit Dataset not found and not downloadable: {error}\n"
            f"Expected <dir>/fsdd/recordings/<digit>_<speaker>_<take>.wav with <dir> given "
            f"by data_dir= or ${ENV_VAR}."
        ) from error
    return root / "recordings"


def read_wav(path) -> np.ndarray:
    """A 16-bit PCM mono WAV file as float32 samples in [-1, 1]."""
    with wave.open(str(path)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono PCM")
        frames = w.readframes(w.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768


def spoken_digits(group_by: str = "digit", length: int = SAMPLE_RATE, data_dir=None):
    """FSDD as a :class:`ClassDataset` of waveforms (N, length), float32.

    Recordings are cut or zero-padded at the end to ``length`` samples (8000 is
    one second; 99% of recordings are shorter). Classes are digits
    (``group_by="digit"``, names ``"0".."9"``) or speakers (``"speaker"``).
    ``metadata`` has ``digit``, ``speaker`` (index into :data:`SPEAKERS`) and
    ``take`` for every recording, for splits such as unseen speakers
    (``dataset.where(...)``). Takes 0-4 are the dataset's official test set.
    """
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {GROUPS}, got {group_by!r}")
    folder = _recordings(data_dir)
    files = sorted(folder.glob("*.wav"))
    if not files:
        raise DatasetNotFoundError(f"{folder} holds no .wav recordings")
    x = np.zeros((len(files), length), np.float32)
    digit, speaker, take = (np.empty(len(files), np.int64) for _ in range(3))
    for i, path in enumerate(files):
        d, s, t = path.stem.split("_")
        samples = read_wav(path)[:length]
        x[i, : len(samples)] = samples
        digit[i], speaker[i], take[i] = int(d), SPEAKERS.index(s), int(t)
    meta = {"digit": digit, "speaker": speaker, "take": take}
    if group_by == "digit":
        return ClassDataset(x, digit, [str(d) for d in range(10)], meta)
    return ClassDataset(x, speaker, list(SPEAKERS), meta)
