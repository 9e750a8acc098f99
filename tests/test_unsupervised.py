"""CACTUs pieces (Hsu, Levine & Finn 2019): k-means, randomly scaled
partitions, the cluster-task sampler, the autoencoder embedding."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from bookcode import unsupervised as uns


def _blobs(seed=0, per=30):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = np.concatenate([c + rng.normal(scale=0.5, size=(per, 2)) for c in centres])
    return points, np.repeat(np.arange(4), per)


def _same_partition(a, b):
    # equal up to a renaming of the clusters
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_finds_separated_blobs():
    points, truth = _blobs()
    centres, labels = uns.kmeans(points, 4, seed=0)
    assert centres.shape == (4, 2) and labels.shape == (120,)
    assert _same_partition(labels, truth)
    for c in range(4):  # each centre is the mean of its cluster
        np.testing.assert_allclose(centres[c], points[labels == c].mean(0), rtol=1e-5, atol=1e-5)


def test_kmeans_is_seeded():
    points = np.random.default_rng(1).normal(size=(200, 3))
    a = uns.kmeans(points, 7, seed=5)[1]
    assert np.array_equal(a, uns.kmeans(points, 7, seed=5)[1])
    assert not np.array_equal(a, uns.kmeans(points, 7, seed=6)[1])


def test_kmeans_one_lloyd_step_by_hand():
    # 1-D, k = 2, after convergence: {0, 1, 2} and {10, 11}
    points = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    centres, labels = uns.kmeans(points, 2, seed=0)
    assert sorted(centres[:, 0].tolist()) == [1.0, 10.5]
    assert labels[0] == labels[1] == labels[2] != labels[3] == labels[4]


def test_kmeans_survives_duplicates():
    points = np.ones((6, 2))
    _, labels = uns.kmeans(points, 3, seed=0)
    assert labels.shape == (6,) and labels.min() >= 0 and labels.max() < 3


def test_kmeans_bad_input():
    with pytest.raises(ValueError, match="k must"):
        uns.kmeans(np.zeros((3, 2)), 4)
    with pytest.raises(ValueError, match="shape"):
        uns.kmeans(np.zeros(5), 2)
    with pytest.raises(ValueError, match="iterations"):
        uns.kmeans(np.zeros((3, 2)), 2, iterations=0)


def test_partitions_differ_by_random_scaling():
    # a 2x2 grid of blobs in 2-D with k = 2: the split follows the dimension
    # that a scaling makes the wider one, so scaled partitions differ
    points, _ = _blobs(per=20)
    partitions = uns.kmeans_partitions(points, 2, partitions=8, seed=0)
    assert len(partitions) == 8
    for p in partitions:
        assert p.shape == (80,) and set(p.tolist()) == {0, 1}
    splits = {tuple(p == p[0]) for p in partitions}
    assert len(splits) >= 2  # both ways of splitting occur
    assert all(
        np.array_equal(a, b)
        for a, b in zip(partitions, uns.kmeans_partitions(points, 2, partitions=8, seed=0))
    )


def test_partitions_bad_input():
    with pytest.raises(ValueError, match="partitions"):
        uns.kmeans_partitions(np.zeros((4, 2)), 2, partitions=0)
    with pytest.raises(ValueError, match="scale_range"):
        uns.kmeans_partitions(np.zeros((4, 2)), 2, partitions=1, scale_range=(1.0, 1.0))


def _clustered(n_clusters=12, per=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_clusters), per)
    rng.shuffle(labels)
    x = np.arange(len(labels), dtype=np.float32)[:, None]  # the example's own index
    return x, labels


def test_cluster_tasks_use_distinct_clusters_and_their_members():
    x, labels = _clustered()
    other = np.roll(labels, 5)  # a second partition
    sampler = uns.ClusterTaskSampler(x, [labels, other], ways=5, shots=2, queries=3, seed=0)
    seen_partitions = set()
    for _ in range(50):
        e = sampler.sample()
        assert len(set(e.classes.tolist())) == 5  # no cluster twice in a task
        support = e.support_x[:, 0].astype(int)
        query = e.query_x[:, 0].astype(int)
        assert not set(support) & set(query)
        assert len(set(support)) == len(support) and len(set(query)) == len(query)
        for partition in (labels, other):
            if all(partition[support] == e.classes[e.support_y]) and all(
                partition[query] == e.classes[e.query_y]
            ):
                seen_partitions.add(id(partition))
                break
        else:
            raise AssertionError("an episode's examples are not the members of its clusters")
        np.testing.assert_array_equal(e.support_y, np.repeat(np.arange(5), 2))
    assert len(seen_partitions) == 2


def test_cluster_tasks_skip_small_clusters():
    x, labels = _clustered(n_clusters=6, per=8)
    labels = labels.copy()
    labels[labels == 0] = 99  # keep the sizes, rename: labels need not be 0..k-1
    small = np.concatenate([labels[:-6], np.arange(200, 206)])  # six singleton clusters
    sampler = uns.ClusterTaskSampler(x, [small], ways=3, shots=1, queries=2, seed=0)
    for _ in range(30):
        e = sampler.sample()
        members = e.support_x[:, 0].astype(int)
        assert all(small[m] < 200 for m in members)


def test_cluster_tasks_error_when_too_few_large_clusters():
    x, labels = _clustered(n_clusters=4, per=3)
    with pytest.raises(
        ValueError, match=r"only 4 of its 4 clusters have shots \+ queries = 3.*ways = 5"
    ):
        uns.ClusterTaskSampler(x, [labels], ways=5, shots=1, queries=2)
    with pytest.raises(ValueError, match="only 0 of its 4 clusters"):
        uns.ClusterTaskSampler(x, [labels], ways=2, shots=2, queries=2)
    with pytest.raises(ValueError, match="one label per example"):
        uns.ClusterTaskSampler(x, [labels[:-1]], ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match="empty"):
        uns.ClusterTaskSampler(x, [], ways=2, shots=1, queries=1)


def test_cluster_tasks_are_seeded_and_batch():
    x, labels = _clustered()
    a = uns.ClusterTaskSampler(x, [labels], ways=4, shots=1, queries=2, seed=3)
    b = uns.ClusterTaskSampler(x, [labels], ways=4, shots=1, queries=2, seed=3)
    for _ in range(5):
        np.testing.assert_array_equal(a.sample().query_x, b.sample().query_x)
    batch = a.sample_batch(3)
    assert batch.support_x.shape == (3, 4, 1) and batch.query_y.shape == (3, 8)
    (sx, sy, _), qy = next(iter(a.tf_dataset(batch_size=2)))
    assert sx.shape == (2, 4, 1) and qy.shape == (2, 8) and sy.dtype.name == "int32"


def test_cluster_purity_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    classes = np.array([5, 5, 6, 7, 7, 8])
    assert uns.cluster_purity(labels, classes) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="shape"):
        uns.cluster_purity(labels, classes[:-1])


def test_autoencoder_shapes_and_embed():
    encoder, autoencoder = uns.conv_autoencoder(code_dim=8, filters=4)
    x = np.random.default_rng(0).random((5, 28, 28, 1), dtype=np.float32)
    assert autoencoder(x).shape == (5, 28, 28, 1)
    codes = uns.embed(encoder, x, batch_size=2)
    assert codes.shape == (5, 8) and codes.dtype == np.float32
    np.testing.assert_allclose(codes, np.asarray(encoder(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        uns.conv_autoencoder(input_shape=(30, 30, 1))


# ------------------------------------------------------ contrastive embedding


def test_nt_xent_by_hand():
    # two images, two views each: z1 = [a, b], z2 = [a', b'] (unit vectors in 2-D)
    z1 = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)  # normalised inside: (1, 0), (0, 1)
    z2 = np.array([[0.6, 0.8], [-1.0, 0.0]], np.float32)
    t = 0.5
    z = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    s = z @ z.T / t
    positive = [2, 3, 0, 1]
    losses = []
    for i in range(4):
        others = [j for j in range(4) if j != i]
        losses.append(-s[i, positive[i]] + np.log(np.sum(np.exp(s[i, others]))))
    got = float(uns.nt_xent(z1, z2, temperature=t))
    assert got == pytest.approx(np.mean(losses), rel=1e-5)
    # views that agree and differ from the others give a smaller loss
    aligned = float(uns.nt_xent(z1, z1, temperature=t))
    assert aligned < got
    with pytest.raises(ValueError, match="temperature"):
        uns.nt_xent(z1, z2, temperature=0.0)


def _strokes(n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28, 1), np.float32)
    for i in range(n):
        r = rng.integers(6, 20)
        x[i, r : r + 2, 5:23] = 1.0  # a horizontal bar at a random height
        x[i, 5:23, r : r + 2] = rng.random()
    return x


def test_augment_keeps_shape_and_range_and_is_seeded():
    x = _strokes()
    a = np.asarray(uns.augment(x, seed=3))
    assert a.shape == x.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, np.asarray(uns.augment(x, seed=3)))
    assert not np.allclose(a, np.asarray(uns.augment(x, seed=4)))
    assert not np.allclose(a, x)
    # a zero-strength augmentation is the identity
    same = uns.augment(x, seed=3, max_rotation=0, max_scale=0, max_shift=0, max_shear=0)
    np.testing.assert_allclose(np.asarray(same), x, atol=1e-6)
    # the images stay recognisable: most ink survives a mild transform
    assert a.sum() > 0.6 * x.sum()
    with pytest.raises(ValueError, match="batch, height, width"):
        uns.augment(x[0], seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        uns.augment(x, seed=0, max_shift=-1)


def test_augment_pure_shift_moves_pixels():
    x = np.zeros((1, 28, 28, 1), np.float32)
    x[0, 10, 10] = 1.0
    for seed in range(5):
        y = np.asarray(uns.augment(x, seed=seed, max_rotation=0, max_scale=0, max_shear=0))
        assert y.sum() == pytest.approx(1.0, abs=1e-4)  # bilinear: the ink is only moved
        rows, cols = np.nonzero(y[0, :, :, 0] > 1e-6)
        assert np.all(np.abs(rows - 10) <= 4) and np.all(np.abs(cols - 10) <= 4)


def test_contrastive_training_lowers_the_loss_and_saves(tmp_path):
    import keras

    from bookcode import nets

    keras.utils.set_random_seed(0)
    x = _strokes(64, seed=1)
    encoder = nets.conv4(filters=8, fused_batch_norm=True, batch_norm_momentum=0.9)
    learner = uns.train_contrastive(encoder, x, steps=40, batch_size=16, learning_rate=3e-3, seed=0)
    losses = learner.step_losses
    assert losses.shape == (40,) and np.all(np.isfinite(losses))
    assert losses[-10:].mean() < losses[:5].mean() - 0.1
    # the learner is the encoder: call gives the embedding the k-means uses
    np.testing.assert_allclose(
        np.asarray(learner(x[:4])), np.asarray(encoder(x[:4], training=False)), rtol=1e-5, atol=1e-5
    )
    path = tmp_path / "contrastive.keras"
    learner.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(x[:4])), np.asarray(learner(x[:4])), atol=1e-5)
    assert loaded.temperature == learner.temperature
    # same seed, same training
    keras.utils.set_random_seed(0)
    again = uns.train_contrastive(
        nets.conv4(filters=8, fused_batch_norm=True, batch_norm_momentum=0.9),
        x, steps=40, batch_size=16, learning_rate=3e-3, seed=0,
    )  # fmt: skip
    np.testing.assert_allclose(again.step_losses, losses, rtol=1e-5)


def test_contrastive_bad_input():
    from bookcode import nets

    encoder = nets.conv4(filters=4)
    with pytest.raises(ValueError, match="steps"):
        uns.train_contrastive(encoder, _strokes(), steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        uns.train_contrastive(encoder, _strokes(), steps=1, batch_size=10)
    with pytest.raises(ValueError, match="shape"):
        uns.train_contrastive(encoder, np.zeros((5, 28, 28)), steps=1)
    with pytest.raises(ValueError, match="temperature"):
        uns.ContrastiveLearner(encoder, temperature=0)
    with pytest.raises(ValueError, match="Keras model"):
        uns.ContrastiveLearner("conv4")
