"""Tests of the inner-loop engine and MAML, ADML, CAML (bookcode.meta)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from bookcode import meta
from bookcode.datasets import Sinusoids
from bookcode.nets import BatchNormalization, conv4


def tiny_net(dtype="float64", inputs=2, outputs=3, seed=0, batch_norm=False):
    keras.utils.set_random_seed(seed)
    norm = [BatchNormalization(dtype=dtype)] if batch_norm else []
    return keras.Sequential(
        [
            keras.Input((inputs,), dtype=dtype),
            keras.layers.Dense(4, dtype=dtype),
            *norm,
            keras.layers.Activation("tanh", dtype=dtype),
            keras.layers.Dense(outputs, dtype=dtype),
        ]
    )


def tiny_task(seed=0, ways=3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    sx = rng.normal(size=(6, 2)).astype(dtype)
    qx = rng.normal(size=(9, 2)).astype(dtype)
    return sx, np.arange(6) % ways, qx, np.arange(9) % ways


def meta_loss(model, params, task, lr, steps):
    """Query loss after adaptation, written out by hand."""
    sx, sy, qx, qy = (tf.constant(a) for a in task)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = meta.task_loss("classification", sy, meta.forward(model, params, sx))
        params = [p - lr * g for p, g in zip(params, tape.gradient(loss, params))]
    return meta.task_loss("classification", qy, meta.forward(model, params, qx))


def batched(task):
    return [tf.constant(a[None]) for a in task]


@pytest.mark.parametrize("steps, batch_norm", [(1, False), (2, False), (2, True)])
def test_second_order_meta_gradient_matches_finite_differences(steps, batch_norm):
    model = tiny_net(batch_norm=batch_norm)
    maml = meta.MAML(model, inner_lr=0.5, inner_steps=steps)
    task = tiny_task()
    _, grads = maml.task_gradients(*batched(task))
    analytic = np.concatenate([g.numpy()[0].ravel() for g in grads])

    theta = [v.numpy() for v in model.trainable_variables]
    shapes = [t.shape for t in theta]
    flat = np.concatenate([t.ravel() for t in theta])

    def loss_at(vector):
        parts = np.split(vector, np.cumsum([np.prod(s) for s in shapes])[:-1])
        params = [tf.constant(p.reshape(s)) for p, s in zip(parts, shapes)]
        return float(meta_loss(model, params, task, 0.5, steps))

    h = 1e-6
    numeric = np.array(
        [(loss_at(flat + h * e) - loss_at(flat - h * e)) / (2 * h) for e in np.eye(len(flat))]
    )
    rel = np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric)
    assert rel < 1e-3
    # And the second-order terms matter: the first-order gradient differs.
    fo = meta.MAML(model, inner_lr=0.5, inner_steps=steps, first_order=True)
    _, fo_grads = fo.task_gradients(*batched(task))
    first = np.concatenate([g.numpy()[0].ravel() for g in fo_grads])
    assert np.linalg.norm(first - numeric) / np.linalg.norm(numeric) > 1e-3


def test_first_order_gradient_is_query_gradient_at_adapted_weights():
    model = tiny_net()
    maml = meta.MAML(model, inner_lr=0.5, inner_steps=2, first_order=True)
    task = tiny_task(1)
    _, grads = maml.task_gradients(*batched(task))
    sx, sy, qx, qy = (tf.constant(a) for a in task)
    params = [v.value for v in model.trainable_variables]
    for _ in range(2):
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = meta.task_loss("classification", sy, meta.forward(model, params, sx))
        params = [p - 0.5 * g for p, g in zip(params, tape.gradient(loss, params))]
    with tf.GradientTape() as tape:
        tape.watch(params)
        loss = meta.task_loss("classification", qy, meta.forward(model, params, qx))
    expected = tape.gradient(loss, params)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g.numpy()[0], e.numpy(), rtol=1e-10, atol=1e-12)


def test_adapt_is_plain_gradient_descent_and_records_history():
    # One parameter w, loss (w - 3)^2, rate 0.25: w halves its distance to 3.
    def loss_fn(params, step):
        return tf.square(params[0] - 3.0)

    def metric_fn(params):
        return loss_fn(params, 0)

    for first_order in (False, True):  # unrolled, graph loop
        fast, history = meta.adapt(
            loss_fn, [tf.constant(1.0)], 3, 0.25, first_order=first_order, metric_fn=metric_fn
        )
        assert float(fast[0]) == pytest.approx(2.75)
        np.testing.assert_allclose(history.numpy(), [4.0, 1.0, 0.25, 0.0625])
    # One rate per parameter (Meta-SGD style).
    fast, none = meta.adapt(loss_fn, [tf.constant(1.0)], 1, [tf.constant(0.5)])
    assert float(fast[0]) == pytest.approx(3.0) and none is None


def test_adapt_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        meta.adapt(lambda p, s: p[0], [tf.constant(1.0)], -1, 0.1)
    with pytest.raises(ValueError, match="rate has 2"):
        meta.adapt(lambda p, s: p[0], [tf.constant(1.0)], 1, [0.1, 0.2])
    with pytest.raises(ValueError, match="first_order=True"):
        meta.adapt(lambda p, s: p[0], [tf.constant(1.0)], tf.constant(2), 0.1)
    with pytest.raises(ValueError, match="inner_steps"):
        meta.MAML(tiny_net(), inner_steps=-1)
    with pytest.raises(ValueError, match="kind"):
        meta.MAML(tiny_net(), kind="ranking")
    with pytest.raises(ValueError, match="build the model"):
        meta.MAML(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="inner_lr"):
        meta.MAML(tiny_net(), inner_lr=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        meta.ADML(tiny_net(), epsilon=0.0)
    with pytest.raises(ValueError, match="context_dim"):
        meta.CAML(tiny_net(), context_dim=0)


def test_adaptation_leaves_variables_and_batch_norm_statistics_untouched():
    model = conv4(filters=8, num_classes=3)
    rng = np.random.default_rng(0)
    before = [v.numpy().copy() for v in model.variables]
    maml = meta.MAML(model, inner_lr=0.4, inner_steps=3)
    sx = rng.uniform(size=(3, 28, 28, 1)).astype("float32")
    qx = rng.uniform(size=(6, 28, 28, 1)).astype("float32")
    logits = maml.predict_episode(sx, np.arange(3), qx)
    assert logits.shape == (6, 3)
    maml.task_gradients(*batched((sx, np.arange(3), qx, np.arange(6) % 3)))
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, v.numpy(), err_msg=v.path)
    assert any("moving" in v.path for v in model.non_trainable_variables)


def test_forward_uses_batch_statistics():
    model = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization()])
    x = np.array([[1.0, 10.0], [3.0, 30.0]], np.float32)
    out = meta.forward(model, [v.value for v in model.trainable_variables], x)
    np.testing.assert_allclose(out.numpy(), [[-1, -1], [1, 1]], atol=1e-2)


def test_adml_perturbation_is_nonzero_and_bounded():
    model = conv4(filters=8, num_classes=3)
    adml = meta.ADML(model, epsilon=0.05, inner_lr=0.4)
    rng = np.random.default_rng(1)
    sx = rng.uniform(0.2, 0.8, size=(3, 28, 28, 1)).astype("float32")
    weights = [v.value for v in model.trainable_variables]
    adv = adml.adversarial(weights, weights, tf.constant(sx), tf.constant(np.arange(3))).numpy()
    delta = np.abs(adv - sx)
    assert delta.max() <= 0.05 + 1e-6
    assert (delta > 0.04).mean() > 0.5  # the pixel gradient is not zero
    # The full objective runs and gives finite meta-gradients.
    results, grads = adml.task_gradients(*batched((sx, np.arange(3), sx, np.arange(3))))
    assert np.isfinite(results["loss"].numpy()).all()
    assert all(np.isfinite(g.numpy()).all() for g in grads)
    queries = meta.adversarial_queries(adml, sx, np.arange(3), sx, np.arange(3), 0.05)
    assert 0 < np.abs(queries - sx).max() <= 0.05 + 1e-6


def test_caml_adapts_only_the_context():
    model = tiny_net(dtype="float32", inputs=1 + 2, outputs=1)
    before = [v.numpy().copy() for v in model.variables]
    caml = meta.CAML(model, context_dim=2, inner_lr=1.0, inner_steps=2, kind="regression")
    task = Sinusoids(shots=5, queries=5, seed=0).sample()
    weights = [v.value for v in model.trainable_variables]
    (context,), history = caml.adapt_task(
        weights, task.support_x, task.support_y, 2, False, track=(task.support_x, task.support_y)
    )
    assert context.shape == (2,) and np.abs(context.numpy()).sum() > 0
    assert history.shape == (3, 2) and history[-1, 0] < history[0, 0]
    assert caml.predict_episode(*task.inputs()).shape == (5, 1)
    _, grads = caml.task_gradients(
        *[
            tf.constant(a[None])
            for a in (task.support_x, task.support_y, task.query_x, task.query_y)
        ]
    )
    assert len(grads) == len(model.trainable_variables)
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_sinusoids_follow_the_paper_ranges_and_seed():
    tasks = Sinusoids(shots=10, queries=7, seed=3)
    batch = tasks.sample_batch(500)
    assert batch.support_x.shape == (500, 10, 1) and batch.query_y.shape == (500, 7, 1)
    assert 0.1 <= batch.amplitude.min() and batch.amplitude.max() <= 5
    assert 0 <= batch.phase.min() and batch.phase.max() <= np.pi
    assert -5 <= batch.support_x.min() and batch.query_x.max() <= 5
    np.testing.assert_allclose(
        batch.support_y,
        batch.amplitude[:, None, None] * np.sin(batch.support_x - batch.phase[:, None, None]),
        rtol=1e-5,
        atol=1e-5,
    )
    a, b = Sinusoids(seed=3).fixed(4), Sinusoids(seed=99).fixed(4)
    np.testing.assert_array_equal(a[2].query_x, b[2].query_x)
    with pytest.raises(ValueError, match="shots"):
        Sinusoids(shots=0)
    with pytest.raises(ValueError, match="x_range"):
        Sinusoids(x_range=(5, -5))


def test_maml_learns_sine_regression_quickly():
    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(40, activation="relu"),
            keras.layers.Dense(40, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    maml = meta.MAML(net, inner_lr=0.01, inner_steps=1, kind="regression")
    maml.compile(keras.optimizers.Adam(5e-3))
    tasks = Sinusoids(shots=10, queries=10, seed=0)
    test = tasks.fixed(50, seed=7)

    def mse_after(steps):
        return np.mean([maml.adaptation_curve(*t.inputs(), t.query_y, steps)[-1, 1] for t in test])

    before = mse_after(1)
    history = maml.fit(tasks.tf_dataset(batch_size=25), steps_per_epoch=200, epochs=1, verbose=0)
    assert "mse" in history.history
    after = mse_after(1)
    assert after < 0.5 * before, (before, after)


def test_fused_batch_norm_is_refused_for_second_order():
    fused = conv4(input_shape=(16, 16, 1), filters=2, num_classes=2, fused_batch_norm=True)
    with pytest.raises(ValueError, match="FusedBatchNormalization"):
        meta.MAML(fused, inner_lr=0.1, first_order=False)
    learner = meta.MAML(fused, inner_lr=0.1, first_order=True)
    with pytest.raises(ValueError, match="first_order=True"):
        learner.first_order = False


# --------------------------------------------------------------------------
# The learner engine: objectives, combiners, batch objective, adapt, saving
# --------------------------------------------------------------------------


def two_tasks():
    tasks = [tiny_task(0), tiny_task(1)]
    return [tf.constant(np.stack(parts)) for parts in zip(*tasks)]


@keras.saving.register_keras_serializable(package="bookcode_tests")
class FirstTaskOnly:
    """A combiner that keeps task 0's gradient."""

    def __call__(self, task_grads):
        return [g[0] for g in task_grads]

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def sgd_step_delta(learner, batch):
    learner.compile(keras.optimizers.SGD(1.0))
    before = [v.numpy().copy() for v in learner.meta_variables]
    sx, sy, qx, qy = batch
    logs = learner.train_on_batch((sx, sy, qx), qy, return_dict=True)
    return [v.numpy() - b for v, b in zip(learner.meta_variables, before)], logs


