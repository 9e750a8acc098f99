"""Tests of the task-batched meta-batch (bookcode.meta.batched): the grouped
convolution against a per-task loop, the batched forward against each task's
forward, per-task results and meta-gradients of MAML and Meta-SGD (first and
second order) equal to the mapped path's, a training step with gradient
agreement, Reptile's per-task updates and training step equal to the mapped
ones, the grouped weight layout, the errors for layers and learners without a
batched form, the option through save/load, and two replicas of a
tf.distribute strategy."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from bookcode import meta
from bookcode.meta import batched
from bookcode.nets import conv4, onednn_enabled

GROUPED_DIFFERENTIABLE = onednn_enabled() or bool(tf.config.list_physical_devices("GPU"))
TASKS, WAYS = 3, 3


def tiny_conv4(batch_norm="exact"):
    keras.utils.set_random_seed(1)
    return conv4(input_shape=(12, 12, 2), filters=4, num_classes=WAYS, blocks=2,
                 batch_norm=batch_norm)  # fmt: skip


def dense_regressor():
    keras.utils.set_random_seed(2)
    return keras.Sequential([
        keras.Input((1,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(8),
        meta_bn(), keras.layers.ReLU(), keras.layers.Dense(1),
    ])  # fmt: skip


def meta_bn():
    from bookcode.nets import BatchNormalization

    return BatchNormalization()


def conv_tasks(seed=0, shots=2):
    rng = np.random.default_rng(seed)
    sx = rng.uniform(size=(TASKS, WAYS * shots, 12, 12, 2)).astype("float32")
    qx = rng.uniform(size=(TASKS, WAYS * 3, 12, 12, 2)).astype("float32")
    sy = np.tile(np.repeat(np.arange(WAYS), shots), (TASKS, 1)).astype("int32")
    qy = np.tile(np.repeat(np.arange(WAYS), 3), (TASKS, 1)).astype("int32")
    return sx, sy, qx, qy


def regression_tasks(seed=0):
    rng = np.random.default_rng(seed)
    sx, qx = (rng.uniform(-5, 5, size=(TASKS, n, 1)).astype("float32") for n in (5, 7))
    amplitude = rng.uniform(0.5, 2, size=(TASKS, 1, 1)).astype("float32")
    return sx, amplitude * np.sin(sx), qx, amplitude * np.sin(qx)


def differentiated_twice(conv, x, kernel):
    """Outputs, first gradients (x, kernel) and a second-order gradient."""
    with tf.GradientTape() as outer:
        outer.watch([x, kernel])
        with tf.GradientTape() as inner:
            inner.watch([x, kernel])
            y = conv(x, kernel)
            loss = tf.reduce_sum(tf.sin(y))
        first = inner.gradient(loss, [x, kernel])
        penalty = sum(tf.reduce_sum(tf.square(g)) for g in first)
    return [y, *first, *outer.gradient(penalty, [x, kernel])]


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "depthwise"])
def test_grouped_convolution_equals_a_per_task_loop_to_second_order(grouped):
    if grouped and not GROUPED_DIFFERENTIABLE:
        pytest.skip("grouped convolutions have gradients on a GPU or with oneDNN only")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(TASKS, 2, 7, 7, 3)), tf.float32)
    kernel = tf.constant(rng.normal(size=(TASKS, 3, 3, 3, 5)), tf.float32)

    def batched_conv(x, kernel):
        y = batched.grouped_conv2d(batched._grouped(x), kernel, (1, 1), "SAME", (1, 1), grouped)
        return batched._stacked(y, 5)

    def loop(x, kernel):
        return tf.stack([tf.nn.conv2d(x[t], kernel[t], 1, "SAME") for t in range(TASKS)])

    for got, want in zip(differentiated_twice(batched_conv, x, kernel),
                         differentiated_twice(loop, x, kernel)):  # fmt: skip
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("batch_norm", ["exact", "keras", "fused"])
def test_task_forward_equals_each_tasks_forward(batch_norm):
    model = tiny_conv4(batch_norm)
    sx = conv_tasks()[0]
    rng = np.random.default_rng(3)
    params = [
        tf.constant(v.numpy() + rng.normal(scale=0.1, size=(TASKS, *v.shape)), tf.float32)
        for v in model.trainable_variables
    ]
    got = batched.task_forward(model, params, sx).numpy()
    for t in range(TASKS):
        want = meta.forward(model, [p[t] for p in params], sx[t]).numpy()
        np.testing.assert_allclose(got[t], want, rtol=1e-4, atol=1e-5)


def learner_pair(make_model, learner="maml", **options):
    """The same learner with mapped and with batched tasks, equal weights."""
    pair = []
    for task_batching in ("map", "batched"):
        if learner == "maml":
            pair.append(meta.MAML(make_model(), task_batching=task_batching, **options))
        else:
            pair.append(meta.MetaSGD(make_model(), rate_seed=0, task_batching=task_batching,
                                     **options))  # fmt: skip
    return pair


CASES = {
    "conv4-maml": (tiny_conv4, conv_tasks, "maml", {"inner_lr": 0.4}),
    "conv4-metasgd": (tiny_conv4, conv_tasks, "metasgd", {}),
    "conv4-metasgd-multiplier": (tiny_conv4, conv_tasks, "metasgd", {"rate_multiplier": 10.0}),
    "dense-maml": (dense_regressor, regression_tasks, "maml",
                   {"inner_lr": 0.05, "kind": meta.REGRESSION}),
}  # fmt: skip


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("case", list(CASES))
def test_batched_tasks_give_the_mapped_results_and_meta_gradients(case, first_order):
    make_model, make_tasks, learner, options = CASES[case]
    mapped, stacked = learner_pair(
        make_model, learner, inner_steps=2, first_order=first_order, **options
    )
    tasks = [tf.constant(a) for a in make_tasks()]
    results_map, grads_map = tf.function(mapped.task_gradients)(*tasks)
    results, grads = tf.function(stacked.task_gradients)(*tasks)
    assert set(results) == set(results_map)
    for key in results:
        np.testing.assert_allclose(results[key].numpy(), results_map[key].numpy(), rtol=1e-4)
    # float noise relative to the largest gradient (a bias before batch norm has none)
    scale = max(np.abs(g.numpy()).max() for g in grads_map)
    for v, g, g_map in zip(mapped.meta_variables, grads, grads_map):
        assert g.shape == (TASKS, *v.shape)
        np.testing.assert_allclose(g.numpy(), g_map.numpy(), atol=1e-5 * scale, rtol=1e-3,
                                   err_msg=v.path)  # fmt: skip


def test_a_training_step_with_gradient_agreement_matches_the_mapped_one():
    mapped, stacked = learner_pair(tiny_conv4, inner_lr=0.4, combiner=meta.gradient_agreement)
    sx, sy, qx, qy = conv_tasks()
    for learner in (mapped, stacked):
        learner.compile(keras.optimizers.SGD(0.1))
        learner.train_on_batch((sx, sy, qx), qy)
    for a, b in zip(mapped.meta_variables, stacked.meta_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.path)


def test_a_layer_without_batched_form_is_named():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              keras.layers.Dropout(0.5, name="drop"), keras.layers.Dense(2)])  # fmt: skip
    with pytest.raises(
        ValueError, match=r"layer 'drop' cannot run task-batched.*task_batching=\"map\""
    ):
        meta.MAML(model, task_batching="batched")
    assert meta.MAML(model, task_batching="map").task_batching == "map"


@pytest.mark.parametrize("make", [
    lambda m: meta.ADML(m, task_batching="batched"),
    lambda m: meta.TAML(m, task_batching="batched"),
    lambda m: meta.CAML(m, task_batching="batched"),
], ids=["ADML", "TAML", "CAML"])  # fmt: skip
def test_learners_with_their_own_task_objective_refuse_batching(make):
    with pytest.raises(ValueError, match=r"overrides .*task_batching=\"map\""):
        make(tiny_conv4())


def test_an_unknown_option_is_refused_and_auto_maps_on_a_cpu():
    with pytest.raises(ValueError, match="task_batching must be one of"):
        meta.MAML(tiny_conv4(), task_batching="vectorized")
    learner = meta.MAML(tiny_conv4())
    assert learner.task_batching == "auto"
    assert learner._batches_tasks() == bool(tf.config.list_physical_devices("GPU"))


@pytest.mark.parametrize("batch_norm", ["exact", "fused"])
def test_grouped_weight_layout_round_trips_and_gives_the_same_forward(batch_norm):
    model = tiny_conv4(batch_norm)
    sx = tf.constant(conv_tasks()[0])
    rng = np.random.default_rng(4)
    params = [
        tf.constant(v.numpy() + rng.normal(scale=0.1, size=(TASKS, *v.shape)), tf.float32)
        for v in model.trainable_variables
    ]
    grouped = batched.group_params(model, params)
    assert grouped[0].shape == (3, 3, 2, TASKS * 4)  # first kernel: tasks in the filters
    for back, p in zip(batched.ungroup_params(model, grouped), params):
        np.testing.assert_array_equal(back.numpy(), p.numpy())
    want = batched.task_forward(model, params, sx).numpy()
    got = batched.task_forward(model, grouped, batched._grouped(sx), grouped=True).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    tiled = batched.tile_grouped(model, [v.value for v in model.trainable_variables], TASKS)
    for t, v in zip(batched.ungroup_params(model, tiled), model.trainable_variables):
        np.testing.assert_array_equal(t.numpy(), np.stack([v.numpy()] * TASKS))


def reptile_pair(batch_norm="fused", **options):
    return [
        meta.Reptile(tiny_conv4(batch_norm), task_batching=task_batching, **options)
        for task_batching in ("map", "batched")
    ]


def biases_before_batch_norm(learner):
    """Convolution biases that batch norm cancels: their gradient is float
    noise, which Adam's normalised step turns into moves of any sign."""
    return {
        layer.bias.path
        for layer in learner.model._flatten_layers()
        if isinstance(layer, keras.layers.Conv2D) and layer.use_bias
    }


