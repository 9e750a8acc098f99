"""Tests of bookcode.learned_optimizers: the LSTM optimiser (Andrychowicz et
al. 2016) and the meta-LSTM few-shot learner (Ravi & Larochelle 2017)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from bookcode import learned_optimizers as lo
from bookcode import nets
from bookcode.learned_optimizers.meta_lstm import _logit

# -- preprocessing -----------------------------------------------------------


def test_preprocessing_values_by_hand():
    p = 10.0
    g = np.array([1.0, -math.e, 1e-3, -2e-5, 0.0], np.float32)
    out = lo.preprocess_gradients(g, p).numpy()
    assert out.shape == (5, 2)
    # |g| >= e^-10 = 4.54e-5: (log|g| / p, sign g)
    np.testing.assert_allclose(out[0], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(out[1], [0.1, -1.0], atol=1e-6)
    np.testing.assert_allclose(out[2], [math.log(1e-3) / 10, 1.0], rtol=1e-5)
    # tiny gradients: (-1, e^p g)
    np.testing.assert_allclose(out[3], [-1.0, -2e-5 * math.exp(10)], rtol=1e-5)
    np.testing.assert_allclose(out[4], [-1.0, 0.0], atol=1e-7)


def test_preprocessing_rejects_bad_p():
    with pytest.raises(ValueError, match="p must be positive"):
        lo.preprocess_gradients(np.ones(3, np.float32), p=0)


# -- quadratics ---------------------------------------------------------------


def test_quadratic_loss_and_gradient_by_hand():
    w = np.array([[[1.0, 2.0], [0.0, 1.0]]], np.float32)
    y = np.array([[1.0, 1.0]], np.float32)
    theta = np.array([[1.0, 1.0]], np.float32)
    # W theta - y = (2, 0): loss 4, gradient 2 W^T (2, 0) = (4, 8)
    loss, grad = lo.quadratic_loss_and_gradient(w, y, theta)
    np.testing.assert_allclose(loss.numpy(), [4.0])
    np.testing.assert_allclose(grad.numpy(), [[4.0, 8.0]])
    np.testing.assert_allclose(lo.quadratic_loss(w, y, theta).numpy(), [4.0])


def test_random_quadratics_shapes_seed_and_bad_input():
    w, y, t = lo.random_quadratics(3, dim=4, seed=5)
    assert w.shape == (3, 4, 4) and y.shape == (3, 4) and t.shape == (3, 4)
    np.testing.assert_array_equal(w, lo.random_quadratics(3, dim=4, seed=5)[0])
    with pytest.raises(ValueError):
        lo.random_quadratics(0)
    with pytest.raises(ValueError, match="log10_scale"):
        lo.random_quadratics(2, log10_scale=(1.0, 0.0))
    # scaling multiplies W and y of each problem by one factor in [10^-2, 10^0]
    ws, ys, ts = lo.random_quadratics(3, dim=4, seed=5, log10_scale=(-2.0, 0.0))
    factor = ws[:, 0, 0] / w[:, 0, 0]
    assert np.all((factor >= 0.01 - 1e-6) & (factor <= 1 + 1e-6))
    np.testing.assert_allclose(ws / factor[:, None, None], w, rtol=1e-5)
    np.testing.assert_allclose(ys / factor[:, None], y, rtol=1e-5)
    np.testing.assert_array_equal(ts, t)


# -- LSTM optimiser -------------------------------------------------------------


def test_lstm_optimizer_shapes_and_bad_config():
    opt = lo.LSTMOptimizer(hidden_size=8)
    state = opt.initial_state(7)
    assert len(state) == 2 and state[0][0].shape == (7, 8)
    update, new_state = opt.step(tf.ones(7), state)
    assert update.shape == (7,)
    assert new_state[1][1].shape == (7, 8)
    assert opt(tf.ones((2, 3))).shape == (6,)
    with pytest.raises(ValueError):
        lo.LSTMOptimizer(hidden_size=0)


def test_lstm_optimizer_is_coordinatewise():
    """Shared weights, one row per coordinate: a coordinate's update does not
    depend on the other coordinates."""
    opt = lo.LSTMOptimizer(hidden_size=8)
    g = tf.constant([0.3, -2.0, 1e-7])
    alone = [opt(g[i : i + 1]).numpy()[0] for i in range(3)]
    np.testing.assert_allclose(opt(g).numpy(), alone, rtol=1e-5, atol=1e-8)


def test_lstm_optimizer_minimize_on_keras_model_variables():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = lo.LSTMOptimizer(hidden_size=8)
    x, y = tf.ones((4, 3)), tf.zeros((4, 2))
    before = [v.numpy().copy() for v in model.trainable_variables]
    loss = opt.minimize(lambda: tf.reduce_mean((model(x) - y) ** 2), model.trainable_variables)
    assert np.isfinite(float(loss))
    after = [v.numpy() for v in model.trainable_variables]
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    # state is kept per coordinate (3*2 kernel + 2 bias) and reset on demand
    assert opt._slots[0] == [6, 2]
    opt.reset()
    assert opt._slots is None


def _unrolled_meta_loss(opt, w, y, t, steps, first_order):
    theta = tf.constant(t)
    state = opt.initial_state(t.size)
    total = 0.0
    for _ in range(steps):
        _, g = lo.quadratic_loss_and_gradient(w, y, theta)
        if first_order:
            g = tf.stop_gradient(g)
        u, state = opt.step(tf.reshape(g, (-1,)), state)
        theta = theta + tf.reshape(u, t.shape)
        total += tf.reduce_mean(lo.quadratic_loss(w, y, theta))
    return total


def test_meta_gradients_flow_through_the_unroll():
    keras.utils.set_random_seed(0)
    opt = lo.LSTMOptimizer(hidden_size=8, output_scale=0.1)
    w, y, t = lo.random_quadratics(8, dim=3, seed=0)
    # first order (the paper's choice): every weight still gets a gradient
    with tf.GradientTape() as tape:
        total = _unrolled_meta_loss(opt, w, y, t, 5, first_order=True)
    grads = tape.gradient(total, opt.trainable_variables)
    assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)
    # the full gradient through 5 unrolled steps equals finite differences
    with tf.GradientTape() as tape:
        total = _unrolled_meta_loss(opt, w, y, t, 5, first_order=False)
    var = opt.head.kernel
    grad = tape.gradient(total, var)
    direction = grad / tf.norm(grad)
    eps = 1e-3
    var.assign_add(eps * direction)
    plus = float(_unrolled_meta_loss(opt, w, y, t, 5, first_order=False))
    var.assign_sub(2 * eps * direction)
    minus = float(_unrolled_meta_loss(opt, w, y, t, 5, first_order=False))
    var.assign_add(eps * direction)
    np.testing.assert_allclose((plus - minus) / (2 * eps), float(tf.norm(grad)), rtol=0.05)


def test_meta_training_reduces_loss_on_held_out_quadratics():
    keras.utils.set_random_seed(0)
    opt = lo.LSTMOptimizer(unroll=10, truncations=2)
    opt.compile(optimizer=keras.optimizers.Adam(1e-2))
    test = lo.random_quadratics(64, seed=99)
    before = np.median(opt.optimize_quadratics(*test, 20).numpy()[-1])
    data = tf.data.Dataset.from_tensor_slices(lo.random_quadratics(32 * 40, seed=1)).batch(32)
    opt.fit(data, epochs=1, verbose=0)
    after = np.median(opt.optimize_quadratics(*test, 20).numpy()[-1])
    assert after < 0.5 * before
    # compile created the optimiser's variables, so the truncation was traced once
    assert opt._truncation.experimental_get_tracing_count() == 1


def test_lstm_optimizer_computes_in_float32_under_mixed_bfloat16():
    """Under the notebooks' bfloat16 policy the optimiser still meta-trains,
    and its updates equal the float32 optimiser's (its layers are float32)."""
    keras.utils.set_random_seed(0)
    reference = lo.LSTMOptimizer(unroll=5, truncations=1)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        opt = lo.LSTMOptimizer(unroll=5, truncations=1)
        opt.set_weights(reference.get_weights())
        g = tf.constant([0.3, -1e-3, 2.0])
        np.testing.assert_allclose(opt(g).numpy(), reference(g).numpy(), rtol=1e-6)
        # bfloat16 gradients (a mixed-precision learner's) are encoded in float32
        encoded = lo.preprocess_gradients(tf.cast(g, tf.bfloat16))
        assert encoded.dtype == tf.float32
        np.testing.assert_allclose(encoded, lo.preprocess_gradients(g), rtol=1e-2)
        opt.compile(optimizer=keras.optimizers.Adam(1e-2))
        data = tf.data.Dataset.from_tensor_slices(lo.random_quadratics(8 * 2, seed=1)).batch(8)
        history = opt.fit(data, epochs=1, verbose=0)
        assert np.isfinite(history.history["meta_loss"][-1])
        assert opt.optimize_quadratics(*lo.random_quadratics(4, seed=2), 3).dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_keras_baseline_on_quadratics_matches_plain_sgd():
    w, y, t = lo.random_quadratics(3, dim=4, seed=2)
    losses = lo.optimize_quadratics_with(keras.optimizers.SGD(0.01), w, y, t, 3)
    theta = t.copy()
    expected = [lo.quadratic_loss(w, y, theta).numpy()]
    for _ in range(3):
        theta = theta - 0.01 * lo.quadratic_loss_and_gradient(w, y, theta)[1].numpy()
        expected.append(lo.quadratic_loss(w, y, theta).numpy())
    np.testing.assert_allclose(losses, np.array(expected), rtol=1e-4)