def test_combiner_argument_replaces_the_mean():
    batch = two_tasks()
    learner = meta.MAML(tiny_net(), inner_lr=0.5, combiner=FirstTaskOnly())
    results, task_grads = learner.task_gradients(*batch)
    assert set(results) == {"loss", "accuracy"} and results["loss"].shape == (2,)
    delta, logs = sgd_step_delta(learner, batch)
    for d, g in zip(delta, task_grads):
        np.testing.assert_allclose(d, -g.numpy()[0], rtol=1e-9, atol=1e-12)
        assert np.abs(g.numpy()[0] - g.numpy()[1]).max() > 1e-6  # task 1 differs
    assert logs["loss"] == pytest.approx(float(tf.reduce_mean(results["loss"])))
    # default: the mean
    mean = meta.MAML(tiny_net(), inner_lr=0.5)
    delta, _ = sgd_step_delta(mean, batch)
    for d, g in zip(delta, task_grads):
        np.testing.assert_allclose(d, -g.numpy().mean(0), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="combiner"):
        meta.MAML(tiny_net(), combiner="mean")


class SquaredLosses(meta.MAML):
    """A batch objective: the sum over tasks of the squared query losses."""

    def batch_objective(self, task_results):
        return tf.reduce_sum(tf.square(task_results["loss"]))


