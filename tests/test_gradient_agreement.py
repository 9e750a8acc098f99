"""Tests of gradient agreement (Eshratifar, Eigen & Pedram 2018): the weights,
the combiner on MAML (first and second order) and Reptile, the per-batch
logging hook of GradientMetaLearner.train_step and AgreementLog."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from bookcode import meta
from bookcode.meta import AgreementLog, GradientAgreement, agreement_weights, gradient_agreement


def updates(*tasks):
    """Task updates of two meta-variables, a (2,) vector and a (1, 2) matrix,
    from flat 4-vectors per task."""
    flat = np.array(tasks, dtype=np.float64)
    return [tf.constant(flat[:, :2]), tf.constant(flat[:, 2:].reshape(-1, 1, 2))]


# -- the weights ------------------------------------------------------------


def test_identical_updates_get_equal_weights_summing_to_one():
    w = agreement_weights(updates(*[[1.0, 2.0, -1.0, 0.5]] * 4)).numpy()
    np.testing.assert_allclose(w, [0.25] * 4)
    assert w.sum() == pytest.approx(1.0)


def test_opposed_update_gets_a_negative_weight():
    # row sums g_i . (g_1 + g_2 + g_3) with g = e1, e1, -e1: 1, 1, -1; |.| sums to 3
    w = agreement_weights(updates([1, 0, 0, 0], [1, 0, 0, 0], [-1, 0, 0, 0])).numpy()
    np.testing.assert_allclose(w, [1 / 3, 1 / 3, -1 / 3])


def test_weights_against_a_hand_computation():
    g = np.array([[1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 3.0, 0.0], [-2.0, 0.0, 1.0, 1.0]])
    gram = g @ g.T
    rows = gram.sum(axis=1)
    expected = rows / np.abs(rows).sum()
    np.testing.assert_allclose(meta.agreement_gram(updates(*g)).numpy(), gram)
    np.testing.assert_allclose(agreement_weights(updates(*g)).numpy(), expected)
    # by hand: sum_j g_j = (-0.5, 1, 4, 0), rows g_i . sum_j g_j = 1.5, 10.75, 5
    np.testing.assert_allclose(expected, np.array([1.5, 10.75, 5.0]) / 17.25)


def test_zero_updates_raise_no_error_and_give_equal_weights():
    zero = updates(*[[0.0, 0.0, 0.0, 0.0]] * 3)
    w = agreement_weights(zero).numpy()
    np.testing.assert_allclose(w, [1 / 3] * 3)
    combined = gradient_agreement(zero)
    assert all(np.all(np.isfinite(c.numpy())) and not np.any(c.numpy()) for c in combined)


def test_updates_that_cancel_give_equal_weights():
    w = agreement_weights(updates([1, 2, 0, 0], [-1, -2, 0, 0])).numpy()
    np.testing.assert_allclose(w, [0.5, 0.5])


def test_float32_and_bfloat16_updates():
    g = updates([1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 3.0, 0.0])
    w64 = agreement_weights(g).numpy()
    w32 = agreement_weights([tf.cast(x, tf.float32) for x in g])
    assert w32.dtype == tf.float32
    np.testing.assert_allclose(w32.numpy(), w64, rtol=1e-6)
    combined = gradient_agreement([tf.cast(x, tf.bfloat16) for x in g])
    assert combined[0].dtype == tf.bfloat16


def test_bad_updates_are_refused():
    with pytest.raises(ValueError, match="empty"):
        agreement_weights([])
    with pytest.raises(ValueError, match="leading task axis"):
        agreement_weights([tf.constant(1.0)])
    with pytest.raises(ValueError, match="number of tasks"):
        agreement_weights([tf.zeros((3, 2)), tf.zeros((2, 2))])


# -- the combiner -------------------------------------------------------------


def test_combined_update_is_the_weighted_sum():
    g = np.array([[1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 3.0, 0.0], [-2.0, 0.0, 1.0, 1.0]])
    w = np.array([1.5, 10.75, 5.0]) / 17.25
    flat = w @ g  # sum_i w_i g_i
    combined = gradient_agreement(updates(*g))
    np.testing.assert_allclose(combined[0].numpy(), flat[:2])
    np.testing.assert_allclose(combined[1].numpy(), flat[2:].reshape(1, 2))


def test_weights_are_constants_in_the_meta_gradient():
    g = updates([1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 3.0, 0.0], [-2.0, 0.0, 1.0, 1.0])
    with tf.GradientTape() as tape:
        tape.watch(g)
        total = tf.add_n([tf.reduce_sum(c) for c in gradient_agreement(g)])
    d = tape.gradient(total, g)
    w = agreement_weights(g).numpy()
    # d/dg_i of sum(sum_i w_i g_i) with w constant is w_i everywhere
    np.testing.assert_allclose(d[0].numpy(), np.repeat(w[:, None], 2, axis=1))
    np.testing.assert_allclose(d[1].numpy(), np.broadcast_to(w[:, None, None], (3, 1, 2)))


def test_equal_updates_give_the_mean():
    g = updates(*[[1.0, -2.0, 0.5, 3.0]] * 3)
    for mine, mean in zip(gradient_agreement(g), meta.mean_gradients(g)):
        np.testing.assert_allclose(mine.numpy(), mean.numpy())


def test_combiner_serialises():
    config = keras.saving.serialize_keras_object(gradient_agreement)
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, GradientAgreement)


# -- on the learners --------------------------------------------------------


def tiny_net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((2,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )


def tiny_batch(tasks=4, seed=0, shuffled=()):
    rng = np.random.default_rng(seed)
    sx = rng.normal(size=(tasks, 6, 2))
    qx = rng.normal(size=(tasks, 9, 2))
    sy = np.tile(np.arange(6) % 3, (tasks, 1)).astype(np.int32)
    qy = np.tile(np.arange(9) % 3, (tasks, 1)).astype(np.int32)
    for i in shuffled:
        qy[i] = rng.permutation(qy[i])
    return sx, sy, qx, qy


LEARNERS = {
    "MAML first order": lambda: meta.MAML(
        tiny_net(), inner_lr=0.5, first_order=True, combiner=gradient_agreement
    ),
    "MAML second order": lambda: meta.MAML(
        tiny_net(), inner_lr=0.5, inner_steps=2, combiner=gradient_agreement
    ),
    "Reptile": lambda: meta.Reptile(
        tiny_net(),
        inner_lr=0.1,
        inner_steps=3,
        inner_optimizer="sgd",
        combiner=gradient_agreement,
    ),
}


@pytest.mark.parametrize("name", list(LEARNERS))
def test_fit_applies_the_weighted_sum_of_task_updates(name):
    learner = LEARNERS[name]()
    batch = tiny_batch()
    before = [v.numpy() for v in learner.meta_variables]
    _, task_updates, inner = learner.task_gradients(
        *(tf.constant(a) for a in batch), inner_updates=True
    )
    task_updates = [g.numpy() for g in task_updates]
    w = agreement_weights(inner).numpy()  # the paper's: weights from theta - theta'_i
    assert not np.allclose(w, w[0]), "the tasks should disagree for this test to mean anything"

    learner.compile(keras.optimizers.SGD(1.0))
    log = AgreementLog()
    dataset = tf.data.Dataset.from_tensors(((batch[0], batch[1], batch[2]), batch[3]))
    learner.fit(dataset, epochs=1, verbose=0, callbacks=[log])
    for old, new, g in zip(before, learner.meta_variables, task_updates):
        expected = old - np.tensordot(w, g, axes=1)  # SGD(1): theta - sum_i w_i g_i
        np.testing.assert_allclose(new.numpy(), expected, rtol=1e-6, atol=1e-9)
    # the hook: the weights of the meta-batch, as they are, reach the callback
    assert log.values.shape == (1, 4)
    np.testing.assert_allclose(log.values[0], w, rtol=1e-6)


def test_inner_updates_by_hand():
    """MAML's inner update after one SGD step is inner_lr times the support
    gradient; Reptile's is its task update; both with a leading task axis."""
    learner = meta.MAML(tiny_net(), inner_lr=0.5, first_order=False, combiner=gradient_agreement)
    sx, sy, qx, qy = tiny_batch()
    _, _, inner = learner.task_gradients(*map(tf.constant, (sx, sy, qx, qy)), inner_updates=True)
    for i in range(len(sx)):
        with tf.GradientTape() as tape:
            loss = keras.losses.sparse_categorical_crossentropy(
                sy[i], learner.model(sx[i]), from_logits=True
            )
            loss = tf.reduce_mean(loss)
        grads = tape.gradient(loss, learner.model.trainable_variables)
        for g, u in zip(grads, inner):
            np.testing.assert_allclose(u[i].numpy(), 0.5 * g.numpy(), rtol=1e-9, atol=1e-12)
    reptile = LEARNERS["Reptile"]()
    _, updates, inner = reptile.task_gradients(*map(tf.constant, (sx, sy, qx, qy)), inner_updates=True)
    for u, v in zip(updates, inner):
        np.testing.assert_array_equal(u.numpy(), v.numpy())