# -- MLP optimisees --------------------------------------------------------------


def _feature_dataset(num_classes=12, per_class=10, dim=6, seed=0):
    from bookcode.episodes import ClassDataset

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim)) * 2
    y = np.repeat(np.arange(num_classes), per_class)
    x = (centres[y] + rng.standard_normal((len(y), dim))).astype(np.float32)
    return ClassDataset(x, y, [str(c) for c in range(num_classes)])


def test_mlp_loss_matches_a_keras_model():
    params = lo.init_mlp_parameters(2, 5, 4, 3, seed=0)
    assert params["w1"].shape == (2, 5, 4) and params["b2"].shape == (2, 3)
    assert np.all(params["b1"] == 0) and np.abs(params["w1"]).max() <= math.sqrt(6 / 9)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 5)).astype(np.float32)
    y = rng.integers(0, 3, (2, 7))
    losses = lo.mlp_loss(params, x, y).numpy()
    assert losses.shape == (2,)
    for i in range(2):
        model = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(4, activation="sigmoid"), keras.layers.Dense(3)]
        )
        model.set_weights([params[k][i] for k in lo.MLP_PARAMETERS])
        expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y[i], model(x[i]))
        np.testing.assert_allclose(losses[i], float(expected), rtol=1e-5)
    with pytest.raises(ValueError):
        lo.init_mlp_parameters(0, 5, 4, 3)


