"""The coordinatewise LSTM optimiser of "Learning to learn by gradient
descent by gradient descent" (Andrychowicz et al. 2016). A small two-layer
LSTM, applied to every coordinate of the optimisee separately with shared
weights, reads the (preprocessed) gradient of that coordinate and outputs its
update. It is meta-trained by backpropagating the optimisee's loss through a
truncated unroll of the optimisation."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from .problems import (
    _flatten_tasks,
    _minibatch_loss,
    _mlp_gradient,
    _problem_gradient,
    _problem_loss,
    quadratic_loss,
    quadratic_loss_and_gradient,
)

# ----------------------------------------------------------------------------
# Gradient preprocessing (Andrychowicz et al. 2016, appendix A)
# ----------------------------------------------------------------------------


def preprocess_gradients(gradients, p: float = 10.0):
    """The paper's scale-free encoding of gradients, shape (n,) -> (n, 2).

    ``(log|g| / p, sign(g))`` if ``|g| >= exp(-p)``, else ``(-1, exp(p) * g)``.
    The first column carries the magnitude on a log scale, the second the sign
    (or, for tiny gradients, a rescaled value), so gradients spanning many
    orders of magnitude all reach the LSTM in a usable range. Computed in
    float32 whatever the gradients' float dtype (bfloat16 under a mixed policy).
    """
    if p <= 0:
        raise ValueError(f"p must be positive, got {p}")
    g = tf.cast(tf.convert_to_tensor(gradients), tf.float32)
    big = tf.abs(g) >= math.exp(-p)
    magnitude = tf.where(big, tf.math.log(tf.maximum(tf.abs(g), 1e-38)) / p, -tf.ones_like(g))
    direction = tf.where(big, tf.sign(g), math.exp(p) * g)
    return tf.stack([magnitude, direction], axis=-1)


# ----------------------------------------------------------------------------
# The coordinatewise LSTM optimiser
# ----------------------------------------------------------------------------


def _refuse_compiled_losses_and_metrics(compile_args, compile_kwargs, learner):
    """Learners that report their own losses: ``compile(loss=...)`` or
    ``metrics=...`` would be silently ignored, so refuse them."""
    import inspect

    bound = inspect.signature(keras.Model.compile).bind(None, *compile_args, **compile_kwargs)
    given = [
        name
        for name in ("loss", "loss_weights", "metrics", "weighted_metrics")
        if bound.arguments.get(name) not in (None, "auto")
    ]
    if given:
        raise ValueError(
            f"{learner} computes its own loss and reports its own metrics; compile() "
            f"takes an optimizer but not {', '.join(given)}"
        )


@keras.saving.register_keras_serializable(package="bookcode")
class LSTMOptimizer(keras.Model):
    """Coordinatewise two-layer LSTM optimiser (Andrychowicz et al. 2016).

    Every coordinate of the optimisee is a separate row of a batch, so one set
    of LSTM weights serves any number of parameters:

        update_t, state_t = m(preprocess(grad_t), state_{t-1});  theta_t = theta_{t-1} + update_t

    ``step(gradients, state)`` is the pure function (gradients (n,) -> updates
    (n,)); ``minimize(loss_fn, variables)`` and ``apply_gradients(grads,
    variables)`` use it like a Keras optimiser on any model's variables.

    Meta-training (``fit`` on :func:`random_quadratics` batches ``(W, y,
    theta0)``, or on batches of small-MLP classification tasks, the dict of
    :func:`mlp_tasks`, as in the paper's MNIST experiment): each batch is
    optimised for ``truncations * unroll`` steps; after
    every ``unroll`` steps the meta-loss (the mean of ``log f`` over those steps,
    see ``log_loss``) is backpropagated through the unroll and the LSTM is
    updated (truncated backpropagation through time). As in the paper the
    gradients fed to the LSTM are treated as constants (no second derivatives).
    For MLP tasks, as in the paper's code, ``f`` after a step is the loss on
    the *next* minibatch: measured on the minibatch whose gradient it just
    used, the meta-loss would reward fitting that minibatch, not the task.
    """

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        preprocess_p: float = 10.0,
        output_scale: float = 0.1,
        unroll: int = 20,
        truncations: int = 5,
        log_loss: bool = True,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")  # see the layers below
        super().__init__(**kwargs)
        if hidden_size < 1 or num_layers < 1 or unroll < 1 or truncations < 1:
            raise ValueError("hidden_size, num_layers, unroll and truncations must be positive")
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.preprocess_p, self.output_scale = preprocess_p, output_scale
        self.unroll, self.truncations, self.log_loss = unroll, truncations, log_loss
        # an optimiser computes in float32 whatever the dtype policy (its updates are
        # small differences; bfloat16 would round most of them away)
        self.cells = [
            layers.LSTMCell(hidden_size, name=f"lstm{i + 1}", dtype="float32")
            for i in range(num_layers)
        ]
        self.head = layers.Dense(1, name="update", dtype="float32")
        self.meta_loss_tracker = keras.metrics.Mean(name="meta_loss")
        self.final_loss_tracker = keras.metrics.Mean(name="final_log10_loss")
        self._slots = None
        self.build((None,))

    def build(self, input_shape):
        x = keras.ops.zeros((1, 2))
        for cell in self.cells:
            x, _ = cell(x, [keras.ops.zeros((1, self.hidden_size))] * 2)
        self.head(x)
        self.built = True

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "preprocess_p": self.preprocess_p,
            "output_scale": self.output_scale,
            "unroll": self.unroll,
            "truncations": self.truncations,
            "log_loss": self.log_loss,
        }

    def compile(self, *args, **kwargs):
        """Like ``keras.Model.compile``; also creates the optimiser's variables
        now, so that the compiled truncation is traced once, not twice (a
        ``tf.function`` that creates variables is traced again). The meta-loss
        is built in: ``loss`` and ``metrics`` are refused."""
        _refuse_compiled_losses_and_metrics(args, kwargs, "LSTMOptimizer")
        super().compile(*args, **kwargs)
        if self.optimizer is not None:
            self.optimizer.build(self.trainable_variables)

    def compile_from_config(self, config):
        """Compile with the saved settings when loading (Keras skips a custom
        ``compile``)."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    # -- the update rule ------------------------------------------------------

    def initial_state(self, num_coordinates):
        """Zero LSTM state for ``num_coordinates`` coordinates: a list of
        ``[h, c]`` per layer, each (num_coordinates, hidden_size)."""
        zeros = tf.zeros((num_coordinates, self.hidden_size))
        return [[zeros, zeros] for _ in range(self.num_layers)]

    def step(self, gradients, state):
        """Updates (n,) for gradients (n,), and the new state."""
        x = preprocess_gradients(gradients, self.preprocess_p)
        new_state = []
        for cell, layer_state in zip(self.cells, state):
            x, layer_state = cell(x, layer_state)
            new_state.append(list(layer_state))
        return self.output_scale * self.head(x)[:, 0], new_state

    def call(self, gradients):
        """Updates for gradients (n,) from a zero state (one step)."""
        gradients = tf.reshape(gradients, (-1,))
        return self.step(gradients, self.initial_state(tf.shape(gradients)[0]))[0]

    # -- use on any Keras model's variables ------------------------------------

    def reset(self):
        """Forget the optimisation state (start a new optimisation run)."""
        self._slots = None

    def apply_gradients(self, gradients, variables):
        """``variable += update`` for every variable, like a Keras optimiser.

        The LSTM state of every coordinate is kept between calls; call
        :meth:`reset` before optimising another problem.
        """
        variables = list(variables)
        sizes = [int(np.prod(v.shape)) for v in variables]
        if self._slots is None or self._slots[0] != sizes:
            state = [
                [tf.Variable(s, trainable=False) for s in layer]
                for layer in self.initial_state(sum(sizes))
            ]
            self._slots = (sizes, state)
        flat = tf.concat([tf.reshape(g, (-1,)) for g in gradients], axis=0)
        updates = self._apply_flat(flat, self._slots[1])
        for v, u in zip(variables, tf.split(updates, sizes)):
            v.assign_add(tf.reshape(u, v.shape))

    @tf.function(reduce_retracing=True)
    def _apply_flat(self, flat_gradients, state_variables):
        state = [[s.read_value() for s in layer] for layer in state_variables]
        updates, new_state = self.step(flat_gradients, state)
        for layer_vars, layer_values in zip(state_variables, new_state):
            for var, value in zip(layer_vars, layer_values):
                var.assign(value)
        return updates

    def minimize(self, loss_fn, variables):
        """One step on ``loss_fn()`` (a callable returning a scalar) over
        ``variables``; returns the loss before the step."""
        with tf.GradientTape() as tape:
            loss = loss_fn()
        self.apply_gradients(tape.gradient(loss, variables), variables)
        return loss

    # -- meta-training on quadratics -------------------------------------------

    def optimize_quadratics(self, w, y, theta0, steps: int):
        """Run the learned optimiser on a batch of quadratics; returns losses
        (steps + 1, n), from theta0 to theta_steps. Used for evaluation."""
        return _optimize_quadratics(
            self, tf.constant(w), tf.constant(y), tf.constant(theta0), steps
        )

    def _segment_loss(self, f):
        return tf.math.log(f + 1e-12) if self.log_loss else f

    def train_step(self, data):
        """One meta-training step on a batch of problems: quadratics ``(W, y,
        theta0)`` (:func:`random_quadratics`) or MLP tasks (the dict of
        :func:`mlp_tasks`)."""
        if isinstance(data, dict):
            problem = {"x": data["x"], "y": data["y"]}
            theta, shapes = _flatten_tasks(data)
        else:
            problem = {"w": data[0], "y": data[1]}
            theta, shapes = data[2], None
        n, p = tf.shape(theta)[0], tf.shape(theta)[1]
        state = self.initial_state(n * p)
        for k in range(self.truncations):
            # one compiled function per truncation: traced once, called k times
            theta, state, meta_loss = self._truncation(
                problem, theta, state, tf.constant(k * self.unroll), shapes
            )
            self.meta_loss_tracker.update_state(meta_loss)
        final = _problem_loss(problem, theta, shapes, self.truncations * self.unroll)
        self.final_loss_tracker.update_state(
            tf.reduce_mean(tf.math.log(final + 1e-12)) / math.log(10)
        )
        return {m.name: m.result() for m in self.metrics}

    @tf.function(reduce_retracing=True)
    def _truncation(self, problem, theta, state, offset, shapes):
        """``unroll`` learned steps from ``theta`` (n, P), then one Adam step on
        the LSTM's weights from the meta-loss of those steps (truncated BPTT)."""
        n, p = tf.shape(theta)[0], tf.shape(theta)[1]
        variables = self.trainable_variables
        with tf.GradientTape() as tape:

            def one_step(t, theta, state, total):
                gradient = _problem_gradient(problem, tf.stop_gradient(theta), shapes, offset + t)
                update, state = self.step(tf.reshape(gradient, (-1,)), state)
                theta = theta + tf.reshape(update, (n, p))
                # MLPs: on the next minibatch, one this step did not use
                loss = _problem_loss(problem, theta, shapes, offset + t + 1)
                return t + 1, theta, state, total + tf.reduce_mean(self._segment_loss(loss))

            _, theta, state, total = tf.while_loop(
                lambda t, *_: t < self.unroll, one_step, (0, theta, state, tf.zeros(()))
            )
            meta_loss = total / self.unroll
        grads = tape.gradient(meta_loss, variables)
        grads, _ = tf.clip_by_global_norm(grads, 1.0)
        self.optimizer.apply(grads, variables)
        state = tf.nest.map_structure(tf.stop_gradient, state)
        return tf.stop_gradient(theta), state, meta_loss

    def optimize_mlps(self, tasks, steps: int | None = None):
        """Run the learned optimiser on a batch of MLP tasks (:func:`mlp_tasks`);
        returns the loss after every step on the next minibatch, (steps, n)."""
        steps = tasks["x"].shape[1] if steps is None else steps
        tasks = {k: tf.constant(v) for k, v in tasks.items()}
        return _optimize_mlps(self, tasks, steps).numpy()

    @property
    def metrics(self):
        return [self.meta_loss_tracker, self.final_loss_tracker]


@tf.function(reduce_retracing=True)
def _optimize_quadratics(optimizer, w, y, theta, steps):
    n, d = tf.shape(theta)[0], tf.shape(theta)[1]
    state = optimizer.initial_state(n * d)
    losses = tf.TensorArray(tf.float32, size=steps + 1)
    losses = losses.write(0, quadratic_loss(w, y, theta))
    for t in tf.range(steps):
        _, gradient = quadratic_loss_and_gradient(w, y, theta)
        update, state = optimizer.step(tf.reshape(gradient, (-1,)), state)
        theta = theta + tf.reshape(update, (n, d))
        losses = losses.write(t + 1, quadratic_loss(w, y, theta))
    return losses.stack()


@tf.function(reduce_retracing=True)
def _optimize_mlps(optimizer, tasks, steps):
    theta, shapes = _flatten_tasks(tasks)
    n, p = tf.shape(theta)[0], tf.shape(theta)[1]
    state = optimizer.initial_state(n * p)
    losses = tf.TensorArray(tf.float32, size=steps)
    for t in tf.range(steps):
        xb, yb = tasks["x"][:, t], tasks["y"][:, t]
        gradient = _mlp_gradient(theta, shapes, xb, yb)
        update, state = optimizer.step(tf.reshape(gradient, (-1,)), state)
        theta = theta + tf.reshape(update, (n, p))
        losses = losses.write(t, _minibatch_loss(theta, shapes, tasks["x"], tasks["y"], t + 1))
    return losses.stack()