def test_weighing_by_task_updates_or_inner_updates_differs():
    """The two sources give different weights on the same meta-batch, and each
    learner applies the weights of the source its combiner names."""
    batch = tiny_batch()
    tensors = [tf.constant(a) for a in batch]
    dataset = tf.data.Dataset.from_tensors(((batch[0], batch[1], batch[2]), batch[3]))
    weights = {}
    for weigh_by in ("inner_updates", "task_updates"):
        learner = meta.MAML(tiny_net(), inner_lr=0.5, first_order=True,
                            combiner=GradientAgreement(weigh_by))  # fmt: skip
        _, grads, inner = learner.task_gradients(*tensors, inner_updates=True)
        expected = agreement_weights(inner if weigh_by == "inner_updates" else grads).numpy()
        learner.compile(keras.optimizers.SGD(1.0))
        log = AgreementLog()
        learner.fit(dataset, verbose=0, callbacks=[log])
        np.testing.assert_allclose(log.values[0], expected, rtol=1e-6)
        weights[weigh_by] = expected
    assert np.abs(weights["inner_updates"] - weights["task_updates"]).max() > 1e-3
    with pytest.raises(ValueError, match="weigh_by"):
        GradientAgreement("gradients")


def test_agreement_log_over_several_batches_and_fits():
    learner = LEARNERS["MAML first order"]()
    learner.compile(keras.optimizers.Adam(1e-2))
    batches = [tiny_batch(seed=s) for s in range(3)]
    dataset = tf.data.Dataset.from_tensor_slices(tuple(np.stack(a) for a in zip(*batches))).map(
        lambda sx, sy, qx, qy: ((sx, sy, qx), qy)
    )
    log = AgreementLog()
    history = learner.fit(dataset, epochs=2, verbose=0, callbacks=[log])
    assert log.values.shape == (6, 4)
    np.testing.assert_allclose(np.abs(log.values).sum(axis=1), 1.0, rtol=1e-6)
    assert np.isfinite(history.history["loss"]).all()  # epoch logs still scalars
    log.reset()
    assert log.values.shape == (0, 0)