def test_mlp_tasks_shapes_labels_seed_and_bad_input():
    data = _feature_dataset()
    tasks = lo.mlp_tasks(data, 3, steps=4, batch_size=8, ways=3, classes_per_label=2, seed=0)
    assert tasks["x"].shape == (3, 4, 8, 6) and tasks["y"].shape == (3, 4, 8)
    assert tasks["w1"].shape == (3, 6, 20) and tasks["w2"].shape == (3, 20, 3)
    assert set(np.unique(tasks["y"])) <= {0, 1, 2}
    # each task's features are standardised over its own examples
    assert abs(float(tasks["x"].mean())) < 0.3
    again = lo.mlp_tasks(data, 3, steps=4, batch_size=8, ways=3, classes_per_label=2, seed=0)
    np.testing.assert_array_equal(tasks["x"], again["x"])
    mixed = lo.mlp_tasks(data, 4, steps=2, batch_size=8, ways=3, classes_per_label=(1, 4))
    assert mixed["x"].shape == (4, 2, 8, 6)
    with pytest.raises(ValueError, match="needs 15 classes"):
        lo.mlp_tasks(data, 1, steps=2, ways=5, classes_per_label=3)
    with pytest.raises(ValueError):
        lo.mlp_tasks(data, 1, steps=0)


