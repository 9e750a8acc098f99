"""Set-up shared by the chapter notebooks: seeds, repeatable runs, quiet logs,
precision, plot defaults, the run profile, and recorded checks.

Environment variables (all optional):

- ``BOOKCODE_PROFILE``: ``quick`` (default: every notebook runs in at most 5
  minutes on a 2-core CPU) or ``full`` (the papers' settings, meant for a GPU).
- ``BOOKCODE_SEED``: overrides the seed a notebook passes to :func:`setup`.
- ``BOOKCODE_PRECISION``: ``float32`` (default: the precision the stored
  notebooks were executed in, so a run reproduces them on any CPU) or
  ``bfloat16`` (mixed precision; faster on CPUs with AVX512-BF16 or AMX, where
  :func:`setup` says so, with other numbers).
- ``BOOKCODE_DETERMINISTIC``: ``0`` skips op determinism (on by default).
- ``BOOKCODE_CHECKS``: a file to which :func:`check` appends one JSON line per
  checked quantity (``benchmarks/multirun.py`` reads it).
- ``TF_ENABLE_ONEDNN_OPTS``: TensorFlow's own switch for its oneDNN CPU kernels.
  :func:`setup` sets it to ``1`` on x86-64 when it is unset and TensorFlow is
  not yet imported: TensorFlow 2.21 turns oneDNN on by itself only on CPUs
  with AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX, and without it a Conv-4
  episode costs about twice the CPU time on an AVX2-only CPU
  (``benchmarks/RESULTS.md``). ``0`` keeps TensorFlow's Eigen kernels.
- ``BOOKCODE_DISTRIBUTE``: ``1`` trains on every visible GPU when there are
  several (``tf.distribute.MirroredStrategy``, see :mod:`bookcode.distribute`;
  learners then need meta-batches, ``tf_dataset(batch_size=...)``), ``0`` on
  one. Unset: on in the ``full`` profile of a notebook whose learners all
  train on meta-batches (``setup(meta_batches=True)``), off otherwise;
  :func:`setup` says which.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import re
import sys
import tempfile
import warnings

PROFILE_VAR = "BOOKCODE_PROFILE"
PROFILES = ("quick", "full")
SEED_VAR = "BOOKCODE_SEED"
PRECISION_VAR = "BOOKCODE_PRECISION"
DETERMINISTIC_VAR = "BOOKCODE_DETERMINISTIC"
CHECKS_VAR = "BOOKCODE_CHECKS"
ONEDNN_VAR = "TF_ENABLE_ONEDNN_OPTS"
DISTRIBUTE_VAR = "BOOKCODE_DISTRIBUTE"

# Lines TensorFlow 2.21 writes to stderr while it is imported on a machine
# without CUDA, whatever TF_CPP_MIN_LOG_LEVEL says (they come before absl
# logging is initialised; tensorflow/tensorflow#100442). Only these are dropped;
# any other line (a failed CUDA library load, a cuDNN mismatch) is shown.
_HARMLESS_IMPORT_LINES = (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called",
    r"cudart_stub\.cc.*\] Could not find cuda drivers on your machine",
    r"cpu_feature_guard\.cc.*\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .* rebuild TensorFlow",
    r"port\.cc.*\] oneDNN custom operations are on",  # setup()'s line says so
)
# cuInit fails when no NVIDIA driver is installed at all; only then it is noise.
_NO_DRIVER = re.compile(r"cudart_stub\.cc.*Could not find cuda drivers")
_CUINIT_FAILED = re.compile(r"cuda_platform\.cc.*failed call to cuInit")


def profile() -> str:
    """The run profile from ``$BOOKCODE_PROFILE``: ``"quick"`` (default) or ``"full"``."""
    value = os.environ.get(PROFILE_VAR, "quick").strip().lower() or "quick"
    if value not in PROFILES:
        raise ValueError(f"{PROFILE_VAR}={value!r}; choose one of {PROFILES}")
    return value


def by_profile(quick, full):
    """``quick`` in the quick profile, ``full`` in the full one."""
    return full if profile() == "full" else quick


_seed_offset = 0


def seeded(n: int) -> int:
    """A notebook's own seed ``n`` for a later cell (``set_random_seed``, a
    sampler's ``seed=``), moved by ``$BOOKCODE_SEED`` as much as the seed of
    :func:`setup`: unchanged in a normal run, different in every cell of a
    run with another seed, so that ``benchmarks/multirun.py`` varies every
    random choice of the notebook, not only the first."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"seeded() takes a non-negative integer, got {n!r}")
    return (n + _seed_offset) % 2**31


