"""The standard few-shot evaluation protocol: mean accuracy over many
held-out episodes with a 95% confidence interval, 1.96 * std / sqrt(n)
(as reported by Vinyals et al. 2016, Snell et al. 2017, Finn et al. 2017)."""

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
        return f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f}% over {len(self.accuracies)} episodes"


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
    of :class:`~bookcode.episodes.Episode`.
    """
    accuracies = []
    for episode in episodes:
        logits = np.asarray(learner.predict_episode(*episode.inputs()))
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
    nearest in raw pixel space (Euclidean). Logits are negative distances."""

    def predict_episode(self, support_x, support_y, query_x):
        s = np.reshape(support_x, (len(support_x), -1)).astype(np.float64)
        q = np.reshape(query_x, (len(query_x), -1)).astype(np.float64)
        distances = (q**2).sum(1)[:, None] - 2 * q @ s.T + (s**2).sum(1)[None, :]
        ways = int(np.max(support_y)) + 1
        logits = np.full((len(q), ways), -np.inf)
        for c in range(ways):
            logits[:, c] = -distances[:, np.asarray(support_y) == c].min(axis=1)
        return logits
