"""The 2-D point-robot navigation family of MAML's reinforcement-learning
experiments (Finn, Abbeel & Levine 2017, section 5.3).

A task is a goal position in the square ``[-0.5, 0.5]^2``; the state is the
robot's position (it starts at the origin unless told otherwise), an action is
a velocity clipped to ``[-max_action, max_action]`` per coordinate, the reward
is minus the distance to the goal after the move, and an episode lasts
``horizon`` steps (100 in the paper). The robot is not confined to the square.

The dynamics exist twice, with the same float32 arithmetic: in NumPy
(:class:`PointNavigation`, one object steps many episodes at once) and in
TensorFlow (:func:`transition`, used by the compiled rollouts of
:mod:`bookcode.control.rollouts`); the tests check that they agree.
"""

from __future__ import annotations

import numpy as np

GOAL_LOW, GOAL_HIGH = -0.5, 0.5
MAX_ACTION = 0.1
HORIZON = 100


def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def sample_goals(count: int, seed=None, low: float = GOAL_LOW, high: float = GOAL_HIGH):
    """``count`` goals uniform in the square ``[low, high]^2``: float32 (count, 2).
    ``seed`` is an int, ``None`` or a ``numpy.random.Generator``."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if not low < high:
        raise ValueError(f"need low < high, got low={low!r}, high={high!r}")
    return _rng(seed).uniform(low, high, size=(int(count), 2)).astype(np.float32)


def _positions(value, name, count=None):
    """A float32 (n, 2) array of finite positions, with a clear error otherwise."""
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != 2 or not len(array):
        raise ValueError(f"{name} must have shape (n, 2), got {array.shape}")
    if count is not None and len(array) != count:
        raise ValueError(f"{name} must have shape ({count}, 2), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def step_positions(positions, actions, goals, max_action: float = MAX_ACTION):
    """One NumPy transition: ``(next_positions, rewards)`` with
    ``next = position + clip(action, -max_action, max_action)`` and
    ``reward = -|next - goal|``. Arrays (..., 2); rewards (...,)."""
    moved = positions + np.clip(actions, -max_action, max_action).astype(np.float32)
    return moved, -np.sqrt(np.sum(np.square(moved - goals), axis=-1))


def transition(positions, actions, goals, max_action: float = MAX_ACTION):
    """:func:`step_positions` in TensorFlow (for compiled rollouts)."""
    import tensorflow as tf

    moved = positions + tf.clip_by_value(actions, -max_action, max_action)
    return moved, -tf.sqrt(tf.reduce_sum(tf.square(moved - goals), axis=-1))


class PointNavigation:
    """A batch of point-robot episodes, one per goal (Finn et al. 2017, 5.3).

    ``goals`` is (n, 2); ``starts`` (n, 2) the initial positions (default:
    the origin, as in the paper). :meth:`reset` returns the positions,
    :meth:`step` takes one action per episode, (n, 2), clipped to
    ``[-max_action, max_action]``, and returns ``(positions, rewards, done)``;
    ``done`` becomes true after ``horizon`` steps, after which stepping is an
    error until :meth:`reset`.

    >>> env = PointNavigation(sample_goals(8, seed=0))
    >>> positions = env.reset()
    >>> positions, rewards, done = env.step(np.zeros((8, 2)))
    """

    def __init__(self, goals, horizon: int = HORIZON, max_action: float = MAX_ACTION,
                 starts=None):  # fmt: skip
        self.goals = _positions(goals, "goals")
        if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
        if not max_action > 0:
            raise ValueError(f"max_action must be positive, got {max_action!r}")
        self.horizon, self.max_action = int(horizon), float(max_action)
        n = len(self.goals)
        self.starts = (
            np.zeros((n, 2), np.float32) if starts is None else _positions(starts, "starts", n)
        )
        self.positions, self.t = None, 0

    @property
    def num_envs(self) -> int:
        return len(self.goals)

    def reset(self):
        """Back to the start positions; returns them, (n, 2)."""
        self.positions, self.t = self.starts.copy(), 0
        return self.positions.copy()

    def step(self, actions):
        """Move every robot by its clipped action; ``(positions, rewards, done)``."""
        if self.positions is None:
            raise ValueError("call reset() before step()")
        if self.t >= self.horizon:
            raise ValueError(f"the episodes ended after {self.horizon} steps; call reset()")
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (self.num_envs, 2):
            raise ValueError(
                f"actions must have shape ({self.num_envs}, 2): one velocity per episode, "
                f"got {actions.shape}"
            )
        if not np.all(np.isfinite(actions)):
            raise ValueError("actions contain NaN or infinite values")
        self.positions, rewards = step_positions(
            self.positions, actions, self.goals, self.max_action
        )
        self.t += 1
        return self.positions.copy(), rewards, self.t >= self.horizon


def straight_line_expert(positions, goals, max_action: float = MAX_ACTION):
    """The expert of the meta-imitation experiments: the velocity towards the
    goal along the straight line, at most ``max_action`` long (so every
    coordinate is within the action range and the robot stops on the goal).
    Arrays (..., 2)."""
    offset = np.asarray(goals, np.float32) - np.asarray(positions, np.float32)
    length = np.sqrt(np.sum(np.square(offset), axis=-1, keepdims=True))
    scale = np.minimum(1.0, max_action / np.maximum(length, 1e-12))
    return (offset * scale).astype(np.float32)


def run_policy(policy, goals, starts=None, horizon: int = HORIZON, max_action=MAX_ACTION):
    """Roll out a deterministic ``policy(positions) -> actions`` ((n, 2) to
    (n, 2), NumPy) from ``starts`` towards ``goals``: returns ``(positions,
    actions, rewards)`` of shapes (n, horizon + 1, 2), (n, horizon, 2),
    (n, horizon)."""
    env = PointNavigation(goals, horizon, max_action, starts)
    positions, actions, rewards = [env.reset()], [], []
    for _ in range(env.horizon):
        action = np.asarray(policy(positions[-1]), np.float32)
        p, r, _ = env.step(action)
        positions.append(p), actions.append(action), rewards.append(r)
    return np.stack(positions, 1), np.stack(actions, 1), np.stack(rewards, 1)
