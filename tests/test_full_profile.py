"""The full profile cannot rot unnoticed.

CI runs the notebooks in the quick profile only. Every value a chapter's
``parameters`` cell sets differently in the ``full`` profile is read here
(the cell is evaluated under both profiles) and must be classified in
``FULL_ONLY`` as one of:

- ``count``: how many times the same code runs (iterations, episodes,
  epochs, evaluation sizes), or a learning rate: nothing new is built;
- ``batch``: more tasks, queries or problems per step: the same code on
  larger tensors;
- a test of this file (``test_...``) that builds the full-profile
  configuration (more filters, more inner steps, more queries) and runs a
  step or two of it on CPU at tiny scale (small meta-batches, random images);
- ``notebook``: a code path inside the notebook itself (a phase skipped, a
  layer left trainable) that only running the notebook in the full profile
  exercises: listed, so that it is a known gap and not a surprise.

A new full-profile value fails ``test_every_full_profile_value_is_classified``
until it is classified, and a ``count`` of zero (a phase switched off) must be
``notebook``.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
from pathlib import Path

import numpy as np
import pytest

import bookcode
import bookcode.notebook

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))

COUNT, BATCH, NOTEBOOK = "count", "batch", "notebook"
FULL_ONLY = {
    "00_getting_started": {"num_test_episodes": COUNT, "train_steps": COUNT},
    "01_introduction": {
        "QUAD_BATCH": BATCH,
        "QUAD_META_STEPS": COUNT,
        "MLP_META_STEPS": COUNT,
        "MLP_TASKS_PER_STEP": BATCH,
        "FILTERS": "test_meta_lstm_full_configuration",
        "INNER_STEPS": "test_meta_lstm_full_configuration",
        "FROZEN_BLOCKS": NOTEBOOK,  # 0: the notebook freezes no pretrained block
        "PRETRAIN_CLASSES": COUNT,
        "PRETRAIN_EPOCHS": COUNT,
        "META_ITERATIONS": COUNT,
        "EVAL_EPISODES": COUNT,
    },
    "02_siamese_networks": {
        "face_steps": COUNT,
        "face_classifier_steps": COUNT,
        "koch_steps": COUNT,
        "omniglot_steps": COUNT,
        "eval_episodes": COUNT,
        "eval_pairs": COUNT,
    },
    "03_prototypical_networks": {
        "num_episodes": COUNT,
        "episodes_per_epoch": COUNT,
        "num_val_episodes": COUNT,
        "test_episodes": COUNT,
        "test_queries": BATCH,
        "variant_episodes": COUNT,
        "variant_test_episodes": COUNT,
    },
    "04_relation_and_matching_networks": {
        "relation_episodes": COUNT,
        "relation_halve_every": NOTEBOOK,  # the notebook's adam(): staircase halving, quick: linear decay
        "matching_episodes": COUNT,
        "baseline_episodes": COUNT,
        "episodes_per_epoch": COUNT,
        "num_val_episodes": COUNT,
        "num_test_episodes": COUNT,
        "num_test_episodes_5shot": COUNT,
        "test_queries": BATCH,
    },
    "06_maml_adml_caml": {
        "sine_iterations": COUNT,
        "sine_test_tasks": COUNT,
        "train_queries": "test_maml_omniglot_full_configuration",
        "filters": "test_maml_omniglot_full_configuration",
        "omni_meta_batch": BATCH,
        "omni_meta_lr": COUNT,
        "first_order_iterations": NOTEBOOK,  # 0: the first-order warm-up is skipped
        "second_order_iterations": COUNT,
        "test_inner_steps": "test_maml_omniglot_full_configuration",
        "test_episodes": COUNT,
        "adml_iterations": COUNT,
        "adversarial_episodes": COUNT,
    },
    "05_memory_augmented_networks": {
        "train_lengths": "test_memory_full_configuration",
        "controller_units": "test_memory_full_configuration",
        "memory_width": "test_memory_full_configuration",
        "train_slots": "test_memory_full_configuration",
        "copy_lr": COUNT,
        "copy_steps": COUNT,
        "copy_eval_every": COUNT,
        "copy_patience": COUNT,
        "copy_test_sequences": COUNT,
        "encoder_episodes": COUNT,
        "mann_train_classes": COUNT,
        "mann_test_classes": COUNT,
        "mann_units": "test_memory_full_configuration",
        "mann_heads": "test_memory_full_configuration",
        "mann_slots": "test_memory_full_configuration",
        "mann_width": "test_memory_full_configuration",
        "mann_lr": COUNT,
        "mann_steps": COUNT,
        "mann_eval_every": COUNT,
        "mann_test_sequences": COUNT,
    },
    "06b_meta_learning_for_control": {
        "hidden": "test_maml_rl_full_configuration",
        "rl_iterations": COUNT,
        "test_goal_count": COUNT,
        "im_iterations": COUNT,
        "im_test_goal_count": COUNT,
    },
    "07_meta_sgd_and_reptile": {
        "sine_iterations": COUNT,
        "sine_test_tasks": COUNT,
        "filters": "test_maml_omniglot_full_configuration",
        "omni_meta_batch": BATCH,
        "omni_iterations": COUNT,
        "omni_meta_lr": COUNT,
        "msgd_rate_range": COUNT,  # Meta-SGD's initial inner rates: learning rates
        "train_queries": "test_maml_omniglot_full_configuration",
        "reptile_meta_batch": BATCH,  # the paper's 5 tasks per meta-step (quick: 10)
        "reptile_iterations": COUNT,
        "reptile_inner_optimizer": "test_reptile_omniglot_full_configuration",
        "reptile_inner_lr": COUNT,
        "reptile_test_lr": COUNT,
        "test_episodes": COUNT,
        "val_episodes": COUNT,
    },
    "09_recent_advances": {
        "cactus_steps": COUNT,
        "contrastive_steps": COUNT,
        "oracle_steps": COUNT,
        "partitions": COUNT,  # more k-means partitions of the same embedding
        "omni_iterations": COUNT,
        "sine_iterations": COUNT,
        "sine_test_tasks": COUNT,
        "test_episodes": COUNT,
    },
    "09b_learning_in_the_concept_space": {
        "meta_batch": BATCH,
        "concept_batch": BATCH,  # more external images per meta-iteration
        "iterations": COUNT,
        "meta_lr": COUNT,
        "test_episodes": COUNT,
    },
    "08_gradient_agreement": {
        "maml_iterations": COUNT,
        "reptile_iterations": COUNT,
        "test_episodes": COUNT,
        "sine_iterations": COUNT,
        "sine_test_tasks": COUNT,
    },
}


class _Earlier:
    """A value from an earlier cell (``base_seed``, ``seeded``): the same in both profiles."""

    def __call__(self, *args, **kwargs):
        return self

    def __eq__(self, other):
        return isinstance(other, _Earlier)

    def __hash__(self):
        return 0

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __call__


def parameters(path: Path, profile: str) -> dict:
    """The values a notebook's ``parameters`` cell sets in ``profile``."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{path.name}: one cell tagged 'parameters'"
    source = "".join(cells[0]["source"])
    tree = ast.parse(source)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assigned = {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }
    namespace = {n: _Earlier() for n in names if not hasattr(builtins, n)}
    namespace.update(bookcode=bookcode, by_profile=bookcode.notebook.by_profile)
    saved = os.environ.get(bookcode.notebook.PROFILE_VAR)
    os.environ[bookcode.notebook.PROFILE_VAR] = profile
    try:
        exec(compile(tree, path.name, "exec"), namespace)  # noqa: S102
    finally:
        if saved is None:
            del os.environ[bookcode.notebook.PROFILE_VAR]
        else:
            os.environ[bookcode.notebook.PROFILE_VAR] = saved
    return {k: namespace[k] for k in sorted(assigned) if k != "by_profile"}