def test_keras_baseline_on_mlps_matches_plain_sgd():
    tasks = lo.mlp_tasks(_feature_dataset(), 2, steps=3, batch_size=8, ways=3, seed=0)
    losses = lo.optimize_mlps_with(keras.optimizers.SGD(0.5), tasks)
    assert losses.shape == (3, 2)
    params = {k: tf.constant(tasks[k]) for k in lo.MLP_PARAMETERS}
    for t in range(3):
        with tf.GradientTape() as tape:
            tape.watch(list(params.values()))
            loss = tf.reduce_sum(lo.mlp_loss(params, tasks["x"][:, t], tasks["y"][:, t]))
        grads = tape.gradient(loss, params)
        params = {k: params[k] - 0.5 * grads[k] for k in params}
        after = (t + 1) % 3  # measured on the next minibatch, cyclically
        expected = lo.mlp_loss(params, tasks["x"][:, after], tasks["y"][:, after]).numpy()
        np.testing.assert_allclose(losses[t], expected, rtol=1e-4)


def _flat_mlp_run(opt, tasks, steps):
    """The learned optimiser on MLP tasks by hand: losses of every step's
    result on the next minibatch (steps, n)."""
    params = {k: tf.constant(tasks[k]) for k in lo.MLP_PARAMETERS}
    names, n = list(params), tasks["x"].shape[0]
    state = opt.initial_state(sum(int(np.prod(params[k].shape)) for k in names))
    losses = []
    for t in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(list(params.values()))
            loss = tf.reduce_sum(lo.mlp_loss(params, tasks["x"][:, t], tasks["y"][:, t]))
        grads = tape.gradient(loss, params)
        flat = tf.concat([tf.reshape(grads[k], (n, -1)) for k in names], 1)
        update, state = opt.step(tf.reshape(flat, (-1,)), state)
        update = tf.split(
            tf.reshape(update, (n, -1)), [int(np.prod(params[k].shape[1:])) for k in names], 1
        )
        params = {k: params[k] + tf.reshape(u, params[k].shape) for k, u in zip(names, update)}
        after = (t + 1) % tasks["x"].shape[1]
        losses.append(lo.mlp_loss(params, tasks["x"][:, after], tasks["y"][:, after]).numpy())
    return np.array(losses)


def test_lstm_optimizer_on_mlps_by_hand_and_meta_loss_on_the_next_minibatch():
    keras.utils.set_random_seed(0)
    tasks = lo.mlp_tasks(_feature_dataset(), 2, steps=4, batch_size=8, ways=3, seed=0)
    opt = lo.LSTMOptimizer(hidden_size=6, unroll=4, truncations=1)
    by_hand = _flat_mlp_run(opt, tasks, 4)
    np.testing.assert_allclose(opt.optimize_mlps(tasks), by_hand, rtol=1e-4)
    # the meta-loss of one truncation (reported before the LSTM's update) is the
    # mean log loss of the 4 steps' results, each on the minibatch after its own
    opt.compile(optimizer=keras.optimizers.SGD(0.0))
    history = opt.fit(tf.data.Dataset.from_tensor_slices(tasks).batch(2), epochs=1, verbose=0)
    np.testing.assert_allclose(
        history.history["meta_loss"][0], np.mean(np.log(by_hand + 1e-12)), rtol=1e-4
    )


def test_meta_training_on_mlp_tasks_reduces_their_loss():
    keras.utils.set_random_seed(0)
    data = _feature_dataset(num_classes=12, per_class=20)
    opt = lo.LSTMOptimizer(hidden_size=10, unroll=5, truncations=2)
    opt.compile(optimizer=keras.optimizers.Adam(1e-2))
    test = lo.mlp_tasks(data, 8, steps=10, batch_size=16, ways=4, seed=99)
    before = np.mean(opt.optimize_mlps(test)[-1])
    train = lo.mlp_tasks(data, 4 * 30, steps=10, batch_size=16, ways=4, seed=1)
    history = opt.fit(tf.data.Dataset.from_tensor_slices(train).batch(4), epochs=1, verbose=0)
    assert np.isfinite(history.history["meta_loss"][-1])
    after = np.mean(opt.optimize_mlps(test)[-1])
    assert after < 0.8 * before, (before, after)


# -- meta-LSTM -------------------------------------------------------------------


