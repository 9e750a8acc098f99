import numpy as np
import pytest

from bookcode.episodes import ClassDataset, Episode, EpisodeSampler, PairSampler, stack


def toy_dataset(num_classes=10, per_class=8):
    """Each example stores (class, index within class) so tests can trace it."""
    y = np.repeat(np.arange(num_classes), per_class)
    x = np.stack([y, np.tile(np.arange(per_class), num_classes)], axis=1).astype(np.float32)
    return ClassDataset(x=x, y=y, class_names=[f"c{i}" for i in range(num_classes)])


def test_class_dataset_groups_examples():
    ds = toy_dataset(4, 3)
    assert ds.num_classes == 4
    assert ds.example_shape == (2,)
    np.testing.assert_array_equal(ds.examples_per_class(), [3, 3, 3, 3])
    np.testing.assert_array_equal(ds.x[ds.indices_of(2)][:, 0], [2, 2, 2])
    assert "4 classes x 3 examples" in repr(ds)


def test_class_dataset_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        ClassDataset(x=np.zeros((2, 1)), y=[0, 5], class_names=["a", "b"])
    with pytest.raises(ValueError, match="2 examples but y has 3"):
        ClassDataset(x=np.zeros((2, 1)), y=[0, 1, 1], class_names=["a", "b"])


def test_where_and_classes_renumber():
    ds = toy_dataset(5, 4)
    sub = ds.where(ds.y % 2 == 1)
    assert sub.class_names == ["c1", "c3"]
    np.testing.assert_array_equal(np.unique(sub.y), [0, 1])
    np.testing.assert_array_equal(sub.x[sub.y == 1][:, 0], [3, 3, 3, 3])
    picked = ds.classes([4, 0])
    assert picked.class_names == ["c4", "c0"]
    np.testing.assert_array_equal(picked.x[picked.y == 0][:, 0], [4, 4, 4, 4])
    with pytest.raises(ValueError, match="unknown class"):
        ds.classes([7])
    with pytest.raises(ValueError, match="mask"):
        ds.where([True])


def test_episode_shapes_and_labels():
    sampler = EpisodeSampler(toy_dataset(), ways=5, shots=2, queries=3, seed=0)
    e = sampler.sample()
    assert e.support_x.shape == (10, 2) and e.query_x.shape == (15, 2)
    np.testing.assert_array_equal(e.support_y, np.repeat(np.arange(5), 2))
    np.testing.assert_array_equal(e.query_y, np.repeat(np.arange(5), 3))
    assert e.ways == 5
    # labels are remapped: every example of label k comes from class classes[k]
    np.testing.assert_array_equal(e.support_x[:, 0], np.repeat(e.classes, 2))
    np.testing.assert_array_equal(e.query_x[:, 0], np.repeat(e.classes, 3))


def test_episode_classes_distinct_and_support_query_disjoint():
    sampler = EpisodeSampler(toy_dataset(), ways=5, shots=3, queries=5, seed=1)
    for _ in range(50):
        e = sampler.sample()
        assert len(set(e.classes.tolist())) == 5
        support = {tuple(v) for v in e.support_x}
        query = {tuple(v) for v in e.query_x}
        assert len(support) == 15 and len(query) == 25
        assert not support & query


