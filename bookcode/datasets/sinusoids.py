"""The sine-wave regression task family of MAML (Finn et al. 2017, section 5.1).

Each task is ``y = amplitude * sin(x - phase)`` with amplitude drawn from
U[0.1, 5], phase from U[0, pi] and inputs x from U[-5, 5]. A learner sees
``shots`` (x, y) pairs of a new task and must predict y at the query points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SineTask:
    """One regression task. Shapes: ``support_x``, ``support_y`` (shots, 1);
    ``query_x``, ``query_y`` (queries, 1); a meta-batch has one more leading
    axis on every array (and on ``amplitude`` and ``phase``)."""

    amplitude: np.ndarray
    phase: np.ndarray
    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray

    def inputs(self):
        """``(support_x, support_y, query_x)``, as for a classification episode."""
        return self.support_x, self.support_y, self.query_x

    def function(self, x):
        """The task's true curve at ``x`` (any shape)."""
        return self.amplitude * np.sin(np.asarray(x) - self.phase)


class Sinusoids:
    """Seeded sampler of sine tasks (the same ``seed`` gives the same tasks).

    >>> tasks = Sinusoids(shots=10, queries=10, seed=0)
    >>> task = tasks.sample()          # task.support_x.shape == (10, 1)
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        amplitude_range=(0.1, 5.0),
        phase_range=(0.0, np.pi),
        x_range=(-5.0, 5.0),
        seed: int | None = None,
    ):
        for name, value in (("shots", shots), ("queries", queries)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, (lo, hi) in (
            ("amplitude_range", amplitude_range),
            ("phase_range", phase_range),
            ("x_range", x_range),
        ):
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")
        self.shots, self.queries = shots, queries
        self.amplitude_range, self.phase_range, self.x_range = (
            amplitude_range,
            phase_range,
            x_range,
        )
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def __repr__(self):
        return (
            f"Sinusoids({self.shots}-shot, {self.queries} queries, amplitude "
            f"U{self.amplitude_range}, phase U[0, {self.phase_range[1]:.3g}], x U{self.x_range})"
        )

    def _draw(self, rng: np.random.Generator, batch: int) -> SineTask:
        amplitude = rng.uniform(*self.amplitude_range, size=(batch, 1, 1))
        phase = rng.uniform(*self.phase_range, size=(batch, 1, 1))
        x = rng.uniform(*self.x_range, size=(batch, self.shots + self.queries, 1))
        y = amplitude * np.sin(x - phase)
        x, y = x.astype(np.float32), y.astype(np.float32)
        k = self.shots
        return SineTask(amplitude[:, 0, 0], phase[:, 0, 0], x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    @staticmethod
    def _unbatch(task: SineTask, i: int) -> SineTask:
        return SineTask(*(getattr(task, f)[i] for f in SineTask.__dataclass_fields__))

    def sample(self) -> SineTask:
        """The next task of this sampler's random stream."""
        return self._unbatch(self._draw(self._rng, 1), 0)

    def sample_batch(self, batch_size: int) -> SineTask:
        """``batch_size`` tasks stacked on a new leading axis."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return self._draw(self._rng, batch_size)

    def fixed(self, num_tasks: int, seed: int = 1234) -> list[SineTask]:
        """A reproducible evaluation set of ``num_tasks`` tasks."""
        if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        batch = self._draw(np.random.default_rng(seed), num_tasks)
        return [self._unbatch(batch, i) for i in range(num_tasks)]

    def tf_dataset(self, batch_size: int | None = None, prefetch: int = 2):
        """An endless ``tf.data.Dataset`` of ``((support_x, support_y, query_x),
        query_y)``, with a leading meta-batch axis when ``batch_size`` is given."""
        from bookcode.episodes import endless_dataset

        def element():
            t = self.sample() if batch_size is None else self.sample_batch(batch_size)
            return (t.support_x, t.support_y, t.query_x), t.query_y

        return endless_dataset(element, prefetch)