@pytest.mark.parametrize("batch_norm", ["exact", "fused"])
@pytest.mark.parametrize("transductive", [True, False], ids=["transductive", "non-transductive"])
@pytest.mark.parametrize("inner_batch", [None, 4], ids=["full-batch", "minibatch"])
@pytest.mark.parametrize("inner_optimizer", ["adam", "sgd"])
def test_batched_reptile_gives_the_mapped_updates_and_results(
    inner_optimizer, inner_batch, transductive, batch_norm
):
    mapped, stacked = reptile_pair(
        batch_norm, inner_lr=0.01, inner_steps=3, inner_batch=inner_batch,
        inner_optimizer=inner_optimizer, transductive=transductive,
    )  # fmt: skip
    for learner in (mapped, stacked):
        learner.compile(keras.optimizers.SGD(1.0))
    tasks = [tf.constant(a) for a in conv_tasks(shots=4)]
    results_map, updates_map = tf.function(mapped.task_gradients)(*tasks)
    results, updates = tf.function(stacked.task_gradients)(*tasks)
    for key in results_map:
        np.testing.assert_allclose(results[key].numpy(), results_map[key].numpy(), rtol=1e-5)
    noisy = biases_before_batch_norm(mapped) if inner_optimizer == "adam" else set()
    scale = max(np.abs(u.numpy()).max() for u in updates_map)
    assert scale > 1e-3  # the tasks moved the weights
    for v, u, u_map in zip(mapped.meta_variables, updates, updates_map):
        assert u.shape == (TASKS, *v.shape)
        if v.path not in noisy:
            np.testing.assert_allclose(u.numpy(), u_map.numpy(), atol=1e-5 * scale, rtol=1e-4,
                                       err_msg=v.path)  # fmt: skip


