"""Per-task gradient combiners: ``combiner(task_grads) -> grads``.

``task_grads`` holds one tensor per meta-variable with a leading task axis;
the result is one tensor per meta-variable, which the meta-optimiser
applies. A combiner passed to a learner must serialise: a function
registered with ``keras.saving.register_keras_serializable`` or a registered
class with ``get_config``.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="bookcode")
def mean_gradients(task_grads):
    """The mean over tasks (MAML, Finn et al. 2017): the default."""
    return [tf.reduce_mean(g, axis=0) for g in task_grads]
