"""Real datasets as :class:`~bookcode.episodes.ClassDataset` objects, and task
families for regression."""

from ._files import ENV_VAR, CorruptDownloadError, DatasetNotFoundError, download_and_extract
from .att_faces import att_faces
from .omniglot import omniglot
from .sinusoids import SineTask, Sinusoids
from .spoken_digits import spoken_digits

__all__ = [
    "ENV_VAR",
    "CorruptDownloadError",
    "DatasetNotFoundError",
    "SineTask",
    "Sinusoids",
    "att_faces",
    "download_and_extract",
    "omniglot",
    "spoken_digits",
]
