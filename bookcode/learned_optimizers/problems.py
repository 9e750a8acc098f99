"""The optimisees on which learned optimisers are meta-trained and compared
(Andrychowicz et al. 2016, "Learning to learn by gradient descent by gradient
descent"): random quadratics ``||W theta - y||^2`` and small MLP
classification tasks, batched so that many problems run in parallel, and
Keras optimisers (SGD, Adam, ...) run on them as baselines."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

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