def setup(seed: int = 0, meta_batches: bool = False) -> str:
    """Prepare a chapter notebook; returns the profile (``"quick"`` or ``"full"``).

    ``meta_batches=True`` says that every ``fit()`` of the notebook takes
    meta-batches (or plain batches): then the ``full`` profile trains on
    every visible GPU when there are several (``$BOOKCODE_DISTRIBUTE``,
    above).

    Seeds Python, NumPy and Keras (``$BOOKCODE_SEED`` overrides ``seed``),
    turns on TensorFlow's op determinism so that a run repeats exactly on one
    machine (``BOOKCODE_DETERMINISTIC=0`` turns it off), sets the Keras dtype
    policy to float32, or to mixed bfloat16 when ``$BOOKCODE_PRECISION`` asks
    for it (:func:`bookcode.nets.fast_precision`),
    asks for TensorFlow's oneDNN CPU kernels (``$TF_ENABLE_ONEDNN_OPTS``,
    above), sets readable plot defaults, and prints one line: profile, seed,
    device, precision and whether oneDNN is on.

    Logs: the notebook's first code cell sets ``TF_CPP_MIN_LOG_LEVEL`` and
    calls ``setup()`` before anything imports TensorFlow or Keras::

        import os

        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # TensorFlow's C++ errors only

        import bookcode.notebook

        profile = bookcode.notebook.setup(seed=3)  # before importing keras

    TensorFlow 2.21 prints a few notices at import that the log level does not
    reach (no CUDA driver, CPU instruction sets); ``setup()`` imports
    TensorFlow itself and drops exactly those lines, showing any other. It sets
    the ``tensorflow`` and ``absl`` Python loggers to ERROR and filters one
    known-harmless Keras warning; all other warnings are shown.
    """
    value = os.environ.get(SEED_VAR, "").strip()
    if value and not value.isdigit():
        raise ValueError(f"{SEED_VAR}={value!r}; expected a non-negative integer")
    global _seed_offset
    _seed_offset = int(value) - seed if value else 0
    seed = int(value or seed)
    _prefer_onednn()
    _import_tensorflow()
    import keras
    import numpy as np
    import tensorflow as tf

    from bookcode import nets

    tf.get_logger().setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    # fit() passes shuffle=True by default; our episode datasets are already
    # random, so Keras's note that it ignores the flag for a tf.data.Dataset is noise.
    warnings.filterwarnings("ignore", message=r"`shuffle=True` was passed, but will be ignored")
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    deterministic = os.environ.get(DETERMINISTIC_VAR, "1").strip() not in ("0", "false", "no")
    _set_op_determinism(deterministic)
    precision, hint = _precision(nets)
    keras.mixed_precision.set_global_policy(precision)
    _plot_defaults()
    print(
        f"bookcode: profile {profile()}, seed {seed}, {device_name()}, precision {precision}"
        + hint
        + f", oneDNN {'on' if nets.onednn_enabled() else 'off'}"
        + ("" if deterministic else ", op determinism off")
        + _distribution(meta_batches)
    )
    return profile()


def _precision(nets) -> tuple[str, str]:
    """The dtype policy for a notebook and a note for :func:`setup`'s line:
    float32 unless ``$BOOKCODE_PRECISION`` chooses, because bfloat16 changes
    the results (a notebook's stored outputs and thresholds are float32 runs);
    the note says when this CPU would train faster in bfloat16."""
    if os.environ.get(PRECISION_VAR):
        return nets.fast_precision(), ""
    if nets.fast_precision() == "mixed_bfloat16":
        return "float32", f" ({PRECISION_VAR}=bfloat16 trains faster on this CPU)"
    return "float32", ""


