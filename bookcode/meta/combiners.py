"""Per-task gradient combiners: ``combiner(task_grads) -> grads``.

``task_grads`` holds one tensor per meta-variable with a leading task axis;
the result is one tensor per meta-variable, which the meta-optimiser
applies. A combiner passed to a learner must serialise: a function
registered with ``keras.saving.register_keras_serializable`` or a registered
class with ``get_config``.

A combiner whose attribute ``uses_inner_updates`` is true is called
``combiner(task_grads, inner_updates)``: ``inner_updates`` holds each task's
inner-loop update ``theta - theta'_i`` (one tensor per fast weight, leading
task axis; :meth:`~bookcode.meta.GradientMetaLearner.inner_update`).

A combiner may also have a method ``batch_logs(task_grads) -> dict`` of
tensors (``batch_logs(task_grads, inner_updates)`` with
``uses_inner_updates``): the learner's ``train_step`` returns them with its
logs, one value per meta-batch as they are (not averaged over the epoch), so
a callback's ``on_train_batch_end`` sees them (e.g.
:class:`~bookcode.meta.AgreementLog`).
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="bookcode")
def mean_gradients(task_grads):
    """The mean over tasks (MAML, Finn et al. 2017): the default."""
    return [tf.reduce_mean(g, axis=0) for g in task_grads]


def _check_task_updates(task_updates):
    task_updates = [tf.convert_to_tensor(g) for g in task_updates]
    if not task_updates:
        raise ValueError("task_updates is empty: pass one tensor per meta-variable")
    for g in task_updates:
        if g.shape.rank is None or g.shape.rank < 1:
            raise ValueError(
                "each task update needs a leading task axis (tasks, ...); got a scalar"
            )
    tasks = {g.shape[0] for g in task_updates} - {None}
    if len(tasks) > 1:
        raise ValueError(
            f"task updates disagree on the number of tasks (leading axis): {sorted(tasks)}"
        )
    return task_updates


def agreement_gram(task_updates):
    """The Gram matrix ``G[i, j] = g_i . g_j`` of the tasks' flattened updates,
    shape (tasks, tasks). ``task_updates`` is what a combiner receives: one
    tensor per meta-variable, leading task axis. Computed in float32 (float64
    for float64 updates)."""
    task_updates = _check_task_updates(task_updates)
    dtype = tf.float64 if any(g.dtype == tf.float64 for g in task_updates) else tf.float32
    gram = 0.0
    for g in task_updates:
        flat = tf.reshape(tf.cast(g, dtype), [tf.shape(g)[0], -1])
        gram += tf.matmul(flat, flat, transpose_b=True)
    return gram


def agreement_weights(task_updates):
    """Gradient-agreement weights, shape (tasks,) (Eshratifar, Eigen & Pedram
    2018, "Gradient Agreement as an Optimization Objective for
    Meta-Learning"):

    ``w_i = sum_j (g_i . g_j) / sum_k |sum_j (g_k . g_j)|``,

    the row sums of the Gram matrix of the flattened task updates ``g_i``
    (:func:`agreement_gram`), normalised so that their absolute values sum
    to one. A task whose update points against the batch's summed update
    gets a negative weight. When the denominator is zero (every update zero,
    or updates that cancel exactly) the weights are equal, ``1 / tasks``.
    """
    gram = agreement_gram(task_updates)
    rows = tf.reduce_sum(gram, axis=1)
    total = tf.reduce_sum(tf.abs(rows))
    tasks = tf.cast(tf.shape(rows)[0], rows.dtype)
    safe = tf.where(total > 0, total, tf.ones_like(total))
    return tf.where(total > 0, rows / safe, tf.ones_like(rows) / tasks)


WEIGHING = ("inner_updates", "task_updates")


@keras.saving.register_keras_serializable(package="bookcode")
class GradientAgreement:
    """The gradient-agreement combiner (Eshratifar, Eigen & Pedram 2018):
    ``sum_i w_i g_i``, where ``g_i`` is task i's meta-gradient (MAML) or
    update ``theta - theta'_i`` (Reptile), with the weights of
    :func:`agreement_weights`, treated as constants in the meta-gradient
    (``tf.stop_gradient``). Equal updates give equal weights ``1 / tasks``
    and the mean, as without agreement.

    ``weigh_by="inner_updates"`` (the paper's algorithm 1): the weights come
    from the tasks' inner-loop updates ``theta - theta'_i``, the learner
    passes them (for Reptile they are its task updates);
    ``"task_updates"``: from the ``g_i`` themselves. Called directly, the
    weights come from ``inner_updates`` when given, else from ``task_grads``.

    ``batch_logs`` reports each meta-batch's weights as ``agreement_weights``
    (shape (tasks,)); :class:`~bookcode.meta.AgreementLog` collects them
    during ``fit()``. :data:`bookcode.meta.gradient_agreement` is the paper's.
    """

    def __init__(self, weigh_by: str = "inner_updates"):
        if weigh_by not in WEIGHING:
            raise ValueError(f"weigh_by must be one of {WEIGHING}, got {weigh_by!r}")
        self.weigh_by = weigh_by

    @property
    def uses_inner_updates(self) -> bool:
        return self.weigh_by == "inner_updates"

    def weights(self, task_grads, inner_updates=None):
        """The agreement weights, shape (tasks,), of ``inner_updates`` when
        given, else of ``task_grads``."""
        return agreement_weights(task_grads if inner_updates is None else inner_updates)

    def __call__(self, task_grads, inner_updates=None):
        task_grads = _check_task_updates(task_grads)
        weights = tf.stop_gradient(self.weights(task_grads, inner_updates))
        return [tf.tensordot(tf.cast(weights, g.dtype), g, axes=1) for g in task_grads]

    def batch_logs(self, task_grads, inner_updates=None) -> dict:
        """``{"agreement_weights": weights}`` of this meta-batch."""
        return {"agreement_weights": self.weights(task_grads, inner_updates)}

    def get_config(self):
        return {"weigh_by": self.weigh_by}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"GradientAgreement(weigh_by={self.weigh_by!r})"


gradient_agreement = GradientAgreement()
"""The gradient-agreement combiner, weights from the inner updates as in the
paper: ``MAML(model, combiner=gradient_agreement)``."""
