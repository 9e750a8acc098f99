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
(:func:`task_gradients`). Reptile's inner loops run the same way
(:func:`reptile_updates`), on weights kept in the grouped layout
(:func:`group_params`) from the first inner step to the last.
"""

from __future__ import annotations

from functools import partial

import keras
import numpy as np
import tensorflow as tf

from ..nets import FusedBatchNormalization, onednn_enabled
from .objectives import metric_name, task_loss
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
    (MAML's or Meta-SGD's) or one it runs batched itself (its
    ``batched_overrides``, e.g. Reptile's ``task_update``), or its model has a
    layer without batched form."""
    from .learners import GradientMetaLearner

    own = getattr(type(learner), "batched_overrides", ())  # hooks with a batched form of their own
    overridden = [
        name
        for name in _PER_TASK_HOOKS
        if name not in own
        and getattr(type(learner), name) is not getattr(GradientMetaLearner, name)
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


def _grouped_kernel(kernel):
    """[tasks, kh, kw, C, F] -> [kh, kw, C, tasks * F] (the kernel of one
    grouped convolution, tasks first in the output channels)."""
    _, kh, kw, channels, _ = kernel.shape
    return tf.reshape(tf.transpose(kernel, [1, 2, 3, 0, 4]), [kh, kw, channels, -1])


def grouped_conv2d(x, kernel, strides, padding, dilations, grouped=None, filters=None):
    """Each task's convolution at once: ``x`` [N, H, W, tasks * C] in the
    layout of :func:`_grouped`, ``kernel`` [tasks, kh, kw, C, F] (or, with
    ``filters=F``, already in the grouped layout [kh, kw, C, tasks * F] of
    :func:`group_params`); returns [N, H', W', tasks * F]. One grouped
    ``tf.nn.conv2d`` where its gradients exist (GPU, or CPU with oneDNN;
    ``grouped=None`` decides so), else a depthwise convolution summed over
    each task's input channels."""
    if grouped is None:
        grouped = onednn_enabled() or bool(tf.config.list_physical_devices("GPU"))
    if grouped:
        kernel = kernel if filters is not None else _grouped_kernel(kernel)
        return tf.nn.conv2d(x, kernel, strides, padding, dilations=dilations)
    # the depthwise kernel [kh, kw, tasks * C, F]
    if filters is not None:
        kh, kw, channels = kernel.shape[:3]
        kernel = tf.transpose(tf.reshape(kernel, [kh, kw, channels, -1, filters]), [0, 1, 3, 2, 4])
    else:
        _, kh, kw, channels, filters = kernel.shape
        kernel = tf.transpose(kernel, [1, 2, 0, 3, 4])
    kernel = tf.reshape(kernel, [kh, kw, -1, filters])
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


def _channel_layers(model):
    """``{id(variable): layer}`` of the variables :func:`group_params` lays
    out per channel: convolution kernels and biases, batch-norm scales and
    offsets."""
    found = {}
    for layer in _layers(model):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.BatchNormalization)):
            for v in layer.trainable_variables:
                found[id(v)] = layer
    return found


def _per_layout(model, params, kernel, vector):
    """``params`` (one tensor per trainable variable of ``model``) with
    ``kernel(variable, tensor)`` applied to convolution kernels and
    ``vector(variable, tensor)`` to the other per-channel tensors (those of
    :func:`_channel_layers`); dense weights as they are."""
    channel = _channel_layers(model)
    return [
        p if id(v) not in channel else kernel(v, p) if len(v.shape) == 4 else vector(v, p)
        for v, p in zip(model.trainable_variables, params)
    ]


def group_params(model: keras.Model, params):
    """The model's trainable tensors with a leading task axis, in the layout
    :func:`task_forward` uses inside (``grouped=True``): convolution kernels
    [kh, kw, C, tasks * F], per-channel vectors [tasks * C], dense weights as
    they are. An elementwise update rule (SGD, Adam) gives the same numbers in
    either layout; this one saves a transpose per kernel per step."""
    return _per_layout(
        model, params, lambda v, p: _grouped_kernel(p), lambda v, p: _per_channel(p)
    )


def ungroup_params(model: keras.Model, params):
    """The inverse of :func:`group_params`: tensors with a leading task axis."""

    def kernel(v, p):
        kh, kw, c, f = v.shape
        return tf.transpose(tf.reshape(p, [kh, kw, c, -1, f]), [3, 0, 1, 2, 4])

    return _per_layout(model, params, kernel, lambda v, p: tf.reshape(p, [-1, *v.shape]))


def tile_grouped(model: keras.Model, weights, tasks):
    """``weights`` (one tensor per trainable variable of ``model``) repeated
    for ``tasks`` tasks, in the layout of :func:`group_params`."""
    channel = _channel_layers(model)
    out = []
    for v, w in zip(model.trainable_variables, weights):
        if id(v) in channel:  # tasks first along the last axis
            out.append(tf.tile(w, [1] * (len(w.shape) - 1) + [tasks]))
        else:
            out.append(tf.tile(w[None], [tasks] + [1] * len(w.shape)))
    return out


