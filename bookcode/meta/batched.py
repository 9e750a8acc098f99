"""A meta-batch's tasks as one batched computation (``task_batching="batched"``).

MAML's meta-batch (Finn et al. 2017) is a set of independent tasks, each with
its own fast weights. :func:`task_forward` runs a ``keras.Sequential`` of
Conv-4's layers (:func:`bookcode.nets.conv4`) or of dense layers for every
task at once, weights with a leading task axis: the tasks' convolutions are
one grouped convolution (tasks moved into the channels), dense layers one
batched matrix product, and batch normalisation over the channels of that
layout uses each task's own statistics. Tasks being independent, the
gradient of the sum of the tasks' losses with respect to weights with a task
axis is each task's own gradient, so the inner loop runs once for all tasks,
and the meta-gradient with respect to the meta-weights tiled along the task
axis is the per-task meta-gradient, exact to second order
(:func:`task_gradients`).
"""

from __future__ import annotations

from functools import partial

import keras
import numpy as np
import tensorflow as tf

from ..nets import FusedBatchNormalization, onednn_enabled
from .objectives import task_loss
from .update_rules import SGD

# layers run on the tasks-in-channels layout, on the tasks-first one, on either
_ON_CHANNELS = (
    keras.layers.Conv2D,
    keras.layers.BatchNormalization,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
)
_ON_TASKS = (keras.layers.Dense, keras.layers.Flatten, keras.layers.Activation)
_ELEMENTWISE = (keras.layers.ReLU,)
_SUPPORTED = _ON_CHANNELS + _ON_TASKS + _ELEMENTWISE

# the hooks a learner may not override for the batched path: they see one task
_PER_TASK_HOOKS = (
    "task_objective", "task_update", "fast_forward", "inner_loss", "adapt_task",
    "batch_objective", "train_step",
)  # fmt: skip


def _layers(model):
    """The leaf layers of a (nested) ``keras.Sequential``, in call order."""
    if not isinstance(model, keras.Sequential):
        raise TypeError(
            f'task_batching="batched" needs a keras.Sequential model, got {type(model).__name__} '
            f'{model.name!r}; use task_batching="map"'
        )
    leaves = []
    for layer in model.layers:
        leaves.extend(_layers(layer) if isinstance(layer, keras.Sequential) else [layer])
    return leaves


def _unsupported(layer) -> str | None:
    """Why ``layer`` has no batched form, or ``None``."""
    if not isinstance(layer, _SUPPORTED):
        return f"its type {type(layer).__name__} has no batched form"
    if not layer.trainable:
        return "it is frozen (trainable=False)"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return "it is channels_first"
    if isinstance(layer, keras.layers.Conv2D) and layer.groups != 1:
        return "it is a grouped convolution"
    if isinstance(layer, keras.layers.BatchNormalization):
        ndim = layer.input_spec.ndim
        if layer.renorm or layer.synchronized or layer.axis % ndim != ndim - 1:
            return "only batch normalisation over the last axis (no renorm, not synchronized)"
    return None


def check_model(model: keras.Model):
    """``ValueError`` naming the first layer of ``model`` that
    :func:`task_forward` cannot run (``TypeError`` if ``model`` is not a
    ``keras.Sequential``)."""
    for layer in _layers(model):
        reason = _unsupported(layer)
        if reason is not None:
            raise ValueError(
                f"layer {layer.name!r} cannot run task-batched: {reason}. Batched layers: "
                f'{", ".join(c.__name__ for c in _SUPPORTED)}; use task_batching="map"'
            )


def check_learner(learner):
    """``ValueError`` if ``learner``'s task objective is not the default one
    (MAML's or Meta-SGD's) or its model has a layer without batched form."""
    from .learners import GradientMetaLearner

    overridden = [
        name
        for name in _PER_TASK_HOOKS
        if getattr(type(learner), name) is not getattr(GradientMetaLearner, name)
    ]
    if overridden:
        raise ValueError(
            f"{type(learner).__name__} overrides {', '.join(overridden)}, which the batched "
            'path does not run; use task_batching="map"'
        )
    check_model(learner.model)


