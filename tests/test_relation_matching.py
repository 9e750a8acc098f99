"""Relation networks (Sung et al. 2018) and matching networks (Vinyals et al. 2016)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from bookcode import nets
from bookcode.metric import (
    AttentionLSTM,
    MatchingNetwork,
    RelationNetwork,
    SupportContext,
    class_sums,
    matching_log_probabilities,
    relation_pairs,
)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _lstm_step(x, h, c, kernel, recurrent, bias):
    """One step of a Keras LSTM cell (gates i, f, c, o), by hand."""
    z = x @ kernel + h @ recurrent + bias
    i, f, g, o = np.split(z, 4, axis=-1)
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    return _sigmoid(o) * np.tanh(c), c


def _small_relation_network(filters=4):
    embedding = nets.conv4(
        filters=filters, pooling_blocks=2, padding=["valid", "valid", "same", "same"],
        flatten=False, fused_batch_norm=True, batch_norm_momentum=0.9,
    )  # fmt: skip
    return RelationNetwork(embedding)


def _episode(ways=3, shots=2, queries=2, seed=0):
    rng = np.random.default_rng(seed)
    support_x = rng.random((ways * shots, 28, 28, 1), dtype=np.float32)
    query_x = rng.random((ways * queries, 28, 28, 1), dtype=np.float32)
    return support_x, np.repeat(np.arange(ways), shots).astype(np.int32), query_x


# ------------------------------------------------------------------ relation network


def test_relation_scores_on_a_hand_made_episode():
    # identity embedding of 1x1x2 "images", relation module = one dense unit
    embedding = keras.Sequential([keras.Input((1, 1, 2)), keras.layers.Identity()])
    relation = keras.Sequential(
        [keras.Input((1, 1, 4)), keras.layers.Flatten(), keras.layers.Dense(1)]
    )
    w, b = np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32), np.array([-1.0], np.float32)
    relation.set_weights([w, b])
    model = RelationNetwork(embedding, relation)
    support = np.array([[1, 0], [0, 1], [2, 2], [1, 1]], np.float32).reshape(4, 1, 1, 2)
    support_y = np.array([0, 1, 1, 0])
    query = np.array([[1, -1], [0, 2], [0.5, 0]], np.float32).reshape(3, 1, 1, 2)
    sums = np.array([[2, 1], [2, 3]], np.float32)  # class 0: (1,0)+(1,1); class 1: (0,1)+(2,2)
    by_hand = np.array(
        [[_sigmoid(np.r_[s, q] @ w[:, 0] + b[0]) for s in sums] for q in query.reshape(3, 2)]
    )
    np.testing.assert_allclose(model.predict_episode(support, support_y, query), by_hand, rtol=1e-5)
    # MSE against one-hot targets
    query_y = np.array([1, 0, 1])
    loss = model.episode_loss(tf.constant(query_y), tf.constant(by_hand, tf.float32))
    assert float(loss) == pytest.approx(np.mean((by_hand - np.eye(2)[query_y]) ** 2), rel=1e-5)


def test_class_sums_for_k_shot():
    features = np.arange(5 * 2 * 2 * 3, dtype=np.float32).reshape(5, 2, 2, 3)
    labels = np.array([2, 0, 2, 1, 0])
    sums = class_sums(features, labels).numpy()
    assert sums.shape == (3, 2, 2, 3)
    np.testing.assert_allclose(sums[0], features[1] + features[4])
    np.testing.assert_allclose(sums[1], features[3])
    np.testing.assert_allclose(sums[2], features[0] + features[2])
    embedding = keras.Sequential([keras.Input((2, 2, 3)), keras.layers.Identity()])
    relation = keras.Sequential(
        [keras.Input((2, 2, 6)), keras.layers.Flatten(), keras.layers.Dense(1)]
    )
    means = RelationNetwork(embedding, relation, combine="mean").process_support(features, labels)
    np.testing.assert_allclose(means.numpy(), sums / np.array([2, 1, 2])[:, None, None, None])
    with pytest.raises(ValueError, match="combine must be"):
        RelationNetwork(embedding, relation, combine="max")
    pairs = relation_pairs(sums, features[:2]).numpy()  # query-major, [class, query]
    assert pairs.shape == (6, 2, 2, 6)
    np.testing.assert_allclose(pairs[4], np.concatenate([sums[1], features[1]], axis=-1))


def test_default_relation_network_is_the_papers_and_the_split_convolution_is_exact():
    model = RelationNetwork()
    assert model.embedding.output_shape == (None, 5, 5, 64)
    assert model.relation.input_shape == (None, 5, 5, 128)
    assert model.relation.output_shape == (None, 1)
    support_x, support_y, query_x = _episode(ways=4, shots=3, queries=2)
    support, query = model.embed([support_x, query_x], training=False)
    classes = model.process_support(support, tf.constant(support_y))
    split = model.relation_logits(classes, query).numpy()  # ways + queries convolutions
    naive = tf.reshape(model.relation(relation_pairs(classes, query)), (8, 4)).numpy()
    np.testing.assert_allclose(split, naive, rtol=1e-4, atol=1e-5)
    scores = model.predict_episode(support_x, support_y, query_x)
    np.testing.assert_allclose(scores, _sigmoid(naive), rtol=1e-4, atol=1e-5)
    assert scores.min() >= 0 and scores.max() <= 1


def test_default_relation_module_has_the_papers_dense_initialisation():
    keras.utils.set_random_seed(0)
    model = RelationNetwork()
    hidden, output = (
        layer for layer in model.relation.layers if isinstance(layer, keras.layers.Dense)
    )
    for layer in (hidden, output):
        np.testing.assert_array_equal(layer.bias.numpy(), np.ones(layer.bias.shape))
    kernel = hidden.kernel.numpy()  # 64 x 8 draws from N(0, 0.01^2)
    assert abs(kernel.mean()) < 0.003 and 0.008 < kernel.std() < 0.012
    assert 0.005 < output.kernel.numpy().std() < 0.02
    # a module given by the caller is left as it is
    given = nets.relation_module()
    bias = given.get_layer("hidden").bias.numpy().copy()
    RelationNetwork(relation=given)
    np.testing.assert_array_equal(given.get_layer("hidden").bias.numpy(), bias)
    assert not np.any(bias)  # Keras's zero biases


def test_relation_network_trains_with_fit_and_updates_batch_norm():
    keras.utils.set_random_seed(0)
    model = _small_relation_network()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    support_x, support_y, query_x = _episode()
    query_y = np.repeat(np.arange(3), 2).astype(np.int32)
    data = tf.data.Dataset.from_tensors(((support_x, support_y, query_x), query_y)).repeat()
    moving = model.relation.layers[0].layers[1].moving_mean.numpy().copy()
    history = model.fit(data, steps_per_epoch=6, epochs=2, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert not np.allclose(model.relation.layers[0].layers[1].moving_mean.numpy(), moving)


def test_relation_network_mean_saves_and_loads(tmp_path):
    model = _small_relation_network()
    model = RelationNetwork(model.embedding, combine="mean")
    episode = _episode(shots=3)
    before = model.predict_episode(*episode)
    model.save(tmp_path / "relation.keras")
    loaded = keras.models.load_model(tmp_path / "relation.keras")
    assert loaded.combine == "mean"
    np.testing.assert_allclose(loaded.predict_episode(*episode), before, rtol=1e-5, atol=1e-6)


def test_relation_network_bad_inputs():
    with pytest.raises(ValueError, match="feature maps"):
        RelationNetwork(nets.conv4(filters=4))  # flat embedding
    with pytest.raises(ValueError, match="relation must be"):
        RelationNetwork(relation="conv")


# ------------------------------------------------------------------ matching network


def test_cosine_attention_with_temperature_by_hand():
    rng = np.random.default_rng(1)
    query, support = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    labels = np.array([1, 0, 1, 2, 0])
    scale = 7.0
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    logits = scale * unit(query) @ unit(support).T
    attention = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probabilities = attention @ np.eye(3)[labels]  # p(y | x) = sum_i a(x, x_i) y_i
    ours = matching_log_probabilities(
        query.astype(np.float32), support.astype(np.float32), labels, scale
    )
    np.testing.assert_allclose(np.exp(ours.numpy()), probabilities, rtol=1e-5, atol=1e-6)
    # the model's attention and probabilities, with an identity embedding
    embedding = keras.Sequential([keras.Input((4,)), keras.layers.Identity()])
    model = MatchingNetwork(embedding, scale=scale)
    state = model.process_support(tf.constant(support, tf.float32), tf.constant(labels))
    np.testing.assert_allclose(
        model.attention(state, tf.constant(query, tf.float32)), attention, rtol=1e-4
    )
    logp = model.predict_episode(support, labels, query)
    np.testing.assert_allclose(logp, np.log(probabilities), rtol=1e-4, atol=1e-5)
    # confident attention stays finite in log space
    sharp = matching_log_probabilities(
        query.astype(np.float32), support.astype(np.float32), labels, 1e4
    )
    assert np.all(np.isfinite(sharp.numpy()))


def test_attention_lstm_is_the_papers_by_hand():
    rng = np.random.default_rng(2)
    units, steps = 3, 2
    layer = AttentionLSTM(units, steps)
    layer.build((None, units))
    weights = [
        rng.normal(scale=0.5, size=w.shape).astype(np.float32) for w in layer.cell.get_weights()
    ]
    layer.cell.set_weights(weights)
    kernel, recurrent, bias = weights
    assert kernel.shape == (2 * units, 4 * units)  # the input is [f'(x), r]
    query, g = rng.normal(size=(2, units)), rng.normal(size=(4, units))
    h, c = np.zeros((2, units)), np.zeros((2, units))
    for _ in range(steps):
        a = np.exp(h @ g.T) / np.exp(h @ g.T).sum(axis=1, keepdims=True)  # dot-product read
        r = a @ g
        h_hat, c = _lstm_step(np.concatenate([query, r], axis=1), h, c, kernel, recurrent, bias)
        h = h_hat + query  # skip connection
    out = layer(tf.constant(query, tf.float32), tf.constant(g, tf.float32))
    np.testing.assert_allclose(out.numpy(), h, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="steps must be"):
        AttentionLSTM(3, steps=0)


def test_support_context_is_a_bidirectional_lstm_with_skip_by_hand():
    rng = np.random.default_rng(3)
    units = 2
    layer = SupportContext(units)
    layer.build((None, units))
    forward, backward = layer.lstm.forward_layer.cell, layer.lstm.backward_layer.cell
    for cell in (forward, backward):
        cell.set_weights(
            [rng.normal(scale=0.5, size=w.shape).astype(np.float32) for w in cell.get_weights()]
        )
    x = rng.normal(size=(4, units))

    def run(cell, sequence):
        h, c, outputs = np.zeros(units), np.zeros(units), []
        for step in sequence:
            h, c = _lstm_step(step, h, c, *cell.get_weights())
            outputs.append(h)
        return np.array(outputs)

    by_hand = x + run(forward, x) + run(backward, x[::-1])[::-1]
    np.testing.assert_allclose(
        layer(tf.constant(x, tf.float32)).numpy(), by_hand, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("fce", [False, True])
def test_matching_network_shapes_and_support_order(fce):
    keras.utils.set_random_seed(0)
    model = MatchingNetwork(nets.conv4(filters=8), fce=fce, processing_steps=3)
    support_x, support_y, query_x = _episode(ways=4, shots=2, queries=3)
    logits = model.predict_episode(support_x, support_y, query_x)
    assert logits.shape == (12, 4)
    np.testing.assert_allclose(np.exp(logits).sum(axis=1), 1.0, rtol=1e-4)  # log p(y | x)
    assert model.attention_weights(support_x, support_y, query_x).shape == (12, 8)
    # permuting the support set (labels with it) changes nothing for the queries
    p = np.random.default_rng(1).permutation(8)
    np.testing.assert_allclose(
        model.predict_episode(support_x[p], support_y[p], query_x), logits, rtol=1e-4, atol=1e-5
    )
    # permuting the queries permutes their logits, nothing else
    p = np.random.default_rng(2).permutation(12)
    np.testing.assert_allclose(
        model.predict_episode(support_x, support_y, query_x[p]), logits[p], rtol=1e-4, atol=1e-5
    )
    if fce:  # the context embedding depends on the support set, in the content order
        support = tf.constant(np.random.default_rng(4).normal(size=(5, 8)), tf.float32)
        g, _ = model.process_support(support, tf.constant([0, 1, 2, 3, 0]))
        order = MatchingNetwork.content_order(support).numpy()
        np.testing.assert_allclose(
            g.numpy()[order], model.support_context(tf.gather(support, order)), rtol=1e-5
        )
        assert not np.allclose(g.numpy(), model.support_context(support).numpy())


def test_matching_network_learns_scale_and_bad_inputs(tmp_path):
    keras.utils.set_random_seed(0)
    model = MatchingNetwork(nets.conv4(filters=4), fce=True, processing_steps=1, scale=5.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    support_x, support_y, query_x = _episode()
    query_y = np.repeat(np.arange(3), 2).astype(np.int32)
    data = tf.data.Dataset.from_tensors(((support_x, support_y, query_x), query_y)).repeat()
    history = model.fit(data, steps_per_epoch=4, epochs=2, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert float(model.scale) != pytest.approx(5.0)
    fixed = MatchingNetwork(nets.conv4(filters=4), scale=5.0, learn_scale=False)
    assert all(v is not fixed.log_scale for v in fixed.trainable_variables)
    with pytest.raises(ValueError, match="scale must be positive"):
        MatchingNetwork(nets.conv4(filters=4), scale=0.0)


def test_matching_network_with_fce_under_mixed_bfloat16():
    """The context LSTMs compute in float32 while the embedding runs in bfloat16."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        embedding = nets.conv4(filters=4, fused_batch_norm=True)
        model = MatchingNetwork(embedding, fce=True, processing_steps=2)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        support_x, support_y, query_x = _episode()
        query_y = np.repeat(np.arange(3), 2).astype(np.int32)
        before = [v.numpy().copy() for v in model.trainable_variables]
        model.fit(
            tf.data.Dataset.from_tensors(((support_x, support_y, query_x), query_y)),
            epochs=1,
            verbose=0,
        )
        logits = model.predict_episode(support_x, support_y, query_x)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert logits.dtype == np.float32 and logits.shape == (6, 3) and np.isfinite(logits).all()
    changed = [not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables)]
    assert all(changed), "every weight, the context LSTMs' included, takes a step"