def task_forward(model: keras.Model, params, x, grouped=False):
    """``model(x)`` of every task at once, in training mode (batch
    normalisation with each task's statistics), as
    :func:`~bookcode.meta.forward` of each task: ``params`` are the model's
    trainable tensors each with a leading task axis, ``x`` is [tasks, N, ...].
    Returns [tasks, N, ...]. ``grouped=True``: ``params`` are in the layout of
    :func:`group_params` and ``x`` is [N, ..., tasks * C] (:func:`_grouped`)."""
    check_model(model)
    weights = {id(v): p for v, p in zip(model.trainable_variables, params)}
    prepared = grouped

    def weight(variable, dtype):
        return tf.cast(weights[id(variable)], dtype)

    h = tf.convert_to_tensor(x)
    channels = model.input_shape[-1] if grouped else x.shape[-1]
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
                h, weight(layer.kernel, dtype), layer.strides, padding, layer.dilation_rate,
                filters=layer.filters if prepared else None,
            )  # fmt: skip
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


def reptile_updates(learner, support_x, support_y, query_x, query_y, *, steps=None, minibatches=True):
    """:meth:`~bookcode.meta.Reptile.task_update` of every task at once: the
    inner loop (Adam or SGD on the support minibatches, which all tasks of a
    meta-batch draw alike) runs once on the meta-weights tiled along a task
    axis; returns per-task results (dict of (tasks,) tensors: query loss and
    metric after adaptation, transductive or not as the learner says) and
    per-task updates ``theta - phi`` (leading task axis). Nothing is
    differentiated through the loop, so it is Reptile's mapped computation,
    equal up to float rounding. ``steps`` (default the learner's
    ``inner_steps``) and ``minibatches=False`` (every step on the whole
    support set) give the test-time adaptation (:func:`reptile_evaluate`)."""
    model = learner.model
    meta_weights = [v.value for v in learner.meta_variables]
    tasks = tf.shape(support_y)[0]
    # the inner loop runs in the grouped layout (group_params; Adam and SGD are elementwise)
    tiled = tile_grouped(model, meta_weights, tasks)
    steps = learner.inner_steps if steps is None else steps
    batches = None
    if minibatches and learner.inner_batch is not None:
        batches = learner.minibatch_indices(tf.shape(support_y)[1], steps, learner.minibatch_seed())
    support = _grouped(tf.cast(support_x, model.compute_dtype))  # examples first

    def support_loss(fast, step):
        x, y = support, support_y
        if batches is not None:
            x, y = tf.gather(support, batches[step]), tf.gather(support_y, batches[step], axis=1)
        outputs = task_forward(model, fast, x, grouped=True)
        return tf.reduce_sum(_per_task(partial(task_loss, learner.kind), y, outputs))

    fast, _ = learner.adapt_task(tiled, support_x, support_y, steps, True, inner_loss=support_loss)
    fast = [tf.stop_gradient(f) for f in fast]
    updates = ungroup_params(model, [w - f for w, f in zip(tiled, fast)])
    dtype = meta_weights[0].dtype
    if learner.transductive:
        query = _grouped(tf.cast(query_x, model.compute_dtype))
        outputs = task_forward(model, fast, query, grouped=True)
        results = _per_task(learner.query_results, query_y, outputs)
    else:  # each task's queries with its support set's statistics, task by task

        def one_task(task):
            weights, sx, qx, qy = task
            outputs = learner._query_outputs(meta_weights, weights, sx, qx)
            return {k: tf.cast(v, dtype) for k, v in learner.query_results(qy, outputs).items()}

        results = learner._map_tasks(
            one_task,
            (ungroup_params(model, fast), support_x, query_x, query_y),
            learner._results_signature(dtype),
        )
    results = {k: tf.stop_gradient(tf.cast(v, dtype)) for k, v in results.items()}
    return learner._checked_results(results, dtype), updates


def reptile_evaluate(learner, episodes, tasks: int = 50):
    """:func:`bookcode.evaluation.evaluate` of a Reptile learner, ``tasks``
    episodes at a time as one computation: each adapts with the learner's
    ``test_inner_steps`` on its whole support set (as ``predict_episode``)
    and its queries are classified transductively or not as the learner
    says. Episodes of one call must share their shapes. The accuracies are
    those of ``evaluate`` up to float rounding."""
    from bookcode.evaluation import EvaluationResult, confidence_interval

    metric = metric_name(learner.kind)
    episodes = list(episodes)
    if not episodes:
        raise ValueError("no episodes to evaluate")

    @tf.function
    def accuracies(support_x, support_y, query_x, query_y):
        results, _ = reptile_updates(
            learner, support_x, support_y, query_x, query_y,
            steps=learner.test_inner_steps, minibatches=False,
        )  # fmt: skip
        return results[metric]

    out = []
    for start in range(0, len(episodes), tasks):
        group = episodes[start : start + tasks]
        arrays = [np.stack(a) for a in zip(*[(*e.inputs(), e.query_y) for e in group])]
        out.append(accuracies(*arrays).numpy())
    values = np.concatenate(out).astype(np.float64)
    return EvaluationResult(float(values.mean()), confidence_interval(values), values)