def _dims(h):
    """``h``'s shape: static sizes where known, scalar tensors elsewhere."""
    dynamic = tf.shape(h)
    return [dynamic[i] if size is None else size for i, size in enumerate(h.shape)]


def _size(shape):
    """The number of elements of a static ``shape``, -1 if unknown."""
    return -1 if None in shape else int(np.prod(shape))


def _grouped(h):
    """[tasks, N, ..., C] -> [N, ..., tasks * C] (the tasks in the channels)."""
    rank = len(h.shape)
    h = tf.transpose(h, list(range(1, rank - 1)) + [0, rank - 1])
    return tf.reshape(h, _dims(h)[:-2] + [_size(h.shape[-2:])])


def _stacked(h, channels):
    """[N, ..., tasks * channels] -> [tasks, N, ..., channels]."""
    h = tf.reshape(h, _dims(h)[:-1] + [-1, channels])
    rank = len(h.shape)
    return tf.transpose(h, [rank - 2] + list(range(rank - 2)) + [rank - 1])


def _per_channel(weight):
    """[tasks, C] -> [tasks * C], the channel order of :func:`_grouped`."""
    return tf.reshape(weight, [-1])


def grouped_conv2d(x, kernel, strides, padding, dilations, grouped=None):
    """Each task's convolution at once: ``x`` [N, H, W, tasks * C] in the
    layout of :func:`_grouped`, ``kernel`` [tasks, kh, kw, C, F]; returns
    [N, H', W', tasks * F]. One grouped ``tf.nn.conv2d`` where its gradients
    exist (GPU, or CPU with oneDNN; ``grouped=None`` decides so), else a
    depthwise convolution summed over each task's input channels."""
    _, kh, kw, channels, filters = kernel.shape
    if grouped is None:
        grouped = onednn_enabled() or bool(tf.config.list_physical_devices("GPU"))
    if grouped:
        kernel = tf.reshape(tf.transpose(kernel, [1, 2, 3, 0, 4]), [kh, kw, channels, -1])
        return tf.nn.conv2d(x, kernel, strides, padding, dilations=dilations)
    kernel = tf.reshape(tf.transpose(kernel, [1, 2, 0, 3, 4]), [kh, kw, -1, filters])
    y = tf.nn.depthwise_conv2d(x, kernel, [1, *strides, 1], padding, dilations=dilations)
    y = tf.reshape(y, _dims(y)[:-1] + [-1, channels, filters])
    return tf.reshape(tf.reduce_sum(y, axis=-2), _dims(y)[:3] + [-1])


def _batch_norm(layer, h, gamma, beta):
    """Training-mode batch normalisation of the grouped layout: statistics
    per channel, hence per task, by the layer's own moments (exact to second
    order for :class:`bookcode.nets.BatchNormalization`)."""
    if isinstance(layer, FusedBatchNormalization) and len(h.shape) == 4:
        ones = tf.ones(tf.shape(h)[-1:], tf.float32)
        scale = ones if gamma is None else tf.cast(gamma, tf.float32)
        offset = tf.zeros_like(ones) if beta is None else tf.cast(beta, tf.float32)
        outputs = tf.compat.v1.nn.fused_batch_norm(
            h, scale, offset, epsilon=layer.epsilon, is_training=True
        )[0]
        return tf.cast(outputs, layer.compute_dtype)
    h = tf.cast(h, keras.backend.result_type(h.dtype, "float32"))
    mean, variance = layer._moments(h, None)
    gamma, beta = (None if w is None else tf.cast(w, h.dtype) for w in (gamma, beta))
    outputs = keras.ops.batch_normalization(h, mean, variance, -1, beta, gamma, layer.epsilon)
    return tf.cast(outputs, layer.compute_dtype)


