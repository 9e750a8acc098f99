"""The inner loop: adaptation of fast weights by an update rule.

Fast weights are plain tensors that stand in for a Keras model's trainable
variables, run through :func:`forward` (``keras.Model.stateless_call``), so
adaptation never writes the model's variables (batch-norm moving averages
included). Batch normalisation uses the statistics of the batch it sees, as
in MAML's reference code (Finn et al. 2017), which makes prediction
transductive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from .update_rules import SGD, UpdateRule


def forward(model: keras.Model, params: Sequence[tf.Tensor], x, non_trainable=None):
    """``model(x)`` computed with the tensors ``params`` in place of
    ``model.trainable_variables`` (same order and shapes).

    Runs in training mode, so batch normalisation normalises with the
    statistics of ``x``; the moving averages it would update are discarded.
    The model's variables are never written.
    """
    if non_trainable is None:
        non_trainable = [v.value for v in model.non_trainable_variables]
    outputs, _ = model.stateless_call(list(params), list(non_trainable), x, training=True)
    return outputs


def _batch_norm_statistics(model):
    """``{index in non_trainable_variables: (layer, "mean" | "variance")}`` of
    the moving statistics of every batch-normalisation layer of ``model``."""
    index = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    found = {}
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            for v, kind in ((layer.moving_mean, "mean"), (layer.moving_variance, "variance")):
                if id(v) in index:
                    found[index[id(v)]] = (layer, kind)
    return found


def forward_with_statistics(model: keras.Model, params: Sequence[tf.Tensor], reference_x, x):
    """``model(x)`` with batch normalisation using the statistics of
    ``reference_x`` (e.g. the support set) instead of those of ``x``: every
    example of ``x`` is processed independently of the others (non-transductive
    prediction, as Reptile's evaluation, Nichol et al. 2018). Without batch
    normalisation this is :func:`forward`.

    The reference pass runs in training mode with the moving averages set to
    zero, so each layer's updated average is ``(1 - momentum)`` times the
    reference batch's statistic; dividing gives the statistic, which the pass
    on ``x`` (inference mode) then uses.
    """
    stats = _batch_norm_statistics(model)
    if not stats:
        return forward(model, params, x)
    current = [v.value for v in model.non_trainable_variables]
    zeroed = [tf.zeros_like(v) if i in stats else v for i, v in enumerate(current)]
    _, updated = model.stateless_call(list(params), zeroed, reference_x, training=True)
    reference = list(current)
    for i, (layer, _) in stats.items():
        reference[i] = updated[i] / tf.cast(1.0 - layer.momentum, updated[i].dtype)
    outputs, _ = model.stateless_call(list(params), reference, x, training=False)
    return outputs


def connect_gradients(grads, params, names=None, unused=(), what="the loss"):
    """Dense gradients, with zeros for the parameters listed (by index) in
    ``unused``; a ``ValueError`` naming any other parameter no gradient
    reaches (a silent zero would leave it untrained)."""
    missing = [i for i, g in enumerate(grads) if g is None and i not in unused]
    if missing:
        labels = [names[i] if names is not None else f"#{i}" for i in missing]
        raise ValueError(
            f"{what} does not depend on parameter(s) {', '.join(labels)}: no gradient "
            "reaches them. Use them, or declare them unused (a learner's `unused_variables`)."
        )
    return [
        tf.zeros_like(p) if g is None else tf.convert_to_tensor(g) for g, p in zip(grads, params)
    ]


def _check_steps(steps, first_order):
    if tf.is_tensor(steps):
        if not first_order:
            raise ValueError(
                "steps given as a tensor need first_order=True (second-order loops are "
                "unrolled, so their number of steps must be a Python integer)"
            )
        return tf.cast(steps, tf.int32)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    return int(steps)


def adapt(
    loss_fn: Callable,
    params: Sequence[tf.Tensor],
    steps,
    update,
    first_order: bool = False,
    metric_fn: Callable | None = None,
    *,
    names: Sequence[str] | None = None,
    unused: Sequence[int] = (),
):
    """``steps`` updates of the fast weights ``params`` by an update rule.

    ``loss_fn(params, step)`` is the inner loss at step ``step`` (an int32
    scalar tensor, 0-based), so a caller can draw a new minibatch per step as
    Reptile does (Nichol et al. 2018). ``update`` is an :class:`UpdateRule`,
    or a learning rate for :class:`SGD`: a float, or one tensor per parameter
    (Meta-SGD, Li et al. 2017).

    Called inside an outer ``tf.GradientTape``, the result is differentiable
    with respect to the initial ``params`` and whatever the rule holds,
    through the inner gradients (second order, Finn et al. 2017).
    ``first_order=True`` treats the inner gradients (and the loss the rule
    sees) as constants: the fast weights still depend on the initial ones
    with identity Jacobian, so the meta-gradient is the query gradient at the
    adapted weights (first-order MAML). First-order loops of more than one
    step, or with ``steps`` given as a tensor, run as one graph loop
    (``tf.while_loop``) instead of being unrolled; second-order loops are
    unrolled.

    ``metric_fn(params)``, if given, is evaluated (without gradient) before
    the first and after every step. No gradient reaching a parameter is an
    error naming it (``names``), except for the indices in ``unused``, whose
    gradient is zero.

    Returns ``(fast_params, history)``: the adapted tensors, and the metric
    history of shape ``(steps + 1, ...)`` (``None`` without ``metric_fn``).
    """
    steps = _check_steps(steps, first_order)
    rule = update if isinstance(update, UpdateRule) else SGD(update)
    params = [tf.convert_to_tensor(p) for p in params]
    unused = set(unused)

    def step(params, state, i):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(params)
            loss = loss_fn(params, i)
        grads = tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.NONE)
        grads = connect_gradients(grads, params, names, unused, "the inner-loop loss")
        if first_order:
            grads = [tf.stop_gradient(g) for g in grads]
            loss = tf.stop_gradient(loss)
        new, state = rule.apply(params, grads, state, loss)
        return [tf.cast(n, p.dtype) for n, p in zip(new, params)], state

    def metric(params):
        return tf.stop_gradient(metric_fn(params))

    state = rule.initial_state(params)
    if tf.is_tensor(steps) or (first_order and steps > 1):
        history = ()
        if metric_fn is not None:
            first = metric(params)
            history = tf.TensorArray(first.dtype, size=steps + 1, element_shape=first.shape)
            history = history.write(0, first)

        def body(i, params, state, history):
            params, state = step(params, state, i)
            if metric_fn is not None:
                history = history.write(i + 1, metric(params))
            return i + 1, params, state, history

        _, params, _, history = tf.while_loop(
            lambda *_: True,
            body,
            (tf.constant(0, tf.int32), params, state, history),
            maximum_iterations=steps,
        )
        return params, (history.stack() if metric_fn is not None else None)

    history = [] if metric_fn is None else [metric(params)]
    for i in range(steps):
        params, state = step(params, state, tf.constant(i, tf.int32))
        if metric_fn is not None:
            history.append(metric(params))
    return params, (tf.stack(history) if metric_fn is not None else None)
