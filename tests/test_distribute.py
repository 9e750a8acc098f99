"""Every learner trains under ``tf.distribute.MirroredStrategy`` with the
update of one device.

Two logical CPU devices stand in for two GPUs. They must be configured before
TensorFlow initialises, so the measurements run in a separate Python process
(this file run as a script); the tests read its report. For each learner: one
``fit()`` step with plain SGD (rate 1) on the same meta-batch, built and
compiled under a one-device strategy and under ``MirroredStrategy`` over the
two devices (each replica gets half of the meta-batch's tasks): the change of
every trainable variable (the meta-gradient, or Reptile's update), of every
non-trainable one (batch-norm averages) and the logged loss must agree within
float32 tolerance. (The meta-batch must split evenly over the replicas: Keras
fails on an uneven split of a dataset's batch, before any learner code runs.)

Learners are found, not listed: every model class in ``bookcode`` with
``predict_episode`` needs a factory in ``FACTORIES`` (tiny, 8x8 images) or a
reason in ``NOT_DISTRIBUTED``. CI runs ``IN_CI`` (every path of the two
engines); ``BOOKCODE_TEST_ALL_LEARNERS=1`` runs every factory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WAYS, SHOTS, QUERIES, SIZE, TASKS = 2, 1, 2, 8, 2
TOLERANCE = 2e-4  # relative, float32 through one (second-order) meta-step

# learner -> why it is not trained under a strategy here
NOT_DISTRIBUTED = {
    "FineTuning": "not meta-trained (compile/fit refuse)",
    "FewShotClassifier": "a base class; its subclasses are tested",
    "GradientMetaLearner": "a base class; its subclasses are tested",
}
# learners whose own train_step would apply the summed gradient of the replicas
# (a strict xfail: fixing one makes it fail here)
KNOWN_WRONG = {}


def _learner_classes():
    import keras
    from test_save_load import (
        CLASSES,  # every bookcode Layer subclass, found by walking the package
    )

    from bookcode.meta import GradientMetaLearner

    return {
        c.__name__: c
        for c in CLASSES.values()
        if issubclass(c, keras.Model)
        and (hasattr(c, "predict_episode") or issubclass(c, GradientMetaLearner))
    }


# -- the worker (a separate process with two logical CPUs) ----------------------------


def _image_net(outputs, batch_norm=True, maps=False):
    import keras
    from keras import layers

    blocks = [keras.Input((SIZE, SIZE, 1)), layers.Conv2D(3, 3, padding="same")]
    if batch_norm:  # "synchronized": batch statistics over every replica's examples
        blocks.append(layers.BatchNormalization(synchronized=batch_norm == "synchronized"))
    blocks += [layers.ReLU(), layers.MaxPooling2D(2)]
    if not maps:
        blocks.append(layers.Flatten())
        if outputs:
            blocks.append(layers.Dense(outputs))
    return keras.Sequential(blocks)


def _flat_net(inputs, outputs):
    import keras
    from keras import layers

    return keras.Sequential(
        [keras.Input((inputs,)), layers.Dense(6, activation="relu"), layers.Dense(outputs)]
    )


FACTORIES = {
    # name -> (factory of the learner given the bookcode packages, data kind)
    "MAML": (lambda b: b.meta.MAML(_image_net(WAYS), inner_lr=0.1, inner_steps=1), "tasks"),
    "MAML+gradient_agreement": (
        lambda b: b.meta.MAML(_image_net(WAYS), inner_lr=0.1, combiner=b.meta.gradient_agreement),
        "tasks",
    ),
    "MAML+agreement_on_meta_gradients": (  # a weighing combiner without inner updates
        lambda b: b.meta.MAML(
            _image_net(WAYS), inner_lr=0.1, combiner=b.meta.GradientAgreement("task_updates")
        ),
        "tasks",
    ),
    "ADML": (lambda b: b.meta.ADML(_image_net(WAYS), epsilon=0.05, first_order=True), "tasks"),
    "CAML": (lambda b: b.meta.CAML(_flat_net(SIZE * SIZE + 2, WAYS), context_dim=2), "flat"),
    "MetaSGD": (lambda b: b.meta.MetaSGD(_image_net(WAYS), rate_seed=0), "tasks"),
    "Reptile": (lambda b: b.meta.Reptile(_image_net(WAYS), inner_steps=2, inner_batch=2), "tasks"),
    "TAML": (lambda b: b.meta.TAML(_image_net(WAYS), variant="theil", inner_lr=0.1), "tasks"),
    "PrototypicalNetwork": (lambda b: b.metric.PrototypicalNetwork(_image_net(0)), "tasks"),
    "GaussianPrototypicalNetwork": (
        lambda b: b.metric.GaussianPrototypicalNetwork(_image_net(0)),
        "tasks",
    ),
    "SemiSupervisedPrototypicalNetwork": (
        lambda b: b.metric.SemiSupervisedPrototypicalNetwork(_image_net(0), masked=True),
        "unlabeled",
    ),
    "RelationNetwork": (lambda b: b.metric.RelationNetwork(_image_net(0, maps=True)), "tasks"),
    "MatchingNetwork": (
        lambda b: b.metric.MatchingNetwork(_image_net(0), fce=True, processing_steps=1),
        "tasks",
    ),
    # a batch of pairs is split between the replicas, so batch norm must see all of it
    "SiameseNetwork": (
        lambda b: b.metric.SiameseNetwork(_image_net(4, batch_norm="synchronized")),
        "pairs",
    ),
    # the external batch is split between the replicas: a generator without batch norm
    "ConceptSpaceLearner": (
        lambda b: b.meta.ConceptSpaceLearner(
            _flat_net(3 * 4 * 4, WAYS),
            _image_net(0, batch_norm=False),  # 8x8 -> 4x4x3 concepts
            external_classes=3,
            concept_weight=0.5,
            inner_lr=0.1,
        ),
        "concept",
    ),
    "MetaLSTMLearner": (
        lambda b: b.learned_optimizers.MetaLSTMLearner(
            _image_net(WAYS, batch_norm=False), steps=1, hidden_size=2
        ),
        "tasks",
    ),
    # policy-gradient MAML samples its trajectories: its reference is the mean of
    # the one-device updates on each replica's half of the goals (same seed)
    "MAMLRL": (
        lambda b: b.control.MAMLRL(
            b.control.mlp_policy(hidden=(4,), seed=0), num_trajectories=2, horizon=4
        ),
        "goals",
    ),
}
# Every path of the two engines: the gradient learners' mean, a combiner that
# weighs tasks (gathered from every replica), a batch objective (TAML); the
# metric learners' meta-batch step with batch norm, and with extra inputs. The
# other learners only change what runs inside one task, on each replica alike;
# they run too with BOOKCODE_TEST_ALL_LEARNERS=1 (about 60 CPU-s more).
IN_CI = (
    "MAML",
    "MAML+gradient_agreement",
    "MAML+agreement_on_meta_gradients",
    "TAML",
    "ConceptSpaceLearner",
    "PrototypicalNetwork",
    "SemiSupervisedPrototypicalNetwork",
    "MAMLRL",
)
SELECTED = sorted(FACTORIES) if os.environ.get("BOOKCODE_TEST_ALL_LEARNERS") == "1" else list(IN_CI)


def _data(kind, tasks, seed=0):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    shape = (SIZE * SIZE,) if kind == "flat" else (SIZE, SIZE, 1)
    if kind == "goals":  # 2 goals per task slot: each replica gets whole goals
        goals = rng.uniform(-0.5, 0.5, (2 * tasks, 2)).astype(np.float32)
        return tf.data.Dataset.from_tensors(goals).repeat()
    if kind == "pairs":
        left = rng.random((2 * tasks,) + shape, dtype=np.float32)
        right = rng.random((2 * tasks,) + shape, dtype=np.float32)
        same = np.tile([1, 0], tasks).astype(np.int32)
        return tf.data.Dataset.from_tensors(((left, right), same)).repeat()
    support_x = rng.random((tasks, WAYS * SHOTS) + shape, dtype=np.float32)
    query_x = rng.random((tasks, WAYS * QUERIES) + shape, dtype=np.float32)
    support_y = np.tile(np.repeat(np.arange(WAYS), SHOTS), (tasks, 1)).astype(np.int32)
    query_y = np.tile(np.repeat(np.arange(WAYS), QUERIES), (tasks, 1)).astype(np.int32)
    inputs = (support_x, support_y, query_x)
    if kind == "concept":  # and a labelled external batch, 2 images per task
        inputs += (rng.random((2 * tasks,) + shape, dtype=np.float32),
                   rng.integers(3, size=2 * tasks).astype(np.int32))  # fmt: skip
    if kind == "unlabeled":
        inputs += ({"unlabeled_x": rng.random((tasks, 4) + shape, dtype=np.float32)},)
    return tf.data.Dataset.from_tensors((inputs, query_y)).repeat()


def _one_step(name, strategy, tasks, data=None):
    import keras

    import bookcode.control
    import bookcode.learned_optimizers
    import bookcode.meta
    import bookcode.metric

    factory, kind = FACTORIES[name]
    if kind == "goals" and data is None and strategy.num_replicas_in_sync == 1:
        # the reference: the mean of the updates on each half of the goals
        goals = next(iter(_data(kind, tasks)))
        half = len(goals) // 2
        parts = [_one_step(name, strategy, tasks, data=g) for g in (goals[:half], goals[half:])]

        def mean(key):
            pairs = zip(parts[0][key], parts[1][key])
            return [((np.asarray(a) + np.asarray(b)) / 2).tolist() for a, b in pairs]

        return {"update": mean("update"), "state": mean("state"),
                "loss": (parts[0]["loss"] + parts[1]["loss"]) / 2}  # fmt: skip
    if data is not None:
        import tensorflow as tf

        data = tf.data.Dataset.from_tensors(data).repeat()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        learner = factory(bookcode)
        learner.compile(keras.optimizers.SGD(1.0))
        before = [v.numpy() for v in learner.trainable_variables]
        states = [v.numpy() for v in learner.non_trainable_variables]
    history = learner.fit(
        _data(kind, tasks) if data is None else data, steps_per_epoch=1, verbose=0
    )
    return {
        "update": [(b - v.numpy()).tolist() for b, v in zip(before, learner.trainable_variables)],
        "state": [
            (v.numpy() - s).tolist()
            for s, v in zip(states, learner.non_trainable_variables)
            if np.issubdtype(s.dtype, np.floating)
        ],
        "loss": float(history.history["loss"][-1]),
    }


def _worker(names):
    """Run in a fresh process: print one JSON line per case."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import warnings

    warnings.filterwarnings("ignore")
    from bookcode import distribute, metric

    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = distribute.strategy(["/cpu:0", "/cpu:1"])  # one instance for every case
    print(json.dumps({"case": "strategy", "type": type(two).__name__}), flush=True)
    for name in names:
        case, started = {"case": name}, time.process_time()
        try:
            case["one"] = _one_step(name, one, TASKS)
            case["two"] = _one_step(name, two, TASKS)
        except Exception as error:  # noqa: BLE001 (reported to the test, which fails with it)
            case["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
        case["cpu_seconds"] = round(time.process_time() - started, 1)
        print(json.dumps(case), flush=True)
    # single episodes cannot be split across replicas: a clear error
    with two.scope():
        learner = metric.PrototypicalNetwork(_image_net(0))
        learner.compile("sgd")
    single = _data("tasks", 1).map(lambda x, y: ((x[0][0], x[1][0], x[2][0]), y[0]))
    try:
        learner.fit(single, steps_per_epoch=1, verbose=0)
        message = None
    except ValueError as error:
        message = str(error)
    print(json.dumps({"case": "single episodes", "error": message}), flush=True)
    # clipping sees the whole gradient: replica shares (1, 3) and (3, 1) sum to (4, 4),
    # norm 4 * sqrt(2), clipped to norm 1; each replica returns half of the clipped sum
    shares = tf.constant([[1.0, 3.0], [3.0, 1.0]])

    def clip():
        index = tf.distribute.get_replica_context().replica_id_in_sync_group
        return distribute.clip_by_global_norm([tf.gather(shares, index)], 1.0)[0]

    clipped = two.experimental_local_results(two.run(clip))
    print(json.dumps({"case": "clip", "values": [c.numpy().tolist() for c in clipped]}), flush=True)


# -- the tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report():
    names = SELECTED
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *names],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
        cwd=str(Path(__file__).resolve().parents[1]),
        check=False,
    )
    cases = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            case = json.loads(line)
            cases[case["case"]] = case
    assert cases, f"the worker reported nothing:\n{result.stderr[-3000:]}"
    return cases