def task_forward(model: keras.Model, params, x):
    """``model(x)`` of every task at once, in training mode (batch
    normalisation with each task's statistics), as
    :func:`~bookcode.meta.forward` of each task: ``params`` are the model's
    trainable tensors each with a leading task axis, ``x`` is [tasks, N, ...].
    Returns [tasks, N, ...]."""
    check_model(model)
    weights = {id(v): p for v, p in zip(model.trainable_variables, params)}

    def weight(variable, dtype):
        return tf.cast(weights[id(variable)], dtype)

    h, grouped, channels = tf.convert_to_tensor(x), False, x.shape[-1]
    for layer in _layers(model):
        dtype = layer.compute_dtype
        if isinstance(layer, _ON_CHANNELS) and not grouped:
            h, grouped = _grouped(h), True
        elif isinstance(layer, _ON_TASKS) and grouped:
            h, grouped = _stacked(h, channels), False
        h = tf.cast(h, dtype)
        if isinstance(layer, keras.layers.Conv2D):
            padding = layer.padding.upper()
            h = grouped_conv2d(
                h, weight(layer.kernel, dtype), layer.strides, padding, layer.dilation_rate
            )
            if layer.use_bias:
                h = tf.nn.bias_add(h, _per_channel(weight(layer.bias, dtype)))
            channels = layer.filters
            if layer.activation is not keras.activations.linear:
                h, grouped = layer.activation(_stacked(h, channels)), False
        elif isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta = (
                _per_channel(weights[id(w)]) if enabled else None
                for w, enabled in ((layer.gamma, layer.scale), (layer.beta, layer.center))
            )
            h = _batch_norm(layer, h, gamma, beta)
        elif isinstance(layer, keras.layers.Dense):
            h = tf.einsum("t...d,tdf->t...f", h, weight(layer.kernel, dtype))
            if layer.use_bias:
                bias = weight(layer.bias, dtype)
                h = h + tf.reshape(bias, [-1] + [1] * (len(h.shape) - 2) + [layer.units])
            h, channels = layer.activation(h), layer.units
        elif isinstance(layer, keras.layers.Flatten):
            h = tf.reshape(h, _dims(h)[:2] + [_size(h.shape[2:])])
            channels = h.shape[-1]
        else:  # pooling, ReLU, Activation: as they are
            h = layer(h)
    return _stacked(h, channels) if grouped else h


def _per_task(fn, *arrays):
    """``fn`` of each task's slices, vectorised over the leading task axis."""
    return tf.vectorized_map(lambda task: fn(*task), arrays)


def task_gradients(learner, support_x, support_y, query_x, query_y, inner_updates=False):
    """:meth:`~bookcode.meta.GradientMetaLearner.task_gradients` of a
    learner with the default task objective, all tasks as one computation:
    per-task results (dict of (tasks,) tensors) and per-task meta-gradients
    (leading task axis), the gradients with respect to the meta-weights tiled
    along the task axis; with ``inner_updates``, also each task's
    ``theta - theta'``."""
    variables = learner.meta_variables
    tasks = tf.shape(support_y)[0]
    tiled = [tf.tile(v.value[None], [tasks] + [1] * len(v.shape)) for v in variables]
    rule = learner.update_rule(tiled)
    if type(rule) is not SGD:
        raise ValueError(
            f"the batched path runs the SGD inner rule (MAML, Meta-SGD), got {type(rule).__name__}; "
            'use task_batching="map"'
        )

    def support_loss(fast, step):
        outputs = task_forward(learner.model, fast, support_x)
        return tf.reduce_sum(_per_task(partial(task_loss, learner.kind), support_y, outputs))

    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(tiled)
        fast, _ = learner.adapt_task(
            tiled, support_x, support_y, learner.inner_steps, learner.first_order,
            inner_loss=support_loss,
        )  # fmt: skip
        outputs = task_forward(learner.model, fast, query_x)
        results = _per_task(learner.query_results, query_y, outputs)
        results = learner._checked_results(results, tiled[0].dtype)
        total = tf.reduce_sum(results["loss"])
    grads = tape.gradient(total, tiled, unconnected_gradients=tf.UnconnectedGradients.NONE)
    grads = learner._check_meta_gradients(grads, tiled, variables)
    if not inner_updates:
        return results, grads
    initial = learner.initial_fast_weights(tiled)
    return results, grads, [tf.stop_gradient(w - f) for w, f in zip(initial, fast)]
