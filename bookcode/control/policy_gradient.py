"""REINFORCE with a baseline (Williams 1992), as MAML's inner step uses it
(Finn et al. 2017, section 3.2): the surrogate loss whose gradient is the
policy-gradient estimate, for Gaussian policies on batches of trajectories.

Shapes: trajectories of a task are (N, T) (N trajectories of T steps); a
leading task axis is allowed everywhere.
"""

from __future__ import annotations

import math

import tensorflow as tf


def rewards_to_go(rewards, discount: float = 0.99):
    """``R_t = sum_{k >= t} discount^(k - t) r_k`` along the last axis."""
    if not 0 <= discount <= 1:
        raise ValueError(f"discount must be in [0, 1], got {discount!r}")
    rewards = tf.convert_to_tensor(rewards, tf.float32)
    steps = tf.shape(rewards)[-1]
    k = tf.range(steps)
    power = tf.cast(k[:, None] - k[None, :], tf.float32)  # [k, t] = k - t
    weights = tf.where(power >= 0, tf.pow(tf.constant(discount, tf.float32), power), 0.0)
    return tf.linalg.matvec(tf.transpose(weights), rewards)  # sum_k weights[k, t] r_k


def leave_one_out_baseline(returns):
    """Baseline of trajectory ``i`` at step ``t``: the mean of the other
    trajectories' returns-to-go at step ``t`` (axis -2 indexes trajectories).
    It does not depend on trajectory ``i``'s own actions, so the estimate
    stays unbiased. Needs at least two trajectories."""
    returns = tf.convert_to_tensor(returns, tf.float32)
    n = returns.shape[-2]
    if n is not None and n < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 trajectories per task")
    n = tf.cast(tf.shape(returns)[-2], returns.dtype)
    return (tf.reduce_sum(returns, axis=-2, keepdims=True) - returns) / (n - 1)


def advantages(rewards, discount: float = 0.99, normalize: bool = True):
    """``R_t - b_t`` (rewards-to-go minus :func:`leave_one_out_baseline`);
    with ``normalize``, centred and scaled to unit deviation over each task's
    (N, T) values, as rllab's ``center_adv``. A constant (no gradient)."""
    returns = rewards_to_go(rewards, discount)
    adv = returns - leave_one_out_baseline(returns)
    if normalize:
        mean, var = tf.nn.moments(adv, axes=[-2, -1], keepdims=True)
        adv = (adv - mean) / (tf.sqrt(var) + 1e-8)
    return tf.stop_gradient(adv)


def gaussian_log_prob(actions, mean, log_std):
    """Log-density of ``actions`` under a diagonal Gaussian: sum over the last
    axis. ``log_std`` broadcasts against ``mean``."""
    actions, mean = tf.cast(actions, tf.float32), tf.cast(mean, tf.float32)
    log_std = tf.cast(log_std, tf.float32)
    z = (actions - mean) * tf.exp(-log_std)
    return tf.reduce_sum(-0.5 * tf.square(z) - log_std - 0.5 * math.log(2 * math.pi), axis=-1)


def reinforce_surrogate(log_probs, advantage):
    """``-mean_{n,t} log pi(a_t | s_t) * A_t`` over the last two axes (one
    value per task): its gradient is minus the REINFORCE estimate of the
    gradient of the expected return (up to the 1/T scale)."""
    return -tf.reduce_mean(log_probs * tf.stop_gradient(advantage), axis=[-2, -1])