def _relative_error(one, two):
    worst = 0.0
    for a, b in zip(one, two):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape
        scale = max(float(np.abs(a).max(initial=0.0)), 1e-6)
        worst = max(worst, float(np.abs(a - b).max(initial=0.0)) / scale)
    return worst


def test_every_learner_has_a_factory_or_a_reason():
    named = {n.split("+")[0] for n in FACTORIES}
    missing = sorted(set(_learner_classes()) - named - set(NOT_DISTRIBUTED))
    assert not missing, (
        f"add a tiny factory for {missing} to FACTORIES in tests/test_distribute.py "
        "(or a reason to NOT_DISTRIBUTED)"
    )


def test_strategy_is_mirrored_over_two_devices(report):
    assert report["strategy"]["type"] == "MirroredStrategy"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n,
            marks=pytest.mark.xfail(reason=KNOWN_WRONG[n], strict=True) if n in KNOWN_WRONG else (),
        )
        for n in SELECTED
    ],
)
def test_two_replicas_give_the_one_device_update(report, name):
    case = report[name]
    assert "error" not in case, case["error"]
    one, two = case["one"], case["two"]
    assert any(np.abs(np.asarray(u)).max() > 0 for u in one["update"]), "nothing was trained"
    assert _relative_error(one["update"], two["update"]) < TOLERANCE
    assert _relative_error(one["state"], two["state"]) < TOLERANCE
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)