@pytest.mark.parametrize("combiner", [None, "agreement"])
def test_batched_reptile_training_steps_match_the_mapped_ones(combiner):
    combiner = combiner and meta.gradient_agreement  # weighs the batched updates themselves
    mapped, stacked = reptile_pair(inner_lr=0.02, inner_steps=2, inner_batch=4,
                                   inner_optimizer="sgd", combiner=combiner)  # fmt: skip
    sx, sy, qx, qy = conv_tasks(shots=4)
    logs = []
    for learner in (mapped, stacked):
        learner.compile(meta.Reptile.annealed_sgd(1.0, 0.0, 10))
        for _ in range(3):  # a new minibatch order every meta-step
            out = learner.train_on_batch((sx, sy, qx), qy, return_dict=True)
        logs.append(out)
    for key in logs[0]:
        np.testing.assert_allclose(logs[1][key], logs[0][key], rtol=1e-5)
    for a, b in zip(mapped.meta_variables, stacked.meta_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.path)


@pytest.mark.parametrize("transductive", [True, False], ids=["transductive", "non-transductive"])
def test_batched_reptile_evaluation_gives_evaluates_accuracies(transductive):
    from bookcode.episodes import Episode
    from bookcode.evaluation import evaluate

    learner = meta.Reptile(tiny_conv4("fused"), inner_lr=0.05, inner_batch=2,
                           transductive=transductive, task_batching="batched")  # fmt: skip
    learner.compile(meta.Reptile.annealed_sgd(1.0, 0.0, 10))
    episodes = []
    for seed in range(4):  # 8 episodes, 4 classes of labels, shuffled queries
        for sx, sy, qx, qy in zip(*conv_tasks(seed, shots=2)[:4]):
            order = np.random.default_rng(seed).permutation(len(qy))
            episodes.append(Episode(sx, sy, qx[order] + 0.3 * sx[:1], qy[order], np.arange(WAYS)))
    episodes = episodes[:8]
    seen = set()
    for steps in (0, 3):
        learner.test_inner_steps = steps
        expected = evaluate(learner, episodes)
        for tasks in (8, 3):  # one call, or groups of 3, 3 and 2
            got = batched.reptile_evaluate(learner, episodes, tasks=tasks)
            np.testing.assert_allclose(got.accuracies, expected.accuracies, atol=1e-6)
            assert got.mean == pytest.approx(expected.mean) and got.ci95 == pytest.approx(expected.ci95)
        seen.add(tuple(expected.accuracies))
    assert len(seen) == 2  # adaptation changed some predictions


