"""bookcode: runnable, tested meta-learning for *Hands-On Meta Learning with
Python*, in Keras 3.

Submodules load on first use, so ``import bookcode`` is quick, imports neither
TensorFlow nor matplotlib, changes no process-wide setting, and
``bookcode.episodes``, ``bookcode.datasets``, ``bookcode.nets`` ... just work.
Notebooks call :func:`bookcode.notebook.setup` for seeds and quiet logs.
"""

import importlib

__version__ = "0.1.0"


def __getattr__(name):
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'bookcode' has no attribute {name!r}") from None
