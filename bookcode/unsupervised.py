"""Unsupervised meta-learning: tasks built from unlabelled images (CACTUs).

Hsu, Levine & Finn (2019), "Unsupervised Learning via Meta-Learning"
(Clustering to Automatically Construct Tasks for Unsupervised meta-learning):

1. learn an embedding of the images without labels (the paper: ACAI, BiGAN,
   DeepCluster, which train for hours on a GPU; here contrastive learning,
   SimCLR (Chen et al. 2020): :func:`augment`, :func:`nt_xent`,
   :class:`ContrastiveLearner`, :func:`train_contrastive`, about a minute on
   a CPU for a Conv-4; or a small convolutional autoencoder,
   :func:`conv_autoencoder`, whose embedding clusters less well);
2. cluster the embeddings with k-means several times, each time after scaling
   every dimension by a random factor, so that the partitions differ
   (:func:`kmeans_partitions`, on :func:`kmeans`);
3. draw N-way K-shot tasks whose classes are clusters of one partition
   (:class:`ClusterTaskSampler`) and meta-train any few-shot learner on them
   (a prototypical network or MAML) exactly as on labelled episodes.

The k-means is our own (NumPy, k-means++ seeding, Lloyd iterations, a few
lines): the project has no scikit-learn dependency and needs nothing beyond
the plain algorithm; every step is seeded.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from .episodes import ClassDataset, Episode, EpisodeSampler, endless_dataset, stack

# ---------------------------------------------------------------- embedding


def conv_autoencoder(input_shape=(28, 28, 1), code_dim: int = 64, filters: int = 32):
    """A convolutional autoencoder for unsupervised embeddings: returns
    ``(encoder, autoencoder)``, Keras models. The encoder is three blocks of
    [3x3 conv ``filters``, ReLU, 2x2 max-pool] and a dense layer to
    ``code_dim``; the decoder mirrors it with transposed convolutions and a
    sigmoid output. Train with ``autoencoder.compile(optimizer, loss="binary_crossentropy")``
    and ``autoencoder.fit(x, x)``: no labels. Inputs in [0, 1], height and
    width divisible by 4 (28x28 Omniglot)."""
    from keras import layers

    h, w, channels = input_shape
    if h % 4 or w % 4:
        raise ValueError(f"height and width must be divisible by 4, got {input_shape}")
    if code_dim < 1 or filters < 1:
        raise ValueError(f"code_dim and filters must be positive, got {code_dim}, {filters}")
    inputs = keras.Input(input_shape)
    x = inputs
    for _ in range(2):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    code = layers.Dense(code_dim, name="code", dtype="float32")(layers.Flatten()(x))
    encoder = keras.Model(inputs, code, name="encoder")
    y = layers.Dense((h // 4) * (w // 4) * filters, activation="relu")(code)
    y = layers.Reshape((h // 4, w // 4, filters))(y)
    for _ in range(2):
        y = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", activation="relu")(y)
    y = layers.Conv2D(channels, 3, padding="same", activation="sigmoid", dtype="float32")(y)
    return encoder, keras.Model(inputs, y, name="autoencoder")


def embed(encoder, x, batch_size: int = 1024) -> np.ndarray:
    """``encoder`` applied to ``x`` in batches (inference mode): float32
    array (len(x), code_dim)."""
    parts = [
        np.asarray(encoder(x[i : i + batch_size], training=False), np.float32)
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(parts).reshape(len(x), -1)


# ------------------------------------------------------------------ k-means


def _squared_distances(points, centres):
    # ||p||^2 - 2 p.c + ||c||^2, (n, k)
    return (
        np.sum(points**2, axis=1)[:, None]
        - 2.0 * points @ centres.T
        + np.sum(centres**2, axis=1)[None, :]
    )


def _kmeans_plus_plus(points, k, rng):
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre is a
    point drawn with probability proportional to its squared distance to the
    nearest centre chosen so far."""
    n = len(points)
    squared_norms = np.einsum("ij,ij->i", points, points)

    def squared_distances_to(centre):
        # einsum, not BLAS: a multithreaded matrix-vector product is slow on a busy CPU
        return squared_norms - 2.0 * np.einsum("ij,j->i", points, centre) + centre @ centre

    centres = np.empty((k, points.shape[1]), points.dtype)
    centres[0] = points[rng.integers(n)]
    nearest = squared_distances_to(centres[0])
    for j in range(1, k):
        weights = np.maximum(nearest, 0)
        total = weights.sum()
        i = rng.integers(n) if total <= 0 else rng.choice(n, p=weights / total)
        centres[j] = points[i]
        nearest = np.minimum(nearest, squared_distances_to(centres[j]))
    return centres