@pytest.mark.parametrize("first_order", [False, True])
def test_batch_objective_is_differentiated_over_the_whole_meta_batch(first_order):
    batch = two_tasks()
    learner = SquaredLosses(tiny_net(), inner_lr=0.5, inner_steps=2, first_order=first_order)
    results, task_grads = learner.task_gradients(*batch)
    # d/dtheta sum_i L_i^2 = sum_i 2 L_i dL_i/dtheta
    losses = results["loss"].numpy()
    expected = [np.tensordot(2 * losses, g.numpy(), axes=1) for g in task_grads]
    _, objective, grads = learner.batch_gradients(*batch)
    assert float(objective) == pytest.approx(float(np.sum(losses**2)), rel=1e-12)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-8, atol=1e-12)
    delta, logs = sgd_step_delta(learner, batch)
    for d, e in zip(delta, expected):
        np.testing.assert_allclose(d, -e, rtol=1e-8, atol=1e-12)
    assert logs["batch_objective"] == pytest.approx(float(np.sum(losses**2)), rel=1e-6)
    assert set(logs) == {"loss", "accuracy", "batch_objective"}


class WithSpareWeight(keras.layers.Layer):
    def build(self, shape):
        self.kernel = self.add_weight(shape=(shape[-1], 3), name="kernel")
        self.spare = self.add_weight(shape=(2,), name="spare")

    def call(self, x):
        return x @ self.kernel


