"""The few-shot classifier base (bookcode.metric.base) and the shared distances."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from bookcode import nets
from bookcode.episodes import ClassDataset, EpisodeSampler
from bookcode.metric import (
    FewShotClassifier,
    PrototypicalNetwork,
    class_prototypes,
    cosine_similarity,
    euclidean_distance,
    squared_euclidean_distance,
)

# ------------------------------------------------------------------ distances


@pytest.fixture
def points():
    rng = np.random.default_rng(0)
    return rng.normal(size=(5, 3, 2)).astype(np.float32), rng.normal(size=(4, 3, 2)).astype(
        np.float32
    )


def test_distances_against_numpy(points):
    a, b = points  # (n, 3, 2) "feature maps": compared flattened
    fa, fb = a.reshape(5, -1), b.reshape(4, -1)
    squared = ((fa[:, None] - fb[None]) ** 2).sum(-1)
    np.testing.assert_allclose(squared_euclidean_distance(a, b), squared, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(euclidean_distance(a, b), np.sqrt(squared), rtol=1e-5)
    cosine = (fa @ fb.T) / np.outer(np.linalg.norm(fa, axis=1), np.linalg.norm(fb, axis=1))
    np.testing.assert_allclose(cosine_similarity(a, b, scale=10.0), 10 * cosine, rtol=1e-5)
    # paired: row i with row i only
    c = b[:4] + 1.0
    np.testing.assert_allclose(
        squared_euclidean_distance(b, c, paired=True), np.full(4, 6.0), rtol=1e-5
    )
    np.testing.assert_allclose(
        euclidean_distance(b, c, paired=True), np.full(4, np.sqrt(6.0)), rtol=1e-5
    )
    np.testing.assert_allclose(
        cosine_similarity(b, c, paired=True), np.diag(cosine_similarity(b, c)), rtol=1e-5
    )
    assert (
        squared_euclidean_distance(a.astype(np.float64), b.astype(np.float64)).dtype == tf.float64
    )


def test_euclidean_gradient_finite_at_zero():
    a = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    with tf.GradientTape() as tape:
        tape.watch(a)
        d = euclidean_distance(a, a)
    assert np.isfinite(tape.gradient(d, a).numpy()).all()


# ------------------------------------------------------------------ the base


def flat_identity(shape):
    return keras.Sequential([keras.Input(shape), keras.layers.Identity()])


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    x = rng.random((10 * 6, 28, 28, 1), dtype=np.float32)
    return ClassDataset(x=x, y=np.repeat(np.arange(10), 6), class_names=list("abcdefghij"))


class SigmoidMSE(PrototypicalNetwork):
    """A loss override as relation networks have it: MSE of sigmoid scores to one-hot."""

    def episode_loss(self, query_y, logits):
        one_hot = tf.one_hot(query_y, tf.shape(logits)[1])
        return tf.reduce_mean(tf.square(tf.sigmoid(logits) - one_hot))


def test_loss_override_gives_the_hand_computed_loss():
    model = SigmoidMSE(flat_identity((2,)))
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    support_x = np.array([[0.0, 0.0], [1.0, 0.0]], np.float32)
    support_y = np.array([0, 1], np.int32)
    query_x = np.array([[0.0, 1.0]], np.float32)
    query_y = np.array([1], np.int32)
    # logits -[1, 2]; sigmoid of them against one-hot [0, 1]
    s = 1 / (1 + np.exp([1.0, 2.0]))
    expected = ((s[0] - 0) ** 2 + (s[1] - 1) ** 2) / 2
    data = tf.data.Dataset.from_tensors(((support_x, support_y, query_x), query_y))
    result = model.evaluate(data, verbose=0, return_dict=True)
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-5)
    history = model.fit(data, epochs=1, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=1e-5)
    ce = PrototypicalNetwork(flat_identity((2,)))
    ce.compile(optimizer=keras.optimizers.SGD(0.0))
    np.testing.assert_allclose(
        ce.evaluate(data, verbose=0, return_dict=True)["loss"], np.log1p(np.exp(1.0)), rtol=1e-5
    )


class MeanMap(FewShotClassifier):
    """A classifier on feature maps (as relation networks): the base must not flatten."""

    def process_support(self, support, support_y):
        assert support.shape.rank == 4  # (n, h, w, c): shapes kept
        return class_prototypes(support, support_y)

    def score(self, maps, query):
        assert maps.shape.rank == 4
        return -tf.reduce_sum(tf.square(query[:, None] - maps[None]), axis=[2, 3, 4])


def test_feature_maps_keep_their_shape_and_batch_norm_sees_the_episode(tiny):
    conv = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(4, 3, strides=4),
            keras.layers.BatchNormalization(),
        ]
    )
    model = MeanMap(conv)
    episode = EpisodeSampler(tiny, ways=3, shots=2, queries=2, seed=0).sample()
    logits = model.predict_episode(*episode.inputs())
    assert logits.shape == (6, 3)
    # in training, one batch-norm pass over support + query: its batch statistics
    support_x, support_y, query_x = episode.inputs()
    model((support_x, support_y, query_x), training=True)
    together = np.concatenate([support_x, query_x])
    features = conv.layers[0](together).numpy()
    momentum = conv.layers[1].momentum
    np.testing.assert_allclose(
        conv.layers[1].moving_mean.numpy(),
        (1 - momentum) * features.mean(axis=(0, 1, 2)),
        rtol=1e-4,
        atol=1e-6,
    )


def test_default_embedding_is_the_fast_conv4():
    model = PrototypicalNetwork()
    kinds = {
        type(layer).__name__
        for block in model.embedding.layers
        for layer in getattr(block, "layers", [block])
    }
    assert "FusedBatchNormalization" in kinds and "BatchNormalization" not in kinds
    assert model.embedding.output_shape == (None, 64)


def test_compile_refuses_loss_and_metrics_clearly():
    model = PrototypicalNetwork(flat_identity((2,)))
    with pytest.raises(ValueError, match="override episode_loss"):
        model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="loss and accuracy only"):
        model.compile(optimizer="adam", metrics=["accuracy"])
    model.compile(optimizer="adam")


def test_default_optimizer_is_adam_at_snell_rate():
    model = PrototypicalNetwork(flat_identity((2,)))
    model.compile()
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-3)


def test_predict_episode_input_errors():
    model = PrototypicalNetwork(flat_identity((2,)))
    x = np.zeros((3, 2), np.float32)
    y = np.array([0, 1, 1])
    with pytest.raises(ValueError, match="extra inputs"):
        model.predict_episode(x, y, x, unlabelled_x=x)
    with pytest.raises(ValueError, match="cover every label"):
        model.adapt(x, np.array([1, 1, 1]))


def test_base_is_registered_and_serialisable():
    assert keras.saving.get_registered_object("bookcode>FewShotClassifier") is FewShotClassifier
    model = PrototypicalNetwork(nets.conv4(filters=4), name="p")
    clone = PrototypicalNetwork.from_config(model.get_config())
    assert clone.name == "p" and clone.embedding.output_shape == (None, 4)
