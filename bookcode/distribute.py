"""Training on several devices with ``tf.distribute.MirroredStrategy``.

Every learner trains under a strategy the Keras way: build and compile it in
``strategy.scope()`` and call ``fit()`` on a dataset of meta-batches
(``sampler.tf_dataset(batch_size=...)``). Keras gives each replica a slice
of the meta-batch's tasks, and the optimiser sums the replicas' gradients
(an all-reduce) before one update of the mirrored variables. The learners'
``train_step`` use the helpers below so that this sum is the meta-gradient
of the whole meta-batch, the same as on one device:

- :func:`replica_share` scales a replica's mean over its own tasks by
  ``local tasks / all tasks``, so the sum over replicas is the mean over all
  tasks (also when the tasks do not split evenly);
- :func:`clip_by_global_norm` clips the whole meta-batch's gradient, not a
  replica's share of it;
- :func:`gather_tasks` collects per-task tensors of every replica (for
  combiners that weigh tasks against each other, such as gradient agreement,
  and for objectives of the whole meta-batch, such as TAML's).

:func:`strategy` picks ``MirroredStrategy`` over the visible GPUs when
there are several, and the default (one-device) strategy otherwise;
:func:`bookcode.notebook.setup` installs it in the ``full`` profile.
"""

from __future__ import annotations

import tensorflow as tf


def replica_count() -> int:
    """Replicas training in sync here: 1 outside a distributed ``fit()``."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def replica_share(local_tasks):
    """``local_tasks / all tasks`` of this replica's meta-batch slice (1.0 on
    one device), as a float32 tensor. A replica's mean over its own tasks
    times this share, summed over the replicas by the optimiser, is the mean
    over every task of the meta-batch."""
    local = tf.cast(local_tasks, tf.float32)
    if replica_count() == 1:
        return tf.ones_like(local)
    total = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, local)
    return local / total


def scale(tensors, factor):
    """Every tensor of a list times ``factor`` (cast to its dtype); ``None`` stays."""
    return [None if t is None else t * tf.cast(factor, t.dtype) for t in tensors]


def clip_by_global_norm(gradients, clip_norm):
    """``tf.clip_by_global_norm`` of the meta-batch's gradient, given this
    replica's share of it (as scaled by :func:`replica_share`). On several
    replicas the shares are summed first, so the norm is the whole gradient's,
    and each replica returns ``1 / replicas`` of the clipped sum for the
    optimiser to add up again."""
    replicas = replica_count()
    if replicas == 1:
        return tf.clip_by_global_norm(gradients, clip_norm)[0]
    context = tf.distribute.get_replica_context()
    summed = context.all_reduce(tf.distribute.ReduceOp.SUM, list(gradients))
    clipped, _ = tf.clip_by_global_norm(summed, clip_norm)
    return scale(clipped, 1.0 / replicas)


def gather_tasks(values):
    """A nest of per-task tensors (leading task axis) with the tasks of every
    replica, in replica order (the order of the undistributed meta-batch).
    On one device, the values themselves. Gradients flow back to each
    replica's own tasks."""
    if replica_count() == 1:
        return values
    context = tf.distribute.get_replica_context()
    return tf.nest.map_structure(lambda v: context.all_gather(v, axis=0), values)


def strategy(devices=None):
    """``MirroredStrategy`` over ``devices`` (default: every visible GPU) when
    there are at least two, else the current (default, one-device) strategy."""
    if devices is None:
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    if len(devices) < 2:
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(devices)