def kmeans(points, k: int, iterations: int = 20, seed: int | None = None):
    """k-means clustering (Lloyd's algorithm from k-means++ seeds).

    ``points`` (n, d); returns ``(centres (k, d), labels (n,))``. Iterates
    until no label changes or ``iterations`` is reached; a cluster left empty
    is restarted at the point farthest from its centre. Same ``seed``, same
    result.
    """
    points = np.asarray(points, np.float32)  # float32 matrix products: twice as fast
    if points.ndim != 2:
        raise ValueError(f"points must have shape (n, d), got {points.shape}")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= len(points):
        raise ValueError(
            f"k must be an integer in 1..{len(points)} (the number of points), got {k!r}"
        )
    if not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    rng = np.random.default_rng(seed)
    centres = _kmeans_plus_plus(points, int(k), rng)
    labels = None
    for _ in range(iterations):
        distances = _squared_distances(points, centres)
        new = np.argmin(distances, axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        sums = np.stack(
            [np.bincount(labels, weights=column, minlength=k) for column in points.T], axis=1
        )
        empty = counts == 0
        centres[~empty] = sums[~empty] / counts[~empty, None]
        if empty.any():
            farthest = np.argsort(distances[np.arange(len(points)), labels])[::-1]
            centres[empty] = points[farthest[: empty.sum()]]
    return centres, labels


def kmeans_partitions(
    embeddings,
    k: int,
    partitions: int,
    seed: int | None = None,
    iterations: int = 20,
    scale_range=(0.0, 1.0),
) -> list[np.ndarray]:
    """``partitions`` k-means clusterings of ``embeddings`` (n, d), each
    after multiplying every dimension by its own factor drawn uniformly from
    ``scale_range`` (Hsu et al. 2019, section 3: random scaling gives diverse
    partitions of one embedding). The first partition is of the unscaled
    embedding. Returns a list of label arrays, each (n,) in ``0..k-1``."""
    embeddings = np.asarray(embeddings, np.float32)
    if not isinstance(partitions, (int, np.integer)) or partitions < 1:
        raise ValueError(f"partitions must be a positive integer, got {partitions!r}")
    low, high = scale_range
    if not 0 <= low < high:
        raise ValueError(
            f"scale_range must be (low, high) with 0 <= low < high, got {scale_range!r}"
        )
    rng = np.random.default_rng(seed)
    result = []
    for p in range(partitions):
        scales = (
            np.ones(embeddings.shape[1]) if p == 0 else rng.uniform(low, high, embeddings.shape[1])
        )
        _, labels = kmeans(embeddings * scales, k, iterations, seed=rng.integers(2**31))
        result.append(labels)
    return result


# ------------------------------------------------------------ cluster tasks


class ClusterTaskSampler:
    """N-way K-shot episodes whose classes are clusters (CACTUs tasks).

    ``x`` (n, ...) are the unlabelled examples and ``partitions`` a list of
    cluster-label arrays (n,), e.g. from :func:`kmeans_partitions`. Each
    episode picks one partition at random, then ``ways`` distinct clusters
    of it among those with at least ``shots + queries`` members, and draws
    support and query examples without replacement inside each cluster
    (the machinery of :class:`~bookcode.episodes.EpisodeSampler`). Labels
    are ``0..ways-1`` per episode. Same ``seed``, same episodes.
    """

    def __init__(self, x, partitions, ways: int, shots: int, queries: int, seed=None):
        if not len(partitions):
            raise ValueError("partitions is empty: give at least one array of cluster labels")
        self.samplers = []
        needed = shots + queries
        for p, labels in enumerate(partitions):
            labels = np.asarray(labels)
            if labels.shape != (len(x),):
                raise ValueError(
                    f"partition {p} has shape {labels.shape}; expected one label per example ({len(x)},)"
                )
            _, labels = np.unique(labels, return_inverse=True)
            clusters = int(labels.max()) + 1
            dataset = ClassDataset(
                x=x, y=labels, class_names=[f"cluster {c}" for c in range(clusters)]
            )
            large = int(np.sum(dataset.examples_per_class() >= needed))
            if large < ways:
                raise ValueError(
                    f"partition {p}: only {large} of its {clusters} clusters have shots + "
                    f"queries = {needed} members, fewer than ways = {ways}; use fewer clusters "
                    "(smaller k), fewer shots or queries, or fewer ways"
                )
            self.samplers.append(EpisodeSampler(dataset, ways, shots, queries))
        self.ways, self.shots, self.queries = ways, shots, queries
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def __repr__(self):
        sizes = [len(s._eligible) for s in self.samplers]
        return (
            f"ClusterTaskSampler({self.ways}-way {self.shots}-shot, {self.queries} queries per "
            f"cluster, {len(self.samplers)} partitions, {min(sizes)}-{max(sizes)} usable clusters each)"
        )

    def _draw(self, rng) -> Episode:
        sampler = self.samplers[rng.integers(len(self.samplers))]
        return sampler._draw(rng)

    def sample(self) -> Episode:
        """The next episode; its ``classes`` are cluster indices of the partition drawn."""
        return self._draw(self._rng)

    def sample_batch(self, batch_size: int) -> Episode:
        """``batch_size`` episodes stacked on a new leading axis."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return stack([self.sample() for _ in range(batch_size)])

    def tf_dataset(self, batch_size: int | None = None, prefetch: int = 2):
        """An endless ``tf.data.Dataset`` of ``((support_x, support_y, query_x),
        query_y)`` for ``fit``, as :meth:`EpisodeSampler.tf_dataset`."""

        def element():
            e = self.sample() if batch_size is None else self.sample_batch(batch_size)
            return (e.support_x, e.support_y.astype(np.int32), e.query_x), e.query_y.astype(
                np.int32
            )

        return endless_dataset(element, prefetch)


def cluster_purity(labels, classes) -> float:
    """Fraction of examples whose true class is the most common class of
    their cluster (1.0: every cluster holds one class). ``labels`` and
    ``classes`` (n,) integers. Uses the labels for analysis only."""
    labels, classes = np.asarray(labels), np.asarray(classes)
    if labels.shape != classes.shape:
        raise ValueError(f"labels {labels.shape} and classes {classes.shape} differ in shape")
    total = 0
    for c in np.unique(labels):
        total += np.bincount(classes[labels == c]).max()
    return total / len(labels)


# ------------------------------------------------- contrastive embedding


def augment(
    images,
    seed=None,
    max_rotation: float = 15.0,
    max_scale: float = 0.2,
    max_shift: float = 3.0,
    max_shear: float = 0.2,
):
    """Random affine views of ``images`` (b, h, w, c) in [0, 1], for
    contrastive learning: each image is rotated by up to ``max_rotation``
    degrees, scaled by a factor in ``exp([-max_scale, max_scale])`` (the
    width by up to 10% more or less than the height), sheared by up to
    ``max_shear`` and shifted by up to ``max_shift`` pixels, about its centre,
    with bilinear interpolation and a zero (background) fill. Same shape,
    values stay in [0, 1]. ``seed``: an integer (same seed, same views) or a
    ``keras.random.SeedGenerator`` (new views at every call, as in training)."""
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(
            f"images must have shape (batch, height, width, channels), got {images.shape}"
        )
    if min(max_rotation, max_scale, max_shift, max_shear) < 0:
        raise ValueError("max_rotation, max_scale, max_shift and max_shear must be non-negative")
    dtype = images.dtype
    x = tf.cast(images, tf.float32)
    b = tf.shape(x)[0]
    h, w = int(x.shape[1]), int(x.shape[2])
    seed = keras.random.SeedGenerator(0) if seed is None else seed

    def uniform(limit):
        return keras.random.uniform((b,), -limit, limit, seed=seed)

    angle = uniform(max_rotation * np.pi / 180.0)
    scale_y = tf.exp(uniform(max_scale))
    scale_x = scale_y * tf.exp(uniform(0.1 if max_scale > 0 else 0.0))
    shear = uniform(max_shear)
    shift_x, shift_y = uniform(max_shift), uniform(max_shift)
    # forward map A = rotation @ shear @ scale; the op wants output -> input: A^-1
    cos, sin = tf.cos(angle), tf.sin(angle)
    a00, a01 = cos * scale_x, (cos * shear - sin) * scale_y
    a10, a11 = sin * scale_x, (sin * shear + cos) * scale_y
    det = a00 * a11 - a01 * a10
    i00, i01, i10, i11 = a11 / det, -a01 / det, -a10 / det, a00 / det
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    # input = A^-1 (output - centre - shift) + centre
    ox = cx - (i00 * (cx + shift_x) + i01 * (cy + shift_y))
    oy = cy - (i10 * (cx + shift_x) + i11 * (cy + shift_y))
    zero = tf.zeros_like(angle)
    transforms = tf.stack([i00, i01, ox, i10, i11, oy, zero, zero], axis=1)
    views = tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=[h, w],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return tf.cast(tf.clip_by_value(views, 0.0, 1.0), dtype)


def nt_xent(z1, z2, temperature: float = 0.5):
    """The NT-Xent loss of SimCLR (Chen, Kornblith, Norouzi & Hinton 2020):
    ``z1[i]`` and ``z2[i]`` (n, d) are projections of two views of image
    ``i``. With the 2n projections L2-normalised, for each one the positive
    is its other view and the negatives are the other 2n - 2:
    ``-log(exp(s_ip / t) / sum_{j != i} exp(s_ij / t))``, averaged over all
    2n, where ``s`` is the cosine similarity. Returns a float32 scalar."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = tf.concat([tf.cast(z1, tf.float32), tf.cast(z2, tf.float32)], axis=0)
    z = tf.math.l2_normalize(z, axis=1)
    n = tf.shape(z1)[0]
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    logits -= 1e9 * tf.eye(2 * n)  # an example is not its own negative
    positives = tf.concat([tf.range(n, 2 * n), tf.range(n)], axis=0)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(positives, logits))