def _distribution(meta_batches: bool = False) -> str:
    """Install ``MirroredStrategy`` over the visible GPUs when there are several
    and ``$BOOKCODE_DISTRIBUTE`` is 1, or is unset in the full profile of a
    notebook that trains on meta-batches; the note for :func:`setup`'s line."""
    import tensorflow as tf

    from bookcode import distribute

    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) < 2:
        return ""
    setting = os.environ.get(DISTRIBUTE_VAR, "").strip().lower()
    wanted = setting in ("1", "true", "yes") if setting else meta_batches and profile() == "full"
    if not wanted:
        return f"; {DISTRIBUTE_VAR}=1 trains on all {len(gpus)} GPUs"
    strategy = distribute.strategy()
    tf.distribute.experimental_set_strategy(strategy)
    return f", MirroredStrategy over {strategy.num_replicas_in_sync} GPUs"


def device_name() -> str:
    """The device TensorFlow computes on: the GPU's name, or the CPU model."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        name = details.get("device_name", gpus[0].name)
        return f"GPU {name}" + (f" (+{len(gpus) - 1} more)" if len(gpus) > 1 else "")
    return f"CPU {_cpu_model()} ({os.cpu_count()} cores, TensorFlow sees no GPU)"


def check(name: str, value, *, at_least=None, at_most=None) -> float:
    """Assert ``at_least <= value <= at_most`` (either bound optional) and
    record ``name=value``; returns the value as a float.

    ``value`` is a number, a scalar array or tensor, or an
    :class:`~bookcode.evaluation.EvaluationResult` (its mean is checked).
    With ``$BOOKCODE_CHECKS`` set, appends one JSON line to that file whether
    the check passes or not. Prints nothing; a failure raises AssertionError
    naming the quantity.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"check() needs a non-empty name, got {name!r}")
    if at_least is None and at_most is None:
        raise ValueError(f"check({name!r}) needs at_least= or at_most=")
    if hasattr(value, "ci95"):
        value = value.mean
    value = float(value)
    failed = []
    if math.isnan(value):
        failed.append("is NaN")
    if at_least is not None and not value >= at_least:
        failed.append(f"is below the required {at_least:g}")
    if at_most is not None and not value <= at_most:
        failed.append(f"is above the allowed {at_most:g}")
    path = os.environ.get(CHECKS_VAR)
    if path:
        record = {"name": name, "value": value, "at_least": at_least, "at_most": at_most}
        with open(path, "a") as f:
            f.write(json.dumps({**record, "passed": not failed}) + "\n")
    if failed:
        raise AssertionError(f"{name} = {value:.4g} " + " and ".join(failed))
    return value


def _prefer_onednn():
    """Ask TensorFlow for its oneDNN CPU kernels (``$TF_ENABLE_ONEDNN_OPTS``,
    read once when TensorFlow is imported) unless the user chose, TensorFlow
    is already imported, or the CPU is not x86-64."""
    if "tensorflow" not in sys.modules and platform.machine().lower() in ("x86_64", "amd64"):
        os.environ.setdefault(ONEDNN_VAR, "1")


def _import_tensorflow():
    """Import TensorFlow, hiding only the known-harmless notices it writes to
    stderr (file descriptor 2) at import; other lines are written back."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:  # also when the import fails: its messages are shown
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = _unexpected_import_lines(captured.read().decode(errors="replace"))
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def _unexpected_import_lines(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.strip()]
    no_driver = any(_NO_DRIVER.search(line) for line in lines)
    return [
        line
        for line in lines
        if not any(re.search(p, line) for p in _HARMLESS_IMPORT_LINES)
        and not (no_driver and _CUINIT_FAILED.search(line))
    ]


def _set_op_determinism(enabled: bool):
    import tensorflow as tf
    from tensorflow.python.framework import config

    if enabled:
        tf.config.experimental.enable_op_determinism()
    elif config.is_op_determinism_enabled():
        config.disable_op_determinism()  # no public API; setup() may be called again


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _plot_defaults():
    """Readable figures: 100 dpi, 10 pt text, no grid lines (so none on images;
    :mod:`bookcode.plotting` adds a light grid to curves)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return
    plt.rcParams.update(
        {
            "figure.figsize": (6, 3.5),
            "figure.dpi": 100,
            "savefig.dpi": 100,
            "font.size": 10,
            "axes.grid": False,
        }
    )