def test_unconnected_variable_is_an_error_unless_declared_unused():
    model = keras.Sequential([keras.Input((2,), dtype="float64"), WithSpareWeight(dtype="float64")])
    batch = batched(tiny_task())
    with pytest.raises(ValueError, match=r"inner-loop loss does not depend on .*spare"):
        meta.MAML(model, inner_lr=0.5).task_gradients(*batch)

    class Declared(meta.MAML):
        @property
        def unused_variables(self):
            return [self.model.layers[0].spare]

    _, grads = Declared(model, inner_lr=0.5).task_gradients(*batch)
    assert np.abs(grads[1].numpy()).max() == 0 and np.abs(grads[0].numpy()).max() > 0

    class QueryIgnoresContext(meta.CAML):  # the meta-gradient check
        def task_objective(self, meta_weights, support_x, support_y, query_x, query_y):
            return {"loss": tf.reduce_sum(meta_weights[0]), "mse": tf.constant(0.0)}

    caml = QueryIgnoresContext(tiny_net(inputs=3, outputs=1), context_dim=1, kind="regression")
    task = [tf.ones((1, 4, 2), tf.float64), tf.ones((1, 4, 1), tf.float64)] * 2
    with pytest.raises(ValueError, match=r"meta-objective does not depend on .*bias"):
        caml.task_gradients(*task)


