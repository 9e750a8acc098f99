"""SequenceSampler (Santoro et al. 2016 episodes as sequences), instance
numbers, and accuracy by presentation instance."""

import numpy as np
import pytest

from bookcode.episodes import ClassDataset, SequenceSampler, instance_numbers
from bookcode.evaluation import accuracy_by_instance


def toy_dataset(classes=8, per_class=12):
    # every example encodes its class and its index: x[..., 0] = class, x[..., 1] = index
    y = np.repeat(np.arange(classes), per_class)
    x = np.stack([y, np.arange(len(y))], axis=1).astype(np.float32).reshape(-1, 1, 2, 1)
    return ClassDataset(x, y, [f"c{i}" for i in range(classes)])


def test_sequence_shapes_and_shift_by_one_step():
    s = SequenceSampler(toy_dataset(), ways=3, instances=4, seed=0).sample()
    assert s.x.shape == (12, 1, 2, 1) and s.y.shape == (12,) and s.previous.shape == (12, 3)
    np.testing.assert_array_equal(s.previous[0], 0)  # no label before the first step
    np.testing.assert_array_equal(s.previous[1:].argmax(-1), s.y[:-1])  # shifted by one
    np.testing.assert_array_equal(s.previous.sum(-1), [0] + [1] * 11)
    # each label names one dataset class, consistently; 4 distinct examples of each
    true_class = s.x[:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(s.classes[s.y], true_class)
    assert len(np.unique(s.x[:, 0, 1, 0])) == 12
    np.testing.assert_array_equal(np.bincount(s.y), [4, 4, 4])
    inputs = s.inputs()
    assert inputs.shape == (12, 2 + 3) and inputs.dtype == np.float32


def test_labels_are_permuted_per_episode():
    sampler = SequenceSampler(toy_dataset(classes=3), ways=3, instances=4, seed=1)
    # with 3 classes every episode uses all of them: only the labelling changes
    mappings = {tuple(sampler.sample().classes) for _ in range(30)}
    assert len(mappings) == 6  # all 3! labellings occur


def test_determinism_fixed_and_errors():
    a = SequenceSampler(toy_dataset(), ways=3, instances=4, seed=5)
    b = SequenceSampler(toy_dataset(), ways=3, instances=4, seed=5)
    np.testing.assert_array_equal(a.sample().x, b.sample().x)
    f1, f2 = a.fixed(3, seed=9), b.fixed(3, seed=9)
    np.testing.assert_array_equal(f1.y, f2.y)
    assert f1.x.shape == (3, 12, 1, 2, 1)
    with pytest.raises(ValueError, match="classes"):
        SequenceSampler(toy_dataset(classes=2), ways=3, instances=4)
    with pytest.raises(ValueError, match="examples"):
        SequenceSampler(toy_dataset(per_class=5), ways=3, instances=6)
    with pytest.raises(ValueError, match="labels"):
        SequenceSampler(toy_dataset(), labels="words")
    with pytest.raises(ValueError, match="ways"):
        SequenceSampler(toy_dataset(), ways=0)


def test_string_labels():
    s = SequenceSampler(toy_dataset(), ways=4, instances=3, seed=2, labels="string").sample()
    assert s.y.shape == (12, 5) and s.previous.shape == (12, 25)
    assert s.y.min() >= 0 and s.y.max() <= 4
    codes = {tuple(row) for row in s.y}
    assert len(codes) == 4  # distinct strings for distinct classes
    fed = s.previous[1:].reshape(11, 5, 5).argmax(-1)
    np.testing.assert_array_equal(fed, s.y[:-1])
    np.testing.assert_array_equal(np.bincount(s.instance), [4, 4, 4])


def test_instance_numbers_and_accuracy_by_instance_by_hand():
    labels = np.array([[0, 1, 0, 0, 1, 2]])
    np.testing.assert_array_equal(instance_numbers(labels), [[0, 0, 1, 2, 1, 0]])
    predicted = np.array([[1, 1, 0, 2, 1, 2]])
    # 1st: steps 0, 1, 5 -> wrong, right, right; 2nd: steps 2, 4 -> right, right; 3rd: step 3 wrong
    np.testing.assert_allclose(accuracy_by_instance(predicted, labels), [2 / 3, 1.0, 0.0])
    logits = np.eye(3)[predicted]
    np.testing.assert_allclose(accuracy_by_instance(logits, labels), [2 / 3, 1.0, 0.0])
    four = accuracy_by_instance(predicted, labels, instances=4)
    assert np.isnan(four[3])
    strings = np.array([[[0, 1], [2, 2], [0, 1]]])
    guess = np.array([[[0, 1], [2, 0], [0, 0]]])  # one digit wrong is wrong
    np.testing.assert_allclose(accuracy_by_instance(guess, strings), [0.5, 0.0])
    with pytest.raises(ValueError, match="match"):
        accuracy_by_instance(predicted[:, :3], labels)
