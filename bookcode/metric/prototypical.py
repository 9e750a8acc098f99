"""Prototypical networks and two of their variants.

- :class:`PrototypicalNetwork` (Snell, Swersky & Zemel 2017, "Prototypical
  Networks for Few-shot Learning"): a class is represented by the mean of its
  embedded support examples, its *prototype*; a query is classified by a
  softmax over negative squared Euclidean distances to the prototypes.
- :class:`GaussianPrototypicalNetwork` (Fort 2017, "Gaussian Prototypical
  Networks for Few-Shot Learning on Omniglot"): the encoder also predicts a
  precision (inverse covariance, a radius or a diagonal) per example; a
  prototype is the precision-weighted mean of its support embeddings and the
  distance to it is measured with the class precision.
- :class:`SemiSupervisedPrototypicalNetwork` (Ren et al. 2018, "Meta-Learning
  for Semi-Supervised Few-Shot Classification"): prototypes refined with
  unlabelled examples by soft k-means, optionally masking out examples that
  look like distractors.

Every learner is a ``keras.Model`` trained with ``fit()`` on
``EpisodeSampler.tf_dataset()`` and implements ``predict_episode(support_x,
support_y, query_x) -> logits (num_query, ways)``. Training with more ways than
testing (Snell et al. train 60-way for 5- and 20-way tests) is just a training
sampler with more ways: the model infers ``ways`` from ``support_y``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

# ---------------------------------------------------------------- functions


def _ways_of(labels, ways):
    return tf.reduce_max(labels) + 1 if ways is None else ways


def class_prototypes(embeddings, labels, ways=None, weights=None):
    """Mean embedding of each class (Snell et al. 2017, eq. 1).

    ``embeddings`` (n, d), ``labels`` (n,) integers in ``0..ways-1``; ``ways``
    defaults to ``max(labels) + 1``. Optional ``weights`` (n,) or (n, d) make it
    a weighted mean (per dimension for (n, d), as in Gaussian prototypes).
    Returns (ways, d). Every class must have at least one example.
    """
    embeddings = tf.convert_to_tensor(embeddings)
    labels = tf.cast(labels, tf.int32)
    one_hot = tf.one_hot(labels, _ways_of(labels, ways), dtype=embeddings.dtype)  # (n, ways)
    if weights is None:
        weights = tf.ones_like(embeddings[:, :1])
    weights = tf.cast(weights, embeddings.dtype)
    if weights.shape.rank == 1:
        weights = weights[:, None]
    weights = tf.broadcast_to(weights, tf.shape(embeddings))
    totals = tf.matmul(one_hot, weights * embeddings, transpose_a=True)  # (ways, d)
    mass = tf.matmul(one_hot, weights, transpose_a=True)  # (ways, d)
    if tf.executing_eagerly() and np.any(mass.numpy() <= 0):
        raise ValueError("every class in 0..ways-1 needs at least one support example")
    return totals / mass


def squared_euclidean_distance(a, b):
    """``||a_i - b_j||^2`` for every pair: ``a`` (n, d), ``b`` (m, d) -> (n, m)."""
    a_sq = tf.reduce_sum(tf.square(a), axis=-1, keepdims=True)  # (n, 1)
    b_sq = tf.reduce_sum(tf.square(b), axis=-1)[None, :]  # (1, m)
    return tf.maximum(a_sq - 2.0 * tf.matmul(a, b, transpose_b=True) + b_sq, 0.0)


def mahalanobis_distance(queries, prototypes, precisions):
    """Squared distance of each query to each class under a diagonal class
    precision (Fort 2017): ``sum_k S_ck (x_ik - p_ck)^2``.

    ``queries`` (n, d), ``prototypes`` (m, d), ``precisions`` (m, d) -> (n, m).
    """
    diff = queries[:, None, :] - prototypes[None, :, :]  # (n, m, d)
    return tf.reduce_sum(precisions[None] * tf.square(diff), axis=-1)


def soft_kmeans_refinement(
    prototypes, support_embeddings, support_labels, unlabeled_embeddings, mask=None
):
    """One soft k-means step that refines prototypes with unlabelled examples
    (Ren et al. 2018, eq. 3-4).

    Each unlabelled example ``j`` is softly assigned to the classes,
    ``z_jc = softmax_c(-||h_j - p_c||^2)``, optionally multiplied by a mask
    ``m_jc`` in [0, 1]; the refined prototype is
    ``(sum_i h_i [y_i = c] + sum_j h_j z_jc m_jc) / (n_c + sum_j z_jc m_jc)``.

    ``prototypes`` (ways, d), ``support_embeddings`` (n, d),
    ``support_labels`` (n,), ``unlabeled_embeddings`` (u, d), ``mask``
    (u, ways) or None. Returns (ways, d).
    """
    prototypes = tf.convert_to_tensor(prototypes)
    ways = tf.shape(prototypes)[0]
    assignments = tf.nn.softmax(-squared_euclidean_distance(unlabeled_embeddings, prototypes))
    if mask is not None:
        assignments = assignments * mask
    one_hot = tf.one_hot(tf.cast(support_labels, tf.int32), ways, dtype=prototypes.dtype)
    totals = tf.matmul(one_hot, support_embeddings, transpose_a=True) + tf.matmul(
        assignments, unlabeled_embeddings, transpose_a=True
    )
    mass = tf.reduce_sum(one_hot, axis=0) + tf.reduce_sum(assignments, axis=0)
    return totals / mass[:, None]


def _check_episode(support_x, support_y, query_x):
    """Clear errors for malformed episodes given to ``predict_episode``."""
    support_y = np.asarray(support_y)
    if support_y.ndim != 1 or len(support_y) != len(support_x):
        raise ValueError(
            f"support_y must have shape ({len(support_x)},), one label per support example; "
            f"got {support_y.shape}"
        )
    if not np.issubdtype(support_y.dtype, np.integer):
        raise ValueError(f"support_y must hold integer labels, got dtype {support_y.dtype}")
    ways = int(support_y.max()) + 1 if len(support_y) else 0
    if len(support_y) == 0 or support_y.min() < 0 or np.any(np.bincount(support_y) == 0):
        raise ValueError(
            "support_y must cover every label 0..ways-1 with at least one example; "
            f"got labels {np.unique(support_y).tolist()}"
        )
    if np.shape(query_x)[1:] != np.shape(support_x)[1:]:
        raise ValueError(
            f"query examples have shape {np.shape(query_x)[1:]} but support examples "
            f"{np.shape(support_x)[1:]}"
        )
    return support_y.astype(np.int32), ways


# ------------------------------------------------------------------- models


class _EpisodicModel(keras.Model):
    """Shared machinery: an embedding network, a ``call`` on episode inputs,
    ``train_step``/``test_step`` with cross-entropy on the queries, and
    ``predict_episode``. Subclasses define ``episode_logits``."""

    def __init__(self, embedding: keras.Model, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(embedding, keras.layers.Layer):
            raise ValueError(  # noqa: TRY004 (the project's convention for bad inputs)
                f"embedding must be a Keras model or layer, got {type(embedding)}"
            )
        self.embedding = embedding
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self._predict_fns = {}

    # The embedding of support, query (and unlabelled) examples in one pass,
    # so batch normalisation sees the whole episode, as in the paper.
    def _embed(self, parts, training):
        sizes = [tf.shape(p)[0] for p in parts]
        outputs = self.embedding(tf.concat(parts, axis=0), training=training)
        # float32 distances even when the embedding computes in (b)float16
        outputs = tf.cast(tf.reshape(outputs, (tf.shape(outputs)[0], -1)), tf.float32)
        return tf.split(outputs, sizes, axis=0)

    def call(self, inputs, training=False):
        """``inputs = (support_x, support_y, query_x[, unlabeled_x])`` -> logits (num_query, ways)."""
        return self.episode_logits(*inputs, training=training)

    def episode_logits(self, support_x, support_y, query_x, unlabeled_x=None, training=False):
        raise NotImplementedError

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def _loss(self, query_y, logits):
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=query_y, logits=logits)
        )

    def train_step(self, data):
        inputs, query_y = data
        with tf.GradientTape() as tape:
            logits = self(inputs, training=True)
            loss = self._loss(query_y, logits)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(query_y, logits)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        inputs, query_y = data
        logits = self(inputs, training=False)
        self.loss_tracker.update_state(self._loss(query_y, logits))
        self.accuracy_tracker.update_state(query_y, logits)
        return {m.name: m.result() for m in self.metrics}

    def predict_episode(self, support_x, support_y, query_x, unlabeled_x=None):
        """Logits (num_query, ways) of the queries of one episode (inference mode)."""
        support_y, _ = _check_episode(support_x, support_y, query_x)
        args = [tf.convert_to_tensor(support_x, tf.float32), tf.constant(support_y),
                tf.convert_to_tensor(query_x, tf.float32)]  # fmt: skip
        if unlabeled_x is not None and len(unlabeled_x):
            args.append(tf.convert_to_tensor(unlabeled_x, tf.float32))
        # one compiled function per signature: with and without unlabelled examples
        if len(args) not in self._predict_fns:
            self._predict_fns[len(args)] = tf.function(
                lambda *a: self.episode_logits(*a, training=False), reduce_retracing=True
            )
        return self._predict_fns[len(args)](*args).numpy()

    def get_config(self):
        config = super().get_config()
        config["embedding"] = keras.saving.serialize_keras_object(self.embedding)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["embedding"] = keras.saving.deserialize_keras_object(config["embedding"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="bookcode")
class PrototypicalNetwork(_EpisodicModel):
    """Prototypical network (Snell et al. 2017).

    ``embedding`` maps a batch of examples (b, ...) to (b, d) (e.g.
    ``bookcode.nets.conv4()``). Trained with ``fit`` on
    ``EpisodeSampler.tf_dataset()``; the number of ways comes from the
    episode, so a model trained 60-way is tested 5-way unchanged.

    >>> model = PrototypicalNetwork(bookcode.nets.conv4())
    >>> model.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> model.fit(train_sampler.tf_dataset(), steps_per_epoch=100, epochs=10)
    """

    def episode_logits(self, support_x, support_y, query_x, unlabeled_x=None, training=False):
        support, query = self._embed([support_x, query_x], training)
        prototypes = class_prototypes(support, support_y)
        return -squared_euclidean_distance(query, prototypes)


@keras.saving.register_keras_serializable(package="bookcode")
class GaussianPrototypicalNetwork(_EpisodicModel):
    """Gaussian prototypical network (Fort 2017).

    The encoder's output (b, d + c) is split into an embedding (b, d) and a raw
    precision (b, c), with ``c = 1`` for ``covariance="radius"`` and ``c = d``
    for ``"diagonal"``. The precision of an example is ``s = 1 +
    softplus(raw)``; a prototype is the precision-weighted mean of its support
    embeddings, the class precision is the sum of their precisions, and the
    logits are minus the squared Mahalanobis distances of the query
    embeddings (Fort's eq. 3-5).
    """

    def __init__(self, embedding: keras.Model, covariance: str = "radius", **kwargs):
        super().__init__(embedding, **kwargs)
        if covariance not in ("radius", "diagonal"):
            raise ValueError(f"covariance must be 'radius' or 'diagonal', got {covariance!r}")
        self.covariance = covariance

    def split(self, outputs):
        """Encoder outputs (b, d + c) -> embeddings (b, d), precisions (b, d)."""
        total = outputs.shape[-1]
        if self.covariance == "radius":
            size = total - 1
        else:
            if total % 2:
                raise ValueError(
                    f"a diagonal covariance needs an even encoder output, got {total} units"
                )
            size = total // 2
        if size < 1:
            raise ValueError(f"the encoder output ({total} units) is too small to split")
        embeddings, raw = outputs[:, :size], outputs[:, size:]
        precisions = 1.0 + tf.nn.softplus(raw)
        return embeddings, tf.broadcast_to(precisions, tf.shape(embeddings))

    def episode_logits(self, support_x, support_y, query_x, unlabeled_x=None, training=False):
        support, query = self._embed([support_x, query_x], training)
        support, support_precision = self.split(support)
        query, _ = self.split(query)
        ways = tf.reduce_max(support_y) + 1
        prototypes = class_prototypes(support, support_y, ways, weights=support_precision)
        one_hot = tf.one_hot(support_y, ways, dtype=support.dtype)
        class_precision = tf.matmul(one_hot, support_precision, transpose_a=True)
        return -mahalanobis_distance(query, prototypes, class_precision)

    def get_config(self):
        return {**super().get_config(), "covariance": self.covariance}


DISTANCE_STATISTICS = 5  # min, max, variance, skewness, kurtosis


def _distance_statistics(distances):
    """Per class statistics of the normalised distances of the unlabelled
    examples (Ren et al. 2018, masked soft k-means): (u, ways) -> (ways, 5)."""
    mean = tf.reduce_mean(distances, axis=0)
    centred = distances - mean
    var = tf.reduce_mean(tf.square(centred), axis=0)
    std = tf.sqrt(var + 1e-8)
    skew = tf.reduce_mean(centred**3, axis=0) / std**3
    kurtosis = tf.reduce_mean(centred**4, axis=0) / tf.square(var + 1e-8)
    return tf.stack(
        [tf.reduce_min(distances, 0), tf.reduce_max(distances, 0), var, skew, kurtosis], axis=1
    )


@keras.saving.register_keras_serializable(package="bookcode")
class SemiSupervisedPrototypicalNetwork(PrototypicalNetwork):
    """Semi-supervised prototypical network (Ren et al. 2018).

    Episodes carry a fourth input, ``unlabeled_x`` (u, ...): unlabelled
    examples of the episode's classes and possibly of distractor classes
    (``EpisodeSampler(..., unlabeled=, distractors=)``). The plain prototypes
    are refined by ``refinement_steps`` steps of soft k-means with them.

    With ``masked=True`` (Ren's "masked soft k-means"), a small MLP reads
    statistics of each class's normalised distances and outputs a threshold
    ``beta_c`` and slope ``gamma_c``; an unlabelled example contributes to
    class ``c`` with weight ``sigmoid(-gamma_c (d_jc - beta_c))``, so
    distractors far from every prototype are masked out.
    ``refinement_steps=0`` (or no unlabelled input) gives plain prototypes.
    """

    def __init__(self, embedding: keras.Model, refinement_steps: int = 1, masked: bool = False,
                 mask_units: int = 20, **kwargs):  # fmt: skip
        super().__init__(embedding, **kwargs)
        if not isinstance(refinement_steps, int) or refinement_steps < 0:
            raise ValueError(f"refinement_steps must be an integer >= 0, got {refinement_steps!r}")
        self.refinement_steps = refinement_steps
        self.masked = bool(masked)
        self.mask_units = mask_units
        if self.masked:
            self.mask_network = keras.Sequential(
                [
                    keras.Input((DISTANCE_STATISTICS,)),
                    keras.layers.Dense(mask_units, activation="tanh", dtype="float32"),
                    keras.layers.Dense(
                        2, bias_initializer=keras.initializers.Constant([1.0, 1.0]), dtype="float32"
                    ),
                ],
                name="mask_network",
            )

    def mask(self, distances):
        """Soft mask (u, ways) in [0, 1] from unlabelled-to-prototype squared distances (u, ways)."""
        normalised = distances / (tf.reduce_mean(distances, axis=0, keepdims=True) + 1e-8)
        beta, gamma = tf.unstack(self.mask_network(_distance_statistics(normalised)), axis=1)
        return tf.sigmoid(-tf.nn.softplus(gamma)[None] * (normalised - beta[None]))

    def refine(self, prototypes, support, support_y, unlabeled):
        """``refinement_steps`` soft k-means steps: (ways, d) -> (ways, d)."""
        refined = prototypes
        for _ in range(self.refinement_steps):
            mask = None
            if self.masked:
                mask = self.mask(squared_euclidean_distance(unlabeled, refined))
            refined = soft_kmeans_refinement(refined, support, support_y, unlabeled, mask)
        return refined

    def episode_logits(self, support_x, support_y, query_x, unlabeled_x=None, training=False):
        if unlabeled_x is None or self.refinement_steps == 0:
            return super().episode_logits(support_x, support_y, query_x, training=training)
        support, query, unlabeled = self._embed([support_x, query_x, unlabeled_x], training)
        prototypes = class_prototypes(support, support_y)
        prototypes = self.refine(prototypes, support, support_y, unlabeled)
        return -squared_euclidean_distance(query, prototypes)

    def get_config(self):
        return {
            **super().get_config(),
            "refinement_steps": self.refinement_steps,
            "masked": self.masked,
            "mask_units": self.mask_units,
        }
