"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning
Algorithms")."""

from __future__ import annotations

import keras
import tensorflow as tf

from . import batched
from .inner_loop import forward_with_statistics
from .learners import AdaptedModel, GradientMetaLearner, _check_steps
from .objectives import task_loss
from .update_rules import SGD, Adam

INNER_OPTIMIZERS = ("adam", "sgd")


class _SupportAdaptedModel(AdaptedModel):
    """An adapted Reptile model that normalises inputs with the support set's
    batch statistics (non-transductive)."""

    def __init__(self, learner, meta_weights, weights, support_x):
        super().__init__(learner, meta_weights, weights)
        self.support_x = support_x

    def __call__(self, x):
        (x,) = self.learner._inputs(x)
        fn = self.learner._compiled("outputs_by_support", self.learner._support_outputs)
        return fn(self.meta_weights, self.weights, self.support_x, x).numpy()


@keras.saving.register_keras_serializable(package="bookcode")
class Reptile(GradientMetaLearner):
    """Reptile (Nichol et al. 2018): for each task of a meta-batch, start from
    ``theta`` and take ``inner_steps`` steps of Adam with ``beta_1 = 0``
    (``inner_optimizer="adam"``, fresh state per task) or of SGD on
    minibatches of ``inner_batch`` support examples (drawn without
    replacement, reshuffled every pass; ``None``: the whole support set),
    ending at ``phi``; the task's update is ``theta - phi``, which the
    ``combiner`` merges over tasks (default: the mean), and the
    meta-optimiser applies like a gradient. With
    ``keras.optimizers.SGD(epsilon)`` that is
    ``theta <- theta + epsilon * (mean(phi) - theta)``;
    :meth:`annealed_sgd` anneals ``epsilon`` linearly as the paper does.

    Nothing is differentiated through the inner loop. The query set of a
    training task is only used to log the loss and metric after adaptation.
    At test time (``predict_episode``, ``evaluate``) the inner loop runs
    ``test_inner_steps`` steps on the whole support set. ``transductive``:
    batch normalisation of the queries uses the statistics of the query batch
    (``True``, like MAML's evaluation) or those of the support set, each query
    independent of the others (``False``, the paper's main numbers).

    ``task_batching="batched"`` runs the inner loops of a meta-batch's tasks
    as one computation (:func:`bookcode.meta.batched.reptile_updates`; Conv-4
    or dense models): the same updates up to float rounding, several times
    fewer operations per meta-step, which on a CPU is what the small
    networks of few-shot learning spend their time on.

    >>> reptile = Reptile(conv4(num_classes=5), inner_lr=1e-3, inner_steps=5, inner_batch=10)
    >>> reptile.compile(Reptile.annealed_sgd(1.0, 0.0, iterations=10000))
    >>> reptile.fit(sampler.tf_dataset(batch_size=5), steps_per_epoch=10000)
    """

    batched_overrides = ("task_update",)  # task_batching="batched": batched.reptile_updates

    def __init__(
        self,
        model,
        inner_lr=1e-3,
        inner_steps: int = 5,
        inner_batch: int | None = None,
        inner_optimizer: str = "adam",
        transductive: bool = True,
        first_order: bool = True,
        **kwargs,
    ):
        if not first_order:
            raise ValueError(
                "Reptile is first order by construction (it never differentiates through "
                "the inner loop); leave first_order=True"
            )
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(
                f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}"
            )
        if inner_batch is not None and _check_steps(inner_batch, "inner_batch") < 1:
            raise ValueError(f"inner_batch must be a positive integer or None, got {inner_batch}")
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=True,
                         **kwargs)  # fmt: skip
        self.inner_batch = None if inner_batch is None else int(inner_batch)
        self.inner_optimizer = inner_optimizer
        self.transductive = bool(transductive)

    @staticmethod
    def annealed_sgd(start: float = 1.0, end: float = 0.0, iterations: int = 100000):
        """``keras.optimizers.SGD`` whose step size goes linearly from ``start``
        to ``end`` over ``iterations`` meta-steps (Reptile's outer step
        ``epsilon``, annealed as in Nichol et al. 2018), then stays at ``end``."""
        if _check_steps(iterations, "iterations") < 1:
            raise ValueError("iterations must be positive")
        schedule = keras.optimizers.schedules.PolynomialDecay(
            float(start), int(iterations), end_learning_rate=float(end), power=1.0
        )
        return keras.optimizers.SGD(schedule)

    task_update_is_inner_update = True

    def inner_update(self, meta_weights, task):
        """Reptile's task update ``theta - phi`` (:meth:`task_update`)."""
        return self.task_update(meta_weights, task)[1]

    @property
    def first_order(self) -> bool:
        return True

    @first_order.setter
    def first_order(self, value):
        if not value:
            raise ValueError("Reptile is first order by construction")
        self._first_order = True

    def update_rule(self, meta_weights):
        if self.inner_optimizer == "adam":
            return Adam(self._inner_lr, beta_1=0.0)
        return SGD(self._inner_lr)

    def minibatch_indices(self, count, steps, seed):
        """(steps, batch) indices into a support set of ``count`` examples:
        consecutive random permutations (stateless, from ``seed``) cut into
        minibatches of ``min(inner_batch, count)``, so each pass over the
        support set draws without replacement."""
        count = tf.convert_to_tensor(count, tf.int32)
        batch = tf.minimum(self.inner_batch, count)
        passes = (steps * batch + count - 1) // count
        keys = tf.random.stateless_uniform(tf.stack([passes, count]), seed)
        order = tf.reshape(tf.argsort(keys, axis=-1), [-1])
        return tf.reshape(order[: steps * batch], tf.stack([steps, batch]))

    def minibatch_loss(self, meta_weights, support_x, support_y, steps, seed):
        """``loss_fn(fast, step)`` on minibatches of ``inner_batch`` support
        examples: ``steps * inner_batch`` indices from consecutive random
        permutations of the support set (stateless, from ``seed``)."""
        batches = self.minibatch_indices(tf.shape(support_y)[0], steps, seed)

        def loss_fn(fast, step):
            picked = batches[step]
            x, y = tf.gather(support_x, picked), tf.gather(support_y, picked)
            return task_loss(self.kind, y, self.fast_forward(meta_weights, fast, x))

        return loss_fn

    def minibatch_seed(self):
        """The stateless seed of this meta-step's support minibatches (every
        task of the meta-batch draws the same positions)."""
        return tf.stack([tf.cast(self.optimizer.iterations, tf.int64), tf.constant(7, tf.int64)])

    def task_gradients(self, support_x, support_y, query_x, query_y, inner_updates=False):
        """Per-task results and updates ``theta - phi``: each task by
        :meth:`task_update`, or, with ``task_batching="batched"``, all tasks as
        one computation (:func:`bookcode.meta.batched.reptile_updates`). The
        updates are the inner updates too (``inner_updates=True``)."""
        if not self._batches_tasks():
            return super().task_gradients(
                support_x, support_y, query_x, query_y, inner_updates=inner_updates
            )
        results, updates = batched.reptile_updates(self, support_x, support_y, query_x, query_y)
        return (results, updates, updates) if inner_updates else (results, updates)

    def task_update(self, meta_weights, task):
        """Adapt on the support set; the update is ``theta - phi``. The
        results are the query loss and metric at ``phi``."""
        support_x, support_y, query_x, query_y = task
        loss_fn = None
        if self.inner_batch is not None:
            loss_fn = self.minibatch_loss(
                meta_weights, support_x, support_y, self.inner_steps, self.minibatch_seed()
            )
        fast, _ = self.adapt_task(
            meta_weights, support_x, support_y, self.inner_steps, True, inner_loss=loss_fn
        )
        initial = self.initial_fast_weights(meta_weights)
        updates = [tf.stop_gradient(w - f) for w, f in zip(initial, fast)]
        outputs = self._query_outputs(meta_weights, fast, support_x, query_x)
        dtype = meta_weights[0].dtype
        results = {
            k: tf.cast(tf.stop_gradient(v), dtype)
            for k, v in self.query_results(query_y, outputs).items()
        }
        return results, updates

    # -- prediction: transductive or with the support set's statistics --------

    def _query_outputs(self, meta_weights, fast, support_x, query_x):
        if self.transductive:
            return self.fast_forward(meta_weights, fast, query_x)
        return forward_with_statistics(self.model, fast, support_x, query_x)

    def _support_outputs(self, meta_weights, fast, support_x, x):
        return self._query_outputs(meta_weights, fast, support_x, x)

    def evaluation_results(self, meta_weights, support_x, support_y, query_x, query_y):
        fast, _ = self.adapt_task(meta_weights, support_x, support_y, self.test_inner_steps, True)
        outputs = self._query_outputs(meta_weights, fast, support_x, query_x)
        return self.query_results(query_y, outputs)

    def adapt(self, support_x, support_y, steps: int | None = None) -> AdaptedModel:
        adapted = super().adapt(support_x, support_y, steps)
        if self.transductive:
            return adapted
        (sx,) = self._inputs(support_x)
        return _SupportAdaptedModel(self, adapted.meta_weights, adapted.weights, sx)

    def get_config(self):
        config = super().get_config()
        config.pop("first_order")
        return {
            **config,
            "inner_batch": self.inner_batch,
            "inner_optimizer": self.inner_optimizer,
            "transductive": self.transductive,
        }