def test_adapt_returns_a_callable_equal_to_predict_episode():
    maml = meta.MAML(tiny_net(), inner_lr=0.5, test_inner_steps=3)
    sx, sy, qx, _ = tiny_task(2)
    adapted = maml.adapt(sx, sy)
    np.testing.assert_array_equal(adapted(qx), maml.predict_episode(sx, sy, qx))
    assert len(adapted.weights) == len(maml.model.trainable_variables)
    # the fast weights are 3 steps of gradient descent (hand computation)
    params = [v.value for v in maml.model.trainable_variables]
    for _ in range(3):
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = meta.task_loss("classification", sy, meta.forward(maml.model, params, sx))
        params = [p - 0.5 * g for p, g in zip(params, tape.gradient(loss, params))]
    for a, h in zip(adapted.weights, params):
        np.testing.assert_allclose(a.numpy(), h.numpy(), rtol=1e-10)
    # steps=0 is the model itself (in training mode)
    np.testing.assert_allclose(maml.adapt(sx, sy, steps=0)(qx), maml.model(qx).numpy())


def test_changing_inner_lr_reaches_compiled_prediction():
    sx, sy, qx, _ = tiny_task(3)
    maml = meta.MAML(tiny_net(), inner_lr=0.1, test_inner_steps=2)
    before = maml.predict_episode(sx, sy, qx)
    maml.inner_lr = 0.7
    after = maml.predict_episode(sx, sy, qx)
    fresh = meta.MAML(tiny_net(), inner_lr=0.7, test_inner_steps=2).predict_episode(sx, sy, qx)
    np.testing.assert_allclose(after, fresh, rtol=1e-12)
    assert np.abs(after - before).max() > 1e-3
    assert maml._functions["adapt"].experimental_get_tracing_count() == 1
    with pytest.raises(ValueError, match="inner_lr"):
        maml.inner_lr = -1.0


def test_compile_refuses_metrics_and_fit_validates():
    maml = meta.MAML(tiny_net(), inner_lr=0.5, test_inner_steps=2)
    with pytest.raises(ValueError, match="logs its own metrics"):
        maml.compile("adam", metrics=["accuracy"])
    maml.compile(keras.optimizers.Adam(1e-2))
    sx, sy, qx, qy = two_tasks()
    history = maml.fit((sx, sy, qx), qy, validation_data=((sx, sy, qx), qy), epochs=2, verbose=0)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert history.history["val_loss"][1] < history.history["val_loss"][0]
    ev = maml.evaluate((sx, sy, qx), qy, verbose=0, return_dict=True)
    expected = np.mean(
        [maml.adaptation_curve(sx[i], sy[i], qx[i], qy[i], 2)[-1, 0] for i in range(2)]
    )
    assert ev["loss"] == pytest.approx(expected, rel=1e-6)  # float32 metric trackers


def round_trip(learner, tmp_path, episode):
    path = str(tmp_path / f"{type(learner).__name__}.keras")
    learner.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(learner)
    np.testing.assert_allclose(
        loaded.predict_episode(*episode), learner.predict_episode(*episode), rtol=1e-6, atol=1e-7
    )
    return loaded