def test_label_shuffled_task_points_against_the_others():
    """On tasks that share one labelling rule, the task whose query labels are
    shuffled gets the lowest weight."""
    learner = meta.MAML(tiny_net(), inner_lr=0.5, first_order=True)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 15, 2))
    y = (x[..., 0] > 0).astype(np.int32) + (x[..., 1] > 0)  # the same rule in every task
    y[0, 6:] = rng.permutation(y[0, 6:])
    w = agreement_weights(
        learner.task_gradients(
            tf.constant(x[:, :6]),
            tf.constant(y[:, :6]),
            tf.constant(x[:, 6:]),
            tf.constant(y[:, 6:]),
        )[1]
    ).numpy()
    assert np.argmin(w) == 0, w


def test_agreement_log_needs_the_weights():
    learner = meta.MAML(tiny_net(), inner_lr=0.5, first_order=True)
    learner.compile(keras.optimizers.SGD(0.1))
    batch = tiny_batch()
    dataset = tf.data.Dataset.from_tensors(((batch[0], batch[1], batch[2]), batch[3]))
    with pytest.raises(ValueError, match="gradient_agreement"):
        learner.fit(dataset, verbose=0, callbacks=[AgreementLog()])


def test_learner_with_agreement_saves_and_loads(tmp_path):
    learner = LEARNERS["MAML first order"]()
    learner.compile(keras.optimizers.Adam(1e-2))
    batch = tiny_batch()
    learner.fit(tf.data.Dataset.from_tensors(((batch[0], batch[1], batch[2]), batch[3])), verbose=0)
    path = tmp_path / "maml_ga.keras"
    learner.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.combiner, GradientAgreement)
    assert loaded.combiner.weigh_by == "inner_updates"
    np.testing.assert_allclose(
        loaded.predict_episode(batch[0][0], batch[1][0], batch[2][0]),
        learner.predict_episode(batch[0][0], batch[1][0], batch[2][0]),
        rtol=1e-6,
    )


# -- label-shuffled meta-batches (bookcode.episodes.shuffle_labels) ----------


def test_shuffle_labels_corrupts_the_first_fraction_of_tasks():
    from bookcode.episodes import ClassDataset, EpisodeSampler, shuffle_labels

    x = np.arange(20 * 10, dtype=np.float32).reshape(200, 1)
    dataset = ClassDataset(x, np.repeat(np.arange(20), 10), [str(c) for c in range(20)])
    batch = EpisodeSampler(dataset, ways=5, shots=2, queries=6, seed=0).sample_batch(8)
    noisy, corrupted = shuffle_labels(batch, 0.25, rng=0)
    np.testing.assert_array_equal(corrupted, [True, True] + [False] * 6)
    for i in range(8):
        for name in ("support", "query"):
            mine, clean = getattr(noisy, f"{name}_y")[i], getattr(batch, f"{name}_y")[i]
            np.testing.assert_array_equal(np.sort(mine), np.sort(clean))  # same label counts
            assert np.array_equal(mine, clean) != corrupted[i]  # changed exactly where corrupted
    np.testing.assert_array_equal(noisy.query_x, batch.query_x)  # images untouched
    # the original batch is untouched, and a seed repeats
    again, _ = shuffle_labels(batch, 0.25, rng=0)
    np.testing.assert_array_equal(again.query_y, noisy.query_y)
    only_query, _ = shuffle_labels(batch, 0.25, rng=0, sets=("query",))
    np.testing.assert_array_equal(only_query.support_y, batch.support_y)
    with pytest.raises(ValueError, match="leading task axis"):
        shuffle_labels(EpisodeSampler(dataset, 5, 2, 6, seed=0).sample(), 0.25)
    with pytest.raises(ValueError, match="fraction"):
        shuffle_labels(batch, 1.5)
    with pytest.raises(ValueError, match="sets"):
        shuffle_labels(batch, 0.5, sets=("train",))
