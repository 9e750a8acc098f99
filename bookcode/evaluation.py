"""Evaluation.

- The standard few-shot protocol: mean accuracy over many held-out episodes
  with a 95% confidence interval, 1.96 * std / sqrt(n) (as reported by
  Vinyals et al. 2016, Snell et al. 2017, Finn et al. 2017): :func:`evaluate`.
- Verification of pairs (same class or not; Koch et al. 2015, chapter 2):
  :func:`roc_curve`, :func:`roc_auc`, :func:`best_threshold`,
  :func:`verification_accuracy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class EvaluationResult:
    """Mean accuracy, the half-width of its 95% confidence interval, and the
    accuracy of every episode."""

    mean: float
    ci95: float
    accuracies: np.ndarray

    def __str__(self):
        return (
            f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f}% over {len(self.accuracies)} episodes"
        )


def confidence_interval(values) -> float:
    """Half-width of the 95% normal confidence interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan")
    return float(1.96 * values.std() / np.sqrt(len(values)))


def evaluate(learner, episodes) -> EvaluationResult:
    """Accuracy of ``learner`` on ``episodes``.

    ``learner`` is anything with ``predict_episode(support_x, support_y,
    query_x) -> logits`` of shape (num_query, ways); ``episodes`` is an iterable
    of :class:`~bookcode.episodes.Episode`. The episode's extras
    (:meth:`~bookcode.episodes.Episode.extras`, e.g. ``unlabeled_x``) that the
    learner names in its ``extra_inputs`` are passed as keyword arguments.
    """
    accepted = set(getattr(learner, "extra_inputs", ()))
    accuracies = []
    for episode in episodes:
        extras = {k: v for k, v in episode.extras().items() if k in accepted}
        logits = np.asarray(learner.predict_episode(*episode.inputs(), **extras))
        expected = (len(episode.query_y), episode.ways)
        if logits.shape != expected:
            raise ValueError(
                f"predict_episode returned shape {logits.shape}, expected {expected} "
                "(num_query, ways)"
            )
        accuracies.append(np.mean(logits.argmax(axis=-1) == episode.query_y))
    if not accuracies:
        raise ValueError("no episodes to evaluate")
    accuracies = np.array(accuracies)
    return EvaluationResult(float(accuracies.mean()), confidence_interval(accuracies), accuracies)


class PixelNearestNeighbour:
    """The simplest baseline: each query gets the label of the support example
    nearest in raw pixel space (Euclidean). Logits are negative squared
    distances (computed in float64)."""

    def predict_episode(self, support_x, support_y, query_x):
        from bookcode.metric.distances import squared_euclidean_distance

        q, s = np.asarray(query_x, np.float64), np.asarray(support_x, np.float64)
        distances = squared_euclidean_distance(q, s).numpy()
        ways = int(np.max(support_y)) + 1
        logits = np.full((len(query_x), ways), -np.inf)
        for c in range(ways):
            logits[:, c] = -distances[:, np.asarray(support_y) == c].min(axis=1)
        return logits


# -- verification: is this pair the same class? ------------------------------------
def _check_pairs(same, scores):
    same = np.asarray(same, dtype=np.float64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if same.shape != scores.shape:
        raise ValueError(f"same has {same.size} labels but scores has {scores.size} values")
    if not np.isin(same, (0, 1)).all():
        raise ValueError("same must hold only 0 (different class) and 1 (same class)")
    if same.min() == same.max():
        raise ValueError("need both same (1) and different (0) pairs")
    return same, scores


def roc_curve(same, scores):
    """Receiver operating characteristic of a verifier that says "same" when
    ``score >= threshold``.

    ``same``: (pairs,) 1 for same-class pairs, 0 otherwise; ``scores``:
    (pairs,) higher means more alike. Returns ``(false_positive_rate,
    true_positive_rate, thresholds)``, each (distinct scores + 1,), from the
    strictest threshold (+inf: nothing is "same") to the loosest.
    """
    same, scores = _check_pairs(same, scores)
    order = np.argsort(-scores, kind="stable")
    scores, same = scores[order], same[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_pos = np.cumsum(same)[last_of_value]
    false_pos = (last_of_value + 1) - true_pos
    tpr = np.r_[0.0, true_pos / same.sum()]
    fpr = np.r_[0.0, false_pos / (len(same) - same.sum())]
    return fpr, tpr, np.r_[np.inf, scores[last_of_value]]


def roc_auc(same, scores) -> float:
    """Area under the ROC curve: the probability that a random same-class pair
    scores higher than a random different-class pair (ties count half)."""
    fpr, tpr, _ = roc_curve(same, scores)
    return float(np.trapezoid(tpr, fpr))


def best_threshold(same, scores) -> tuple[float, float]:
    """The threshold with the highest verification accuracy on these pairs,
    and that accuracy. Choose it on training classes, then apply it to new
    ones with :func:`verification_accuracy`."""
    fpr, tpr, thresholds = roc_curve(same, scores)
    same = np.asarray(same).reshape(-1)
    positives = same.sum()
    accuracy = (tpr * positives + (1 - fpr) * (len(same) - positives)) / len(same)
    best = int(np.argmax(accuracy[1:])) + 1  # skip +inf
    return float(thresholds[best]), float(accuracy[best])


def verification_accuracy(same, scores, threshold: float) -> float:
    """Fraction of pairs classified correctly by ``score >= threshold`` (all
    pairs count, same and different: not the precision on predicted-same pairs)."""
    same, scores = _check_pairs(same, scores)
    return float(np.mean((scores >= threshold) == (same == 1)))


# -- sequences of labelled examples (memory-augmented networks, chapter 5) ---------
def accuracy_by_instance(predictions, labels, instances: int | None = None) -> np.ndarray:
    """Accuracy at the 1st, 2nd, ... presentation of a class in labelled
    sequences (Santoro et al. 2016, table 1).

    ``labels``: (batch, time) integers, or (batch, time, digits) string labels
    (a step is right only if every digit is); ``predictions``: predicted labels
    of the same shape, or logits with one more axis (argmax is taken).
    Returns an array (instances,): entry ``k`` is the accuracy over all steps
    that show their class for the (k+1)-th time (NaN where there are none).
    ``instances`` defaults to the largest number of presentations found.
    """
    from bookcode.episodes import instance_numbers

    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.ndim == 1:
        labels, predictions = labels[None], predictions[None]
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(axis=-1)
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {predictions.shape} must match labels {labels.shape} "
            "(or be logits with one more axis)"
        )
    correct = predictions == labels
    if correct.ndim == 3:  # string labels: one integer per step, all digits right
        correct = correct.all(axis=-1)
        labels = (labels * (labels.max() + 1) ** np.arange(labels.shape[-1])).sum(-1)
    instance = instance_numbers(labels)
    count = int(instance.max()) + 1 if instances is None else instances
    result = np.full(count, np.nan)
    for k in range(count):
        chosen = instance == k
        if chosen.any():
            result[k] = correct[chosen].mean()
    return result
