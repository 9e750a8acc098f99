"""Learning in the concept space (Zhou, Wu & Li 2018): the joint objective
against a hand computation, gradients reaching the generator, learning on
synthetic tasks, bad input."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from bookcode import meta, nets
from bookcode.episodes import ClassDataset, EpisodeSampler
from bookcode.meta.concept_space import ConceptSpaceLearner, concept_dataset

WAYS, DIM, CONCEPT = 3, 10, 4


def _generator(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((DIM,)), keras.layers.Dense(CONCEPT, activation="tanh")], name="gen"
    )


def _head():
    return keras.Sequential([keras.Input((CONCEPT,)), keras.layers.Dense(WAYS)], name="head")


def _learner(external_classes=5, **kwargs):
    return ConceptSpaceLearner(
        _head(), _generator(), external_classes=external_classes, inner_lr=0.5, **kwargs
    )


def _element(seed=0, tasks=2):
    rng = np.random.default_rng(seed)
    sx = rng.normal(size=(tasks, WAYS * 2, DIM)).astype(np.float32)
    qx = rng.normal(size=(tasks, WAYS * 2, DIM)).astype(np.float32)
    sy = np.tile(np.repeat(np.arange(WAYS), 2), (tasks, 1)).astype(np.int32)
    cx = rng.normal(size=(7, DIM)).astype(np.float32)
    cy = rng.integers(5, size=7).astype(np.int32)
    return tuple(map(tf.constant, (sx, sy, qx, cx, cy))), tf.constant(sy)


def _xent(y, logits):
    return float(meta.task_loss("classification", y, logits))


def test_joint_objective_by_hand():
    learner = _learner(concept_weight=0.3)
    inputs, qy = _element()
    sx, sy, qx, cx, cy = (t.numpy() for t in inputs)
    weights = [v.value for v in learner.meta_variables]
    critic = [v.value for v in learner.discriminator.trainable_variables]
    results, concept_loss, _, objective = learner.joint_objective(weights, critic, (inputs, qy))
    head, gen = learner.model, learner.generator
    query_losses = []
    for i in range(len(sx)):
        theta = [v.value for v in head.trainable_variables]
        support = gen(sx[i])
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = meta.task_loss("classification", sy[i], meta.forward(head, theta, support))
        fast = [t - 0.5 * g for t, g in zip(theta, tape.gradient(loss, theta))]
        query_losses.append(_xent(qy[i], meta.forward(head, fast, gen(qx[i]))))
    expected_concept = _xent(cy, learner.discriminator(gen(cx)))
    np.testing.assert_allclose(results["loss"], query_losses, rtol=1e-5)
    assert float(concept_loss) == pytest.approx(expected_concept, rel=1e-5)
    assert float(objective) == pytest.approx(
        np.mean(query_losses) + 0.3 * expected_concept, rel=1e-5
    )


def test_meta_loss_alone_reaches_the_generator():
    learner = _learner(concept_weight=0.0)
    inputs, qy = _element()
    weights = [v.value for v in learner.meta_variables]
    critic = [v.value for v in learner.discriminator.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(weights)
        objective = learner.joint_objective(weights, critic, (inputs, qy))[-1]
    grads = tape.gradient(objective, weights)
    n_head = len(learner.model.trainable_variables)
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads[n_head:])


def test_without_meta_loss_to_generator_only_the_discriminator_trains_it():
    inputs, qy = _element()
    grads = {}
    for flag, weight in ((False, 0.3), (True, 0.0), (True, 0.3)):
        learner = _learner(concept_weight=weight, meta_loss_to_generator=flag)
        weights = [v.value for v in learner.meta_variables]
        critic = [v.value for v in learner.discriminator.trainable_variables]
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(weights)
            _, concept_loss, _, objective = learner.joint_objective(weights, critic, (inputs, qy))
        n_head = len(learner.model.trainable_variables)
        grads[flag, weight] = [g.numpy() for g in tape.gradient(objective, weights)]
        if not flag:
            external = tape.gradient(concept_loss, weights[n_head:])
            for g, e in zip(grads[flag, weight][n_head:], external):
                np.testing.assert_allclose(g, 0.3 * e.numpy(), rtol=1e-5, atol=1e-7)
    n_head = 2
    # the head's meta-gradient is the same with or without the stop
    for a, b in zip(grads[False, 0.3][:n_head], grads[True, 0.3][:n_head]):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    # and the generator's differs by exactly the meta-loss's part
    for a, b, c in zip(
        grads[False, 0.3][n_head:], grads[True, 0.3][n_head:], grads[True, 0.0][n_head:]
    ):
        np.testing.assert_allclose(b - a, c, rtol=1e-4, atol=1e-6)
    restored = ConceptSpaceLearner.from_config(_learner(meta_loss_to_generator=False).get_config())
    assert restored.meta_loss_to_generator is False


def test_fused_generator_gives_the_exact_second_order_meta_gradient():
    # the inner loop adapts the head only, so the generator is differentiated once:
    # TensorFlow's fused batch norm (wrong second derivatives) is then exact
    grads = {}
    for kind in ("exact", "fused"):
        keras.utils.set_random_seed(3)
        gen = nets.conv4(input_shape=(12, 12, 1), filters=3, blocks=2, batch_norm=kind)
        head = keras.Sequential([keras.Input((gen.output_shape[-1],)), keras.layers.Dense(WAYS)])
        learner = ConceptSpaceLearner(head, gen, external_classes=4, inner_lr=0.5, inner_steps=2)
        rng = np.random.default_rng(0)
        sx = tf.constant(rng.random((2, WAYS * 2, 12, 12, 1), dtype=np.float32))
        qx = tf.constant(rng.random((2, WAYS * 2, 12, 12, 1), dtype=np.float32))
        sy = tf.constant(np.tile(np.repeat(np.arange(WAYS), 2), (2, 1)).astype(np.int32))
        cx = tf.constant(rng.random((6, 12, 12, 1), dtype=np.float32))
        cy = tf.constant(rng.integers(4, size=6).astype(np.int32))
        weights = [v.value for v in learner.meta_variables]
        critic = [v.value for v in learner.discriminator.trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch(weights)
            objective = learner.joint_objective(weights, critic, ((sx, sy, qx, cx, cy), sy))[-1]
        grads[kind] = [g.numpy() for g in tape.gradient(objective, weights)]
    assert len(grads["exact"]) == len(grads["fused"])
    for exact, fused in zip(grads["exact"], grads["fused"]):
        assert np.abs(exact).max() > 0
        np.testing.assert_allclose(fused, exact, rtol=1e-3, atol=1e-5)


def _synthetic(num_classes, seed):
    # classes are random directions in a 4-D subspace of the 10-D inputs, plus noise
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, DIM)))[0][:, :CONCEPT]
    means = rng.normal(size=(num_classes, CONCEPT)) * 2.0
    y = np.repeat(np.arange(num_classes), 20)
    x = means[y] @ basis.T + 0.3 * rng.normal(size=(len(y), DIM))
    return ClassDataset(x.astype(np.float32), y, [str(c) for c in range(num_classes)])


def test_learns_on_synthetic_tasks():
    train, external, test = _synthetic(30, 1), _synthetic(20, 2), _synthetic(30, 3)
    learner = _learner(external_classes=20, concept_weight=1.0, inner_steps=2)
    learner.compile(keras.optimizers.Adam(1e-2))
    episodes = EpisodeSampler(train, WAYS, 2, 5, seed=0)
    test_episodes = EpisodeSampler(test, WAYS, 2, 5, seed=0).fixed(30)

    def accuracy():
        return np.mean(
            [
                (learner.predict_episode(*e.inputs()).argmax(1) == e.query_y).mean()
                for e in test_episodes
            ]
        )

    before = accuracy()
    history = learner.fit(
        concept_dataset(episodes, external, concept_batch=32, batch_size=4, seed=0),
        steps_per_epoch=60,
        epochs=1,
        verbose=0,
    )
    assert {"loss", "accuracy", "concept_loss", "concept_accuracy"} <= set(history.history)
    assert accuracy() > before + 0.1


def test_bad_arguments():
    with pytest.raises(ValueError, match="external_classes"):
        ConceptSpaceLearner(_head(), _generator())
    with pytest.raises(ValueError, match="concept_weight"):
        _learner(concept_weight=-1)
    with pytest.raises(ValueError, match="classification"):
        _learner(kind="regression")
    fused_head = keras.Sequential(
        [keras.Input((CONCEPT,)), nets.FusedBatchNormalization(), keras.layers.Dense(WAYS)]
    )
    with pytest.raises(ValueError, match="FusedBatchNormalization"):
        ConceptSpaceLearner(fused_head, _generator(), external_classes=5)
    with pytest.raises(ValueError, match="concept_batch"):
        concept_dataset(None, _synthetic(3, 0), concept_batch=0)
