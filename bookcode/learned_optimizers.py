"""Optimisers that are learned rather than designed.

- :class:`LSTMOptimizer`: "Learning to learn by gradient descent by gradient
  descent" (Andrychowicz et al. 2016). A small two-layer LSTM, applied to every
  coordinate of the optimisee separately with shared weights, reads the
  (preprocessed) gradient of that coordinate and outputs its update. It is
  meta-trained by backpropagating the optimisee's loss through a truncated
  unroll of the optimisation.
- :class:`MetaLSTMLearner`: "Optimization as a model for few-shot learning"
  (Ravi & Larochelle 2017). The cell state of an LSTM *is* the learner's
  parameter vector; the input gate is a learned per-coordinate learning rate,
  the forget gate a learned shrinkage, and the initial cell state the learned
  initialisation. It adapts a small convolutional learner to an episode's
  support set in a few steps.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers

# ----------------------------------------------------------------------------
# Gradient preprocessing (Andrychowicz et al. 2016, appendix A)
# ----------------------------------------------------------------------------


def preprocess_gradients(gradients, p: float = 10.0):
    """The paper's scale-free encoding of gradients, shape (n,) -> (n, 2).

    ``(log|g| / p, sign(g))`` if ``|g| >= exp(-p)``, else ``(-1, exp(p) * g)``.
    The first column carries the magnitude on a log scale, the second the sign
    (or, for tiny gradients, a rescaled value), so gradients spanning many
    orders of magnitude all reach the LSTM in a usable range.
    """
    if p <= 0:
        raise ValueError(f"p must be positive, got {p}")
    g = tf.convert_to_tensor(gradients, dtype=tf.float32)
    big = tf.abs(g) >= math.exp(-p)
    magnitude = tf.where(big, tf.math.log(tf.maximum(tf.abs(g), 1e-38)) / p, -tf.ones_like(g))
    direction = tf.where(big, tf.sign(g), math.exp(p) * g)
    return tf.stack([magnitude, direction], axis=-1)


# ----------------------------------------------------------------------------
# Random quadratics f(theta) = ||W theta - y||^2 (the paper's first experiment)
# ----------------------------------------------------------------------------


def random_quadratics(num_problems: int, dim: int = 10, seed: int = 0, log10_scale=(0.0, 0.0)):
    """``(W, y, theta0)`` of ``num_problems`` quadratics with IID standard normal
    entries: W (n, dim, dim), y (n, dim), theta0 (n, dim), float32.

    ``log10_scale=(low, high)`` multiplies W and y of each problem by
    ``10**u``, u uniform in [low, high], so that losses and gradients span
    several orders of magnitude (default: no scaling, the paper's problems).
    """
    if num_problems < 1 or dim < 1:
        raise ValueError("num_problems and dim must be positive")
    low, high = log10_scale
    if low > high:
        raise ValueError(f"log10_scale must be (low, high) with low <= high, got {log10_scale}")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((num_problems, dim, dim)).astype(np.float32)
    y = rng.standard_normal((num_problems, dim)).astype(np.float32)
    theta0 = rng.standard_normal((num_problems, dim)).astype(np.float32)
    if high > low:
        scale = (10.0 ** rng.uniform(low, high, num_problems)).astype(np.float32)
        w, y = w * scale[:, None, None], y * scale[:, None]
    return w, y, theta0


def quadratic_loss(w, y, theta):
    """``||W theta - y||^2`` per problem: W (n, d, d), y (n, d), theta (n, d) -> (n,)."""
    residual = tf.linalg.matvec(w, theta) - y
    return tf.reduce_sum(tf.square(residual), axis=-1)


def quadratic_loss_and_gradient(w, y, theta):
    """Losses (n,) and their gradients ``2 W^T (W theta - y)`` (n, d)."""
    residual = tf.linalg.matvec(w, theta) - y
    loss = tf.reduce_sum(tf.square(residual), axis=-1)
    return loss, 2.0 * tf.linalg.matvec(w, residual, transpose_a=True)


# ----------------------------------------------------------------------------
# Small MLP optimisees (the paper's second experiment: a 1-hidden-layer network)
# ----------------------------------------------------------------------------


def init_mlp_parameters(num_tasks: int, inputs: int, hidden: int, classes: int, seed: int = 0):
    """Glorot-uniform weights and zero biases (Keras ``Dense`` defaults) of
    ``num_tasks`` MLPs ``inputs -> hidden (sigmoid) -> classes``, as a dict
    ``{"w1": (n, inputs, hidden), "b1": (n, hidden), "w2": (n, hidden, classes),
    "b2": (n, classes)}`` of float32 arrays."""
    if min(num_tasks, inputs, hidden, classes) < 1:
        raise ValueError("num_tasks, inputs, hidden and classes must be positive")
    rng = np.random.default_rng(seed)

    def glorot(fan_in, fan_out):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, (num_tasks, fan_in, fan_out)).astype(np.float32)

    return {
        "w1": glorot(inputs, hidden),
        "b1": np.zeros((num_tasks, hidden), np.float32),
        "w2": glorot(hidden, classes),
        "b2": np.zeros((num_tasks, classes), np.float32),
    }


def mlp_loss(params, x, y):
    """Mean cross-entropy of a batch of MLPs (see :func:`init_mlp_parameters`),
    each on its own minibatch: ``x`` (n, m, inputs), ``y`` (n, m) -> (n,)."""
    hidden = tf.sigmoid(tf.einsum("nmi,nih->nmh", x, params["w1"]) + params["b1"][:, None])
    logits = tf.einsum("nmh,nhc->nmc", hidden, params["w2"]) + params["b2"][:, None]
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32), logits=logits),
        axis=-1,
    )


MLP_PARAMETERS = ("w1", "b1", "w2", "b2")


def _flatten_tasks(params):
    """dict of (n, ...) -> (n, P) and the per-tensor shapes (without n)."""
    shapes = [tuple(params[k].shape[1:]) for k in MLP_PARAMETERS]
    n = tf.shape(params["w1"])[0]
    flat = tf.concat([tf.reshape(params[k], (n, -1)) for k in MLP_PARAMETERS], axis=1)
    return flat, shapes


def _unflatten_tasks(flat, shapes):
    sizes = [int(np.prod(s)) for s in shapes]
    n = tf.shape(flat)[0]
    parts = tf.split(flat, sizes, axis=1)
    return {k: tf.reshape(p, (n, *s)) for k, p, s in zip(MLP_PARAMETERS, parts, shapes)}


def mlp_tasks(
    dataset,
    num_tasks: int,
    steps: int,
    batch_size: int = 128,
    ways: int = 10,
    classes_per_label: int = 1,
    hidden: int = 20,
    seed: int = 0,
):
    """Random classification problems for meta-training an optimiser on MLPs.

    Each task draws ``ways * k`` classes of ``dataset`` (a ClassDataset of
    feature vectors, e.g. pooled Omniglot images), with ``k =
    classes_per_label`` (or drawn uniformly from ``(low, high)`` per task),
    and merges every ``k`` of them into one label (so a label is a mixed
    group of characters, like a spoken digit said by many speakers), then
    standardises the features over the task's examples and draws one
    minibatch of ``batch_size`` examples per step (without replacement inside
    a minibatch). Returns the dict ``{"x": (n, steps, batch, d), "y": (n, steps,
    batch), "w1", "b1", "w2", "b2"}`` with a fresh Glorot initialisation of an
    MLP ``d -> hidden -> ways`` per task: the input of ``LSTMOptimizer.fit``,
    :meth:`LSTMOptimizer.optimize_mlps` and :func:`optimize_mlps_with`.
    Step ``t`` takes its gradient on minibatch ``t``; the loss after it is
    measured on minibatch ``t + 1`` (cyclically), one the step did not see.
    """
    if np.isscalar(classes_per_label):
        classes_per_label = (classes_per_label, classes_per_label)
    low, high = classes_per_label
    if min(num_tasks, steps, batch_size, ways, low) < 1 or high < low:
        raise ValueError(
            "num_tasks, steps, batch_size, ways and classes_per_label must be positive"
        )
    if ways * high > dataset.num_classes:
        raise ValueError(
            f"a task needs {ways * high} classes; the dataset has {dataset.num_classes}"
        )
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(num_tasks):
        group = int(rng.integers(low, high + 1))
        classes = rng.choice(dataset.num_classes, ways * group, replace=False)
        task = dataset.classes(classes)
        x = task.x.reshape(len(task.x), -1).astype(np.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        y = np.asarray(task.y) // group
        index = np.stack(
            [rng.choice(len(x), batch_size, replace=len(x) < batch_size) for _ in range(steps)]
        )
        xs.append(x[index])
        ys.append(y[index])
    params = init_mlp_parameters(num_tasks, xs[0].shape[-1], hidden, ways, seed=seed + 1)
    return {"x": np.stack(xs), "y": np.stack(ys).astype(np.int32), **params}


# ----------------------------------------------------------------------------
# The coordinatewise LSTM optimiser
# ----------------------------------------------------------------------------


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
        super().__init__(**kwargs)
        if hidden_size < 1 or num_layers < 1 or unroll < 1 or truncations < 1:
            raise ValueError("hidden_size, num_layers, unroll and truncations must be positive")
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.preprocess_p, self.output_scale = preprocess_p, output_scale
        self.unroll, self.truncations, self.log_loss = unroll, truncations, log_loss
        self.cells = [layers.LSTMCell(hidden_size, name=f"lstm{i + 1}") for i in range(num_layers)]
        self.head = layers.Dense(1, name="update")
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
        ``tf.function`` that creates variables is traced again)."""
        super().compile(*args, **kwargs)
        if self.optimizer is not None:
            self.optimizer.build(self.trainable_variables)

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


def _problem_gradient(problem, theta, shapes, t):
    """Gradient (n, P) at step ``t`` of a batch of quadratics (``"w"`` in
    ``problem``) or of MLP tasks (on their minibatch ``t``). As in the paper
    it is an input to the optimiser: no second derivatives."""
    if "w" in problem:
        gradient = quadratic_loss_and_gradient(problem["w"], problem["y"], theta)[1]
    else:
        gradient = _mlp_gradient(theta, shapes, problem["x"][:, t], problem["y"][:, t])
    return tf.stop_gradient(gradient)


def _problem_loss(problem, theta, shapes, t):
    """Loss (n,) of every problem at ``theta`` (MLPs: on minibatch ``t``,
    cyclically)."""
    if "w" in problem:
        return quadratic_loss(problem["w"], problem["y"], theta)
    return _minibatch_loss(theta, shapes, problem["x"], problem["y"], t)


def _minibatch_loss(theta, shapes, x, y, t):
    """Loss (n,) of flat MLP parameters on minibatch ``t`` of ``x`` (n, steps,
    batch, d), cyclically."""
    t = t % tf.shape(x)[1]
    return mlp_loss(_unflatten_tasks(theta, shapes), x[:, t], y[:, t])


def _mlp_gradient(theta, shapes, x, y):
    """Gradient (n, P) of every task's minibatch loss w.r.t. its flat parameters."""
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = tf.reduce_sum(mlp_loss(_unflatten_tasks(theta, shapes), x, y))
    return tape.gradient(loss, theta)


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


def optimize_mlps_with(keras_optimizer, tasks, steps: int | None = None):
    """Run a Keras optimiser on a batch of MLP tasks (:func:`mlp_tasks`) in
    parallel (one variable holds every task's parameters; the built-in
    optimisers act per coordinate); returns the loss after every step on the
    next minibatch, (steps, n), as :meth:`LSTMOptimizer.optimize_mlps`."""
    steps = tasks["x"].shape[1] if steps is None else steps
    x, y = tf.constant(tasks["x"]), tf.constant(tasks["y"])
    flat, shapes = _flatten_tasks({k: tf.constant(tasks[k]) for k in MLP_PARAMETERS})
    theta = tf.Variable(flat)

    @tf.function
    def run():
        losses = tf.TensorArray(tf.float32, size=steps)
        for t in tf.range(steps):
            gradient = _mlp_gradient(tf.convert_to_tensor(theta), shapes, x[:, t], y[:, t])
            keras_optimizer.apply([gradient], [theta])
            losses = losses.write(t, _minibatch_loss(theta, shapes, x, y, t + 1))
        return losses.stack()

    keras_optimizer.build([theta])
    return run().numpy()


def optimize_quadratics_with(keras_optimizer, w, y, theta0, steps: int):
    """Run a Keras optimiser (SGD, RMSprop, Adam, ...) on a batch of quadratics
    in parallel; returns losses (steps + 1, n). Every problem is one row of one
    variable: the built-in optimisers act per coordinate, so rows do not
    interact."""
    theta = tf.Variable(theta0)
    w, y = tf.constant(w), tf.constant(y)

    @tf.function
    def run():
        losses = tf.TensorArray(tf.float32, size=steps + 1)
        losses = losses.write(0, quadratic_loss(w, y, theta))
        for t in tf.range(steps):
            _, gradient = quadratic_loss_and_gradient(w, y, theta)
            keras_optimizer.apply([gradient], [theta])
            losses = losses.write(t + 1, quadratic_loss(w, y, theta))
        return losses.stack()

    keras_optimizer.build([theta])
    return run().numpy()


# ----------------------------------------------------------------------------
# Meta-LSTM few-shot learner (Ravi & Larochelle 2017)
# ----------------------------------------------------------------------------


def small_convnet(ways: int, filters: int = 16, blocks: int = 4, input_shape=(28, 28, 1)):
    """The learner of the meta-LSTM: ``blocks`` x [3x3 conv, batch norm, ReLU,
    2x2 max-pool] and a dense layer with ``ways`` logits (Conv-4 with few
    filters, as Ravi & Larochelle 2017 with 32)."""
    model = keras.Sequential(name="learner")
    model.add(keras.Input(shape=input_shape))
    for _ in range(blocks):
        model.add(layers.Conv2D(filters, 3, padding="same"))
        model.add(layers.BatchNormalization())
        model.add(layers.ReLU())
        model.add(layers.MaxPooling2D(2))
    model.add(layers.Flatten())
    model.add(layers.Dense(ways))
    return model


def _logit(p):
    return float(np.log(p / (1 - p)))


class MetaLSTMCell(layers.Layer):
    """The second layer of the meta-learner: an LSTM cell whose cell state is
    the learner's parameter vector (Ravi & Larochelle 2017, eq. 2-5).

    For every coordinate, with ``x_t`` the first layer's output (n, hidden):

        f_t = sigmoid(W_F [x_t, theta_{t-1}, f_{t-1}] + b_F)    learned shrinkage
        i_t = sigmoid(W_I [x_t, theta_{t-1}, i_{t-1}] + b_I)    learned learning rate
        theta_t = f_t * theta_{t-1} - i_t * grad_t               (the cell update)

    With ``f = 1`` and ``i = lr`` this is exactly a gradient-descent step.
    """

    def __init__(self, initial_learning_rate=0.1, initial_forget=0.99, **kwargs):
        super().__init__(**kwargs)
        self.initial_learning_rate, self.initial_forget = initial_learning_rate, initial_forget

    def build(self, input_shape):
        features = int(input_shape[-1]) + 2
        small = keras.initializers.RandomUniform(-0.01, 0.01)
        self.w_forget = self.add_weight(shape=(features, 1), initializer=small, name="w_forget")
        self.w_input = self.add_weight(shape=(features, 1), initializer=small, name="w_input")
        self.b_forget = self.add_weight(
            shape=(1,),
            initializer=keras.initializers.Constant(_logit(self.initial_forget)),
            name="b_forget",
        )
        self.b_input = self.add_weight(
            shape=(1,),
            initializer=keras.initializers.Constant(_logit(self.initial_learning_rate)),
            name="b_input",
        )

    def call(self, x, theta, gradient, previous_forget, previous_input):
        """All arguments (n,) except ``x`` (n, hidden); returns ``(theta_t, f_t, i_t)``."""
        forget = tf.sigmoid(
            tf.concat([x, theta[:, None], previous_forget[:, None]], -1) @ self.w_forget
            + self.b_forget
        )[:, 0]
        learning_rate = tf.sigmoid(
            tf.concat([x, theta[:, None], previous_input[:, None]], -1) @ self.w_input
            + self.b_input
        )[:, 0]
        return forget * theta - learning_rate * gradient, forget, learning_rate


class MetaLSTMLearner(keras.Model):
    """Optimization as a model for few-shot learning (Ravi & Larochelle 2017).

    ``learner`` is a Keras model mapping images to ``ways`` logits; its weights
    are the learned initial parameters theta_0 (the initial cell state). An
    episode is learned in ``steps`` updates on the support set: a coordinatewise
    LSTM (``hidden_size`` units) reads the preprocessed gradient and loss of
    every parameter, and a :class:`MetaLSTMCell` turns its output into the
    forget and input gates of the parameter update. The query loss after the
    last step trains theta_0, the LSTM and the gates (``fit`` on
    ``sampler.tf_dataset(batch_size)``). As in the paper, the learner's
    gradients are inputs, not differentiated through (first order), and batch
    normalisation uses batch statistics also at test time.

    ``encoder`` (optional) is a frozen Keras model applied to all images first,
    e.g. the lower blocks of a pretrained network, so that the meta-LSTM only
    learns the upper layers (``learner`` then takes the encoder's features).

    ``initialisation_optimizer`` (optional) trains theta_0 alone, e.g. with a
    smaller learning rate than the LSTM and the gates when theta_0 starts from
    a pretrained network; by default the compiled optimiser trains everything.
    """

    def __init__(
        self,
        learner: keras.Model,
        steps: int = 5,
        hidden_size: int = 20,
        initial_learning_rate: float = 0.1,
        preprocess_p: float = 10.0,
        encoder: keras.Model | None = None,
        initial_forget: float = 0.99,
        initialisation_optimizer: keras.optimizers.Optimizer | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.initialisation_optimizer = initialisation_optimizer
        if steps < 1 or hidden_size < 1:
            raise ValueError("steps and hidden_size must be positive")
        self.learner, self.steps, self.hidden_size = learner, steps, hidden_size
        self.encoder = encoder
        if encoder is not None:
            encoder.trainable = False
        self.preprocess_p = preprocess_p
        self.ways = int(learner.output_shape[-1])
        self.lstm = layers.LSTMCell(hidden_size, name="lstm")
        self.meta_cell = MetaLSTMCell(initial_learning_rate, initial_forget, name="meta_lstm")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        self.lstm(tf.zeros((1, 4)), [tf.zeros((1, hidden_size))] * 2)
        self.meta_cell(tf.zeros((1, hidden_size)), *[tf.zeros((1,))] * 4)

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def _meta_and_initial_variables(self):
        """(the LSTM's and the gates' variables, theta_0's variables)."""
        initial = self.learner.trainable_variables
        return [v for v in self.trainable_variables if not any(v is w for w in initial)], initial

    def compile(self, *args, **kwargs):
        """Like ``keras.Model.compile``; also creates the optimisers' variables
        now, so that the training step is traced once, not twice (a
        ``tf.function`` that creates variables is traced again). Set
        ``initialisation_optimizer`` before compiling."""
        super().compile(*args, **kwargs)
        if self.optimizer is None:
            return
        if self.initialisation_optimizer is None:
            self.optimizer.build(self.trainable_variables)
        else:
            meta, initial = self._meta_and_initial_variables()
            self.optimizer.build(meta)
            self.initialisation_optimizer.build(initial)

    # -- the learner as a function of a flat parameter vector -------------------

    def _shapes(self):
        return [tuple(v.shape) for v in self.learner.trainable_variables]

    def initial_parameters(self):
        """theta_0, the learned initialisation, flat (num_parameters,)."""
        return tf.concat([tf.reshape(v, (-1,)) for v in self.learner.trainable_variables], 0)

    def learner_logits(self, theta, x):
        """Logits of the learner with flat parameters ``theta`` on ``x``
        (batch-norm in training mode: batch statistics)."""
        shapes = self._shapes()
        sizes = [int(np.prod(s)) for s in shapes]
        tensors = [tf.reshape(t, s) for t, s in zip(tf.split(theta, sizes), shapes)]
        non_trainable = [tf.convert_to_tensor(v) for v in self.learner.non_trainable_variables]
        logits, _ = self.learner.stateless_call(tensors, non_trainable, x, training=True)
        return logits

    def _support_loss_and_gradient(self, theta, x, y):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(
                    y, self.learner_logits(theta, x), from_logits=True
                )
            )
        return loss, tape.gradient(loss, theta)

    def encode(self, x):
        """The learner's inputs: ``x`` through the frozen ``encoder`` if there is one."""
        x = tf.convert_to_tensor(x, tf.float32)
        return x if self.encoder is None else self.encoder(x, training=False)

    def adapt(self, support_x, support_y):
        """Learn one episode: returns theta_T (flat) and the gates of every step,
        forget (steps, n) and input (steps, n)."""
        support_x = self.encode(support_x)
        support_y = tf.convert_to_tensor(support_y, tf.int32)
        theta = self.initial_parameters()
        n = tf.shape(theta)[0]

        def step(t, theta, state, forget, learning_rate, forgets, rates):
            loss, gradient = self._support_loss_and_gradient(theta, support_x, support_y)
            loss, gradient = tf.stop_gradient(loss), tf.stop_gradient(gradient)
            inputs = tf.concat(
                [
                    preprocess_gradients(gradient, self.preprocess_p),
                    tf.broadcast_to(preprocess_gradients(loss[None], self.preprocess_p), (n, 2)),
                ],
                -1,
            )
            x, state = self.lstm(inputs, state)
            theta, forget, learning_rate = self.meta_cell(x, theta, gradient, forget, learning_rate)
            return (
                t + 1,
                theta,
                list(state),
                forget,
                learning_rate,
                forgets.write(t, forget),
                rates.write(t, learning_rate),
            )

        # a graph loop, not a Python one: traced once instead of `steps` times
        zeros = tf.zeros((n,))
        forgets, rates = (tf.TensorArray(tf.float32, size=self.steps) for _ in range(2))
        _, theta, _, _, _, forgets, rates = tf.while_loop(
            lambda t, *_: t < self.steps,
            step,
            (0, theta, [tf.zeros((n, self.hidden_size))] * 2, zeros, zeros, forgets, rates),
            maximum_iterations=self.steps,
        )
        return theta, forgets.stack(), rates.stack()

    def call(self, inputs):
        """Query logits (num_query, ways) for one episode ``(support_x, support_y, query_x)``."""
        support_x, support_y, query_x = inputs
        theta, _, _ = self.adapt(support_x, support_y)
        return self.learner_logits(theta, self.encode(query_x))

    @tf.function(reduce_retracing=True)
    def _predict(self, support_x, support_y, query_x):
        return self((support_x, support_y, query_x))

    def predict_episode(self, support_x, support_y, query_x):
        """Logits (num_query, ways) after learning the support set."""
        return _compiled_episode_logits(self, support_x, support_y, query_x)

    @tf.function(reduce_retracing=True)
    def _query_loss_and_accuracy(self, support_x, support_y, query_x, query_y):
        # one compiled function for every episode of a meta-batch: traced once, not per episode
        logits = self((support_x, support_y, query_x))
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(query_y, logits, from_logits=True)
        )
        hits = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), query_y)
        return loss, tf.reduce_mean(tf.cast(hits, tf.float32))

    def train_step(self, data):
        (support_x, support_y, query_x), query_y = data
        batched = len(support_x.shape) == 5
        if not batched:
            support_x, support_y, query_x, query_y = (
                t[None] for t in (support_x, support_y, query_x, query_y)
            )
        tasks = support_x.shape[0]
        meta, initial = self._meta_and_initial_variables()
        variables = meta + initial
        with tf.GradientTape() as tape:
            losses, accuracies = zip(
                *(
                    self._query_loss_and_accuracy(
                        support_x[i], support_y[i], query_x[i], query_y[i]
                    )
                    for i in range(tasks)
                )
            )
            loss = tf.add_n(losses) / tasks
        grads = tape.gradient(loss, variables)
        grads, _ = tf.clip_by_global_norm(grads, 10.0)
        if self.initialisation_optimizer is None:
            self.optimizer.apply(grads, variables)
        else:
            self.optimizer.apply(grads[: len(meta)], meta)
            self.initialisation_optimizer.apply(grads[len(meta) :], initial)
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(tf.add_n(accuracies) / tasks)
        return {m.name: m.result() for m in self.metrics}


