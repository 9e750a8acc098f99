import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from bookcode.episodes import ClassDataset, EpisodeSampler, PairSampler
from bookcode.evaluation import evaluate
from bookcode.metric import (
    SiameseNetwork,
    all_pairs_contrastive_loss,
    contrastive_loss,
    euclidean_distance,
    roc_auc,
)


def identity_embedding(dim=2):
    return keras.Sequential([keras.Input((dim,)), keras.layers.Identity()])


# --- the contrastive loss and its label convention ---------------------------------


def test_contrastive_loss_hand_computed():
    same = tf.constant([1.0, 1.0, 0.0, 0.0, 0.0])
    distance = tf.constant([0.5, 2.0, 0.5, 1.5, 0.0])
    # same: D^2 / 2; different: max(0, m - D)^2 / 2 with m = 1
    expected = [0.125, 2.0, 0.125, 0.0, 0.5]
    np.testing.assert_allclose(contrastive_loss(same, distance), expected, rtol=1e-6)
    # margin 2: the different pair at 1.5 is now inside the margin
    np.testing.assert_allclose(contrastive_loss([0.0], tf.constant([1.5]), margin=2.0), [0.125])


def test_label_convention_same_is_one():
    """same = 1 pulls together (loss grows with distance), same = 0 pushes apart."""
    d = tf.Variable([0.3])
    for same, sign in [(1.0, 1.0), (0.0, -1.0)]:
        with tf.GradientTape() as tape:
            loss = contrastive_loss(tf.constant([same]), d)
        grad = tape.gradient(loss, d).numpy()[0]
        assert np.sign(grad) == sign
    # a pair of identical embeddings costs nothing if same, margin^2 / 2 if different
    np.testing.assert_allclose(contrastive_loss([1.0, 0.0], tf.zeros(2), margin=3.0), [0, 4.5])
    with pytest.raises(ValueError, match="margin"):
        contrastive_loss([1.0], tf.ones(1), margin=0)


def test_all_pairs_contrastive_loss_hand_computed():
    # Points on a line: classes 0, 0, 1 at 0.0, 0.5, 2.0 (2-d embeddings).
    embeddings = tf.constant([[0.0, 0.0], [0.5, 0.0], [2.0, 0.0]])
    labels = tf.constant([0, 0, 1])
    # One same pair (D = 0.5): 0.125. Two different pairs, D = 2.0 and 1.5:
    # with margin 1 both cost 0; with margin 2, (2 - 2)^2/2 = 0 and 0.5^2/2 = 0.125.
    np.testing.assert_allclose(all_pairs_contrastive_loss(labels, embeddings), 0.125, rtol=1e-5)
    np.testing.assert_allclose(
        all_pairs_contrastive_loss(labels, embeddings, margin=2.0), 0.125 + 0.0625, rtol=1e-5
    )
    # Order does not matter, and a pair is never compared with itself.
    perm = [2, 0, 1]
    np.testing.assert_allclose(
        all_pairs_contrastive_loss(tf.gather(labels, perm), tf.gather(embeddings, perm)),
        0.125,
        rtol=1e-5,
    )
    with pytest.raises(ValueError):
        all_pairs_contrastive_loss(labels, embeddings, margin=0.0)


def test_active_negatives_average_only_pairs_inside_the_margin():
    embeddings = tf.constant([[0.0, 0.0], [0.5, 0.0], [2.0, 0.0]])
    labels = tf.constant([0, 0, 1])
    # Margin 2: different pairs at D = 2.0 (loss 0, inactive) and D = 1.5 (loss 0.125).
    # Plain mean over both: 0.0625; active mean over the one inside the margin: 0.125.
    active = all_pairs_contrastive_loss(labels, embeddings, margin=2.0, active_negatives=True)
    np.testing.assert_allclose(active, 0.125 + 0.125, rtol=1e-5)
    # No different pair inside the margin: the different-pair term is 0, not NaN.
    np.testing.assert_allclose(
        all_pairs_contrastive_loss(labels, embeddings, margin=1.0, active_negatives=True),
        0.125,
        rtol=1e-5,
    )
    model = SiameseNetwork(keras.Sequential([keras.Input((2,))]), margin=2.0, active_negatives=True)
    np.testing.assert_allclose(model.all_pairs_loss(labels, embeddings), 0.25, rtol=1e-5)
    assert SiameseNetwork.from_config(model.get_config()).active_negatives


