"""bookcode: runnable, tested meta-learning for *Hands-On Meta Learning with
Python*, in Keras 3.

Submodules load on first use, so ``import bookcode`` is quick and
``bookcode.episodes``, ``bookcode.datasets``, ``bookcode.nets`` ... just work.
"""

import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _import_tensorflow_quietly():
    """Import TensorFlow and find its devices with stderr muted: TensorFlow
    2.16+ prints C++ notices (oneDNN, CUDA probing) before its log level
    applies. Import ``bookcode`` before ``keras`` or ``tensorflow`` to keep
    notebook outputs clean."""
    if "tensorflow" in sys.modules:
        return
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


_import_tensorflow_quietly()

__version__ = "0.1.0"


def __getattr__(name):
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'bookcode' has no attribute {name!r}") from None