def test_single_episodes_under_two_replicas_are_refused(report):
    message = report["single episodes"]["error"]
    assert message is not None and "tf_dataset(batch_size=...)" in message


def test_clipping_sees_the_whole_meta_batch_gradient(report):
    half = 0.5 / np.sqrt(2.0)
    np.testing.assert_allclose(report["clip"]["values"], [[half, half], [half, half]], rtol=1e-6)


def test_no_strategy_without_several_gpus():
    import tensorflow as tf

    from bookcode import distribute

    assert distribute.strategy([]) is tf.distribute.get_strategy()
    assert distribute.strategy(["/gpu:0"]) is tf.distribute.get_strategy()
    assert distribute.replica_count() == 1
    assert float(distribute.replica_share(5)) == 1.0
    clipped = distribute.clip_by_global_norm([tf.constant([3.0, 4.0])], 1.0)
    np.testing.assert_allclose(clipped[0].numpy(), [0.6, 0.8], rtol=1e-6)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _worker(sys.argv[1:])


def test_setup_offers_the_strategy_when_several_gpus_are_visible(monkeypatch):
    import tensorflow as tf

    from bookcode import notebook

    class Device:
        def __init__(self, name):
            self.name = name

    fake = [Device("/device:GPU:0"), Device("/device:GPU:1")]
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: fake)
    monkeypatch.delenv(notebook.DISTRIBUTE_VAR, raising=False)
    assert notebook._distribution() == "; BOOKCODE_DISTRIBUTE=1 trains on all 2 GPUs"
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: fake[:1])
    assert notebook._distribution() == ""


