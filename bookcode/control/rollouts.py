"""Compiled rollouts of Gaussian policies in the point-navigation family:
all tasks and trajectories of a meta-batch step together, in TensorFlow."""

from __future__ import annotations

import tensorflow as tf

from .environment import HORIZON, MAX_ACTION, transition


def sample_trajectories(mean_fn, log_std, goals, num_trajectories: int, seed,
                        horizon: int = HORIZON, starts=None, max_action: float = MAX_ACTION):  # fmt: skip
    """``num_trajectories`` episodes per goal of the policy
    ``a ~ N(mean_fn(s), exp(log_std)^2)``.

    ``mean_fn(positions)`` maps (B, N, 2) to (B, N, 2); ``log_std`` is (B, 2)
    or (2,), or ``None`` for the deterministic policy ``a = mean_fn(s)``.
    ``goals`` (B, 2); ``starts`` (B, 2) (default: the origin); ``seed`` a
    stateless seed (2 integers). Returns a dict of ``observations`` (B, N, T, 2)
    (the position each action was taken in), ``actions`` (B, N, T, 2) (the
    sampled, unclipped actions) and ``rewards`` (B, N, T). No gradient flows
    through the samples.
    """
    goals = tf.convert_to_tensor(goals, tf.float32)
    b, n = tf.shape(goals)[0], num_trajectories
    if starts is None:
        positions = tf.zeros(tf.stack([b, n, 2]), tf.float32)
    else:
        positions = tf.broadcast_to(tf.convert_to_tensor(starts, tf.float32)[:, None, :],
                                    tf.stack([b, n, 2]))  # fmt: skip
    if log_std is None:
        scale = tf.zeros((1, 1, 2), tf.float32)
    else:
        log_std = tf.stop_gradient(tf.cast(log_std, tf.float32))
        scale = tf.exp(tf.reshape(log_std, tf.stack([-1, 1, 2])))
    noise = tf.random.stateless_normal(tf.stack([horizon, b, n, 2]), seed)
    goals_ = goals[:, None, :]

    def body(t, positions, obs, acts, rews):
        mean = tf.stop_gradient(tf.cast(mean_fn(positions), tf.float32))
        action = mean + scale * noise[t]
        moved, reward = transition(positions, action, goals_, max_action)
        return t + 1, moved, obs.write(t, positions), acts.write(t, action), rews.write(t, reward)

    arrays = [tf.TensorArray(tf.float32, size=horizon) for _ in range(3)]
    _, _, obs, acts, rews = tf.while_loop(
        lambda t, *_: t < horizon, body, (tf.constant(0), positions, *arrays)
    )
    time_last = lambda a, perm: tf.transpose(a.stack(), perm)
    return {
        "observations": time_last(obs, [1, 2, 0, 3]),
        "actions": time_last(acts, [1, 2, 0, 3]),
        "rewards": time_last(rews, [1, 2, 0]),
    }


def episode_returns(rewards):
    """Undiscounted return of each trajectory: the sum over the last axis."""
    return tf.reduce_sum(rewards, axis=-1)
