"""bookcode: runnable, tested meta-learning for *Hands-On Meta Learning with
Python*, in Keras 3. Import submodules: ``bookcode.datasets``,
``bookcode.episodes``, ``bookcode.nets``, ``bookcode.evaluation``, ..."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
