"""Gradient-based meta-learners on the :func:`~bookcode.meta.adapt` engine.

:class:`GradientMetaLearner` holds the machinery; an algorithm is a few
overrides: :meth:`~GradientMetaLearner.meta_variables` (what the outer loop
trains), :meth:`~GradientMetaLearner.initial_fast_weights`,
:meth:`~GradientMetaLearner.fast_forward`,
:meth:`~GradientMetaLearner.update_rule` (e.g. ``SGD(rates)`` for Meta-SGD),
:meth:`~GradientMetaLearner.inner_loss` (e.g. a new minibatch per step for
Reptile), :meth:`~GradientMetaLearner.task_objective` and
:meth:`~GradientMetaLearner.batch_objective` (e.g. TAML's inequality over the
tasks' losses).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from .. import distribute
from . import batched
from .combiners import mean_gradients
from .inner_loop import adapt, connect_gradients, forward
from .objectives import (
    CLASSIFICATION,
    REGRESSION,
    fgsm,
    metric_name,
    task_loss,
    task_metric,
)
from .update_rules import SGD

TASK_BATCHINGS = ("auto", "map", "batched")


def _check_steps(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_second_order_support(model, first_order):
    """TensorFlow's fused batch-norm kernel gives wrong second derivatives
    (measured: relative errors up to 0.8 against Keras batch norm on the same
    weights, while first-order gradients agree to 1e-5), so it is refused for
    second-order meta-learning."""
    from ..nets import FusedBatchNormalization

    fused = any(isinstance(layer, FusedBatchNormalization) for layer in model._flatten_layers())
    if fused and not first_order:
        raise ValueError(
            "second-order meta-gradients through FusedBatchNormalization are wrong in "
            "TensorFlow; build the model with conv4(fused_batch_norm=False) or use "
            "first_order=True"
        )


class AdaptedModel:
    """A learner adapted to one task's support set (learn2learn's
    ``clone()``/``adapt()`` idea): ``adapted(x)`` gives the outputs (logits
    or predictions) for ``x``; ``weights`` are the fast tensors. The
    learner's variables are untouched."""

    def __init__(self, learner, meta_weights, weights):
        self.learner, self.meta_weights, self.weights = learner, meta_weights, weights

    def __call__(self, x):
        (x,) = self.learner._inputs(x)
        outputs = self.learner._compiled("outputs", self.learner._outputs_graph)
        return outputs(self.meta_weights, self.weights, x).numpy()