class FineTuner:
    """Baseline few-shot learner: plain gradient descent on the support set
    from fixed initial weights (random, or pretrained on the training classes
    with a fresh head), ``steps`` steps of rate ``learning_rate``; batch
    normalisation uses batch statistics. Ravi & Larochelle (2017) compare the
    meta-LSTM against this ("Baseline-finetune")."""

    def __init__(self, learner: keras.Model, steps: int = 10, learning_rate: float = 0.1):
        if steps < 1 or learning_rate <= 0:
            raise ValueError("steps and learning_rate must be positive")
        self.learner, self.steps = learner, steps
        self._rate = tf.Variable(float(learning_rate), trainable=False)
        self.ways = int(learner.output_shape[-1])

    @property
    def learning_rate(self) -> float:
        """The fine-tuning step size; can be changed without retracing."""
        return float(self._rate.numpy())

    @learning_rate.setter
    def learning_rate(self, value: float):
        if value <= 0:
            raise ValueError("learning_rate must be positive")
        self._rate.assign(float(value))

    def _loss(self, weights, x, y):
        non_trainable = [tf.convert_to_tensor(v) for v in self.learner.non_trainable_variables]
        logits, _ = self.learner.stateless_call(weights, non_trainable, x, training=True)
        return tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        )

    @tf.function(reduce_retracing=True)
    def _predict(self, support_x, support_y, query_x):
        def step(weights):
            with tf.GradientTape() as tape:
                tape.watch(weights)
                loss = self._loss(weights, support_x, support_y)
            grads = tape.gradient(loss, weights)
            return ([w - self._rate * g for w, g in zip(weights, grads)],)

        # a graph loop, not a Python one: traced once instead of `steps` times
        (weights,) = tf.while_loop(
            lambda weights: True,
            step,
            ([tf.convert_to_tensor(v) for v in self.learner.trainable_variables],),
            maximum_iterations=self.steps,
        )
        non_trainable = [tf.convert_to_tensor(v) for v in self.learner.non_trainable_variables]
        logits, _ = self.learner.stateless_call(weights, non_trainable, query_x, training=True)
        return logits

    def predict_episode(self, support_x, support_y, query_x):
        """Logits (num_query, ways) after fine-tuning on the support set."""
        return _compiled_episode_logits(self, support_x, support_y, query_x)


def _compiled_episode_logits(learner, support_x, support_y, query_x):
    """Run ``learner._predict`` (a compiled function) on one episode, checking
    that the episode has as many ways as the learner has outputs."""
    ways = int(np.max(support_y)) + 1
    if ways != learner.ways:
        raise ValueError(f"the learner has {learner.ways} outputs but the episode has {ways} ways")
    return learner._predict(
        tf.convert_to_tensor(support_x, tf.float32),
        tf.convert_to_tensor(support_y, tf.int32),
        tf.convert_to_tensor(query_x, tf.float32),
    ).numpy()