def test_fit_on_episodes_uses_every_pair():
    """fit() on the episode sampler trains on all pairs of each episode and
    lowers that loss (contrastive and L1 heads)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 6))
    x = (np.repeat(centres, 6, axis=0) + 0.3 * rng.normal(size=(48, 6))).astype("float32")
    data = ClassDataset(x, np.repeat(np.arange(8), 6), [str(i) for i in range(8)])
    for head in ("contrastive", "l1"):
        keras.utils.set_random_seed(0)
        embedding = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
        model = SiameseNetwork(embedding, head=head)
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        sampler = EpisodeSampler(data, ways=4, shots=2, queries=2, seed=0)
        history = model.fit(sampler.tf_dataset(), steps_per_epoch=20, epochs=3, verbose=0)
        losses = history.history["loss"]
        assert np.isfinite(losses).all() and losses[-1] < losses[0], (head, losses)
        episode = sampler.sample()
        x_all = np.concatenate([episode.support_x, episode.query_x])
        y_all = np.concatenate([episode.support_y, episode.query_y])
        loss = model.all_pairs_loss(tf.constant(y_all), model.embedding(x_all))
        assert loss.shape == () and np.isfinite(float(loss))


def test_euclidean_distance():
    a = tf.constant([[0.0, 0.0], [1.0, 1.0]])
    b = tf.constant([[3.0, 4.0], [1.0, 1.0]])
    np.testing.assert_allclose(euclidean_distance(a, b, paired=True), [5.0, 0.0], atol=1e-4)
    with tf.GradientTape() as tape:
        tape.watch(a)
        d = euclidean_distance(a, a, paired=True)
    assert np.isfinite(tape.gradient(d, a).numpy()).all()  # finite at zero distance


# --- the network ------------------------------------------------------------------


def test_contrastive_score_is_minus_distance_and_loss_matches():
    model = SiameseNetwork(identity_embedding(), head="contrastive", margin=2.0)
    left = np.array([[0.0, 0.0], [1.0, 0.0]], np.float32)
    right = np.array([[3.0, 4.0], [1.0, 0.5]], np.float32)
    scores = model((left, right)).numpy()
    np.testing.assert_allclose(scores, [-5.0, -0.5], atol=1e-4)
    np.testing.assert_allclose(model.distance(left, right), [5.0, 0.5], atol=1e-4)
    # pair 1 different (beyond the margin: 0), pair 2 same (0.5^2 / 2)
    loss = model.pair_loss(tf.constant([0.0, 1.0]), tf.constant(scores))
    np.testing.assert_allclose(loss, (0 + 0.125) / 2, atol=1e-4)
    assert model.default_threshold() == -1.0


def test_l1_head_is_weighted_l1_distance_then_sigmoid_bce():
    model = SiameseNetwork(identity_embedding(), head="l1")
    left = np.array([[0.0, 0.0], [1.0, 2.0]], np.float32)
    right = np.array([[1.0, -2.0], [1.0, 2.0]], np.float32)
    model((left, right))  # builds the head
    model.similarity.set_weights(
        [np.array([[-1.0], [-0.5]], np.float32), np.array([2.0], np.float32)]
    )
    scores = model((left, right)).numpy()
    np.testing.assert_allclose(scores, [-1 * 1 - 0.5 * 2 + 2, 2.0], atol=1e-6)
    loss = model.pair_loss(tf.constant([0.0, 1.0]), tf.constant(scores)).numpy()
    expected = np.mean([-np.log(1 - 1 / (1 + np.exp(-0.0))), -np.log(1 / (1 + np.exp(-2.0)))])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert model.default_threshold() == 0.0


def test_predict_episode_takes_the_nearest_support_example():
    model = SiameseNetwork(identity_embedding())
    support_x = np.array([[0, 0], [10, 0], [0, 10], [5, 5]], np.float32)
    support_y = np.array([0, 1, 2, 1])  # two examples of class 1, in any order
    query_x = np.array([[1, 0], [4, 4], [0, 8]], np.float32)
    logits = model.predict_episode(support_x, support_y, query_x)
    distances = np.linalg.norm(query_x[:, None] - support_x[None], axis=-1)
    expected = np.stack(
        [-distances[:, 0], -np.minimum(distances[:, 1], distances[:, 3]), -distances[:, 2]], 1
    )
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    np.testing.assert_array_equal(logits.argmax(1), [0, 1, 2])
    with pytest.raises(ValueError, match="support_y"):
        model.predict_episode(support_x, support_y[:3], query_x)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="head"):
        SiameseNetwork(identity_embedding(), head="cosine")
    with pytest.raises(ValueError, match="margin"):
        SiameseNetwork(identity_embedding(), margin=-1.0)


def test_save_and_load_round_trip(tmp_path):
    model = SiameseNetwork(identity_embedding(), head="l1", margin=0.5)
    x = np.ones((2, 2), np.float32)
    before = model((x, 2 * x)).numpy()
    path = os.path.join(tmp_path, "siamese.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.head == "l1" and loaded.margin == 0.5
    np.testing.assert_allclose(loaded((x, 2 * x)), before, rtol=1e-6)


def small_embedding(name=None):
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
         keras.layers.Dense(4)],
        name=name,
    )  # fmt: skip


def toy_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 6))
    x = (np.repeat(centres, 6, axis=0) + 0.3 * rng.normal(size=(48, 6))).astype("float32")
    return ClassDataset(x, np.repeat(np.arange(8), 6), [str(i) for i in range(8)])


@pytest.mark.parametrize("head", ["contrastive", "l1"])
def test_save_and_load_with_concatenated_embeddings(head, tmp_path):
    """Two members of the same name, trained, saved and loaded: same episode logits."""
    from bookcode.metric import concatenate_embeddings

    data = toy_clusters()
    both = concatenate_embeddings(small_embedding("member"), small_embedding("member"))
    model = SiameseNetwork(both, head=head)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(PairSampler(data, seed=0).tf_dataset(8), steps_per_epoch=3, epochs=1, verbose=0)
    episode = EpisodeSampler(data, ways=4, shots=2, queries=2, seed=1).sample()
    before = model.predict_episode(*episode.inputs())
    model.save(tmp_path / "ensemble.keras")
    loaded = keras.models.load_model(tmp_path / "ensemble.keras")
    assert type(loaded.embedding).__name__ == "ConcatenatedEmbedding"
    assert len(loaded.embedding.members) == 2
    np.testing.assert_allclose(
        loaded.predict_episode(*episode.inputs()), before, rtol=1e-5, atol=1e-5
    )


def test_fit_with_validation_data_on_pairs_and_on_episodes():
    """Validation used to fail on episodes: test_step only unpacked pairs
    ((left, right), same), so ((support_x, support_y, query_x), query_y) raised
    "too many values to unpack". Now it reports the training loss and pair
    accuracy (all pairs of the episode) without training."""
    data = toy_clusters()
    pairs = PairSampler(data, seed=0).tf_dataset(8)
    episodes = EpisodeSampler(data, ways=4, shots=2, queries=2, seed=0).tf_dataset()
    for train in (pairs, episodes):
        for val in (pairs, episodes):
            model = SiameseNetwork(small_embedding())
            model.compile(optimizer=keras.optimizers.Adam(1e-2))
            history = model.fit(
                train, steps_per_epoch=2, epochs=1, validation_data=val, validation_steps=2,
                verbose=0,
            )  # fmt: skip
            assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
            assert np.isfinite(history.history["val_loss"][0])
    # the validation loss on one episode is the all-pairs loss of that episode
    model = SiameseNetwork(identity_embedding(6))
    model.compile(optimizer="adam")
    episode = EpisodeSampler(data, ways=3, shots=2, queries=1, seed=2).sample()
    inputs = (episode.support_x, episode.support_y.astype(np.int32), episode.query_x)
    element = tf.data.Dataset.from_tensors((inputs, episode.query_y.astype(np.int32)))
    x = np.concatenate([episode.support_x, episode.query_x])
    y = np.concatenate([episode.support_y, episode.query_y])
    expected = all_pairs_contrastive_loss(tf.constant(y), tf.constant(x))
    result = model.evaluate(element, verbose=0, return_dict=True)
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-5)


# --- the pair sampler ---------------------------------------------------------------


def toy_dataset(num_classes=6, per_class=5):
    y = np.repeat(np.arange(num_classes), per_class)
    x = np.stack([y, np.tile(np.arange(per_class), num_classes)], 1).astype(np.float32)
    return ClassDataset(x=x, y=y, class_names=[str(c) for c in range(num_classes)])


def test_pair_sampler_balanced_no_identical_pair_and_seeded():
    left, right, same = PairSampler(toy_dataset(), seed=0).sample(400)
    assert left.shape == right.shape == (400, 2) and same.dtype == np.float32
    assert same.mean() == 0.5
    np.testing.assert_array_equal(same, left[:, 0] == right[:, 0])  # label = same class
    assert not np.any(np.all(left == right, axis=1))  # never an example with itself
    again = PairSampler(toy_dataset(), seed=0).sample(400)
    np.testing.assert_array_equal(again[0], left)
    np.testing.assert_array_equal(again[1], right)
    other = PairSampler(toy_dataset(), seed=1).sample(400)
    assert not np.array_equal(other[1], right)
    (l_batch, _r_batch), s_batch = next(iter(PairSampler(toy_dataset(), seed=0).tf_dataset(8)))
    assert l_batch.shape == (8, 2) and s_batch.shape == (8,)


# --- learning on real data --------------------------------------------------------------


@pytest.mark.parametrize("head", ["contrastive", "l1"])
def test_learns_to_verify_unseen_omniglot_characters(head):
    from bookcode.datasets import omniglot

    keras.utils.set_random_seed(0)
    data = omniglot("background", image_size=14)
    train = data.classes(np.arange(300))
    test = data.classes(np.arange(600, 700))
    embedding = keras.Sequential(
        [
            keras.Input((14, 14, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(32),
            keras.layers.UnitNormalization(),
        ]
    )
    model = SiameseNetwork(embedding, head=head)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    left, right, same = PairSampler(test).fixed(400)
    auc_before = roc_auc(same, model((left, right)).numpy())
    history = model.fit(
        PairSampler(train, seed=0).tf_dataset(64), steps_per_epoch=300, epochs=1, verbose=0
    )
    auc_after = roc_auc(same, model((left, right)).numpy())
    assert np.isfinite(history.history["loss"]).all()
    assert auc_after > 0.75 and auc_after > auc_before + 0.15, (auc_before, auc_after)
    episodes = EpisodeSampler(test, ways=5, shots=1, queries=3).fixed(40)
    accuracy = evaluate(model, episodes).mean
    print(head, auc_before, auc_after, accuracy)
    assert accuracy > 0.45  # chance: 0.2


# --- classification-trained embeddings and ensembles --------------------------------


def test_cosine_classifier_hand_computed():
    from bookcode.metric.siamese import CosineClassifier  # also there, for chapter 2

    head = CosineClassifier(2, scale=10.0)
    head.build((None, 2))
    head.kernel.assign(np.array([[2.0, 0.0], [0.0, 3.0]], np.float32))  # classes along x and y
    x = np.array([[3.0, 4.0], [-1.0, 0.0]], np.float32)
    # cos with (1, 0) and (0, 1): (0.6, 0.8) and (-1, 0), times the scale
    np.testing.assert_allclose(head(x).numpy(), [[6.0, 8.0], [-10.0, 0.0]], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        CosineClassifier(1)
    with pytest.raises(ValueError, match="scale"):
        CosineClassifier(3, scale=0.0)


def test_concatenated_embedding_averages_squared_distances():
    from bookcode.metric.siamese import concatenate_embeddings

    first = keras.Sequential([keras.Input((2,)), keras.layers.UnitNormalization()])
    second = keras.Sequential(
        [keras.Input((2,)), keras.layers.Lambda(lambda v: v[:, ::-1] * [1.0, -1.0])]
    )
    both = concatenate_embeddings(first, second)
    a = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    b = np.array([[0.0, 1.0], [0.0, 2.0]], np.float32)
    d1 = ((first(a).numpy() - first(b).numpy()) ** 2).sum(1)  # 0.4, 2.0
    d2 = ((second(a).numpy() - second(b).numpy()) ** 2).sum(1)  # 18, 5
    np.testing.assert_allclose(d1, [0.4, 2.0], rtol=1e-5)
    np.testing.assert_allclose(d2, [18.0, 5.0], rtol=1e-5)
    d = ((both(a).numpy() - both(b).numpy()) ** 2).sum(1)
    np.testing.assert_allclose(d, [9.2, 3.5], rtol=1e-5)  # mean of the members' values
    # as the embedding of a Siamese network: minus the ensemble distance
    scores = SiameseNetwork(both)((a, b)).numpy()
    np.testing.assert_allclose(scores, -np.sqrt([9.2, 3.5]), rtol=1e-4)
    # unit-length members give a unit-length ensemble embedding
    # members may share a name, as two copies of one architecture do
    twin = keras.Sequential([keras.Input((2,)), keras.layers.UnitNormalization()], name=first.name)
    unit = concatenate_embeddings(first, twin)
    np.testing.assert_allclose(np.linalg.norm(unit(a).numpy(), axis=1), [1.0, 1.0], rtol=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        concatenate_embeddings(first)
    third = keras.Sequential([keras.Input((3,)), keras.layers.Identity()])
    with pytest.raises(ValueError, match="input shapes differ"):
        concatenate_embeddings(first, third)