def full_only(path: Path) -> dict:
    """``{name: (quick value, full value)}`` of the values that differ."""
    quick, full = parameters(path, "quick"), parameters(path, "full")
    assert quick.keys() == full.keys(), f"{path.name}: the profiles set different names"
    return {k: (quick[k], full[k]) for k in full if not _same(quick[k], full[k])}


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return a is b


def _has_zero(value) -> bool:
    if isinstance(value, dict):
        return any(_has_zero(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_zero(v) for v in value)
    return isinstance(value, (int, float)) and value == 0


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_full_profile_value_is_classified(path):
    found = full_only(path)
    known = FULL_ONLY.get(path.stem, {})
    missing = sorted(set(found) - set(known))
    assert not missing, (
        f"{path.name} sets {missing} differently in the full profile: classify each in "
        "FULL_ONLY of tests/test_full_profile.py (count, batch, notebook, or a test here that "
        "builds and runs that configuration at tiny scale)"
    )
    stale = sorted(set(known) - set(found))
    assert not stale, f"{path.name} no longer sets {stale} by profile: remove them from FULL_ONLY"
    for name, (_, full) in found.items():
        kind = known[name]
        if kind == COUNT and _has_zero(full):
            pytest.fail(f"{path.name}: {name} is 0 in the full profile (a phase switched off): "
                        "classify it as notebook")  # fmt: skip
        if kind.startswith("test_"):
            assert kind in globals(), f"FULL_ONLY names {kind}, which this file does not define"


def _episodes(tasks, ways, shots, queries, size=28, seed=0):
    rng = np.random.default_rng(seed)
    support_x = rng.random((tasks, ways * shots, size, size, 1), dtype=np.float32)
    query_x = rng.random((tasks, ways * queries, size, size, 1), dtype=np.float32)
    support_y = np.tile(np.repeat(np.arange(ways), shots), (tasks, 1)).astype(np.int32)
    query_y = np.tile(np.repeat(np.arange(ways), queries), (tasks, 1)).astype(np.int32)
    return (support_x, support_y, query_x), query_y


def _full(chapter: str) -> dict:
    return parameters(ROOT / "chapters" / f"{chapter}.ipynb", "full")


def test_maml_omniglot_full_configuration():
    """Chapters 6 and 7, Omniglot in the full profile: Conv-4 with 64 filters,
    second-order MAML, 15 training queries per class, 3 test-time steps;
    two meta-steps on a meta-batch of 2 random tasks (32 in the full profile)."""
    import keras
    import tensorflow as tf

    from bookcode import meta, nets

    p, p7 = _full("06_maml_adml_caml"), _full("07_meta_sgd_and_reptile")
    assert (p7["filters"], p7["train_queries"]) == (p["filters"], p["train_queries"])
    keras.utils.set_random_seed(0)
    model = nets.conv4(
        filters=p["filters"], num_classes=p["ways"], fused_batch_norm=False
    )  # second order needs Keras batch norm
    learner = meta.MAML(
        model, inner_lr=p["omni_inner_lr"], inner_steps=1, test_inner_steps=p["test_inner_steps"]
    )
    learner.compile(keras.optimizers.Adam(p["omni_meta_lr"]))
    data = tf.data.Dataset.from_tensors(
        _episodes(2, p["ways"], p["shots"], p["train_queries"])
    ).repeat()
    history = learner.fit(data, steps_per_epoch=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    (sx, sy, qx), _ = _episodes(1, p["ways"], p["shots"], 15, seed=1)
    logits = learner.predict_episode(sx[0], sy[0], qx[0])
    assert logits.shape == (p["ways"] * 15, p["ways"]) and np.isfinite(logits).all()


def test_reptile_omniglot_full_configuration():
    """Chapter 7, Reptile on Omniglot in the full profile: the strided Conv-4
    with 64 filters and fused batch norm, the paper's inner Adam
    (beta_1 = 0) on minibatches of 10-shot tasks, batched; two meta-steps on
    a meta-batch of 2 random tasks (5 in the full profile)."""
    import keras
    import tensorflow as tf

    from bookcode import meta
    from bookcode.nets import FusedBatchNormalization

    p = _full("07_meta_sgd_and_reptile")
    assert p["reptile_inner_optimizer"] == "adam"
    keras.utils.set_random_seed(0)
    layers = [keras.Input((28, 28, 1))]
    for _ in range(4):
        layers += [
            keras.layers.Conv2D(p["filters"], 3, strides=2, padding="same"),
            FusedBatchNormalization(),
            keras.layers.ReLU(),
        ]
    model = keras.Sequential(layers + [keras.layers.Flatten(), keras.layers.Dense(p["ways"])])
    learner = meta.Reptile(
        model,
        inner_lr=p["reptile_inner_lr"],
        inner_optimizer=p["reptile_inner_optimizer"],
        inner_steps=p["reptile_inner_steps"],
        inner_batch=p["reptile_inner_batch"],
        task_batching="batched",
    )
    learner.compile(meta.Reptile.annealed_sgd(1.0, 0.0, p["reptile_iterations"]))
    before = [w.numpy().copy() for w in model.trainable_weights]
    data = tf.data.Dataset.from_tensors(
        _episodes(2, p["ways"], p["reptile_train_shots"], 1)
    ).repeat()
    history = learner.fit(data, steps_per_epoch=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(not np.allclose(b, w.numpy()) for b, w in zip(before, model.trainable_weights))
    (sx, sy, qx), _ = _episodes(1, p["ways"], 1, 15, seed=1)
    logits = learner.predict_episode(sx[0], sy[0], qx[0])
    assert logits.shape == (p["ways"] * 15, p["ways"]) and np.isfinite(logits).all()


def test_meta_lstm_full_configuration():
    """Chapter 1, meta-LSTM in the full profile: Conv-4 with 32 filters, 10
    inner steps; one meta-step on one random 5-way 1-shot task."""
    import keras
    import tensorflow as tf

    from bookcode import learned_optimizers, nets

    p = _full("01_introduction")
    keras.utils.set_random_seed(0)
    network = nets.conv4(filters=p["FILTERS"], num_classes=5)
    learner = learned_optimizers.MetaLSTMLearner(network, steps=p["INNER_STEPS"])
    learner.compile()
    data = tf.data.Dataset.from_tensors(_episodes(1, 5, 1, 2)).repeat()
    history = learner.fit(data, steps_per_epoch=1, verbose=0)
    assert np.isfinite(next(iter(history.history.values()))).all()


def test_maml_rl_full_configuration():
    """Chapter 6b, MAML for control in the full profile: a (100, 100) policy;
    one meta-step on 2 goals."""
    import keras

    from bookcode import control

    p = _full("06b_meta_learning_for_control")
    keras.utils.set_random_seed(0)
    learner = control.MAMLRL(
        control.mlp_policy(p["hidden"], seed=0),
        inner_lr=p["inner_lr"],
        num_trajectories=2,
        init_log_std=p["init_log_std"],
    )
    learner.compile(keras.optimizers.Adam(p["meta_lr"]))
    history = learner.fit(control.goal_dataset(2, seed=0), steps_per_epoch=1, verbose=0)
    assert all(np.isfinite(v).all() for v in history.history.values())


def test_memory_full_configuration():
    """Chapter 5 in the full profile: the NTM (100 units, memory 128 x 20) on
    copy sequences of length up to 20, the MANN (200 units, 4 heads, memory
    128 x 40) on 5-class sequences; one training step of each on a batch of 2
    (without XLA, to keep this test fast)."""
    import keras

    from bookcode.memory import MANNCell, NTMCell, SequenceModel, copy_batch

    p = _full("05_memory_augmented_networks")
    keras.utils.set_random_seed(0)
    bits = p["bits"]
    ntm = SequenceModel(
        NTMCell(p["controller_units"], bits, p["train_slots"], p["memory_width"]), xla=False
    )
    ntm.compile(
        keras.optimizers.Adam(p["copy_lr"]), keras.losses.BinaryCrossentropy(from_logits=True)
    )
    x, y, mask, _ = copy_batch(2, *p["train_lengths"], bits=bits, seed=0)
    assert x.shape[1] == 2 * p["train_lengths"][1] + 1
    history = ntm.fit(x, y, sample_weight=mask, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    ways, features = p["ways"], p["encoder_filters"]
    mann = SequenceModel(
        MANNCell(
            p["mann_units"], ways, p["mann_slots"], p["mann_width"], read_heads=p["mann_heads"]
        ),
        xla=False,
    )
    mann.compile(
        keras.optimizers.Adam(p["mann_lr"]),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    steps = ways * p["instances"]
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(2, steps, features + ways)).astype(np.float32)
    labels = rng.integers(0, ways, size=(2, steps))
    history = mann.fit(inputs, labels, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