@keras.saving.register_keras_serializable(package="bookcode")
class ContrastiveLearner(keras.Model):
    """SimCLR (Chen et al. 2020) for small images: an ``encoder`` and a
    projection head (dense ``projection_dim``, ReLU, dense
    ``projection_dim``) trained with :func:`nt_xent` on two
    :func:`augment` views of each image; no labels. ``fit`` takes a
    dataset of image batches; ``call`` is the encoder (use the encoder's
    output, not the projection, as the embedding, as in the paper).
    ``augmentation``: keyword arguments of :func:`augment`."""

    def __init__(
        self,
        encoder,
        projection_dim: int = 64,
        temperature: float = 0.5,
        augmentation: dict | None = None,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(encoder, keras.layers.Layer):
            raise ValueError(  # noqa: TRY004 (the project's convention for bad inputs)
                f"encoder must be a Keras model or layer, got {type(encoder)}"
            )
        if projection_dim < 1 or temperature <= 0:
            raise ValueError(
                f"projection_dim and temperature must be positive, got {projection_dim}, {temperature}"
            )
        self.encoder = encoder
        self.projection_dim, self.temperature, self.seed = projection_dim, temperature, seed
        self.augmentation = dict(augmentation or {})
        augment(np.zeros((1, 4, 4, 1), np.float32), 0, **self.augmentation)  # check the names
        self.projection = keras.Sequential(
            [
                keras.layers.Dense(projection_dim, activation="relu"),
                keras.layers.Dense(projection_dim, dtype="float32"),
            ],
            name="projection",
        )
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=False):
        return self.encoder(x, training=training)

    def build(self, input_shape):
        if not self.encoder.built:
            self.encoder.build(input_shape)
        if not self.projection.built:
            self.projection.build(tuple(self.encoder.compute_output_shape(input_shape)))
        self.built = True

    def contrastive_loss(self, x, training=True):
        """NT-Xent of two fresh views of the batch ``x``."""
        views = tf.concat(
            [augment(x, self.seed_generator, **self.augmentation) for _ in range(2)], axis=0
        )
        z = self.projection(self.encoder(views, training=training), training=training)
        z1, z2 = tf.split(z, 2, axis=0)
        return nt_xent(z1, z2, self.temperature)

    def train_step(self, data):
        x = data[0] if isinstance(data, (tuple, list)) else data
        with tf.GradientTape() as tape:
            loss = self.contrastive_loss(x)
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        return {"loss": loss}  # this step's loss, not a running mean

    def get_config(self):
        return {
            **super().get_config(),
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "projection_dim": self.projection_dim,
            "temperature": self.temperature,
            "augmentation": self.augmentation,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)


def train_contrastive(
    encoder,
    x,
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
    **options,
):
    """Train ``encoder`` without labels by SimCLR on the images ``x`` (n, h,
    w, c) in [0, 1]: ``steps`` Adam steps of ``batch_size`` images drawn at
    random (seeded). ``options``: :class:`ContrastiveLearner`'s
    (``projection_dim``, ``temperature``, ``augmentation``). Returns the
    learner; its ``step_losses`` holds the loss of every step.
    The encoder itself is trained in place."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"x must have shape (n, height, width, channels), got {x.shape}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 2 <= batch_size <= len(x):
        raise ValueError(
            f"batch_size must be in 2..{len(x)} (the number of images), got {batch_size}"
        )
    learner = ContrastiveLearner(encoder, seed=seed, **options)
    learner.compile(keras.optimizers.Adam(learning_rate))
    rng = np.random.default_rng(seed)
    indices = rng.integers(len(x), size=(steps, batch_size))
    dataset = tf.data.Dataset.from_tensor_slices(indices).map(lambda i: tf.gather(x, i))
    losses = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
    )
    learner.fit(
        dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[record]
    )
    learner.step_losses = np.array(losses)
    return learner