@keras.saving.register_keras_serializable(package="bookcode")
class GradientMetaLearner(keras.Model):
    """Base of the gradient-based learners: adapts ``model`` to a task with
    :func:`~bookcode.meta.adapt` and meta-trains it with ``fit()`` on
    meta-batches ``((support_x, support_y, query_x), query_y)`` with a
    leading task axis.

    ``train_step`` maps :meth:`task_objective` over the tasks of a
    meta-batch in one compiled graph (``tf.map_fn``, ``parallel_tasks`` tasks
    in flight), or, with ``task_batching="batched"``, runs them as one
    batched computation (:mod:`bookcode.meta.batched`: MAML and Meta-SGD on
    Conv-4 or dense models; ``"auto"``, the default, batches on a GPU and maps
    on a CPU; ``"map"`` always maps), takes one meta-gradient per task and
    merges them with ``combiner`` (default: their mean; see
    :mod:`bookcode.meta.combiners`).
    A subclass that overrides :meth:`batch_objective` is instead
    differentiated through that objective of the whole meta-batch. Every
    key of the task objective's dict is logged (mean over tasks). Under a
    ``tf.distribute`` strategy (build and compile in ``strategy.scope()``)
    each replica maps its slice of the tasks, and the update is the one of the
    whole meta-batch on one device (:mod:`bookcode.distribute`).

    ``inner_lr`` can be changed at any time (it is a variable read by the
    compiled functions). Test-time adaptation (``predict_episode``,
    :meth:`adapt`, ``fit``'s validation) is first order with
    ``test_inner_steps`` steps, as one graph loop.

    A new algorithm is a few overrides. Meta-SGD (Li et al. 2017), for one:
    add one rate variable per model weight, return them with the model's
    weights from ``meta_variables``, start the fast weights from the first
    part (``initial_fast_weights``) and return ``SGD(meta_weights[n:])``
    from ``update_rule`` (:class:`~bookcode.meta.MetaSGD`). Reptile (Nichol
    et al. 2018) adapts on a new support minibatch per ``step`` with
    ``Adam`` and returns ``theta - phi`` from :meth:`task_update` instead of
    a gradient (:class:`~bookcode.meta.Reptile`). Variables the objective legitimately does not
    use are listed in ``unused_variables``; any other variable that no
    gradient reaches is an error, never a silent zero.
    """

    def __init__(
        self,
        model: keras.Model,
        inner_lr=0.4,
        inner_steps: int = 1,
        first_order: bool = False,
        test_inner_steps: int | None = None,
        kind: str = CLASSIFICATION,
        parallel_tasks: int = 4,
        combiner=None,
        task_batching: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not model.built:
            raise ValueError("build the model first (give it an Input or call it once)")
        if kind not in (CLASSIFICATION, REGRESSION):
            raise ValueError(f"kind must be {CLASSIFICATION!r} or {REGRESSION!r}, got {kind!r}")
        if combiner is not None and not callable(combiner):
            raise ValueError(f"combiner must be callable or None, got {combiner!r}")
        self.model = model
        _check_second_order_support(model, first_order)
        self._inner_lr = self.add_weight(
            shape=(), initializer="zeros", dtype="float64", trainable=False, name="inner_lr"
        )
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.test_inner_steps = self.inner_steps if test_inner_steps is None else test_inner_steps
        self._first_order = bool(first_order)
        self.kind = kind
        self.parallel_tasks = int(parallel_tasks)
        self.combiner = combiner
        if task_batching not in TASK_BATCHINGS:
            raise ValueError(
                f"task_batching must be one of {TASK_BATCHINGS}, got {task_batching!r}"
            )
        if task_batching == "batched":
            batched.check_learner(self)
        self.task_batching = task_batching
        # metric trackers and compiled functions, kept out of Keras's tracking (not saved)
        object.__setattr__(self, "_trackers", {})
        object.__setattr__(self, "_functions", {})
        for key in ("loss", metric_name(kind)):
            self._metric(key)
        self.built = True

    # -- settings ---------------------------------------------------------------

    @property
    def inner_lr(self) -> float:
        """The inner-loop learning rate; changing it takes effect at once
        (training and prediction read it from a variable)."""
        return self._inner_lr_value

    @inner_lr.setter
    def inner_lr(self, value):
        if np.ndim(value) != 0 or not float(value) > 0:
            raise ValueError(f"inner_lr must be a positive number, got {value!r}")
        self._inner_lr_value = float(value)
        self._inner_lr.assign(float(value))

    @property
    def inner_steps(self) -> int:
        """Inner steps in meta-training; changing it retraces the training step."""
        return self._inner_steps

    @inner_steps.setter
    def inner_steps(self, value: int):
        self._inner_steps = _check_steps(value, "inner_steps")
        self.train_function = None

    @property
    def test_inner_steps(self) -> int:
        """Inner steps at test time (prediction, validation)."""
        return self._test_inner_steps

    @test_inner_steps.setter
    def test_inner_steps(self, value: int):
        self._test_inner_steps = _check_steps(value, "test_inner_steps")
        self.test_function = None

    @property
    def first_order(self) -> bool:
        """Whether meta-gradients stop at the inner gradients. Changing it
        makes the next ``fit()`` retrace its training step."""
        return self._first_order

    @first_order.setter
    def first_order(self, value: bool):
        _check_second_order_support(self.model, value)
        self._first_order = bool(value)
        self.train_function = None

    # -- what subclasses change ---------------------------------------------

    @property
    def meta_variables(self) -> list:
        """The variables the outer loop trains (default: the model's)."""
        return list(self.model.trainable_variables)

    @property
    def unused_variables(self) -> list:
        """Meta-variables (or model variables adapted in the inner loop) that
        the objective does not use: they get zero gradients. Any other
        variable no gradient reaches is an error."""
        return []

    @property
    def fast_weight_names(self) -> list:
        """Names of the fast weights, for error messages (default: the
        model's trainable variables, which MAML adapts)."""
        return [v.path for v in self.model.trainable_variables]

    @property
    def objective_keys(self) -> tuple:
        """The keys of :meth:`task_objective`'s dict: ``loss`` and the metric."""
        return ("loss", metric_name(self.kind))

    def initial_fast_weights(self, meta_weights):
        """The tensors adaptation starts from, given the meta-variables' values."""
        return list(meta_weights)

    def fast_forward(self, meta_weights, fast_weights, x):
        """Outputs for ``x`` with adapted ``fast_weights``."""
        return forward(self.model, fast_weights, x)

    def update_rule(self, meta_weights):
        """The inner loop's update rule given the meta-variables' values
        (default: ``SGD(inner_lr)``; Meta-SGD returns ``SGD(rates)``)."""
        return SGD(self._inner_lr)

    def inner_loss(self, meta_weights, support_x, support_y):
        """``loss_fn(fast_weights, step)`` of the inner loop: the task loss on
        the whole support set at every step."""

        def loss_fn(fast, step):
            return task_loss(self.kind, support_y, self.fast_forward(meta_weights, fast, support_x))

        return loss_fn

    def query_results(self, query_y, outputs) -> dict:
        """``{"loss": ..., metric: ...}`` of outputs against targets."""
        return {
            "loss": task_loss(self.kind, query_y, outputs),
            metric_name(self.kind): task_metric(self.kind, query_y, outputs),
        }

    def adapt_task(
        self, meta_weights, support_x, support_y, steps, first_order, track=None, inner_loss=None
    ):
        """Adapt to one task's support set; ``track=(x, y)`` records the loss
        and metric on ``(x, y)`` after each step; ``inner_loss`` replaces
        :meth:`inner_loss`'s ``loss_fn(fast_weights, step)`` (e.g. Reptile's
        minibatches). Returns ``(fast_weights, history)``."""
        metric_fn = None
        if track is not None:

            def metric_fn(fast):
                outputs = self.fast_forward(meta_weights, fast, track[0])
                return tf.stack(list(self.query_results(track[1], outputs).values()))

        names = self.fast_weight_names
        unused = {v.path for v in self.unused_variables}
        return adapt(
            self.inner_loss(meta_weights, support_x, support_y)
            if inner_loss is None
            else inner_loss,
            self.initial_fast_weights(meta_weights),
            steps,
            self.update_rule(meta_weights),
            first_order=first_order,
            metric_fn=metric_fn,
            names=names,
            unused=[i for i, n in enumerate(names) if n in unused],
        )

    def task_objective(self, meta_weights, support_x, support_y, query_x, query_y) -> dict:
        """Meta-objective of one task: ``{"loss": scalar, ...metrics}``. By
        default the query loss and metric after adapting on the support set
        (Finn et al. 2017)."""
        fast, _ = self.adapt_task(
            meta_weights, support_x, support_y, self.inner_steps, self.first_order
        )
        return self.query_results(query_y, self.fast_forward(meta_weights, fast, query_x))

    def batch_objective(self, task_results: dict):
        """Override to meta-train on an objective of the whole meta-batch,
        given each key of :meth:`task_objective` with a leading task axis
        (e.g. TAML's inequality of the tasks' losses). Not overridden: each
        task is differentiated alone and the gradients are combined."""
        raise NotImplementedError

    def combine_gradients(self, task_grads, inner_updates=None):
        """One gradient per meta-variable from the per-task ones (leading
        task axis), by ``combiner`` (default: the mean); a combiner that
        weighs tasks by their inner updates also gets ``inner_updates``."""
        if self._combiner_uses_inner_updates():
            return self.combiner(task_grads, inner_updates)
        return (self.combiner or mean_gradients)(task_grads)

    def _combiner_uses_inner_updates(self):
        return bool(getattr(self.combiner, "uses_inner_updates", False))

    task_update_is_inner_update = False
    """True when :meth:`task_update` already returns ``theta - theta'`` (Reptile)."""

    def inner_update(self, meta_weights, task):
        """``theta - theta'``: the initial minus the adapted fast weights after
        ``inner_steps`` steps on the task's support set, one tensor per fast
        weight, a constant for differentiation. Gradient agreement weighs
        MAML's tasks by it (Eshratifar, Eigen & Pedram 2018, algorithm 1)."""
        meta_weights = [tf.stop_gradient(w) for w in meta_weights]
        fast, _ = self.adapt_task(meta_weights, task[0], task[1], self.inner_steps, True)
        initial = self.initial_fast_weights(meta_weights)
        return [tf.stop_gradient(w - f) for w, f in zip(initial, fast)]

    # -- training ---------------------------------------------------------------

    def _batches_tasks(self):
        """Whether the meta-batch's tasks run as one batched computation:
        ``task_batching="batched"``, or ``"auto"`` on a GPU when the learner
        and its model allow it."""
        if self.task_batching != "auto":
            return self.task_batching == "batched"
        if not tf.config.list_physical_devices("GPU"):
            return False
        try:
            batched.check_learner(self)
        except (TypeError, ValueError):
            return False
        return True

    def _has_batch_objective(self):
        return type(self).batch_objective is not GradientMetaLearner.batch_objective

    def _task_results(self, meta_weights, task):
        return self._checked_results(
            self.task_objective(meta_weights, *task), meta_weights[0].dtype
        )

    def _checked_results(self, results, dtype):
        keys = self.objective_keys
        if not isinstance(results, dict) or set(results) != set(keys):
            raise ValueError(
                f"task_objective must return a dict with keys {list(keys)} (objective_keys), "
                f"got {list(results) if isinstance(results, dict) else type(results)}"
            )
        return {k: tf.cast(results[k], dtype) for k in keys}

    def _map_tasks(self, fn, tasks, signature):
        return tf.map_fn(
            fn, tasks, fn_output_signature=signature, parallel_iterations=self.parallel_tasks
        )

    def _results_signature(self, dtype):
        return {k: tf.TensorSpec((), dtype) for k in self.objective_keys}

    def task_gradients(self, support_x, support_y, query_x, query_y, inner_updates=False):
        """Per-task results (dict of (tasks,) tensors) and meta-gradients (one
        tensor per meta-variable with a leading task axis), each from
        :meth:`task_update`, or all at once (:mod:`bookcode.meta.batched`) when
        tasks are batched. ``inner_updates=True`` adds a third value, each
        task's :meth:`inner_update` (leading task axis)."""
        if self._batches_tasks():
            return batched.task_gradients(
                self, support_x, support_y, query_x, query_y, inner_updates=inner_updates
            )
        variables = self.meta_variables
        meta_weights = [v.value for v in variables]

        def one_task(task):
            weights = [tf.identity(w) for w in meta_weights]
            results, update = self.task_update(weights, task)
            if not inner_updates:
                return results, update
            if self.task_update_is_inner_update:
                return results, update, update
            return results, update, self.inner_update(weights, task)

        def specs(weights):
            return [tf.TensorSpec(w.shape, w.dtype) for w in weights]

        signature = (self._results_signature(meta_weights[0].dtype), specs(meta_weights))
        if inner_updates:
            signature += (specs(self.initial_fast_weights(meta_weights)),)
        return self._map_tasks(one_task, (support_x, support_y, query_x, query_y), signature)

    def task_update(self, meta_weights, task):
        """One task's ``(results, update)``: the dict of :meth:`task_objective`
        and one tensor per meta-variable that the combiner merges over tasks
        and the meta-optimiser applies like a gradient. By default the gradient
        of the task's meta-loss; Reptile (Nichol et al. 2018) returns
        ``theta - phi`` (initial minus adapted weights) instead. ``task`` is
        ``(support_x, support_y, query_x, query_y)`` of one task."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(meta_weights)
            results = self._task_results(meta_weights, task)
        grads = tape.gradient(
            results["loss"], meta_weights, unconnected_gradients=tf.UnconnectedGradients.NONE
        )
        return results, self._check_meta_gradients(grads, meta_weights, self.meta_variables)

    def _check_meta_gradients(self, grads, weights, variables):
        unused = {v.path for v in self.unused_variables}
        return connect_gradients(
            grads,
            weights,
            [v.path for v in variables],
            [i for i, v in enumerate(variables) if v.path in unused],
            "the meta-objective",
        )

    def batch_gradients(self, support_x, support_y, query_x, query_y):
        """Per-task results, :meth:`batch_objective` and its gradient (one
        tensor per meta-variable), all tasks under one tape."""
        variables = self.meta_variables
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            weights = [tf.convert_to_tensor(v) for v in variables]
            tape.watch(weights)
            results = self._map_tasks(
                lambda task: self._task_results(weights, task),
                (support_x, support_y, query_x, query_y),
                self._results_signature(weights[0].dtype),
            )
            # under tf.distribute: the objective of every replica's tasks, computed on
            # each replica; all_gather's gradient sums the replicas' copies, hence / replicas
            results = distribute.gather_tasks(results)
            objective = self.batch_objective(results)
            share = objective / distribute.replica_count()
        grads = tape.gradient(share, weights, unconnected_gradients=tf.UnconnectedGradients.NONE)
        return results, objective, self._check_meta_gradients(grads, weights, variables)

    def _replicated_combination(self, task_grads, local_tasks, inner_updates=None):
        """``(gradient, task_grads, inner_updates)`` such that the optimiser's
        sum over the replicas of a ``tf.distribute`` strategy gives the
        combined gradient of the whole meta-batch (on one device: just
        :meth:`combine_gradients`). The mean takes each replica's share of it;
        any other combiner sees every replica's tasks
        (:func:`bookcode.distribute.gather_tasks`)."""
        replicas = distribute.replica_count()
        if replicas == 1:
            return self.combine_gradients(task_grads, inner_updates), task_grads, inner_updates
        plain_mean = self.combiner is None and (
            type(self).combine_gradients is GradientMetaLearner.combine_gradients
        )
        if plain_mean:
            share = distribute.replica_share(local_tasks)
            combined = distribute.scale(self.combine_gradients(task_grads), share)
            return combined, task_grads, inner_updates
        task_grads = distribute.gather_tasks(task_grads)
        if inner_updates is not None:
            inner_updates = distribute.gather_tasks(inner_updates)
        combined = self.combine_gradients(task_grads, inner_updates)
        return distribute.scale(combined, 1.0 / replicas), task_grads, inner_updates

    def train_step(self, data):
        (support_x, support_y, query_x), query_y, _ = keras.utils.unpack_x_y_sample_weight(data)
        logs, per_batch = {}, {}
        if self._has_batch_objective():
            results, objective, grads = self.batch_gradients(support_x, support_y, query_x, query_y)
            logs["batch_objective"] = objective
        else:
            uses_inner = self._combiner_uses_inner_updates()
            results, task_grads, *inner = self.task_gradients(
                support_x, support_y, query_x, query_y, inner_updates=uses_inner
            )
            grads, task_grads, inner = self._replicated_combination(
                task_grads, tf.shape(support_y)[0], inner[0] if inner else None
            )
            # a combiner's batch_logs (e.g. gradient-agreement weights) are returned
            # as they are, one value per meta-batch, for callbacks to read
            if hasattr(self.combiner, "batch_logs"):
                args = (task_grads, inner) if uses_inner else (task_grads,)
                per_batch = dict(self.combiner.batch_logs(*args))
        self.optimizer.apply(grads, self.meta_variables)
        logs = self._log({**{k: tf.reduce_mean(v) for k, v in results.items()}, **logs})
        return {**logs, **per_batch}

    def evaluation_results(self, meta_weights, support_x, support_y, query_x, query_y):
        """Loss and metric on the queries after first-order adaptation with
        ``test_inner_steps`` steps (``fit``'s validation, ``evaluate``)."""
        fast, _ = self.adapt_task(meta_weights, support_x, support_y, self.test_inner_steps, True)
        return self.query_results(query_y, self.fast_forward(meta_weights, fast, query_x))

    def test_step(self, data):
        (support_x, support_y, query_x), query_y, _ = keras.utils.unpack_x_y_sample_weight(data)
        meta_weights = [v.value for v in self.meta_variables]
        dtype = meta_weights[0].dtype
        results = self._map_tasks(
            lambda task: {
                k: tf.cast(v, dtype)
                for k, v in self.evaluation_results(meta_weights, *task).items()
            },
            (support_x, support_y, query_x, query_y),
            {k: tf.TensorSpec((), dtype) for k in ("loss", metric_name(self.kind))},
        )
        return self._log({k: tf.reduce_mean(v) for k, v in results.items()})

    def _metric(self, key):
        if key not in self._trackers:
            with tf.init_scope():  # created eagerly even when first met while tracing
                self._trackers[key] = keras.metrics.Mean(name=key)
        return self._trackers[key]

    def _log(self, values: dict):
        for key, value in values.items():
            self._metric(key).update_state(value)
        return {key: self._trackers[key].result() for key in values}

    @property
    def metrics(self):
        return list(self._trackers.values())

    def compile(self, optimizer="adam", loss=None, metrics=None, weighted_metrics=None, **kwargs):
        """Like ``keras.Model.compile`` with only the meta-optimiser (default
        Adam): the learner computes its own loss and logs its own metrics
        (the keys of :meth:`task_objective`)."""
        if loss is not None or metrics or weighted_metrics:
            raise ValueError(
                f"{type(self).__name__} computes its own loss and logs its own metrics "
                f"({', '.join(self.objective_keys)}); compile() takes only the meta-optimiser"
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        """Recompile after ``keras.models.load_model`` (optimizer state included)."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        self.optimizer.build(self.meta_variables)

    def call(self, x, training=False):
        """The meta-learned model before adaptation."""
        return self.model(x, training=training)

    # -- prediction -------------------------------------------------------------

    def _inputs(self, *arrays):
        dtype = self.meta_variables[0].dtype
        converted = []
        for a in arrays:
            a = tf.convert_to_tensor(a)
            converted.append(a if a.dtype.is_integer else tf.cast(a, dtype))
        return converted

    def _compiled(self, name, fn):
        """One ``tf.function`` per kind of call, made once (the inner rate is
        a variable and the number of steps a tensor, so neither retraces)."""
        if name not in self._functions:
            self._functions[name] = tf.function(fn, reduce_retracing=True)
        return self._functions[name]

    def _adapt_graph(self, meta_weights, sx, sy, steps):
        fast, _ = self.adapt_task(meta_weights, sx, sy, steps, True)
        return fast

    def _outputs_graph(self, meta_weights, fast, x):
        return self.fast_forward(meta_weights, fast, x)

    def _meta_weights(self):
        return [tf.convert_to_tensor(v) for v in self.meta_variables]

    def adapt(self, support_x, support_y, steps: int | None = None) -> AdaptedModel:
        """Adapt to a support set with ``steps`` first-order steps (default
        ``test_inner_steps``): an :class:`AdaptedModel`, callable on inputs."""
        steps = _check_steps(self.test_inner_steps if steps is None else steps, "steps")
        sx, sy = self._inputs(support_x, support_y)
        meta_weights = self._meta_weights()
        fast = self._compiled("adapt", self._adapt_graph)(
            meta_weights, sx, sy, tf.constant(steps, tf.int32)
        )
        return AdaptedModel(self, meta_weights, fast)

    def predict_episode(self, support_x, support_y, query_x, steps: int | None = None):
        """Adapt on the support set with ``steps`` (default ``test_inner_steps``)
        and return the outputs for the queries: logits (num_query, ways) for
        classification, predictions (num_query, ...) for regression."""
        return self.adapt(support_x, support_y, steps)(query_x)

    def adaptation_curve(self, support_x, support_y, query_x, query_y, steps: int | None = None):
        """Query loss and metric (accuracy or MSE) before and after each of
        ``steps`` inner steps on one task: an array of shape (steps + 1, 2)."""
        steps = _check_steps(self.test_inner_steps if steps is None else steps, "steps")

        def curve(meta_weights, sx, sy, qx, qy, steps):
            _, history = self.adapt_task(meta_weights, sx, sy, steps, True, track=(qx, qy))
            return history

        sx, sy, qx, qy = self._inputs(support_x, support_y, query_x, query_y)
        fn = self._compiled("curve", curve)
        return fn(self._meta_weights(), sx, sy, qx, qy, tf.constant(steps, tf.int32)).numpy()

    # -- saving -----------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(
            model=keras.saving.serialize_keras_object(self.model),
            inner_lr=self.inner_lr,
            inner_steps=self.inner_steps,
            first_order=self.first_order,
            test_inner_steps=self.test_inner_steps,
            kind=self.kind,
            parallel_tasks=self.parallel_tasks,
            task_batching=self.task_batching,
            combiner=None
            if self.combiner is None
            else keras.saving.serialize_keras_object(self.combiner),
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        if config.get("combiner") is not None:
            config["combiner"] = keras.saving.deserialize_keras_object(config["combiner"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="bookcode")
class MAML(GradientMetaLearner):
    """Model-Agnostic Meta-Learning (Finn, Abbeel & Levine 2017).

    Learns initial weights of ``model`` from which ``inner_steps`` gradient
    steps of rate ``inner_lr`` on a task's support set give low loss on its
    query set; the meta-gradient goes through the inner steps (second order)
    unless ``first_order=True``. ``kind`` is ``"classification"`` (integer
    labels, logits) or ``"regression"`` (mean squared error).

    >>> maml = MAML(bookcode.nets.conv4(num_classes=5), inner_lr=0.4, inner_steps=1)
    >>> maml.compile(keras.optimizers.Adam(1e-3))
    >>> maml.fit(sampler.tf_dataset(batch_size=32), steps_per_epoch=100)
    """


@keras.saving.register_keras_serializable(package="bookcode")
class ADML(GradientMetaLearner):
    """Adversarial Meta-Learning (Yin et al. 2018).

    Each task has two branches: adapt on the clean support set and evaluate on
    adversarial queries, and adapt on adversarial support examples and
    evaluate on the clean queries; the meta-loss is their sum. Adversarial
    examples come from FGSM with step ``epsilon`` against the weights in use
    (the initial weights for the support set, the adapted fast weights for the
    queries), computed from the gradient with respect to the input pixels,
    and clipped to ``clip_range``.
    """

    def __init__(self, model, epsilon: float = 0.1, clip_range=(0.0, 1.0), **kwargs):
        if not epsilon > 0:
            raise ValueError(f"epsilon must be positive, got {epsilon!r}")
        super().__init__(model, **kwargs)
        self.epsilon = float(epsilon)
        self.clip_range = None if clip_range is None else tuple(float(c) for c in clip_range)

    def adversarial(self, meta_weights, fast_weights, x, y):
        """FGSM examples for ``(x, y)`` against ``fast_weights``."""

        def loss_of_input(inputs):
            return task_loss(self.kind, y, self.fast_forward(meta_weights, fast_weights, inputs))

        return fgsm(loss_of_input, x, self.epsilon, self.clip_range)

    def task_objective(self, meta_weights, support_x, support_y, query_x, query_y):
        frozen = [tf.stop_gradient(w) for w in self.initial_fast_weights(meta_weights)]
        # Branch 1: clean support -> adversarial queries.
        fast_clean, _ = self.adapt_task(
            meta_weights, support_x, support_y, self.inner_steps, self.first_order
        )
        adv_query = self.adversarial(
            meta_weights, [tf.stop_gradient(w) for w in fast_clean], query_x, query_y
        )
        out_adv = self.fast_forward(meta_weights, fast_clean, adv_query)
        # Branch 2: adversarial support -> clean queries.
        adv_support = self.adversarial(meta_weights, frozen, support_x, support_y)
        fast_adv, _ = self.adapt_task(
            meta_weights, adv_support, support_y, self.inner_steps, self.first_order
        )
        clean = self.query_results(query_y, self.fast_forward(meta_weights, fast_adv, query_x))
        clean["loss"] += task_loss(self.kind, query_y, out_adv)
        return clean

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "clip_range": self.clip_range}


def adversarial_queries(
    learner, support_x, support_y, query_x, query_y, epsilon, clip_range=(0.0, 1.0), steps=None
):
    """White-box FGSM queries against ``learner`` after it adapted to the
    support set (``steps`` inner steps, default its ``test_inner_steps``):
    the attack a model meets at test time. Returns perturbed ``query_x``."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon!r}")
    steps = _check_steps(learner.test_inner_steps if steps is None else steps, "steps")

    def attack(meta_weights, sx, sy, qx, qy, epsilon, steps, clip_range):
        fast, _ = learner.adapt_task(meta_weights, sx, sy, steps, True)

        def loss_of_input(inputs):
            return task_loss(learner.kind, qy, learner.fast_forward(meta_weights, fast, inputs))

        return fgsm(loss_of_input, qx, epsilon, clip_range)

    sx, sy, qx, qy = learner._inputs(support_x, support_y, query_x, query_y)
    clip = None if clip_range is None else tuple(float(c) for c in clip_range)
    eps = tf.constant(float(epsilon), sx.dtype)
    fn = learner._compiled("attack", attack)
    return fn(
        learner._meta_weights(), sx, sy, qx, qy, eps, tf.constant(steps, tf.int32), clip
    ).numpy()


@keras.saving.register_keras_serializable(package="bookcode")
class CAML(GradientMetaLearner):
    """Context adaptation (Zintgraf et al. 2019, CAVIA; the book's CAML).

    ``model`` takes inputs whose last axis is the task input followed by
    ``context_dim`` context parameters. The inner loop adapts only the
    context vector, starting from zero for every task; the outer loop trains
    the shared weights of ``model`` (through the inner step, second order
    unless ``first_order=True``).
    """

    def __init__(self, model, context_dim: int = 4, inner_lr=1.0, **kwargs):
        if not isinstance(context_dim, (int, np.integer)) or context_dim < 1:
            raise ValueError(f"context_dim must be a positive integer, got {context_dim!r}")
        super().__init__(model, inner_lr=inner_lr, **kwargs)
        self.context_dim = int(context_dim)

    @property
    def fast_weight_names(self):
        return ["context"]

    def initial_fast_weights(self, meta_weights):
        return [tf.zeros((self.context_dim,), meta_weights[0].dtype)]

    def fast_forward(self, meta_weights, fast_weights, x):
        (context,) = fast_weights
        x = tf.cast(x, context.dtype)
        tiled = tf.broadcast_to(context, tf.concat([tf.shape(x)[:-1], [self.context_dim]], 0))
        return forward(self.model, meta_weights, tf.concat([x, tiled], axis=-1))

    def get_config(self):
        return {**super().get_config(), "context_dim": self.context_dim}