def test_meta_lstm_cell_with_hand_set_gates_is_a_gradient_step():
    """With W = 0, forget gate 1 and input gate lr, the cell update is
    theta - lr * grad: plain gradient descent."""
    cell = lo.MetaLSTMCell(initial_learning_rate=0.25, initial_forget=0.5)
    x = tf.random.normal((4, 3))
    theta, grad = tf.constant([1.0, -2.0, 0.5, 0.0]), tf.constant([0.4, 0.4, -1.0, 2.0])
    zeros = tf.zeros(4)
    cell(x, theta, grad, zeros, zeros)
    cell.w_forget.assign(tf.zeros_like(cell.w_forget))
    cell.w_input.assign(tf.zeros_like(cell.w_input))
    cell.b_forget.assign([30.0])  # sigmoid(30) = 1 in float32
    new_theta, forget, rate = cell(x, theta, grad, zeros, zeros)
    np.testing.assert_allclose(rate.numpy(), 0.25, rtol=1e-6)
    np.testing.assert_allclose(forget.numpy(), 1.0)
    np.testing.assert_allclose(new_theta.numpy(), (theta - 0.25 * grad).numpy(), rtol=1e-6)
    # the initial biases give the requested initial gates
    fresh = lo.MetaLSTMCell(initial_learning_rate=0.25, initial_forget=0.5)
    fresh(x, theta, grad, zeros, zeros)
    np.testing.assert_allclose(tf.sigmoid(fresh.b_input).numpy(), [0.25], rtol=1e-6)
    np.testing.assert_allclose(tf.sigmoid(fresh.b_forget).numpy(), [0.5], rtol=1e-6)


def _episode(ways=3, shots=2, queries=2, seed=0):
    rng = np.random.default_rng(seed)
    sx = rng.random((ways * shots, 12, 12, 1), dtype=np.float32)
    qx = rng.random((ways * queries, 12, 12, 1), dtype=np.float32)
    return sx, np.repeat(np.arange(ways), shots), qx, np.repeat(np.arange(ways), queries)


def _learner(ways, filters, blocks=4, input_shape=(28, 28, 1)):
    """The meta-LSTM's learner: Conv-4 with few filters and Keras batch norm."""
    return nets.conv4(
        input_shape, filters, num_classes=ways, blocks=blocks, batch_norm="keras", name="learner"
    )


def _meta_lstm(ways=3, steps=2):
    learner = _learner(ways, filters=4, blocks=2, input_shape=(12, 12, 1))
    return lo.MetaLSTMLearner(learner, steps=steps, hidden_size=6)


def test_meta_lstm_trains_under_mixed_bfloat16_with_a_float32_meta_learner():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = _meta_lstm(steps=2)
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        sx, sy, qx, qy = _episode()
        sy, qy = sy.astype("int32"), qy.astype("int32")  # as EpisodeSampler gives them
        data = tf.data.Dataset.from_tensors(((sx, sy, qx), qy)).repeat(2)
        history = model.fit(data, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][-1])
        theta, forget, rate = model.adapt(sx, sy)
        assert theta.dtype == forget.dtype == rate.dtype == tf.float32
        assert model.predict_episode(sx, sy, qx).dtype == np.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_meta_lstm_shapes_and_gates():
    keras.utils.set_random_seed(0)
    model = _meta_lstm()
    sx, sy, qx, _ = _episode()
    logits = model.predict_episode(sx, sy, qx)
    assert logits.shape == (6, 3)
    theta, forget, rate = model.adapt(sx, sy)
    n = model.learner.count_params() - 2 * 2 * 4  # minus batch-norm moving statistics
    assert theta.shape == (n,) and forget.shape == (2, n) and rate.shape == (2, n)
    assert np.all((forget.numpy() > 0) & (forget.numpy() < 1))
    with pytest.raises(ValueError, match="ways"):
        model.predict_episode(sx[:4], sy[:4], qx)
    with pytest.raises(ValueError):
        lo.MetaLSTMLearner(model.learner, steps=0)


def test_meta_lstm_with_frozen_encoder():
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential(
        [keras.Input((12, 12, 1)), keras.layers.Conv2D(3, 3, padding="same")]
    )
    learner = _learner(3, filters=4, blocks=1, input_shape=(12, 12, 3))
    model = lo.MetaLSTMLearner(learner, steps=2, hidden_size=6, encoder=encoder)
    sx, sy, qx, _ = _episode()
    assert model.predict_episode(sx, sy, qx).shape == (6, 3)
    assert not any(v is w for v in model.trainable_variables for w in encoder.weights)
    np.testing.assert_allclose(model.encode(sx).numpy(), encoder(sx).numpy(), rtol=1e-6)


