import numpy as np
import pytest

from bookcode.episodes import ClassDataset, EpisodeSampler
from bookcode.evaluation import PixelNearestNeighbour, confidence_interval, evaluate


class Oracle:
    """Reads the class off the first feature, which the toy data encodes."""

    def __init__(self, wrong_every=0):
        self.wrong_every = wrong_every

    def predict_episode(self, support_x, support_y, query_x):
        ways = int(support_y.max()) + 1
        lookup = {float(x[0]): y for x, y in zip(support_x, support_y)}
        logits = np.zeros((len(query_x), ways))
        for i, x in enumerate(query_x):
            label = lookup[float(x[0])]
            if self.wrong_every and i % self.wrong_every == 0:
                label = (label + 1) % ways
            logits[i, label] = 1
        return logits


def episodes(n=20):
    y = np.repeat(np.arange(8), 6)
    x = np.stack([y, np.random.default_rng(0).normal(size=len(y))], 1)
    ds = ClassDataset(x=x, y=y, class_names=list("abcdefgh"))
    return EpisodeSampler(ds, ways=4, shots=1, queries=5, seed=0).fixed(n)


def test_evaluate_perfect_and_imperfect_learners():
    perfect = evaluate(Oracle(), episodes())
    assert perfect.mean == 1.0 and perfect.ci95 == 0.0 and len(perfect.accuracies) == 20
    result = evaluate(Oracle(wrong_every=4), episodes())
    np.testing.assert_allclose(result.mean, 15 / 20)
    assert "75.00" in str(result)


def test_confidence_interval_formula():
    values = np.array([0.5, 0.7, 0.9, 1.0])
    np.testing.assert_allclose(confidence_interval(values), 1.96 * values.std() / 2)
    assert np.isnan(confidence_interval([1.0]))


def test_evaluate_rejects_wrong_logit_shape_and_no_episodes():
    class Wrong:
        def predict_episode(self, support_x, support_y, query_x):
            return np.zeros((len(query_x), 3))

    with pytest.raises(ValueError, match="expected \\(20, 4\\)"):
        evaluate(Wrong(), episodes(2))
    with pytest.raises(ValueError, match="no episodes"):
        evaluate(Oracle(), [])


def test_pixel_nearest_neighbour():
    support = np.array([[0.0, 0.0], [10.0, 10.0], [0.0, 10.0]])
    query = np.array([[1.0, 1.0], [9.0, 9.5], [0.5, 8.0]])
    logits = PixelNearestNeighbour().predict_episode(support, np.array([0, 1, 2]), query)
    np.testing.assert_array_equal(logits.argmax(1), [0, 1, 2])
    np.testing.assert_allclose(logits[0, 0], -2.0)
