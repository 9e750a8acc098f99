import numpy as np
import pytest

from bookcode.episodes import ClassDataset, EpisodeSampler
from bookcode.evaluation import (
    PixelNearestNeighbour,
    best_threshold,
    confidence_interval,
    evaluate,
    roc_auc,
    roc_curve,
    verification_accuracy,
)


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
    rng = np.random.default_rng(1)
    support, query = rng.normal(size=(6, 4, 4)), rng.normal(size=(5, 4, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    squared = ((query.reshape(5, 1, -1) - support.reshape(1, 6, -1)) ** 2).sum(-1)
    expected = np.stack([-squared[:, labels == c].min(1) for c in range(3)], 1)
    np.testing.assert_allclose(
        PixelNearestNeighbour().predict_episode(support, labels, query), expected, rtol=1e-12
    )


class Recorder:
    """Records the keyword arguments evaluate gives to predict_episode."""

    extra_inputs = ("unlabeled_x",)

    def __init__(self):
        self.seen = []

    def predict_episode(self, support_x, support_y, query_x, **extras):
        self.seen.append(extras)
        return np.eye(int(support_y.max()) + 1)[np.zeros(len(query_x), int)]


def test_evaluate_passes_the_extras_a_learner_takes():
    y = np.repeat(np.arange(6), 6)
    ds = ClassDataset(x=np.stack([y, y], 1).astype(float), y=y, class_names=list("abcdef"))
    semi = EpisodeSampler(ds, ways=3, shots=1, queries=2, unlabeled=2, seed=0).fixed(3)
    recorder = Recorder()
    evaluate(recorder, semi)
    assert [list(k) for k in recorder.seen] == [["unlabeled_x"]] * 3
    for extras, episode in zip(recorder.seen, semi):
        assert extras["unlabeled_x"] is episode.unlabeled_x
    evaluate(Oracle(), semi)  # no extra_inputs: called with three arguments
    recorder.seen.clear()
    evaluate(recorder, episodes(2))  # plain episodes: nothing extra
    assert recorder.seen == [{}, {}]


# --- verification metrics -------------------------------------------------------------


def test_roc_curve_and_auc_hand_computed():
    same = [1, 0, 1, 0]
    scores = [0.9, 0.8, 0.3, 0.1]
    fpr, tpr, thresholds = roc_curve(same, scores)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.8, 0.3, 0.1])
    assert roc_auc(same, scores) == pytest.approx(0.75)  # 3 of 4 (same, different) pairs ordered
    assert roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
    assert roc_auc([0, 1], [0.0, 1.0]) == 1.0


def test_best_threshold_and_accuracy_count_every_pair():
    same = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.0])
    threshold, accuracy = best_threshold(same, scores)
    assert threshold == pytest.approx(0.8) and accuracy == pytest.approx(5 / 6)
    assert verification_accuracy(same, scores, threshold) == pytest.approx(5 / 6)
    # calling everything "same" is right on the same pairs only: accuracy 1/2, not precision
    assert verification_accuracy(same, scores, -1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both"):
        roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="labels"):
        roc_curve([1, 0, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="only 0"):
        verification_accuracy([2, 0], [0.2, 0.3], 0.0)
