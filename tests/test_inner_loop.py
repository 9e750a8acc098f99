"""Tests of the inner-loop engine: bookcode.meta.adapt and its update rules."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from bookcode import meta


@pytest.mark.parametrize("first_order", [False, True])  # unrolled, graph loop
def test_step_aware_loss_sees_a_new_minibatch_per_step(first_order):
    # loss (w - target[step])^2, rate 0.25, from w = 0:
    # step 0: grad -2 -> w = 0.5; step 1: grad 2 * (0.5 - 5) = -9 -> w = 2.75
    targets = tf.constant([1.0, 5.0])
    seen = []

    def loss_fn(params, step):
        seen.append(step.dtype)
        return tf.square(params[0] - tf.gather(targets, step))

    fast, _ = meta.adapt(loss_fn, [tf.constant(0.0)], 2, 0.25, first_order=first_order)
    assert float(fast[0]) == pytest.approx(2.75)
    assert set(seen) == {tf.int32}


def test_per_parameter_rates():
    def loss_fn(params, step):
        return tf.square(params[0]) + tf.square(params[1] - 1.0)

    # grads 2 * 1 = 2 and 2 * (2 - 1) = 2; rates 0.1 and 0.5
    fast, _ = meta.adapt(loss_fn, [tf.constant(1.0), tf.constant(2.0)], 1, [0.1, 0.5])
    np.testing.assert_allclose([float(f) for f in fast], [0.8, 1.0])
    fast, _ = meta.adapt(loss_fn, [tf.constant(1.0), tf.constant(2.0)], 1, meta.SGD([0.1, 0.5]))
    np.testing.assert_allclose([float(f) for f in fast], [0.8, 1.0])


@pytest.mark.parametrize("beta_1", [0.0, 0.9])
@pytest.mark.parametrize("first_order", [False, True])
def test_adam_rule_equals_hand_computation(beta_1, first_order):
    w0 = np.array([1.0, -2.0])
    lr, beta_2, eps = 0.1, 0.999, 1e-8

    def loss_fn(params, step):
        return tf.reduce_sum(tf.constant([1.0, 3.0], tf.float64) * params[0] ** 2)

    rule = meta.Adam(lr, beta_1=beta_1, beta_2=beta_2, epsilon=eps)
    fast, _ = meta.adapt(loss_fn, [tf.constant(w0)], 2, rule, first_order=first_order)
    w, m, v = w0.copy(), 0.0, 0.0
    for t in (1, 2):
        g = 2 * np.array([1.0, 3.0]) * w
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g**2
        w = w - lr * (m / (1 - beta_1**t)) / (np.sqrt(v / (1 - beta_2**t)) + eps)
    np.testing.assert_allclose(fast[0].numpy(), w, rtol=1e-12)
    assert meta.Adam().beta_1 == 0.0  # Reptile's inner Adam


def test_graph_loop_gradients_equal_unrolled_first_order_and_reach_rule_variables():
    """First order, 3 steps, in a tf.function: the graph loop's meta-gradient
    w.r.t. the initial weights and w.r.t. a Keras variable of the update rule
    equal the hand-unrolled loop with stopped inner gradients."""
    rate = keras.Variable(0.3, dtype="float64", name="rate")
    x = tf.constant([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]], tf.float64)
    y = tf.constant([1.0, -1.0, 0.5], tf.float64)

    def loss_fn(params, step):
        return tf.reduce_mean(tf.square(tf.tanh(tf.linalg.matvec(x, params[0])) + params[1] - y))

    @tf.function
    def by_adapt(w, b):
        with tf.GradientTape() as tape:
            tape.watch([w, b])
            fast, _ = meta.adapt(loss_fn, [w, b], 3, meta.SGD(rate), first_order=True)
            loss = loss_fn(fast, 0) * 2.0
        return tape.gradient(loss, [w, b, rate])

    @tf.function
    def by_hand(w, b):
        with tf.GradientTape() as tape:
            tape.watch([w, b])
            params = [w, b]
            for _ in range(3):
                with tf.GradientTape() as inner:
                    inner.watch(params)
                    loss = loss_fn(params, 0)
                grads = [tf.stop_gradient(g) for g in inner.gradient(loss, params)]
                params = [p - rate * g for p, g in zip(params, grads)]
            loss = loss_fn(params, 0) * 2.0
        return tape.gradient(loss, [w, b, rate])

    w, b = tf.constant([0.3, -0.2], tf.float64), tf.constant(0.1, tf.float64)
    graph, hand = by_adapt(w, b), by_hand(w, b)
    assert "While" in str(by_adapt.get_concrete_function(w, b).graph.as_graph_def())
    for g, h in zip(graph, hand):
        assert g is not None
        np.testing.assert_allclose(g.numpy(), h.numpy(), rtol=1e-12)
    assert abs(float(graph[2])) > 1e-3  # the rule's variable gets a real gradient


def test_metric_history_in_graph_loop_with_tensor_steps():
    def loss_fn(params, step):
        return tf.square(params[0] - 3.0)

    fast, history = tf.function(
        lambda s: meta.adapt(
            loss_fn, [tf.constant(1.0)], s, 0.25, first_order=True, metric_fn=lambda p: p[0]
        )
    )(tf.constant(2))
    np.testing.assert_allclose(history.numpy(), [1.0, 2.0, 2.5])
    assert float(fast[0]) == 2.5


def test_unconnected_gradient_is_an_error_naming_the_parameter():
    def loss_fn(params, step):
        return tf.square(params[0])

    params = [tf.constant(1.0), tf.constant(2.0)]
    with pytest.raises(ValueError, match=r"inner-loop loss does not depend on parameter\(s\) #1"):
        meta.adapt(loss_fn, params, 1, 0.1)
    with pytest.raises(ValueError, match="bias"):
        meta.adapt(loss_fn, params, 1, 0.1, names=["kernel", "bias"])
    fast, _ = meta.adapt(loss_fn, params, 1, 0.1, unused=[1])
    assert float(fast[1]) == 2.0 and float(fast[0]) == pytest.approx(0.8)
