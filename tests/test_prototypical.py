"""Prototypical networks (Snell et al. 2017) and the Gaussian (Fort 2017) and
semi-supervised (Ren et al. 2018) variants."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from bookcode import nets
from bookcode.episodes import ClassDataset, EpisodeSampler
from bookcode.evaluation import evaluate
from bookcode.metric import (
    GaussianPrototypicalNetwork,
    PrototypicalNetwork,
    SemiSupervisedPrototypicalNetwork,
    class_prototypes,
    mahalanobis_distance,
    soft_kmeans_refinement,
    squared_euclidean_distance,
)


def identity_embedding(dim):
    """An embedding that returns its (dim,) input unchanged, so the maths can be
    checked by hand."""
    return keras.Sequential([keras.Input((dim,)), keras.layers.Flatten()])


# ------------------------------------------------------------- the functions


def test_class_prototypes_hand_computed():
    embeddings = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0], [5.0, 5.0]], np.float32)
    labels = np.array([0, 0, 1, 0])
    expected = [[7 / 3, 5 / 3], [1.0, 3.0]]
    np.testing.assert_allclose(class_prototypes(embeddings, labels), expected, rtol=1e-6)


def test_class_prototypes_weighted_per_dimension():
    embeddings = np.array([[0.0, 0.0], [4.0, 4.0]], np.float32)
    weights = np.array([[1.0, 3.0], [3.0, 1.0]], np.float32)
    np.testing.assert_allclose(
        class_prototypes(embeddings, np.array([0, 0]), weights=weights), [[3.0, 1.0]]
    )


def test_class_prototypes_rejects_missing_class():
    with pytest.raises(ValueError, match="at least one support example"):
        class_prototypes(np.ones((2, 3), np.float32), np.array([0, 2]))


def test_squared_euclidean_distance_hand_computed():
    a = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
    b = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]], np.float32)
    expected = [[25.0, 1.0, 0.0], [13.0, 1.0, 2.0]]
    np.testing.assert_allclose(squared_euclidean_distance(a, b), expected, atol=1e-5)


def test_mahalanobis_distance_hand_computed():
    queries = np.array([[1.0, 2.0]], np.float32)
    prototypes = np.array([[0.0, 0.0], [1.0, 0.0]], np.float32)
    precisions = np.array([[2.0, 1.0], [1.0, 0.5]], np.float32)
    # 2*1 + 1*4 = 6 ; 1*0 + 0.5*4 = 2
    np.testing.assert_allclose(mahalanobis_distance(queries, prototypes, precisions), [[6.0, 2.0]])


def test_soft_kmeans_refinement_hand_computed():
    support = np.array([[0.0, 0.0], [10.0, 0.0]], np.float32)
    labels = np.array([0, 1])
    prototypes = class_prototypes(support, labels)
    # One unlabelled example exactly on prototype 0: its assignment is
    # softmax(-[0, 100]) = [1, e^-100] ~ [1, 0], so prototype 0 becomes the
    # mean of (0, 0) and (0, 2) = (0, 1) and prototype 1 stays.
    unlabeled = np.array([[0.0, 2.0]], np.float32)
    refined = soft_kmeans_refinement(prototypes, support, labels, unlabeled)
    d = np.array([4.0, 104.0])
    z = np.exp(-d) / np.exp(-d).sum()
    expected0 = (support[0] + z[0] * unlabeled[0]) / (1 + z[0])
    expected1 = (support[1] + z[1] * unlabeled[0]) / (1 + z[1])
    np.testing.assert_allclose(refined, [expected0, expected1], rtol=1e-5, atol=1e-6)


def test_soft_kmeans_mask_removes_distractors():
    support = np.array([[0.0, 0.0], [4.0, 0.0]], np.float32)
    labels = np.array([0, 1])
    prototypes = class_prototypes(support, labels)
    relevant = np.array([[0.0, 1.0]], np.float32)
    distractor = np.array([[2.0, 50.0]], np.float32)
    unlabeled = np.concatenate([relevant, distractor])
    mask = np.array([[1.0, 1.0], [0.0, 0.0]], np.float32)  # distractor masked out
    with_mask = soft_kmeans_refinement(prototypes, support, labels, unlabeled, mask)
    without_distractor = soft_kmeans_refinement(prototypes, support, labels, relevant)
    np.testing.assert_allclose(with_mask, without_distractor, rtol=1e-6)
    all_masked = soft_kmeans_refinement(prototypes, support, labels, unlabeled, 0 * mask)
    np.testing.assert_allclose(all_masked, prototypes, rtol=1e-6)


def test_soft_kmeans_distractor_cluster_hand_computed():
    """Ren et al. (2018), eq. 5: one more cluster at the origin with radius r."""
    support = np.array([[2.0, 0.0], [0.0, 2.0]], np.float32)
    labels = np.array([0, 1])
    prototypes = class_prototypes(support, labels)
    unlabeled = np.array([[2.0, 1.0], [0.1, 0.0]], np.float32)
    r = 0.5
    refined = soft_kmeans_refinement(prototypes, support, labels, unlabeled, distractor_radius=r)
    logits = np.stack(
        [-((unlabeled - p) ** 2).sum(1) for p in support]
        + [-(unlabeled**2).sum(1) / r**2 - np.log(r)],
        axis=1,
    )
    z = np.exp(logits - logits.max(1, keepdims=True))
    z = (z / z.sum(1, keepdims=True))[:, :2]  # the origin cluster's share is dropped
    expected = (support + z.T @ unlabeled) / (1 + z.sum(0))[:, None]
    np.testing.assert_allclose(refined, expected, rtol=1e-5)
    # the example near the origin goes to the distractor cluster, barely moving the prototypes
    assert z[1].sum() < 0.05 and z[0, 0] > 0.9


# ------------------------------------------------------- PrototypicalNetwork


def test_logits_are_negative_squared_distances_to_prototypes():
    model = PrototypicalNetwork(identity_embedding(2))
    support_x = np.array([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0]], np.float32)
    support_y = np.array([0, 0, 1])
    query_x = np.array([[1.0, 1.0], [3.0, 0.0]], np.float32)
    logits = model.predict_episode(support_x, support_y, query_x)
    # prototypes (0, 1) and (4, 0)
    np.testing.assert_allclose(logits, [[-1.0, -10.0], [-10.0, -1.0]], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_omniglot():
    rng = np.random.default_rng(0)
    x = rng.random((12 * 8, 28, 28, 1), dtype=np.float32)
    return ClassDataset(x=x, y=np.repeat(np.arange(12), 8), class_names=[str(i) for i in range(12)])


def test_shapes_any_ways_and_gradients(tiny_omniglot):
    model = PrototypicalNetwork(nets.conv4(filters=8))
    episode = EpisodeSampler(tiny_omniglot, ways=4, shots=2, queries=3, seed=0).sample()
    assert model.predict_episode(*episode.inputs()).shape == (12, 4)
    inputs = tuple(tf.constant(a) for a in episode.inputs())
    with tf.GradientTape() as tape:
        logits = model(inputs, training=True)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(episode.query_y, logits)
        )
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(grads) == len(model.trainable_variables) > 0
    assert all(g is not None and np.all(np.isfinite(g)) for g in grads)
    assert any(np.abs(g).sum() > 0 for g in grads)


def test_train_with_more_ways_than_test(tiny_omniglot):
    model = PrototypicalNetwork(nets.conv4(filters=8))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    train = EpisodeSampler(tiny_omniglot, ways=10, shots=1, queries=2, seed=0)
    history = model.fit(train.tf_dataset(), steps_per_epoch=2, epochs=1, verbose=0)
    assert set(history.history) == {"loss", "accuracy"}
    test = EpisodeSampler(tiny_omniglot, ways=3, shots=1, queries=2, seed=1).sample()
    assert model.predict_episode(*test.inputs()).shape == (6, 3)


def test_bad_episodes_raise_clear_errors():
    model = PrototypicalNetwork(identity_embedding(2))
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="cover every label"):
        model.predict_episode(x, np.array([0, 0, 2]), x)
    with pytest.raises(ValueError, match="one label per support example"):
        model.predict_episode(x, np.array([0, 1]), x)
    with pytest.raises(ValueError, match="integer labels"):
        model.predict_episode(x, np.array([0.0, 1.0, 1.0]), x)
    with pytest.raises(ValueError, match="query examples have shape"):
        model.predict_episode(x, np.array([0, 1, 1]), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="embedding must be"):
        PrototypicalNetwork("conv4")


LEARNERS = {
    "plain": lambda: PrototypicalNetwork(nets.conv4(filters=8)),
    "gaussian": lambda: GaussianPrototypicalNetwork(nets.conv4(filters=8), covariance="diagonal"),
    "semi-supervised": lambda: SemiSupervisedPrototypicalNetwork(
        nets.conv4(filters=8), masked=True
    ),
}


def sampler_for(model, dataset, seed=0):
    unlabeled = 2 if model.extra_inputs else 0
    return EpisodeSampler(dataset, ways=3, shots=1, queries=2, seed=seed, unlabeled=unlabeled)


@pytest.mark.parametrize("name", LEARNERS)
def test_save_and_load_round_trip(name, tiny_omniglot, tmp_path):
    model = LEARNERS[name]()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    sampler = sampler_for(model, tiny_omniglot)
    model.fit(sampler.tf_dataset(), steps_per_epoch=2, epochs=1, verbose=0)
    episode = sampler.sample()
    before = model.predict_episode(*episode.inputs(), **episode.extras())
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded) is type(model) and loaded.compiled  # optimizer restored too
    assert loaded.get_config().keys() == model.get_config().keys()
    after = loaded.predict_episode(*episode.inputs(), **episode.extras())
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LEARNERS)
def test_fit_with_validation_data(name, tiny_omniglot):
    model = LEARNERS[name]()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    train = sampler_for(model, tiny_omniglot, seed=0).tf_dataset()
    val = sampler_for(model, tiny_omniglot, seed=1).tf_dataset()
    history = model.fit(
        train, steps_per_epoch=2, epochs=1, validation_data=val, validation_steps=2, verbose=0
    )
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert np.isfinite(history.history["val_loss"][0])
    assert 0 <= history.history["val_accuracy"][0] <= 1


@pytest.mark.parametrize("name", LEARNERS)
def test_adapt_equals_predict_episode(name, tiny_omniglot):
    model = LEARNERS[name]()
    episode = sampler_for(model, tiny_omniglot).sample()
    scores = model.adapt(episode.support_x, episode.support_y, **episode.extras())
    np.testing.assert_allclose(
        scores(episode.query_x),
        model.predict_episode(*episode.inputs(), **episode.extras()),
        rtol=1e-5,
        atol=1e-5,
    )
    assert scores(episode.query_x[:1]).shape == (1, 3)
    with pytest.raises(ValueError, match="query examples have shape"):
        scores(np.zeros((2, 5), np.float32))


def test_learns_on_real_omniglot():
    from bookcode import datasets

    keras.utils.set_random_seed(0)
    train = datasets.omniglot("train")
    test = datasets.omniglot("test")
    episodes = EpisodeSampler(test, ways=5, shots=1, queries=5).fixed(40, seed=3)
    embedding = nets.conv4(filters=32, fused_batch_norm=True, batch_norm_momentum=0.9)
    model = PrototypicalNetwork(embedding)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    before = evaluate(model, episodes).mean
    sampler = EpisodeSampler(train, ways=30, shots=1, queries=4, seed=0)
    model.fit(sampler.tf_dataset(), steps_per_epoch=60, epochs=1, verbose=0)
    after = evaluate(model, episodes).mean
    assert after > 0.7 and after > before + 0.15, (before, after)


# ------------------------------------------------- Gaussian prototypical nets


def test_gaussian_radius_hand_computed():
    model = GaussianPrototypicalNetwork(
        identity_embedding(3), covariance="radius", precision_head=False
    )
    raw = np.log(np.e - 1)  # softplus(raw) = 1, so the precision is 2
    support_x = np.array([[0.0, 0.0, raw], [2.0, 0.0, 0.0], [5.0, 5.0, raw]], np.float32)
    support_y = np.array([0, 0, 1])
    query_x = np.array([[1.0, 1.0, 123.0]], np.float32)  # the query's own precision is unused
    s0, s1 = 2.0, 1.0 + np.log(2.0)
    proto0 = (s0 * np.array([0.0, 0.0]) + s1 * np.array([2.0, 0.0])) / (s0 + s1)
    expected = [
        -(s0 + s1) * np.sum((np.array([1.0, 1.0]) - proto0) ** 2),
        -s0 * np.sum((np.array([1.0, 1.0]) - np.array([5.0, 5.0])) ** 2),
    ]
    logits = model.predict_episode(support_x, support_y, query_x)
    np.testing.assert_allclose(logits, [expected], rtol=1e-5)


def test_gaussian_split_shapes_and_errors():
    diagonal = GaussianPrototypicalNetwork(
        identity_embedding(4), covariance="diagonal", precision_head=False
    )
    embeddings, precisions = diagonal.split(tf.zeros((5, 8)))
    assert embeddings.shape == (5, 4) and precisions.shape == (5, 4)
    np.testing.assert_allclose(precisions, 1 + np.log(2.0), rtol=1e-6)
    radius = GaussianPrototypicalNetwork(
        identity_embedding(4), covariance="radius", precision_head=False
    )
    embeddings, precisions = radius.split(tf.zeros((5, 8)))
    assert embeddings.shape == (5, 7) and precisions.shape == (5, 7)
    with pytest.raises(ValueError, match="even encoder output"):
        diagonal.split(tf.zeros((5, 7)))
    with pytest.raises(ValueError, match="'radius' or 'diagonal'"):
        GaussianPrototypicalNetwork(identity_embedding(4), covariance="full")


def test_gaussian_precision_head_is_unconstrained_and_learns():
    # A ReLU encoder: its outputs are >= 0, so a precision read off them could not go
    # below 1 + ln 2. The head's raw precision is a linear map and can.
    encoder = keras.Sequential([keras.Input((3,)), keras.layers.ReLU()])
    model = GaussianPrototypicalNetwork(encoder, covariance="radius")
    x = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]], np.float32)
    embeddings, precisions = model.split(encoder(x))
    assert embeddings.shape == (2, 3) and precisions.shape == (2, 3)  # the whole output embeds
    np.testing.assert_allclose(precisions, 1 + np.log(2.0), rtol=1e-6)  # zero start
    model.precision_head.kernel.assign([[-2.0], [1.0], [0.0]])
    model.precision_head.bias.assign([0.5])
    raw = x @ np.array([-2.0, 1.0, 0.0]) + 0.5  # -1.5 and 3.5
    _, precisions = model.split(encoder(x))
    np.testing.assert_allclose(precisions[:, 0], 1 + np.log1p(np.exp(raw)), rtol=1e-5)
    assert float(precisions[0, 0]) < 1 + np.log(2.0)  # below the floor of a ReLU output

    diagonal = GaussianPrototypicalNetwork(encoder, covariance="diagonal")
    assert diagonal.split(encoder(x))[1].shape == (2, 3)
    assert diagonal.precision_head.kernel.shape == (3, 3)

    # one training step moves the head (the gradient reaches it)
    dense = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    learner = GaussianPrototypicalNetwork(dense, covariance="radius")
    learner.compile(optimizer=keras.optimizers.SGD(0.1))
    rng = np.random.default_rng(0)
    support_x, query_x = rng.normal(size=(4, 3)), rng.normal(size=(6, 3))
    episode = tf.data.Dataset.from_tensors(
        (
            (
                support_x.astype("float32"),
                np.array([0, 0, 1, 1], np.int32),
                query_x.astype("float32"),
            ),
            np.array([0, 1, 0, 1, 0, 1], np.int32),
        )
    )
    learner.fit(episode, epochs=1, verbose=0)
    assert np.any(learner.precision_head.kernel.numpy() != 0)


# --------------------------------------------- semi-supervised prototypical


def test_semi_supervised_sampler_inputs_and_training(tiny_omniglot):
    sampler = EpisodeSampler(
        tiny_omniglot, ways=3, shots=1, queries=2, seed=0, unlabeled=2, distractors=2
    )
    inputs, _ = next(iter(sampler.tf_dataset()))
    assert len(inputs) == 4
    unlabeled_x = inputs[3]["unlabeled_x"]
    assert unlabeled_x.shape == (10, 28, 28, 1)  # (3 ways + 2 distractors) * 2
    model = SemiSupervisedPrototypicalNetwork(nets.conv4(filters=8), masked=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(sampler.tf_dataset(), steps_per_epoch=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    episode = sampler.sample()
    logits = model.predict_episode(*episode.inputs(), episode.unlabeled_x)
    assert logits.shape == (6, 3)
    np.testing.assert_allclose(
        model.predict_episode(*episode.inputs(), unlabeled_x=episode.unlabeled_x), logits
    )


def test_evaluate_gives_the_semi_supervised_learner_its_unlabeled_examples():
    """Plain evaluate(learner, episodes) passes Episode.extras() to a learner
    that takes them: the accuracy is that of the refined prototypes."""
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(6, 4)) * 3, 10, axis=0) + rng.normal(size=(60, 4))
    data = ClassDataset(x.astype(np.float32), np.repeat(np.arange(6), 10), list("abcdef"))
    episodes = EpisodeSampler(data, ways=3, shots=1, queries=5, unlabeled=4).fixed(8, seed=0)
    semi = SemiSupervisedPrototypicalNetwork(identity_embedding(4), refinement_steps=2)
    plain = PrototypicalNetwork(identity_embedding(4))
    by_hand = [
        np.mean(semi.predict_episode(*e.inputs(), e.unlabeled_x).argmax(1) == e.query_y)
        for e in episodes
    ]
    without = [np.mean(plain.predict_episode(*e.inputs()).argmax(1) == e.query_y) for e in episodes]
    np.testing.assert_allclose(evaluate(semi, episodes).accuracies, by_hand)
    np.testing.assert_allclose(evaluate(plain, episodes).accuracies, without)  # no extras for it
    assert by_hand != without  # the unlabelled examples made a difference
    with pytest.raises(ValueError, match="extra inputs"):
        plain.predict_episode(*episodes[0].inputs(), unlabeled_x=episodes[0].unlabeled_x)


def test_semi_supervised_without_refinement_equals_plain():
    embedding = identity_embedding(2)
    plain = PrototypicalNetwork(embedding)
    semi = SemiSupervisedPrototypicalNetwork(embedding, refinement_steps=0)
    support_x = np.array([[0.0, 0.0], [4.0, 0.0]], np.float32)
    support_y = np.array([0, 1])
    query_x = np.array([[1.0, 0.0]], np.float32)
    unlabeled_x = np.array([[0.0, 1.0]], np.float32)
    np.testing.assert_allclose(
        semi.predict_episode(support_x, support_y, query_x, unlabeled_x),
        plain.predict_episode(support_x, support_y, query_x),
    )
    refined = SemiSupervisedPrototypicalNetwork(embedding, refinement_steps=1)
    # prototype 0 moves towards (0, 1), so the query (1, 0) gets further from it
    logits = refined.predict_episode(support_x, support_y, query_x, unlabeled_x)
    assert logits[0, 0] < -1.0
    with pytest.raises(ValueError, match="refinement_steps"):
        SemiSupervisedPrototypicalNetwork(embedding, refinement_steps=-1)


def test_masked_soft_kmeans_masks_far_distractors():
    model = SemiSupervisedPrototypicalNetwork(identity_embedding(2), masked=True)
    # threshold beta = 1.5 (in units of the mean distance), steep slope
    dense = model.mask_network.layers[-1]
    dense.kernel.assign(np.zeros(dense.kernel.shape, np.float32))
    dense.bias.assign(np.array([1.5, 20.0], np.float32))
    prototypes = np.array([[0.0, 0.0], [4.0, 0.0]], np.float32)
    unlabeled = np.array([[0.0, 0.5], [4.0, 0.5], [2.0, 30.0]], np.float32)
    mask = model.mask(squared_euclidean_distance(unlabeled, prototypes)).numpy()
    assert mask.shape == (3, 2) and np.all((mask >= 0) & (mask <= 1))
    assert mask[2].max() < 1e-3  # the distractor far from both prototypes
    assert mask[0, 0] > 0.99 and mask[1, 1] > 0.99  # near examples kept


def test_distractor_cluster_radius_is_learned_saved_and_exclusive_with_mask(tmp_path):
    model = SemiSupervisedPrototypicalNetwork(identity_embedding(2), distractor_cluster=True)
    support_x = np.array([[2.0, 0.0], [0.0, 2.0]], np.float32)
    support_y = np.array([0, 1])
    query_x = np.array([[2.0, 0.5], [0.5, 2.0]], np.float32)
    unlabeled = np.array([[2.0, 1.0], [0.3, 0.2]], np.float32)
    with tf.GradientTape() as tape:
        logits = model.episode_logits(
            *map(tf.constant, (support_x, support_y, query_x)), unlabeled_x=tf.constant(unlabeled)
        )
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits([0, 1], logits))
    grad = tape.gradient(loss, model.distractor_log_radius)
    assert grad is not None and abs(float(grad)) > 1e-4
    # a vanishing radius leaves every unlabelled example to the classes: plain soft k-means
    model.distractor_log_radius.assign(-20.0)
    soft = SemiSupervisedPrototypicalNetwork(identity_embedding(2))
    np.testing.assert_allclose(
        model.predict_episode(support_x, support_y, query_x, unlabeled),
        soft.predict_episode(support_x, support_y, query_x, unlabeled),
        rtol=1e-5,
    )
    model.distractor_log_radius.assign(0.7)
    path = tmp_path / "distractor_cluster.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.distractor_cluster and float(loaded.distractor_log_radius) == pytest.approx(0.7)
    np.testing.assert_allclose(
        loaded.predict_episode(support_x, support_y, query_x, unlabeled),
        model.predict_episode(support_x, support_y, query_x, unlabeled),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="not both"):
        SemiSupervisedPrototypicalNetwork(
            identity_embedding(2), masked=True, distractor_cluster=True
        )


# ----------------------------------- the fused batch norm used for speed here


def test_fused_batch_norm_matches_keras_batch_norm():
    x = np.random.default_rng(0).normal(1.0, 3.0, size=(6, 5, 5, 3)).astype(np.float32)
    plain = keras.layers.BatchNormalization(momentum=0.9)
    fused = nets.FusedBatchNormalization(momentum=0.9)
    for layer in (plain, fused):
        layer.build(x.shape)
        layer.gamma.assign([1.0, 2.0, 3.0])
        layer.beta.assign([0.0, 1.0, -1.0])
    np.testing.assert_allclose(fused(x, training=True), plain(x, training=True), atol=1e-5)
    np.testing.assert_allclose(fused.moving_mean, plain.moving_mean, atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance, plain.moving_variance, atol=1e-5)
    np.testing.assert_allclose(fused(x), plain(x), atol=1e-5)
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        loss_plain = tf.reduce_sum(plain(xt, training=True) ** 3)
        loss_fused = tf.reduce_sum(fused(xt, training=True) ** 3)
    np.testing.assert_allclose(
        tape.gradient(loss_fused, xt), tape.gradient(loss_plain, xt), rtol=1e-3, atol=1e-3
    )


def test_mixed_precision_gives_float32_logits(tiny_omniglot):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        for model in [
            PrototypicalNetwork(nets.conv4(filters=8, fused_batch_norm=True)),
            GaussianPrototypicalNetwork(nets.conv4(filters=8, fused_batch_norm=True)),
            SemiSupervisedPrototypicalNetwork(nets.conv4(filters=8), masked=True),
        ]:
            model.compile(optimizer=keras.optimizers.Adam(1e-3))
            sampler = sampler_for(model, tiny_omniglot)
            model.fit(sampler.tf_dataset(), steps_per_epoch=1, epochs=1, verbose=0)
            episode = sampler.sample()
            logits = model.predict_episode(*episode.inputs(), **episode.extras())
            assert logits.dtype == np.float32 and logits.shape == (6, 3)
            assert model((*map(tf.constant, episode.inputs()),)).dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
