"""Update rules of the inner loop: how fast weights move given their gradients.

A rule is an object with ``initial_state(params)`` (any nest of tensors) and
``apply(params, grads, state, loss) -> (params, state)``. Rules are plain
Python objects built per call from tensors (e.g. a learner's meta-weights),
so they are differentiable with respect to what they hold: Meta-SGD's learned
rates (Li et al. 2017) are ``SGD(rates)`` with ``rates`` among the
meta-weights. A rule may also hold Keras variables (e.g. the weights of a
meta-LSTM, Ravi & Larochelle 2017): read inside :func:`~bookcode.meta.adapt`,
they receive gradients through the graph loop too.
"""

from __future__ import annotations

import tensorflow as tf


def _as(value, dtype):
    """``value`` as a tensor of ``dtype`` (Python numbers without a float32 detour)."""
    if tf.is_tensor(value) or hasattr(value, "__tf_tensor__"):
        return tf.cast(value, dtype)
    return tf.constant(value, dtype)


def per_parameter(rate, params, what="rate"):
    """One tensor per parameter: a scalar broadcast, or a checked list."""
    if isinstance(rate, (list, tuple)):
        if len(rate) != len(params):
            raise ValueError(
                f"{what} has {len(rate)} tensors but there are {len(params)} parameters"
            )
        return [_as(r, p.dtype) for r, p in zip(rate, params)]
    return [_as(rate, p.dtype) for p in params]


class UpdateRule:
    """Base of the inner-loop update rules (stateless by default)."""

    def initial_state(self, params):
        """The rule's state before the first step: any nest of tensors."""
        return ()

    def apply(self, params, grads, state, loss):
        """One step: returns ``(new_params, new_state)``. ``loss`` is the
        inner loss the gradients come from (a constant under first order)."""
        raise NotImplementedError


class SGD(UpdateRule):
    """``params <- params - rate * grads``; ``rate`` is a scalar or one tensor
    per parameter (Meta-SGD, Li et al. 2017). MAML's inner loop (Finn et al.
    2017)."""

    def __init__(self, rate):
        self.rate = rate

    def apply(self, params, grads, state, loss):
        rates = per_parameter(self.rate, params)
        return [p - r * g for p, r, g in zip(params, rates, grads)], state


class Adam(UpdateRule):
    """Adam (Kingma & Ba 2015, Algorithm 1) on tensors: state ``(t, m, v)``,
    step ``rate * m_hat / (sqrt(v_hat) + epsilon)``. ``beta_1=0`` by default,
    as Reptile's inner loop (Nichol et al. 2018). Differentiable in its
    inputs wherever the gradients are non-zero."""

    def __init__(self, learning_rate=1e-3, beta_1=0.0, beta_2=0.999, epsilon=1e-8):
        self.learning_rate, self.beta_1, self.beta_2 = learning_rate, beta_1, beta_2
        self.epsilon = epsilon

    def initial_state(self, params):
        dtype = params[0].dtype if params else tf.float32
        zeros = [tf.zeros_like(p) for p in params]
        return (tf.zeros((), dtype), zeros, list(zeros))

    def apply(self, params, grads, state, loss):
        t, m, v = state
        t = t + 1
        b1, b2, eps = (_as(c, t.dtype) for c in (self.beta_1, self.beta_2, self.epsilon))
        m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, grads)]
        v = [b2 * vi + (1 - b2) * tf.square(g) for vi, g in zip(v, grads)]
        c1, c2 = 1 - tf.pow(b1, t), 1 - tf.pow(b2, t)
        rates = per_parameter(self.learning_rate, params, "learning_rate")
        new = [
            p - r * (mi / c1) / (tf.sqrt(vi / c2) + eps)
            for p, r, mi, vi in zip(params, rates, m, v)
        ]
        return new, (t, m, v)
