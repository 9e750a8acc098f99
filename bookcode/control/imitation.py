"""One-shot meta-imitation on the point robot (Finn, Yu, Zhang, Abbeel &
Levine 2017, "One-Shot Visual Imitation Learning via Meta-Learning", without
the vision): MAML (:class:`bookcode.meta.MAML`, regression) on a
behaviour-cloning loss, the mean squared error between the policy's actions
and an expert's. A task is a goal; its support set is one demonstration
(positions, expert actions) from one start, its query set another
demonstration of the same goal from another start. At test time the policy
adapts to one demonstration of a new goal and is rolled out from a new start.

Actions are expressed in units of the maximum speed (``action / max_action``,
so the expert's lie in the unit disc): with raw velocities (at most 0.1) the
squared errors, and so the inner gradients, would be 100 times smaller.
:func:`imitation_rollouts` multiplies the policy's outputs back.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..meta import SGD, Adam, adapt
from .environment import (
    MAX_ACTION,
    _rng,
    run_policy,
    sample_goals,
    straight_line_expert,
)
from .policy import batched_forward, dense_layers
from .rollouts import sample_trajectories

DEMO_HORIZON = 20  # the expert crosses the square's diagonal (1.41) in 15 steps


def demonstrations(goals, starts, horizon: int = DEMO_HORIZON, max_action: float = MAX_ACTION):
    """The straight-line expert's demonstrations: positions (G, horizon, 2)
    and the actions taken there in units of ``max_action`` (G, horizon, 2)."""

    def expert(p):
        return straight_line_expert(p, goals, max_action)

    positions, actions, _ = run_policy(expert, goals, starts, horizon, max_action)
    return positions[:, :-1], actions / np.float32(max_action)


def imitation_tasks(count: int, seed=None, horizon: int = DEMO_HORIZON, goals=None):
    """``count`` one-shot imitation tasks for :class:`bookcode.meta.MAML`:
    ``((support_x, support_y, query_x), query_y)``, each (count, horizon, 2):
    two demonstrations of each goal from two random starts in the square.
    ``goals`` (count, 2) fixes the goals (default: uniform, from ``seed``)."""
    rng = _rng(seed)
    goals = sample_goals(count, rng) if goals is None else np.asarray(goals, np.float32)
    if goals.shape != (count, 2):
        raise ValueError(f"goals must have shape ({count}, 2), got {goals.shape}")
    support = demonstrations(goals, sample_goals(count, rng), horizon)
    query = demonstrations(goals, sample_goals(count, rng), horizon)
    return (support[0], support[1], query[0]), query[1]


def imitation_dataset(tasks, batch_size: int, seed: int = 0):
    """An endless, shuffled ``tf.data.Dataset`` of meta-batches of
    ``batch_size`` tasks from :func:`imitation_tasks`' output (for
    ``MAML.fit``)."""
    (sx, sy, qx), qy = tasks
    data = tf.data.Dataset.from_tensor_slices(((sx, sy, qx), qy))
    return data.shuffle(len(qy), seed=seed).repeat().batch(batch_size, drop_remainder=True)


def stack_weights(weights_per_task):
    """A list (tasks) of weight lists -> one list of tensors with a task axis."""
    return [tf.stack(ws) for ws in zip(*weights_per_task)]


def adapted_weights(learner, support_x, support_y, steps=None):
    """The fast weights of ``learner`` (a :class:`bookcode.meta.MAML`) adapted
    to each task's demonstration, stacked along a task axis (for
    :func:`imitation_rollouts`)."""
    return stack_weights([learner.adapt(x, y, steps).weights for x, y in zip(support_x, support_y)])


def random_weights(model, count: int, seed=None):
    """``count`` fresh initialisations of a Dense-only ``model`` (Glorot
    uniform kernels, zero biases), stacked along a task axis."""
    rng = _rng(seed)
    weights = []
    for layer in dense_layers(model):
        fan_in, fan_out = layer.kernel.shape
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        weights.append(tf.constant(rng.uniform(-limit, limit, (count, fan_in, fan_out)),
                                   tf.float32))  # fmt: skip
        weights.append(tf.zeros((count, fan_out), tf.float32))
    return weights


def behaviour_cloning(model, support_x, support_y, steps: int = 200, learning_rate=1e-2,
                      optimizer: str = "adam", seed=None, initial=None):  # fmt: skip
    """Behaviour cloning from scratch on each task's demonstration: ``steps``
    full-batch steps of Adam (or SGD) on the mean squared error of actions,
    all tasks at once (one network per task, from :func:`random_weights`,
    or ``initial``), by :func:`bookcode.meta.adapt`. Returns the stacked
    weights."""
    x = tf.convert_to_tensor(support_x, tf.float32)
    y = tf.convert_to_tensor(support_y, tf.float32)
    params = random_weights(model, len(support_x), seed) if initial is None else initial
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    rule = Adam(learning_rate, beta_1=0.9) if optimizer == "adam" else SGD(learning_rate)

    @tf.function
    def train(params):
        def loss_fn(p, step):
            mse = tf.reduce_mean(tf.square(batched_forward(model, p, x) - y), axis=[1, 2])
            return tf.reduce_sum(mse)  # each task's gradient is its own

        fast, _ = adapt(loss_fn, params, tf.constant(steps), rule, first_order=True)
        return fast

    return train(params)


def imitation_rollouts(model, weights, goals, starts, horizon: int = DEMO_HORIZON,
                       max_action: float = MAX_ACTION):  # fmt: skip
    """Positions (G, horizon + 1, 2) of each task's deterministic policy
    (stacked ``weights``; outputs in units of ``max_action``) rolled out from
    ``starts`` towards ``goals``."""
    goals = tf.convert_to_tensor(goals, tf.float32)
    starts = tf.convert_to_tensor(starts, tf.float32)
    paths = sample_trajectories(
        lambda s: max_action * batched_forward(model, weights, s), None, goals, 1,
        tf.constant([0, 0]), horizon, starts, max_action,
    )  # fmt: skip
    obs = paths["observations"][:, 0]
    last = obs[:, -1] + tf.clip_by_value(paths["actions"][:, 0, -1], -max_action, max_action)
    return tf.concat([obs, last[:, None]], axis=1).numpy()


def success_rate(final_positions, goals, radius: float) -> float:
    """Fraction of robots that end within ``radius`` of their goal."""
    distance = np.linalg.norm(np.asarray(final_positions) - np.asarray(goals), axis=-1)
    return float(np.mean(distance <= radius))
