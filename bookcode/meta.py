"""Gradient-based meta-learning on one inner-loop engine (chapters 6-8).

The engine is :func:`adapt`: a few steps of gradient descent on *fast
weights*, plain tensors that stand in for a Keras model's trainable
variables, run through :func:`forward` (``keras.Model.stateless_call``). So
adaptation never changes the model: its variables, batch-norm moving averages
included, stay as they are. Batch normalisation uses the statistics of the
batch it sees (support or query set) and its moving-average updates are
discarded, as in MAML's reference code (Finn et al. 2017), which makes
prediction transductive.

Gradients flow through the inner loop (second order, nested
``tf.GradientTape``) unless ``first_order=True``, which stops them at the
inner gradients. ``inner_lr`` is a scalar or one tensor per parameter (for
Meta-SGD's learned rates).

Learners, all ``keras.Model`` subclasses trained with ``fit()`` on
meta-batches ``((support_x, support_y, query_x), query_y)`` with a leading task
axis, and all with ``predict_episode``:

- :class:`MAML` (Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning
  for Fast Adaptation of Deep Networks"), classification and regression;
- :class:`ADML` (Yin et al. 2018, "Adversarial Meta-Learning"), FGSM
  adversarial support and query sets;
- :class:`CAML` (Zintgraf et al. 2019, "Fast Context Adaptation via
  Meta-Learning", CAVIA): only a context vector is adapted per task.

The tasks of a meta-batch run inside one compiled ``tf.function`` through
``tf.map_fn`` (no Python loop over tasks), each returning its own
meta-gradient, so later learners can reweight per-task gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

CLASSIFICATION, REGRESSION = "classification", "regression"


# --------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------


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


def _rates(inner_lr, params):
    """One learning rate per parameter: broadcast a scalar, or check a list."""
    if isinstance(inner_lr, (list, tuple)):
        if len(inner_lr) != len(params):
            raise ValueError(
                f"inner_lr has {len(inner_lr)} tensors but there are {len(params)} parameters"
            )
        return [tf.cast(r, p.dtype) for r, p in zip(inner_lr, params)]
    return [tf.cast(inner_lr, params[0].dtype)] * len(params) if params else []


def adapt(
    loss_fn: Callable,
    params: Sequence[tf.Tensor],
    inner_lr,
    inner_steps: int,
    first_order: bool = False,
    metric_fn: Callable | None = None,
):
    """Gradient descent on fast weights: ``inner_steps`` updates
    ``params <- params - inner_lr * grad loss_fn(params)``.

    ``loss_fn(params) -> scalar`` is the task's training loss (e.g. on the
    support set). ``inner_lr`` is a scalar or a list of tensors shaped like
    ``params`` (Meta-SGD). Called inside an outer ``tf.GradientTape``, the
    result is differentiable with respect to the initial ``params`` through
    the inner gradients (second order); ``first_order=True`` treats the inner
    gradients as constants (first-order MAML).

    ``metric_fn(params)``, if given, is evaluated (without gradient) before
    the first and after every step, like the ``corrects[update_step + 1]``
    array of the reference MAML code.

    Returns ``(fast_params, history)``: the adapted tensors, and the metric
    history of shape ``(inner_steps + 1, ...)`` (``None`` without
    ``metric_fn``).
    """
    if not isinstance(inner_steps, (int, np.integer)) or inner_steps < 0:
        raise ValueError(f"inner_steps must be a non-negative integer, got {inner_steps!r}")
    params = list(params)
    rates = _rates(inner_lr, params)
    history = []
    for _ in range(inner_steps):
        if metric_fn is not None:
            history.append(tf.stop_gradient(metric_fn(params)))
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(params)
            loss = loss_fn(params)
        grads = tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if first_order:
            grads = [tf.stop_gradient(g) for g in grads]
        params = [p - r * g for p, r, g in zip(params, rates, grads)]
    if metric_fn is not None:
        history.append(tf.stop_gradient(metric_fn(params)))
        return params, tf.stack(history)
    return params, None


def _check_second_order_support(model, first_order):
    """TensorFlow's fused batch-norm kernel gives wrong second derivatives
    (measured: relative errors up to 0.8 against Keras batch norm on the same
    weights, while first-order gradients agree to 1e-5), so it is refused for
    second-order meta-learning."""
    from .nets import FusedBatchNormalization

    fused = any(isinstance(layer, FusedBatchNormalization) for layer in model._flatten_layers())
    if fused and not first_order:
        raise ValueError(
            "second-order meta-gradients through FusedBatchNormalization are wrong in "
            "TensorFlow; build the model with conv4(fused_batch_norm=False) or use "
            "first_order=True"
        )


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


# --------------------------------------------------------------------------
# Learners
# --------------------------------------------------------------------------


class GradientMetaLearner(keras.Model):
    """Base of the gradient-based learners: adapts ``model`` to a task with
    :func:`adapt` and meta-trains the initial weights with ``fit()``.

    Subclasses define :meth:`task_objective` (the meta-loss of one task).
    ``train_step`` maps it over the tasks of a meta-batch in one compiled
    graph (``tf.map_fn`` with ``parallel_tasks`` tasks in flight), collects
    one meta-gradient per task (:meth:`task_gradients`), averages them
    (:meth:`combine_gradients`) and applies them with the meta-optimiser.
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
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not model.built:
            raise ValueError("build the model first (give it an Input or call it once)")
        if kind not in (CLASSIFICATION, REGRESSION):
            raise ValueError(f"kind must be {CLASSIFICATION!r} or {REGRESSION!r}, got {kind!r}")
        if not isinstance(inner_steps, (int, np.integer)) or inner_steps < 0:
            raise ValueError(f"inner_steps must be a non-negative integer, got {inner_steps!r}")
        if test_inner_steps is not None and (
            not isinstance(test_inner_steps, (int, np.integer)) or test_inner_steps < 0
        ):
            raise ValueError("test_inner_steps must be a non-negative integer or None")
        if np.ndim(inner_lr) == 0 and float(inner_lr) <= 0:
            raise ValueError(f"inner_lr must be positive, got {inner_lr!r}")
        self.model = model
        _check_second_order_support(model, first_order)
        self.inner_lr = inner_lr
        self.inner_steps = int(inner_steps)
        self.test_inner_steps = self.inner_steps if test_inner_steps is None else test_inner_steps
        self._first_order = bool(first_order)
        self.kind = kind
        self.parallel_tasks = int(parallel_tasks)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.metric_tracker = keras.metrics.Mean(
            name="accuracy" if kind == CLASSIFICATION else "mse"
        )
        self._predict_fn = self._curve_fn = self._attack_fn = None
        self.built = True

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

    def initial_fast_weights(self, meta_weights):
        """The tensors adaptation starts from, given the meta-variables' values."""
        return list(meta_weights)

    def fast_forward(self, meta_weights, fast_weights, x):
        """Outputs for ``x`` with adapted ``fast_weights``."""
        return forward(self.model, fast_weights, x)

    def inner_rates(self, meta_weights):
        """The inner learning rate(s) given the meta-variables' values."""
        return self.inner_lr

    def adapt_task(self, meta_weights, support_x, support_y, steps, first_order, track=None):
        """Adapt to one task's support set; ``track=(x, y)`` records the metric
        on ``(x, y)`` after each step. Returns ``(fast_weights, history)``."""

        def support_loss(fast):
            return task_loss(self.kind, support_y, self.fast_forward(meta_weights, fast, support_x))

        metric_fn = None
        if track is not None:

            def metric_fn(fast):
                outputs = self.fast_forward(meta_weights, fast, track[0])
                return tf.stack(
                    [
                        task_loss(self.kind, track[1], outputs),
                        task_metric(self.kind, track[1], outputs),
                    ]
                )

        return adapt(
            support_loss,
            self.initial_fast_weights(meta_weights),
            self.inner_rates(meta_weights),
            steps,
            first_order=first_order,
            metric_fn=metric_fn,
        )

    def task_objective(self, meta_weights, support_x, support_y, query_x, query_y):
        """Meta-loss of one task and its metric (accuracy or MSE): the query
        loss after adapting on the support set."""
        fast, _ = self.adapt_task(
            meta_weights, support_x, support_y, self.inner_steps, self.first_order
        )
        outputs = self.fast_forward(meta_weights, fast, query_x)
        return task_loss(self.kind, query_y, outputs), task_metric(self.kind, query_y, outputs)

    def combine_gradients(self, task_grads):
        """One gradient per meta-variable from the per-task ones (leading task
        axis): their mean."""
        return [tf.reduce_mean(g, axis=0) for g in task_grads]

    # -- training ---------------------------------------------------------------

    def task_gradients(self, support_x, support_y, query_x, query_y):
        """Per-task meta-losses (tasks,), metrics (tasks,) and meta-gradients
        (one tensor per meta-variable with a leading task axis)."""
        variables = self.meta_variables
        meta_weights = [v.value for v in variables]

        def one_task(task):
            weights = [tf.identity(w) for w in meta_weights]
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(weights)
                loss, metric = self.task_objective(weights, *task)
            grads = tape.gradient(loss, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return loss, metric, grads

        dtype = meta_weights[0].dtype
        signature = (
            tf.TensorSpec((), dtype),
            tf.TensorSpec((), dtype),
            [tf.TensorSpec(w.shape, w.dtype) for w in meta_weights],
        )
        return tf.map_fn(
            one_task,
            (support_x, support_y, query_x, query_y),
            fn_output_signature=signature,
            parallel_iterations=self.parallel_tasks,
        )

    def train_step(self, data):
        (support_x, support_y, query_x), query_y, _ = keras.utils.unpack_x_y_sample_weight(data)
        losses, metrics, grads = self.task_gradients(support_x, support_y, query_x, query_y)
        self.optimizer.apply(self.combine_gradients(grads), self.meta_variables)
        return self._update_metrics(losses, metrics)

    def test_step(self, data):
        (support_x, support_y, query_x), query_y, _ = keras.utils.unpack_x_y_sample_weight(data)
        meta_weights = [v.value for v in self.meta_variables]

        def one_task(task):
            sx, sy, qx, qy = task
            fast, _ = self.adapt_task(meta_weights, sx, sy, self.test_inner_steps, True)
            outputs = self.fast_forward(meta_weights, fast, qx)
            return task_loss(self.kind, qy, outputs), task_metric(self.kind, qy, outputs)

        dtype = meta_weights[0].dtype
        losses, metrics = tf.map_fn(
            one_task,
            (support_x, support_y, query_x, query_y),
            fn_output_signature=(tf.TensorSpec((), dtype), tf.TensorSpec((), dtype)),
            parallel_iterations=self.parallel_tasks,
        )
        return self._update_metrics(losses, metrics)

    def _update_metrics(self, losses, metrics):
        self.loss_tracker.update_state(tf.reduce_mean(losses))
        self.metric_tracker.update_state(tf.reduce_mean(metrics))
        return {m.name: m.result() for m in self.metrics}

    @property
    def metrics(self):
        return [self.loss_tracker, self.metric_tracker]

    def compile(self, optimizer="adam", **kwargs):
        """Like ``keras.Model.compile``; the default meta-optimiser is Adam."""
        super().compile(optimizer=optimizer, **kwargs)

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

    def predict_episode(self, support_x, support_y, query_x, steps: int | None = None):
        """Adapt on the support set with ``steps`` (default ``test_inner_steps``)
        and return the outputs for the queries: logits (num_query, ways) for
        classification, predictions (num_query, ...) for regression."""
        steps = self.test_inner_steps if steps is None else steps
        if self._predict_fn is None:

            @tf.function(reduce_retracing=True)
            def predict(sx, sy, qx, steps):
                meta_weights = [v.value for v in self.meta_variables]
                fast, _ = self.adapt_task(meta_weights, sx, sy, steps, True)
                return self.fast_forward(meta_weights, fast, qx)

            self._predict_fn = predict
        sx, sy, qx = self._inputs(support_x, support_y, query_x)
        return self._predict_fn(sx, sy, qx, int(steps)).numpy()

    def adaptation_curve(self, support_x, support_y, query_x, query_y, steps: int | None = None):
        """Query loss and metric (accuracy or MSE) before and after each of
        ``steps`` inner steps on one task: an array of shape (steps + 1, 2)."""
        steps = self.test_inner_steps if steps is None else steps
        if self._curve_fn is None:

            @tf.function(reduce_retracing=True)
            def curve(sx, sy, qx, qy, steps):
                meta_weights = [v.value for v in self.meta_variables]
                _, history = self.adapt_task(meta_weights, sx, sy, steps, True, track=(qx, qy))
                return history

            self._curve_fn = curve
        sx, sy, qx, qy = self._inputs(support_x, support_y, query_x, query_y)
        return self._curve_fn(sx, sy, qx, qy, int(steps)).numpy()


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
        self.clip_range = clip_range

    def adversarial(self, meta_weights, fast_weights, x, y):
        """FGSM examples for ``(x, y)`` against ``fast_weights``."""

        def loss_of_input(inputs):
            return task_loss(self.kind, y, self.fast_forward(meta_weights, fast_weights, inputs))

        return fgsm(loss_of_input, x, self.epsilon, self.clip_range)

    def task_objective(self, meta_weights, support_x, support_y, query_x, query_y):
        start = self.initial_fast_weights(meta_weights)
        frozen = [tf.stop_gradient(w) for w in start]
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
        out_clean = self.fast_forward(meta_weights, fast_adv, query_x)
        loss = task_loss(self.kind, query_y, out_adv) + task_loss(self.kind, query_y, out_clean)
        return loss, task_metric(self.kind, query_y, out_clean)


def adversarial_queries(
    learner, support_x, support_y, query_x, query_y, epsilon, clip_range=(0.0, 1.0), steps=None
):
    """White-box FGSM queries against ``learner`` after it adapted to the
    support set (``steps`` inner steps, default its ``test_inner_steps``):
    the attack a model meets at test time. Returns perturbed ``query_x``."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon!r}")
    steps = learner.test_inner_steps if steps is None else steps
    if getattr(learner, "_attack_fn", None) is None:

        @tf.function(reduce_retracing=True)
        def attack(sx, sy, qx, qy, epsilon, steps, clip_range):
            meta_weights = [v.value for v in learner.meta_variables]
            fast, _ = learner.adapt_task(meta_weights, sx, sy, steps, True)

            def loss_of_input(inputs):
                return task_loss(learner.kind, qy, learner.fast_forward(meta_weights, fast, inputs))

            return fgsm(loss_of_input, qx, epsilon, clip_range)

        learner._attack_fn = attack
    sx, sy, qx, qy = learner._inputs(support_x, support_y, query_x, query_y)
    clip = None if clip_range is None else tuple(float(c) for c in clip_range)
    eps = tf.constant(float(epsilon), sx.dtype)
    return learner._attack_fn(sx, sy, qx, qy, eps, int(steps), clip).numpy()


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

    def initial_fast_weights(self, meta_weights):
        return [tf.zeros((self.context_dim,), meta_weights[0].dtype)]

    def fast_forward(self, meta_weights, fast_weights, x):
        (context,) = fast_weights
        x = tf.cast(x, context.dtype)
        tiled = tf.broadcast_to(context, tf.concat([tf.shape(x)[:-1], [self.context_dim]], 0))
        return forward(self.model, meta_weights, tf.concat([x, tiled], axis=-1))