def test_meta_lstm_with_hand_set_gates_reduces_to_gradient_descent():
    keras.utils.set_random_seed(0)
    model = _meta_lstm(steps=1)
    sx, sy, qx, _ = _episode()
    model.meta_cell.w_forget.assign(tf.zeros_like(model.meta_cell.w_forget))
    model.meta_cell.w_input.assign(tf.zeros_like(model.meta_cell.w_input))
    model.meta_cell.b_forget.assign([30.0])
    model.meta_cell.b_input.assign([_logit(0.1)])
    theta0 = model.initial_parameters()
    _, grad = model._support_loss_and_gradient(theta0, tf.constant(sx), tf.constant(sy, tf.int32))
    theta1, forget, rate = model.adapt(sx, sy)
    np.testing.assert_allclose(theta1.numpy(), (theta0 - 0.1 * grad).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(forget.numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(rate.numpy(), 0.1, rtol=1e-5)
    expected = model.learner_logits(theta0 - 0.1 * grad, tf.constant(qx)).numpy()
    np.testing.assert_allclose(model.predict_episode(sx, sy, qx), expected, rtol=1e-4, atol=1e-5)


def test_meta_lstm_meta_gradients_reach_init_lstm_and_gates():
    keras.utils.set_random_seed(0)
    model = _meta_lstm()
    sx, sy, qx, qy = _episode()
    with tf.GradientTape() as tape:
        logits = model((sx, tf.constant(sy, tf.int32), qx))
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(qy, logits, from_logits=True)
        )
    grads = tape.gradient(loss, model.trainable_variables)
    names = [v.path for v in model.trainable_variables]
    missing = [n for n, g in zip(names, grads) if g is None or float(tf.reduce_sum(tf.abs(g))) == 0]
    assert not missing, missing


def test_meta_lstm_initialisation_optimizer_trains_only_theta0():
    sx, sy, qx, qy = _episode()
    sy, qy = sy.astype(np.int32), qy.astype(np.int32)
    data = tf.data.Dataset.from_tensors(((sx[None], sy[None], qx[None]), qy[None])).repeat()

    def one_step(initialisation_optimizer):
        keras.utils.set_random_seed(0)
        model = _meta_lstm()
        model.initialisation_optimizer = initialisation_optimizer
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        # compile creates the optimisers' variables (the training step is traced once)
        assert model.optimizer.built
        assert initialisation_optimizer is None or initialisation_optimizer.built
        before = [v.numpy() for v in model.trainable_variables]
        model.fit(data, steps_per_epoch=1, epochs=1, verbose=0)
        initial = {id(v) for v in model.learner.trainable_variables}
        moved = [not np.allclose(b, v.numpy()) for b, v in zip(before, model.trainable_variables)]
        return [m for m, v in zip(moved, model.trainable_variables) if id(v) in initial], [
            m for m, v in zip(moved, model.trainable_variables) if id(v) not in initial
        ]

    initial_moved, meta_moved = one_step(None)  # the compiled optimiser trains everything
    assert all(initial_moved) and all(meta_moved)
    initial_moved, meta_moved = one_step(keras.optimizers.SGD(0.0))  # theta_0 frozen
    assert not any(initial_moved) and all(meta_moved)


def test_meta_lstm_learns_on_real_omniglot():
    from bookcode.datasets import omniglot
    from bookcode.episodes import EpisodeSampler
    from bookcode.evaluation import evaluate

    keras.utils.set_random_seed(0)
    train, test = omniglot("train"), omniglot("test")
    model = lo.MetaLSTMLearner(_learner(5, filters=16), steps=3, initial_learning_rate=0.3)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    episodes = EpisodeSampler(test, ways=5, shots=1, queries=5, seed=1).fixed(30)
    before = evaluate(model, episodes).mean
    sampler = EpisodeSampler(train, ways=5, shots=1, queries=5, seed=0)
    model.fit(sampler.tf_dataset(batch_size=2), steps_per_epoch=60, epochs=1, verbose=0)
    after = evaluate(model, episodes).mean
    assert after > before + 0.1 and after > 0.5, (before, after)


def test_fine_tuning_baseline_is_plain_gradient_descent():
    """The re-exported bookcode.meta.FineTuning equals one gradient step of
    the meta-LSTM's learner by hand."""
    keras.utils.set_random_seed(0)
    learner = _learner(3, filters=4, blocks=2, input_shape=(12, 12, 1))
    sx, sy, qx, _ = _episode()
    tuner = lo.FineTuning(learner, steps=1, learning_rate=0.1)
    model = lo.MetaLSTMLearner(learner, steps=1)
    theta0 = model.initial_parameters()
    _, grad = model._support_loss_and_gradient(theta0, tf.constant(sx), tf.constant(sy, tf.int32))
    expected = model.learner_logits(theta0 - 0.1 * grad, tf.constant(qx)).numpy()
    np.testing.assert_allclose(tuner.predict_episode(sx, sy, qx), expected, rtol=1e-4, atol=1e-5)
    assert not hasattr(lo, "FineTuner")


def test_meta_lstm_update_rule_in_the_meta_engine_is_the_paper_step():
    """One step of bookcode.meta.adapt with MetaLSTMUpdate, by hand: LSTM on
    the preprocessed gradient and loss, then the cell's gated update."""
    from bookcode import meta

    keras.utils.set_random_seed(0)
    model = _meta_lstm(steps=1)
    sx, sy, _, _ = _episode()
    x, y = tf.constant(sx), tf.constant(sy, tf.int32)
    theta0 = model.initial_parameters()
    n = int(theta0.shape[0])
    loss, grad = model._support_loss_and_gradient(theta0, x, y)
    inputs = tf.concat(
        [
            lo.preprocess_gradients(grad),
            tf.broadcast_to(lo.preprocess_gradients(loss[None]), (n, 2)),
        ],
        -1,
    )
    h, _ = model.lstm(inputs, [tf.zeros((n, 6))] * 2)
    expected, forget, rate = model.meta_cell(h, theta0, grad, tf.zeros(n), tf.zeros(n))
    rule = lo.MetaLSTMUpdate(model.lstm, model.meta_cell)
    zeros = tf.zeros(n)
    (theta1, f1, i1), _ = meta.adapt(
        lambda p, step: model._support_loss(p[0], x, y),
        [theta0, zeros, zeros],
        1,
        rule,
        first_order=True,
        unused=(1, 2),
    )
    np.testing.assert_allclose(theta1.numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(f1.numpy(), forget.numpy(), rtol=1e-6)
    np.testing.assert_allclose(i1.numpy(), rate.numpy(), rtol=1e-6)
    # and the learner's adapt is exactly that loop
    theta, forgets, rates = model.adapt(sx, sy)
    np.testing.assert_allclose(forgets.numpy(), forget.numpy()[None], rtol=1e-6)
    np.testing.assert_allclose(theta.numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rates.numpy(), rate.numpy()[None], rtol=1e-6)


# -- saving and loading ------------------------------------------------------------


def test_lstm_optimizer_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(0)
    opt = lo.LSTMOptimizer(hidden_size=8, unroll=3, truncations=1, output_scale=0.05)
    opt.compile(optimizer=keras.optimizers.Adam(1e-2))
    opt.fit(
        tf.data.Dataset.from_tensor_slices(lo.random_quadratics(8, dim=3, seed=1)).batch(4),
        verbose=0,
    )
    test = lo.random_quadratics(4, dim=3, seed=5)
    trajectory = opt.optimize_quadratics(*test, 10).numpy()
    opt.save(tmp_path / "opt.keras")
    loaded = keras.models.load_model(tmp_path / "opt.keras")
    assert type(loaded) is lo.LSTMOptimizer and loaded.output_scale == 0.05
    np.testing.assert_array_equal(loaded.optimize_quadratics(*test, 10).numpy(), trajectory)
    # the meta-optimiser and its state come back too (2 meta-batches x 1 truncation)
    assert int(loaded.optimizer.iterations) == 2
    for a, b in zip(opt.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_meta_lstm_cell_config_round_trip():
    cell = lo.MetaLSTMCell(initial_learning_rate=0.25, initial_forget=0.5, name="gates")
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(cell))
    assert type(again) is lo.MetaLSTMCell and again.name == "gates"
    assert (again.initial_learning_rate, again.initial_forget) == (0.25, 0.5)


def test_meta_lstm_saves_and_loads_with_encoder_and_initialisation_optimizer(tmp_path):
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential(
        [keras.Input((12, 12, 1)), keras.layers.Conv2D(3, 3, padding="same")], name="encoder"
    )
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, 10)
    model = lo.MetaLSTMLearner(
        _learner(3, filters=4, blocks=1, input_shape=(12, 12, 3)),
        steps=2,
        hidden_size=6,
        initial_learning_rate=0.2,
        encoder=encoder,
        initialisation_optimizer=keras.optimizers.Adam(schedule),
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    sx, sy, qx, qy = _episode()
    data = tf.data.Dataset.from_tensors(
        ((sx[None], sy[None].astype(np.int32), qx[None]), qy[None].astype(np.int32))
    ).repeat(2)
    model.fit(data, epochs=1, verbose=0)
    logits = model.predict_episode(sx, sy, qx)
    model.save(tmp_path / "meta_lstm.keras")
    loaded = keras.models.load_model(tmp_path / "meta_lstm.keras")
    assert type(loaded) is lo.MetaLSTMLearner
    assert (loaded.steps, loaded.hidden_size, loaded.initial_learning_rate) == (2, 6, 0.2)
    np.testing.assert_array_equal(loaded.predict_episode(sx, sy, qx), logits)
    # the frozen encoder stays frozen; both optimisers come back with their state
    assert not loaded.encoder.trainable
    assert len(loaded.trainable_variables) == len(model.trainable_variables)
    assert int(loaded.optimizer.iterations) == 2
    assert int(loaded.initialisation_optimizer.iterations) == 2
    assert isinstance(
        loaded.initialisation_optimizer.learning_rate, keras.optimizers.schedules.CosineDecay
    ) or float(loaded.initialisation_optimizer.learning_rate) == pytest.approx(float(schedule(2)))
    for a, b in zip(
        model.initialisation_optimizer.variables, loaded.initialisation_optimizer.variables
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # and training goes on identically from there
    model.fit(data, epochs=1, verbose=0)
    loaded.fit(data, epochs=1, verbose=0)
    np.testing.assert_allclose(
        loaded.predict_episode(sx, sy, qx), model.predict_episode(sx, sy, qx), rtol=1e-5, atol=1e-6
    )


def test_meta_lstm_validation_data_and_evaluate():
    keras.utils.set_random_seed(0)
    model = _meta_lstm()
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # nothing moves: losses stay comparable
    sx, sy, qx, qy = _episode()
    sy, qy = sy.astype(np.int32), qy.astype(np.int32)
    expected_loss = float(
        tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(
                qy, model.predict_episode(sx, sy, qx), from_logits=True
            )
        )
    )
    expected_accuracy = float(np.mean(np.argmax(model.predict_episode(sx, sy, qx), -1) == qy))
    batched = tf.data.Dataset.from_tensors(((sx[None], sy[None], qx[None]), qy[None]))
    history = model.fit(batched, epochs=1, verbose=0, validation_data=batched)
    np.testing.assert_allclose(history.history["val_loss"], [expected_loss], rtol=1e-5)
    np.testing.assert_allclose(history.history["val_accuracy"], [expected_accuracy])
    np.testing.assert_allclose(history.history["loss"], [expected_loss], rtol=1e-5)
    # single episodes (not batched) are accepted too, by a newly compiled step
    single = tf.data.Dataset.from_tensors(((sx, sy, qx), qy))
    with pytest.raises(ValueError, match="compile"):
        model.evaluate(single, verbose=0)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    scores = model.evaluate(single, verbose=0, return_dict=True)
    np.testing.assert_allclose(scores["loss"], expected_loss, rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: lo.LSTMOptimizer(hidden_size=4), lambda: _meta_lstm()])
def test_compile_refuses_losses_and_metrics(make):
    model = make()
    with pytest.raises(ValueError, match="not metrics"):
        model.compile(optimizer="adam", metrics=["accuracy"])
    with pytest.raises(ValueError, match="not loss"):
        model.compile("adam", "mse")
    model.compile(optimizer="adam")  # an optimiser alone is fine
