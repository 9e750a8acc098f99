"""Tests of Meta-SGD (Li et al. 2017) and Reptile (Nichol et al. 2018) in bookcode.meta."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_meta import round_trip, tiny_net  # shared with MAML's tests

from bookcode import meta
from bookcode.nets import FusedBatchNormalization


def tiny_task(seed=0, ways=3):
    rng = np.random.default_rng(seed)
    sx, qx = rng.normal(size=(6, 2)), rng.normal(size=(9, 2))
    return sx, np.arange(6) % ways, qx, np.arange(9) % ways


def batched(*tasks):
    return [tf.constant(np.stack(parts)) for parts in zip(*tasks)]


def linear_net(w0=0.5):
    """y = w x, one weight: the loss of a task is a quadratic in w."""
    net = keras.Sequential(
        [keras.Input((1,), dtype="float64"), keras.layers.Dense(1, use_bias=False, dtype="float64")]
    )
    net.layers[0].kernel.assign([[w0]])
    return net


# --------------------------------------------------------------------------
# Meta-SGD
# --------------------------------------------------------------------------


def test_meta_sgd_rates_start_uniform_and_adapt_elementwise():
    net = tiny_net()
    learner = meta.MetaSGD(net, rate_seed=3)
    rates = learner.learned_rates()
    assert list(rates) == [v.path for v in net.trainable_variables]
    flat = np.concatenate([r.ravel() for r in rates.values()])
    assert 0.005 <= flat.min() and flat.max() <= 0.1 and flat.std() > 0.01
    assert learner.inner_steps == 1 and len(learner.meta_variables) == 2 * len(rates)
    # one step: theta - alpha * grad, elementwise
    sx, sy, qx, _ = tiny_task(1)
    theta = [v.value for v in net.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = meta.task_loss("classification", sy, meta.forward(net, theta, sx))
    grads = tape.gradient(loss, theta)
    fast = [t - r * g for t, r, g in zip(theta, rates.values(), grads)]
    np.testing.assert_allclose(
        learner.predict_episode(sx, sy, qx, steps=1),
        meta.forward(net, fast, qx).numpy(),
        rtol=1e-10,
    )


@pytest.mark.parametrize("steps, batch_norm", [(1, False), (2, True)])
def test_meta_sgd_meta_gradient_matches_finite_differences(steps, batch_norm):
    net = tiny_net(batch_norm=batch_norm)
    learner = meta.MetaSGD(net, inner_steps=steps, rate_seed=0)
    task = tiny_task(2)
    _, grads = learner.task_gradients(*batched(task))
    analytic = np.concatenate([g.numpy()[0].ravel() for g in grads])
    values = [v.numpy() for v in learner.meta_variables]
    shapes = [v.shape for v in values]
    flat = np.concatenate([v.ravel() for v in values])
    n = len(learner.rates)

    def loss_at(vector):
        parts, i = [], 0
        for s in shapes:
            size = int(np.prod(s))
            parts.append(tf.constant(vector[i : i + size].reshape(s)))
            i += size
        theta, rates = parts[:n], parts[n:]
        sx, sy, qx, qy = (tf.constant(a) for a in task)
        for _ in range(steps):  # written out by hand
            with tf.GradientTape() as tape:
                tape.watch(theta)
                loss = meta.task_loss("classification", sy, meta.forward(net, theta, sx))
            theta = [t - r * g for t, r, g in zip(theta, rates, tape.gradient(loss, theta))]
        return float(meta.task_loss("classification", qy, meta.forward(net, theta, qx)))

    h = 1e-6
    numeric = np.array(
        [(loss_at(flat + h * e) - loss_at(flat - h * e)) / (2 * h) for e in np.eye(len(flat))]
    )
    sizes = sum(int(np.prod(s)) for s in shapes[:n])
    assert np.abs(analytic[sizes:]).max() > 1e-4  # the rates get a real gradient
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_meta_sgd_trains_rates_which_may_turn_negative():
    net = linear_net(0.0)
    learner = meta.MetaSGD(net, kind="regression", rate_range=(0.05, 0.05))
    # every task: y = 2x; from w = 0 one step of rate 1/2 solves it (w = 4 * rate)
    x = np.array([[1.0], [1.0]])

    def repeated(a, n):
        return np.repeat(a[None], n, axis=0)

    learner.compile(keras.optimizers.SGD(0.01))
    learner.fit((repeated(x, 200), repeated(2 * x, 200), repeated(x, 200)), repeated(2 * x, 200),
                batch_size=1, verbose=0)  # fmt: skip
    assert float(learner.rates[0].numpy().ravel()[0]) > 0.1
    # a task whose gradient points the wrong way pushes a rate below zero
    flipped = meta.MetaSGD(linear_net(1.0), kind="regression", rate_range=(0.01, 0.01))
    flipped.compile(keras.optimizers.SGD(0.05))
    # support says y = 2x, query says y = 0: the meta-gradient raises w's loss if the rate grows
    flipped.fit((repeated(x, 50), repeated(2 * x, 50), repeated(x, 50)), repeated(0 * x, 50),
                batch_size=1, verbose=0)  # fmt: skip
    assert float(flipped.rates[0].numpy().ravel()[0]) < 0


def test_meta_sgd_rejects_bad_rate_range():
    with pytest.raises(ValueError, match="rate_range"):
        meta.MetaSGD(tiny_net(), rate_range=(0.1, 0.01))
    with pytest.raises(ValueError, match="rate_multiplier"):
        meta.MetaSGD(tiny_net(), rate_multiplier=0.0)


def test_meta_sgd_rate_multiplier_scales_the_rates_steps_only():
    sx, sy, qx, qy = tiny_task(2)
    learners = {m: meta.MetaSGD(tiny_net(), rate_seed=5, rate_multiplier=m) for m in (1.0, 10.0)}
    before = {m: learner.learned_rates() for m, learner in learners.items()}
    # the same rates and the same adapted model before training
    for a, b in zip(before[1.0].values(), before[10.0].values()):
        np.testing.assert_allclose(b, a, rtol=1e-6)
    np.testing.assert_allclose(
        learners[10.0].predict_episode(sx, sy, qx), learners[1.0].predict_episode(sx, sy, qx),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    for learner in learners.values():
        learner.compile(keras.optimizers.Adam(1e-3, epsilon=1e-12))
        learner.train_on_batch((sx[None], sy[None], qx[None]), qy[None])
    moved = {
        m: np.concatenate([(r - before[m][k]).ravel() for k, r in learner.learned_rates().items()])
        for m, learner in learners.items()
    }
    # Adam's first step moves every variable by its rate (1e-3): the rates by 10x that
    big = np.abs(moved[1.0]) > 5e-4
    assert big.mean() > 0.5
    np.testing.assert_allclose(moved[10.0][big], 10 * moved[1.0][big], rtol=1e-3)
    # the weights take the same step
    for a, b in zip(
        learners[1.0].model.trainable_variables, learners[10.0].model.trainable_variables
    ):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------
# Reptile
# --------------------------------------------------------------------------


def quadratic_tasks():
    """Two regression tasks y = a x on three points each."""
    x = np.array([[1.0], [2.0], [-1.0]])
    tasks = [(x, 3.0 * x, x, 3.0 * x), (x, -1.0 * x, x, -1.0 * x)]
    return tasks


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_reptile_update_by_hand_on_a_quadratic(inner_optimizer):
    w0, lr, steps, eps = 0.5, 0.1, 3, 0.5  # eps exact in float32
    learner = meta.Reptile(
        linear_net(w0), inner_lr=lr, inner_steps=steps, inner_optimizer=inner_optimizer,
        kind="regression",
    )  # fmt: skip
    learner.compile(keras.optimizers.SGD(eps))
    tasks = quadratic_tasks()
    sx, sy, qx, qy = batched(*tasks)
    learner.train_on_batch((sx, sy, qx), qy)

    def adapted(x, y):
        w, m, v = w0, 0.0, 0.0
        for t in range(1, steps + 1):
            g = np.mean(2 * x * (w * x - y))  # d/dw mean((w x - y)^2)
            if inner_optimizer == "sgd":
                w -= lr * g
            else:  # Adam with beta_1 = 0: m = g
                m, v = g, 0.999 * v + 0.001 * g**2
                w -= lr * m / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        return w

    phis = [adapted(x, y) for x, y, _, _ in tasks]
    expected = w0 + eps * (np.mean(phis) - w0)
    assert float(learner.model.layers[0].kernel.numpy()[0, 0]) == pytest.approx(expected, rel=1e-12)


def test_reptile_direction_is_first_order_maml_plus_the_first_gradient():
    """Two inner SGD steps on the support set: theta - phi = alpha (g1 + g2),
    with g1 the support gradient at theta and g2 first-order MAML's
    meta-gradient (one inner step, the support set as queries)."""
    sx, sy, _, _ = tiny_task(3)
    task = (sx, sy, sx, sy)
    alpha = 0.3
    reptile = meta.Reptile(tiny_net(), inner_lr=alpha, inner_steps=2, inner_optimizer="sgd")
    reptile.compile(keras.optimizers.SGD(1.0))
    _, (update) = reptile.task_gradients(*batched(task))
    fomaml = meta.MAML(tiny_net(), inner_lr=alpha, inner_steps=1, first_order=True)
    _, g2 = fomaml.task_gradients(*batched(task))
    plain = meta.MAML(tiny_net(), inner_lr=alpha, inner_steps=0)
    _, g1 = plain.task_gradients(*batched(task))
    for u, a, b in zip(update, g1, g2):
        np.testing.assert_allclose(u.numpy(), alpha * (a.numpy() + b.numpy()), rtol=1e-10)
        assert np.abs(b.numpy() - a.numpy()).max() > 1e-6  # g2 is not g1


def test_reptile_minibatches_draw_without_replacement():
    reptile = meta.Reptile(tiny_net(), inner_steps=5, inner_batch=10)
    batches = reptile.minibatch_indices(50, 5, tf.constant([4, 7], tf.int64)).numpy()
    assert batches.shape == (5, 10) and sorted(batches.ravel()) == list(range(50))
    again = reptile.minibatch_indices(50, 5, tf.constant([4, 7], tf.int64)).numpy()
    np.testing.assert_array_equal(batches, again)
    other = reptile.minibatch_indices(50, 5, tf.constant([5, 7], tf.int64)).numpy()
    assert (batches != other).any()
    # a small support set: batches shrink to it, each pass a permutation
    small = reptile.minibatch_indices(4, 3, tf.constant([1, 7], tf.int64)).numpy()
    assert small.shape == (3, 4) and all(sorted(row) == [0, 1, 2, 3] for row in small)


def test_reptile_minibatch_training_step_moves_towards_adapted_weights():
    sx, sy, qx, qy = tiny_task(4)
    reptile = meta.Reptile(tiny_net(), inner_lr=0.01, inner_steps=3, inner_batch=2)
    reptile.compile(keras.optimizers.SGD(1.0))
    before = [v.numpy().copy() for v in reptile.meta_variables]
    logs = reptile.train_on_batch((sx[None], sy[None], qx[None]), qy[None], return_dict=True)
    assert set(logs) == {"loss", "accuracy"}
    moved = [v.numpy() - b for v, b in zip(reptile.meta_variables, before)]
    assert all(np.isfinite(m).all() for m in moved) and max(np.abs(m).max() for m in moved) > 1e-4


def test_forward_with_support_statistics_is_non_transductive():
    net = tiny_net(batch_norm=True)
    params = [v.value for v in net.trainable_variables]
    rng = np.random.default_rng(0)
    support, queries = rng.normal(size=(6, 2)), rng.normal(size=(5, 2)) + 1.0
    both = meta.forward_with_statistics(net, params, support, queries).numpy()
    one = meta.forward_with_statistics(net, params, support, queries[:1]).numpy()
    np.testing.assert_allclose(both[:1], one, rtol=1e-10)  # queries do not see each other
    np.testing.assert_allclose(  # the support set with its own statistics: training mode
        meta.forward_with_statistics(net, params, support, support).numpy(),
        meta.forward(net, params, support).numpy(), rtol=1e-6,
    )  # fmt: skip
    # (to 1e-6: Keras rounds the momentum to float32)
    assert not np.allclose(both, meta.forward(net, params, queries).numpy())
    # the moving averages are untouched
    np.testing.assert_array_equal(net.layers[1].moving_mean.numpy(), np.zeros(4))


def test_forward_with_support_statistics_with_fused_batch_norm():
    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [keras.Input((4, 4, 1)), keras.layers.Conv2D(3, 3), FusedBatchNormalization(),
         keras.layers.Flatten(), keras.layers.Dense(2)]
    )  # fmt: skip
    params = [v.value for v in net.trainable_variables]
    x = np.random.default_rng(1).normal(size=(5, 4, 4, 1)).astype("float32")
    np.testing.assert_allclose(
        meta.forward_with_statistics(net, params, x, x).numpy(),
        meta.forward(net, params, x).numpy(), rtol=1e-4, atol=1e-5,
    )  # fmt: skip


def test_reptile_non_transductive_prediction_and_evaluate():
    net = tiny_net(batch_norm=True)
    sx, sy, qx, qy = tiny_task(5)
    reptile = meta.Reptile(net, inner_lr=0.01, inner_steps=2, transductive=False)
    logits = reptile.predict_episode(sx, sy, qx)
    np.testing.assert_allclose(reptile.predict_episode(sx, sy, qx[:2]), logits[:2], rtol=1e-10)
    reptile.transductive = True
    assert not np.allclose(reptile.predict_episode(sx, sy, qx[:2]), logits[:2])
    reptile.transductive = False
    reptile.compile(keras.optimizers.SGD(1.0))
    result = reptile.evaluate((sx[None], sy[None], qx[None]), qy[None], verbose=0, return_dict=True)
    expected = meta.task_loss("classification", qy, tf.constant(logits))
    assert result["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_reptile_annealed_sgd_is_linear():
    opt = meta.Reptile.annealed_sgd(1.0, 0.0, iterations=10)
    schedule = opt._learning_rate
    assert [round(float(schedule(i)), 6) for i in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]


def test_reptile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="first order"):
        meta.Reptile(tiny_net(), first_order=False)
    with pytest.raises(ValueError, match="inner_optimizer"):
        meta.Reptile(tiny_net(), inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match="inner_batch"):
        meta.Reptile(tiny_net(), inner_batch=0)
    with pytest.raises(ValueError, match="first order"):
        meta.Reptile(tiny_net()).first_order = False


def test_save_and_load(tmp_path):
    sx, sy, qx, qy = tiny_task(6)
    learner = meta.MetaSGD(tiny_net(), rate_range=(0.01, 0.2), rate_seed=1)
    learner.compile(keras.optimizers.Adam(1e-2))
    learner.fit((sx[None], sy[None], qx[None]), qy[None], epochs=3, verbose=0)
    loaded = round_trip(learner, tmp_path, (sx, sy, qx))
    for a, b in zip(loaded.rates, learner.rates):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert loaded.rate_range == (0.01, 0.2)
    faster = meta.MetaSGD(tiny_net(), rate_range=(0.01, 0.2), rate_seed=1, rate_multiplier=4.0)
    loaded = round_trip(faster, tmp_path, (sx, sy, qx))
    assert loaded.rate_multiplier == 4.0
    for a, b in zip(loaded.learned_rates().values(), faster.learned_rates().values()):
        np.testing.assert_array_equal(a, b)

    reptile = meta.Reptile(
        tiny_net(batch_norm=True), inner_lr=0.02, inner_steps=3, inner_batch=4,
        inner_optimizer="sgd", transductive=False, test_inner_steps=7,
    )  # fmt: skip
    reptile.compile(meta.Reptile.annealed_sgd(0.5, 0.0, 10))
    reptile.fit((sx[None], sy[None], qx[None]), qy[None], epochs=2, verbose=0)
    loaded = round_trip(reptile, tmp_path, (sx, sy, qx))
    assert (loaded.inner_batch, loaded.inner_optimizer, loaded.transductive) == (4, "sgd", False)
    assert loaded.test_inner_steps == 7 and int(loaded.optimizer.iterations) == 2
