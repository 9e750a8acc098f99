"""Task losses, metrics and the FGSM attack shared by the gradient-based learners."""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

CLASSIFICATION, REGRESSION = "classification", "regression"


def metric_name(kind: str) -> str:
    """The metric a learner of this ``kind`` logs: ``accuracy`` or ``mse``."""
    return "accuracy" if kind == CLASSIFICATION else "mse"


def _full_precision(outputs):
    """Outputs of a mixed-precision model (bfloat16/float16) as float32, so
    losses and meta-gradients are accumulated in full precision."""
    return tf.cast(outputs, tf.float32) if outputs.dtype.size == 2 else outputs


def task_loss(kind: str, y_true, outputs):
    """Mean cross-entropy (``classification``: integer labels, logits) or mean
    squared error (``regression``)."""
    outputs = _full_precision(outputs)
    if kind == CLASSIFICATION:
        losses = keras.losses.sparse_categorical_crossentropy(y_true, outputs, from_logits=True)
        return tf.reduce_mean(losses)
    return tf.reduce_mean(tf.square(tf.cast(y_true, outputs.dtype) - outputs))


def task_metric(kind: str, y_true, outputs):
    """Accuracy (classification) or mean squared error (regression)."""
    outputs = _full_precision(outputs)
    if kind == CLASSIFICATION:
        predicted = tf.argmax(outputs, axis=-1, output_type=tf.int32)
        return tf.reduce_mean(tf.cast(predicted == tf.cast(y_true, tf.int32), outputs.dtype))
    return task_loss(kind, y_true, outputs)


def fgsm(loss_fn: Callable, x, epsilon: float, clip_range=None):
    """Fast gradient sign method (Goodfellow et al. 2015): ``x + epsilon *
    sign(grad_x loss_fn(x))``, optionally clipped to ``clip_range``. The
    result is a constant (no gradient flows back through it)."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(x)
        loss = loss_fn(x)
    perturbed = x + tf.cast(epsilon, x.dtype) * tf.sign(tape.gradient(loss, x))
    if clip_range is not None:
        perturbed = tf.clip_by_value(perturbed, clip_range[0], clip_range[1])
    return tf.stop_gradient(perturbed)
