"""Set-up shared by the chapter notebooks: seeds, quiet logs, plot defaults,
and the run profile.

The profile is ``quick`` (default: every notebook runs in at most 5 minutes on
a 2-core CPU) or ``full`` (the papers' settings, meant for a GPU), chosen by
the environment variable ``BOOKCODE_PROFILE``.
"""

from __future__ import annotations

import logging
import os
import random
import warnings

PROFILE_VAR = "BOOKCODE_PROFILE"
PROFILES = ("quick", "full")


def profile() -> str:
    """The run profile from ``$BOOKCODE_PROFILE``: ``"quick"`` (default) or ``"full"``."""
    value = os.environ.get(PROFILE_VAR, "quick").strip().lower() or "quick"
    if value not in PROFILES:
        raise ValueError(f"{PROFILE_VAR}={value!r}; choose one of {PROFILES}")
    return value


def by_profile(quick, full):
    """``quick`` in the quick profile, ``full`` in the full one."""
    return full if profile() == "full" else quick


def setup(seed: int = 0) -> str:
    """Seed Python, NumPy and Keras, silence TensorFlow's logs, set plot
    defaults; returns the profile. Call it at the top of every notebook."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="keras")
    import keras
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    try:
        import matplotlib.pyplot as plt

        plt.rcParams.update(
            {"figure.figsize": (6, 3.5), "figure.dpi": 80, "axes.grid": True, "font.size": 10}
        )
    except ImportError:
        pass
    return profile()