def test_episodes_cover_classes_in_balance():
    sampler = EpisodeSampler(toy_dataset(10, 8), ways=5, shots=1, queries=1, seed=2)
    counts = np.bincount(np.concatenate([sampler.sample().classes for _ in range(2000)]))
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_same_seed_same_episodes_and_fixed_is_reproducible():
    a = EpisodeSampler(toy_dataset(), ways=3, shots=1, queries=2, seed=7)
    b = EpisodeSampler(toy_dataset(), ways=3, shots=1, queries=2, seed=7)
    c = EpisodeSampler(toy_dataset(), ways=3, shots=1, queries=2, seed=8)
    ea, eb, ec = a.sample(), b.sample(), c.sample()
    np.testing.assert_array_equal(ea.support_x, eb.support_x)
    assert not np.array_equal(
        np.concatenate([ea.support_x, ea.query_x]), np.concatenate([ec.support_x, ec.query_x])
    )
    first = a.fixed(4)
    a.sample()
    again = a.fixed(4)
    for e1, e2 in zip(first, again):
        np.testing.assert_array_equal(e1.query_x, e2.query_x)
    assert not np.array_equal(a.fixed(4, seed=1)[0].query_x, first[0].query_x) or not (
        np.array_equal(a.fixed(4, seed=1)[1].query_x, first[1].query_x)
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ways": 11, "shots": 1, "queries": 1}, "needs 11 classes"),
        ({"ways": 5, "shots": 4, "queries": 5}, "shots \\+ queries"),
        ({"ways": 0, "shots": 1, "queries": 1}, "ways must be a positive integer"),
        ({"ways": 5, "shots": -1, "queries": 1}, "shots must be a positive integer"),
        ({"ways": 5, "shots": 1, "queries": 0}, "queries must be a positive integer"),
        ({"ways": 5, "shots": 1, "queries": 1, "distractors": 2}, "distractors need unlabeled"),
        (
            {"ways": 9, "shots": 1, "queries": 1, "unlabeled": 1, "distractors": 2},
            "needs 11 classes",
        ),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EpisodeSampler(toy_dataset(10, 8), **kwargs)


def test_uneven_classes_only_uses_large_enough_ones():
    y = np.array([0] * 5 + [1] * 2 + [2] * 5)
    ds = ClassDataset(x=np.arange(12.0)[:, None], y=y, class_names=["a", "b", "c"])
    sampler = EpisodeSampler(ds, ways=2, shots=2, queries=2, seed=0)
    for _ in range(20):
        assert 1 not in sampler.sample().classes
    with pytest.raises(ValueError, match="only 2 of 3 classes"):
        EpisodeSampler(ds, ways=3, shots=2, queries=2)


def test_semi_supervised_episode_has_unlabeled_and_distractors():
    sampler = EpisodeSampler(
        toy_dataset(10, 8), ways=3, shots=1, queries=2, unlabeled=2, distractors=2, seed=0
    )
    e = sampler.sample()
    assert e.unlabeled_x.shape == (10, 2)
    np.testing.assert_array_equal(e.unlabeled_y, [0, 0, 1, 1, 2, 2, -1, -1, -1, -1])
    labelled = {tuple(v) for v in np.concatenate([e.support_x, e.query_x])}
    assert not labelled & {tuple(v) for v in e.unlabeled_x}
    distractor_classes = set(e.unlabeled_x[6:, 0].tolist())
    assert not distractor_classes & set(e.classes.tolist())


def test_meta_batch_stacks_episodes():
    sampler = EpisodeSampler(toy_dataset(), ways=4, shots=1, queries=2, seed=0)
    batch = sampler.sample_batch(6)
    assert batch.support_x.shape == (6, 4, 2) and batch.query_y.shape == (6, 8)
    assert batch.classes.shape == (6, 4)
    assert stack([sampler.sample()]).unlabeled_x is None


def test_tf_dataset_matches_fit_signature():
    sampler = EpisodeSampler(toy_dataset(), ways=4, shots=2, queries=3, seed=0)
    (sx, sy, qx), qy = next(iter(sampler.tf_dataset()))
    assert sx.shape == (8, 2) and sy.shape == (8,) and qx.shape == (12, 2) and qy.shape == (12,)
    (sx, sy, qx), qy = next(iter(sampler.tf_dataset(batch_size=3)))
    assert sx.shape == (3, 8, 2) and qy.shape == (3, 12)
    semi = EpisodeSampler(toy_dataset(), ways=2, shots=1, queries=1, unlabeled=2, seed=0)
    inputs, _ = next(iter(semi.tf_dataset()))
    assert len(inputs) == 4 and inputs[3]["unlabeled_x"].shape == (4, 2)


def test_episode_inputs_order():
    e = Episode(np.zeros((2, 1)), np.array([0, 1]), np.ones((3, 1)), np.zeros(3), np.arange(2))
    sx, sy, qx = e.inputs()
    assert sx.shape == (2, 1) and qx.shape == (3, 1) and list(sy) == [0, 1]


def test_pair_sampler_is_balanced_distinct_and_seeded():
    ds = toy_dataset(6, 4)
    left, right, same = PairSampler(ds, seed=0).sample(200)
    assert left.shape == (200, 2) and same.mean() == 0.5
    classes_equal = left[:, 0] == right[:, 0]
    np.testing.assert_array_equal(classes_equal, same == 1)
    assert not np.any(np.all(left == right, axis=1))  # never the same example twice
    again = PairSampler(ds, seed=0).sample(200)
    np.testing.assert_array_equal(again[1], right)
    fixed = PairSampler(ds, seed=3).fixed(10)
    np.testing.assert_array_equal(fixed[0], PairSampler(ds, seed=9).fixed(10)[0])
    (l_batch, _r_batch), s_batch = next(iter(PairSampler(ds).tf_dataset(8)))
    assert l_batch.shape == (8, 2) and s_batch.shape == (8,)
    with pytest.raises(ValueError, match="even"):
        PairSampler(ds).sample(3)


def test_episode_extras():
    plain = EpisodeSampler(toy_dataset(), ways=2, shots=1, queries=1, seed=0).sample()
    assert plain.extras() == {}
    semi = EpisodeSampler(toy_dataset(), ways=2, shots=1, queries=1, unlabeled=2, seed=0).sample()
    assert list(semi.extras()) == ["unlabeled_x"]
    assert semi.extras()["unlabeled_x"] is semi.unlabeled_x


def test_endless_dataset_continues_the_sampler_stream():
    """The one tf.data adapter of every sampler: the signature comes from the
    first element, and iterating again continues the stream (no repeat)."""
    from bookcode.datasets.sinusoids import Sinusoids
    from bookcode.episodes import endless_dataset

    counter = iter(range(100))
    dataset = endless_dataset(lambda: (np.full(3, next(counter), np.int32), {"u": np.zeros(2)}))
    assert dataset.element_spec[0].shape == (3,) and dataset.element_spec[1]["u"].dtype == "float64"
    first = [int(a[0]) for a, _ in dataset.take(2)]
    again = [int(a[0]) for a, _ in dataset.take(2)]
    assert first == [0, 1] and again[0] > 1
    (sx, sy, qx), qy = next(iter(Sinusoids(shots=5, queries=7, seed=0).tf_dataset(batch_size=4)))
    assert sx.shape == sy.shape == (4, 5, 1) and qx.shape == qy.shape == (4, 7, 1)
    assert sx.dtype == qy.dtype == "float32"
