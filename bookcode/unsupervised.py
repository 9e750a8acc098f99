"""Unsupervised meta-learning: tasks built from unlabelled images (CACTUs).

Hsu, Levine & Finn (2019), "Unsupervised Learning via Meta-Learning"
(Clustering to Automatically Construct Tasks for Unsupervised meta-learning):

1. learn an embedding of the images without labels (the paper: ACAI, BiGAN,
   DeepCluster; here a small convolutional autoencoder, :func:`conv_autoencoder`,
   which trains in about a minute on a CPU);
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

import numpy as np

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
    import keras
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
    centres = np.empty((k, points.shape[1]), points.dtype)
    centres[0] = points[rng.integers(n)]
    nearest = _squared_distances(points, centres[:1])[:, 0]
    for j in range(1, k):
        weights = np.maximum(nearest, 0)
        total = weights.sum()
        i = rng.integers(n) if total <= 0 else rng.choice(n, p=weights / total)
        centres[j] = points[i]
        nearest = np.minimum(nearest, _squared_distances(points, centres[j : j + 1])[:, 0])
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