def test_full_profile_of_a_meta_batch_notebook_distributes_by_itself(monkeypatch):
    """Several GPUs: the full profile of a notebook that trains on meta-batches
    installs MirroredStrategy unless BOOKCODE_DISTRIBUTE=0; the quick profile,
    and notebooks that train on single episodes, only when asked."""
    import tensorflow as tf

    from bookcode import distribute, notebook

    class Device:
        def __init__(self, name):
            self.name = name

    class Strategy:
        num_replicas_in_sync = 2

    installed = []
    monkeypatch.setattr(
        tf.config, "list_logical_devices", lambda kind=None: [Device("/device:GPU:0"), Device("/device:GPU:1")]
    )
    monkeypatch.setattr(distribute, "strategy", lambda devices=None: Strategy())
    monkeypatch.setattr(tf.distribute, "experimental_set_strategy", installed.append)
    on, off = ", MirroredStrategy over 2 GPUs", "; BOOKCODE_DISTRIBUTE=1 trains on all 2 GPUs"
    cases = [  # (profile, BOOKCODE_DISTRIBUTE, meta_batches) -> note
        (("full", None, True), on),
        (("full", "0", True), off),
        (("full", None, False), off),
        (("full", "1", False), on),
        (("quick", None, True), off),
        (("quick", "1", True), on),
    ]
    for (profile, setting, meta_batches), note in cases:
        monkeypatch.setenv(notebook.PROFILE_VAR, profile)
        if setting is None:
            monkeypatch.delenv(notebook.DISTRIBUTE_VAR, raising=False)
        else:
            monkeypatch.setenv(notebook.DISTRIBUTE_VAR, setting)
        before = len(installed)
        assert notebook._distribution(meta_batches) == note, (profile, setting, meta_batches)
        assert len(installed) - before == (note == on)
