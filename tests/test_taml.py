"""TAML (Jamal & Qi 2019): the inequality measures against hand computations,
the prediction entropy, and the learner's meta-objective against MAML's pieces."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from bookcode import meta
from bookcode.datasets import Sinusoids
from bookcode.meta import taml

LOSSES = [1.0, 2.0, 3.0, 6.0]  # mean 3


def test_theil_index_by_hand():
    # (1/4) sum (l/3) ln(l/3)
    expected = (1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3) + 0 + 2 * math.log(2)) / 4
    assert float(taml.theil_index(LOSSES)) == pytest.approx(expected, rel=1e-5)


def test_generalized_entropy_by_hand():
    # alpha = 2: (1 / (4 * 2)) sum ((l/3)^2 - 1) = (1/8)(1/9 + 4/9 + 1 + 4 - 4)
    expected = (1 / 9 + 4 / 9 + 1 + 4 - 4) / 8
    assert float(taml.generalized_entropy(LOSSES, alpha=2.0)) == pytest.approx(expected, rel=1e-5)
    # alpha = 1 is Theil, alpha = 0 the mean log deviation, and the limits agree
    theil = float(taml.theil_index(LOSSES))
    assert float(taml.generalized_entropy(LOSSES, alpha=1)) == pytest.approx(theil)
    assert float(taml.generalized_entropy(LOSSES, alpha=1.001)) == pytest.approx(theil, rel=2e-3)
    mld = -np.mean(np.log(np.array(LOSSES) / 3))
    assert float(taml.generalized_entropy(LOSSES, alpha=0)) == pytest.approx(mld, rel=1e-5)
    assert float(taml.generalized_entropy(LOSSES, alpha=0.001)) == pytest.approx(mld, rel=2e-3)


def test_atkinson_index_by_hand():
    # epsilon = 0.5: 1 - (mean of sqrt(l))^2 / mean
    expected = 1 - np.mean(np.sqrt(LOSSES)) ** 2 / 3
    assert float(taml.atkinson_index(LOSSES, epsilon=0.5)) == pytest.approx(expected, rel=1e-5)
    # epsilon = 1: 1 - geometric mean / mean = 1 - 36 ** 0.25 / 3
    assert float(taml.atkinson_index(LOSSES, epsilon=1)) == pytest.approx(
        1 - 36**0.25 / 3, rel=1e-5
    )


def test_gini_coefficient_by_hand():
    # pairwise |differences| (ordered pairs): 2 * (1 + 2 + 5 + 1 + 4 + 3) = 32
    assert float(taml.gini_coefficient(LOSSES)) == pytest.approx(32 / (2 * 16 * 3), rel=1e-6)
    # one task holds all the loss: (M - 1) / M
    assert float(taml.gini_coefficient([1e-9, 1e-9, 1e-9, 1.0])) == pytest.approx(0.75, rel=1e-4)


def test_variance_of_logarithms_by_hand():
    logs = np.log(LOSSES)
    expected = np.mean((logs - np.log(36**0.25)) ** 2)  # ln of the geometric mean
    assert float(taml.variance_of_logarithms(LOSSES)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", sorted(taml.INEQUALITY_MEASURES))
def test_measures_are_zero_for_equal_losses_and_scale_free(name):
    measure = taml.INEQUALITY_MEASURES[name]
    assert abs(float(measure([0.7, 0.7, 0.7]))) < 1e-6
    assert float(measure(LOSSES)) > 0.01
    # scale invariance: the same inequality in other units
    assert float(measure(np.array(LOSSES) * 10)) == pytest.approx(float(measure(LOSSES)), rel=1e-4)


@pytest.mark.parametrize("name", sorted(taml.INEQUALITY_MEASURES))
def test_measures_refuse_bad_losses(name):
    measure = taml.INEQUALITY_MEASURES[name]
    with pytest.raises(ValueError, match="positive"):
        measure([1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="at least two"):
        measure([1.0])
    with pytest.raises(ValueError, match="vector"):
        measure([[1.0, 2.0]])


def test_atkinson_refuses_nonpositive_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        taml.atkinson_index(LOSSES, epsilon=0)


def test_prediction_entropy():
    assert float(taml.prediction_entropy(np.zeros((3, 5)))) == pytest.approx(math.log(5))
    assert float(taml.prediction_entropy([[50.0, 0.0, 0.0]])) < 1e-6
    # by hand: p = softmax([0, ln 3]) = (1/4, 3/4)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert float(taml.prediction_entropy([[0.0, math.log(3.0)]])) == pytest.approx(expected)


def _net(ways=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(ways)]
    )


def _batch(tasks=4, ways=3, seed=0):
    rng = np.random.default_rng(seed)
    sx = rng.normal(size=(tasks, ways * 2, 6)).astype(np.float32)
    qx = rng.normal(size=(tasks, ways * 3, 6)).astype(np.float32)
    sy = np.tile(np.repeat(np.arange(ways), 2), (tasks, 1)).astype(np.int32)
    qy = np.tile(np.repeat(np.arange(ways), 3), (tasks, 1)).astype(np.int32)
    return sx, sy, qx, qy


def _xent(model, weights, x, y):
    return meta.task_loss("classification", y, meta.forward(model, weights, x))


@pytest.mark.parametrize("variant", ["theil", "gini", "entropy"])
def test_batch_objective_equals_maml_pieces(variant):
    net = _net()
    learner = taml.TAML(net, variant=variant, weight=0.7, inner_lr=0.5, inner_steps=1)
    sx, sy, qx, qy = _batch()
    results, objective, grads = learner.batch_gradients(*map(tf.constant, (sx, sy, qx, qy)))
    theta = [v.value for v in net.trainable_variables]
    query, initial, h0, h1 = [], [], [], []
    for i in range(len(sx)):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            support_loss = _xent(net, theta, sx[i], sy[i])
        fast = [t - 0.5 * g for t, g in zip(theta, tape.gradient(support_loss, theta))]
        query.append(float(_xent(net, fast, qx[i], qy[i])))
        initial.append(float(support_loss))
        h0.append(float(taml.prediction_entropy(meta.forward(net, theta, qx[i]))))
        h1.append(float(taml.prediction_entropy(meta.forward(net, fast, qx[i]))))
    np.testing.assert_allclose(results["loss"], query, rtol=1e-5)
    np.testing.assert_allclose(results["initial_loss"], initial, rtol=1e-5)
    if variant == "entropy":
        expected = np.mean(query) + 0.7 * (np.mean(h1) - np.mean(h0))
        np.testing.assert_allclose(results["entropy_initial"], h0, rtol=1e-5)
    else:
        expected = np.mean(query) + 0.7 * float(taml.INEQUALITY_MEASURES[variant](initial))
    assert float(objective) == pytest.approx(expected, rel=1e-5)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_weight_zero_gives_maml_gradient_and_weight_changes_it():
    sx, sy, qx, qy = map(tf.constant, _batch())
    net = _net()
    maml = meta.MAML(net, inner_lr=0.5)
    _, task_grads = maml.task_gradients(sx, sy, qx, qy)
    maml_grads = maml.combine_gradients(task_grads)
    for variant in ("theil", "entropy"):
        _, _, zero = taml.TAML(net, variant=variant, weight=0.0, inner_lr=0.5).batch_gradients(
            sx, sy, qx, qy
        )
        for a, b in zip(zero, maml_grads):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        _, _, some = taml.TAML(net, variant=variant, weight=1.0, inner_lr=0.5).batch_gradients(
            sx, sy, qx, qy
        )
        assert max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(some, maml_grads)) > 1e-4


def test_inequality_gradient_matches_finite_differences():
    # d objective / d (output bias), weight only on the inequality: exact second order
    sx, sy, qx, qy = map(tf.constant, _batch(seed=3))
    net = _net(seed=3)
    learner = taml.TAML(net, variant="variance_of_logarithms", weight=2.0, inner_lr=0.3)
    _, _, grads = learner.batch_gradients(sx, sy, qx, qy)
    bias = net.trainable_variables[-1]
    original = bias.numpy()
    h = 1e-3
    numeric = []
    for j in range(len(original)):
        values = []
        for sign in (1, -1):
            shifted = original.copy()
            shifted[j] += sign * h
            bias.assign(shifted)
            values.append(float(learner.batch_gradients(sx, sy, qx, qy)[1]))
        numeric.append((values[0] - values[1]) / (2 * h))
    bias.assign(original)
    np.testing.assert_allclose(grads[-1], numeric, rtol=2e-2, atol=2e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        taml.TAML(_net(), variant="atkinsons")
    with pytest.raises(ValueError, match="weight"):
        taml.TAML(_net(), weight=-1.0)
    with pytest.raises(ValueError, match="classification"):
        taml.TAML(_net(ways=1), variant="entropy", kind="regression")
    with pytest.raises(ValueError, match="measure_options"):
        taml.TAML(_net(), variant="theil", measure_options={"alpha": 3.0})


def test_measure_options_reach_the_measure():
    learner = taml.TAML(_net(), variant="atkinson", measure_options={"epsilon": 1.0})
    assert float(learner.inequality(tf.constant(LOSSES))) == pytest.approx(1 - 36**0.25 / 3)


def test_taml_learns_sine_regression():
    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(40, activation="relu"),
         keras.layers.Dense(40, activation="relu"), keras.layers.Dense(1)]
    )  # fmt: skip
    learner = taml.TAML(net, variant="theil", weight=0.5, inner_lr=0.01, kind="regression")
    learner.compile(keras.optimizers.Adam(3e-3))
    test = Sinusoids(seed=1).fixed(20)

    def after_one_step():
        return np.mean([learner.adaptation_curve(*t.inputs(), t.query_y, 1)[1, 1] for t in test])

    before = after_one_step()
    history = learner.fit(
        Sinusoids(seed=0).tf_dataset(batch_size=10), steps_per_epoch=50, epochs=4, verbose=0
    )
    assert set(history.history) >= {"loss", "mse", "initial_loss", "batch_objective"}
    assert after_one_step() < 0.9 * before