def test_save_and_load_keep_the_option(tmp_path):
    learner = meta.MAML(tiny_conv4(), inner_lr=0.4, task_batching="batched")
    learner.compile(keras.optimizers.Adam(1e-3))
    sx, sy, qx, qy = conv_tasks()
    learner.train_on_batch((sx, sy, qx), qy)
    assert learner.get_config()["task_batching"] == "batched"
    learner.save(tmp_path / "maml.keras")
    loaded = keras.models.load_model(tmp_path / "maml.keras")
    assert loaded.task_batching == "batched"
    loaded.train_on_batch((sx, sy, qx), qy)
    reptile = meta.Reptile(tiny_conv4("fused"), inner_batch=2, task_batching="batched")
    reptile.compile(meta.Reptile.annealed_sgd(1.0, 0.0, 10))
    reptile.train_on_batch((sx, sy, qx), qy)
    reptile.save(tmp_path / "reptile.keras")
    loaded = keras.models.load_model(tmp_path / "reptile.keras")
    assert loaded.task_batching == "batched" and loaded.inner_batch == 2
    loaded.train_on_batch((sx, sy, qx), qy)


DISTRIBUTED = """
import sys
sys.path.insert(0, "tests")
import test_distribute as d
d.FACTORIES["MAML batched"] = (
    lambda b: b.meta.MAML(d._image_net(d.WAYS), inner_lr=0.1, task_batching="batched"), "tasks"
)
d._worker(["MAML", "MAML batched"])
"""


def test_two_replicas_of_batched_tasks_give_the_one_device_mapped_update():
    import test_distribute

    result = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED], capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""},
        cwd=str(Path(__file__).resolve().parents[1]), check=False,
    )  # fmt: skip
    cases = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            cases[json.loads(line)["case"]] = json.loads(line)
    mapped, stacked = cases.get("MAML"), cases.get("MAML batched")
    assert mapped and stacked, result.stderr[-3000:]
    assert "error" not in stacked, stacked["error"]
    error = test_distribute._relative_error
    assert error(mapped["one"]["update"], stacked["two"]["update"]) < test_distribute.TOLERANCE
    assert error(stacked["one"]["update"], stacked["two"]["update"]) < test_distribute.TOLERANCE