def test_save_and_load_round_trips(tmp_path):
    sx, sy, qx, qy = tiny_task(4)
    maml = meta.MAML(
        tiny_net(), inner_lr=0.3, inner_steps=2, first_order=True, test_inner_steps=4,
        combiner=FirstTaskOnly(),
    )  # fmt: skip
    maml.compile(keras.optimizers.Adam(1e-2))
    maml.fit((sx[None], sy[None], qx[None]), qy[None], verbose=0)  # trained weights
    loaded = round_trip(maml, tmp_path, (sx, sy, qx))
    assert (loaded.inner_lr, loaded.inner_steps, loaded.test_inner_steps) == (0.3, 2, 4)
    assert loaded.first_order and isinstance(loaded.combiner, FirstTaskOnly)
    assert int(loaded.optimizer.iterations) == 1  # the meta-optimiser's state too

    conv = conv4(input_shape=(16, 16, 1), filters=2, num_classes=3)
    images = np.random.default_rng(0).uniform(size=(9, 16, 16, 1)).astype("float32")
    adml = meta.ADML(conv, epsilon=0.05, clip_range=(0.0, 1.0), inner_lr=0.2)
    loaded = round_trip(adml, tmp_path, (images[:3], np.arange(3), images[3:]))
    assert loaded.epsilon == 0.05 and loaded.clip_range == (0.0, 1.0)

    task = Sinusoids(shots=5, queries=5, seed=0).sample()
    caml = meta.CAML(tiny_net("float32", 1 + 2, 1), context_dim=2, kind="regression")
    loaded = round_trip(caml, tmp_path, task.inputs())
    assert loaded.context_dim == 2 and loaded.kind == "regression"

    tuner = meta.FineTuning(tiny_net(), steps=3, learning_rate=0.2)
    loaded = round_trip(tuner, tmp_path, (sx, sy, qx))
    assert (loaded.steps, loaded.learning_rate) == (3, 0.2)


def test_fine_tuning_is_gradient_descent_on_the_support_set():
    sx, sy, qx, _ = tiny_task(5)
    net = tiny_net(batch_norm=True)
    tuner = meta.FineTuning(net, steps=4, learning_rate=0.3)
    params = [v.value for v in net.trainable_variables]
    for _ in range(4):
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = meta.task_loss("classification", sy, meta.forward(net, params, sx))
        params = [p - 0.3 * g for p, g in zip(params, tape.gradient(loss, params))]
    np.testing.assert_allclose(
        tuner.predict_episode(sx, sy, qx), meta.forward(net, params, qx).numpy(), rtol=1e-9
    )
    tuner.learning_rate, tuner.steps = 0.1, 2  # no retracing
    tuner.predict_episode(sx, sy, qx)
    assert tuner._functions["adapt"].experimental_get_tracing_count() == 1
    with pytest.raises(ValueError, match="2 ways"):
        tuner.predict_episode(sx[:2], np.arange(2), qx)
    with pytest.raises(TypeError, match="not meta-trained"):
        tuner.compile("adam")
    with pytest.raises(ValueError, match="positive"):
        meta.FineTuning(net, steps=0)


def test_the_engine_supports_learned_per_parameter_rates():
    batch = batched(tiny_task())
    # Meta-SGD (bookcode.meta.MetaSGD) with every rate 0.5
    learner = meta.MetaSGD(tiny_net(), inner_steps=1, rate_range=(0.5, 0.5))
    results, grads = learner.task_gradients(*batch)
    n = len(learner.rates)
    # same value as MAML with the scalar rate 0.5; the rates get gradients too
    maml_results, maml_grads = meta.MAML(tiny_net(), inner_lr=0.5).task_gradients(*batch)
    assert float(results["loss"][0]) == pytest.approx(float(maml_results["loss"][0]), rel=1e-12)
    for g, m in zip(grads[:n], maml_grads):
        np.testing.assert_allclose(g.numpy(), m.numpy(), rtol=1e-10)
    assert all(np.abs(g.numpy()).max() > 0 for g in grads[n:])
