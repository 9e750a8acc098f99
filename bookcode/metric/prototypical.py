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
  unlabelled examples by soft k-means, optionally with a distractor cluster
  or a mask for examples that look like distractors.

All are :class:`~bookcode.metric.base.FewShotClassifier` s: trained with
``fit()`` on ``EpisodeSampler.tf_dataset()``, evaluated with
``predict_episode(support_x, support_y, query_x) -> logits (num_query, ways)``.
Training with more ways than testing (Snell et al. train 60-way for 5- and
20-way tests) is just a training sampler with more ways: the model infers
``ways`` from ``support_y``. Built without an embedding, they use the fast
Conv-4 (:meth:`FewShotClassifier.default_embedding`).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from .base import FewShotClassifier
from .distances import mahalanobis_distance, squared_euclidean_distance

# ---------------------------------------------------------------- functions


def _ways_of(labels, ways):
    return tf.reduce_max(labels) + 1 if ways is None else ways


def class_prototypes(embeddings, labels, ways=None, weights=None):
    """Mean embedding of each class (Snell et al. 2017, eq. 1).

    ``embeddings`` (n, ...), ``labels`` (n,) integers in ``0..ways-1``;
    ``ways`` defaults to ``max(labels) + 1``. Optional ``weights`` (n,) or of
    the embeddings' shape make it a weighted mean (per dimension, as in
    Gaussian prototypes). Returns (ways, ...): feature maps give mean feature
    maps. Every class must have at least one example.
    """
    embeddings = tf.convert_to_tensor(embeddings)
    shape = tf.shape(embeddings)
    flat = tf.reshape(embeddings, (shape[0], -1))
    labels = tf.cast(labels, tf.int32)
    one_hot = tf.one_hot(labels, _ways_of(labels, ways), dtype=flat.dtype)  # (n, ways)
    if weights is None:
        weights = tf.ones_like(flat[:, :1])
    weights = tf.cast(weights, flat.dtype)
    weights = tf.reshape(weights, (shape[0], -1))  # (n, 1) or (n, d)
    weights = tf.broadcast_to(weights, tf.shape(flat))
    totals = tf.matmul(one_hot, weights * flat, transpose_a=True)  # (ways, d)
    mass = tf.matmul(one_hot, weights, transpose_a=True)  # (ways, d)
    if tf.executing_eagerly() and np.any(mass.numpy() <= 0):
        raise ValueError("every class in 0..ways-1 needs at least one support example")
    return tf.reshape(totals / mass, tf.concat([[-1], shape[1:]], axis=0))


def soft_kmeans_refinement(
    prototypes,
    support_embeddings,
    support_labels,
    unlabeled_embeddings,
    mask=None,
    distractor_radius=None,
):
    """One soft k-means step that refines prototypes with unlabelled examples
    (Ren et al. 2018, eq. 3-4).

    Each unlabelled example ``j`` is softly assigned to the classes,
    ``z_jc = softmax_c(-||h_j - p_c||^2)``, optionally multiplied by a mask
    ``m_jc`` in [0, 1]; the refined prototype is
    ``(sum_i h_i [y_i = c] + sum_j h_j z_jc m_jc) / (n_c + sum_j z_jc m_jc)``.

    With ``distractor_radius`` r (a scalar), the softmax also has a
    *distractor cluster* centred at the origin (Ren et al. 2018, eq. 5): its
    logit is ``-||h_j||^2 / r^2 - log r`` against ``-||h_j - p_c||^2`` for the
    classes (radius 1); what it takes is not given to any class.

    ``prototypes`` (ways, d), ``support_embeddings`` (n, d),
    ``support_labels`` (n,), ``unlabeled_embeddings`` (u, d), ``mask``
    (u, ways) or None. Returns (ways, d).
    """
    prototypes = tf.convert_to_tensor(prototypes)
    ways = tf.shape(prototypes)[0]
    logits = -squared_euclidean_distance(unlabeled_embeddings, prototypes)
    if distractor_radius is None:
        assignments = tf.nn.softmax(logits)
    else:
        radius = tf.cast(distractor_radius, logits.dtype)
        to_origin = tf.reduce_sum(tf.square(unlabeled_embeddings), axis=-1, keepdims=True)
        logits = tf.concat([logits, -to_origin / tf.square(radius) - tf.math.log(radius)], axis=1)
        assignments = tf.nn.softmax(logits)[:, :-1]
    if mask is not None:
        assignments = assignments * mask
    one_hot = tf.one_hot(tf.cast(support_labels, tf.int32), ways, dtype=prototypes.dtype)
    totals = tf.matmul(one_hot, support_embeddings, transpose_a=True) + tf.matmul(
        assignments, unlabeled_embeddings, transpose_a=True
    )
    mass = tf.reduce_sum(one_hot, axis=0) + tf.reduce_sum(assignments, axis=0)
    return totals / mass[:, None]


# ------------------------------------------------------------------- models


@keras.saving.register_keras_serializable(package="bookcode")
class PrototypicalNetwork(FewShotClassifier):
    """Prototypical network (Snell et al. 2017).

    ``embedding`` maps a batch of examples (b, ...) to embeddings (compared
    flattened); default: the fast Conv-4. Trained with ``fit`` on
    ``EpisodeSampler.tf_dataset()``; the number of ways comes from the
    episode, so a model trained 60-way is tested 5-way unchanged.

    >>> model = PrototypicalNetwork()  # nets.conv4(fused_batch_norm=True)
    >>> model.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> model.fit(train_sampler.tf_dataset(), steps_per_epoch=100, epochs=10)
    """

    def process_support(self, support, support_y):
        return class_prototypes(support, support_y)

    def score(self, prototypes, query):
        return -squared_euclidean_distance(query, prototypes)


@keras.saving.register_keras_serializable(package="bookcode")
class GaussianPrototypicalNetwork(FewShotClassifier):
    """Gaussian prototypical network (Fort 2017).

    Every example gets an embedding (b, d) and a raw precision (b, c), with
    ``c = 1`` for ``covariance="radius"`` and ``c = d`` for ``"diagonal"``.
    With ``precision_head=True`` (default) the whole encoder output is the
    embedding and a linear :class:`PrecisionHead` on it gives the raw
    precision: an output of its own, unconstrained, whatever the encoder ends
    with (Conv-4 ends in ReLU and max-pool, which would pin a precision read
    off the encoder at its floor). With ``precision_head=False`` the encoder's
    output (b, d + c) is split, as in Fort's code, and its last ``c`` units
    must be free to go negative. The precision of an example is ``s = 1 +
    softplus(raw)``; a prototype is the precision-weighted mean of its support
    embeddings, the class precision is the sum of their precisions, and the
    logits are minus the squared Mahalanobis distances of the query
    embeddings (Fort's eq. 3-5).
    """

    def __init__(
        self, embedding=None, covariance: str = "radius", precision_head: bool = True, **kwargs
    ):
        super().__init__(embedding, **kwargs)
        if covariance not in ("radius", "diagonal"):
            raise ValueError(f"covariance must be 'radius' or 'diagonal', got {covariance!r}")
        self.covariance = covariance
        self.precision_head = PrecisionHead(covariance) if precision_head else None

    def split(self, outputs):
        """Encoder outputs -> embeddings (b, d), precisions (b, d)."""
        outputs = (
            tf.reshape(outputs, (tf.shape(outputs)[0], -1)) if outputs.shape.rank != 2 else outputs
        )
        if self.precision_head is not None:
            raw = tf.cast(self.precision_head(outputs), outputs.dtype)
            precisions = 1.0 + tf.nn.softplus(raw)
            return outputs, tf.broadcast_to(precisions, tf.shape(outputs))
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

    def process_support(self, support, support_y):
        support, precision = self.split(support)
        ways = tf.reduce_max(support_y) + 1
        prototypes = class_prototypes(support, support_y, ways, weights=precision)
        one_hot = tf.one_hot(support_y, ways, dtype=support.dtype)
        return prototypes, tf.matmul(one_hot, precision, transpose_a=True)

    def score(self, state, query):
        prototypes, class_precision = state
        return -mahalanobis_distance(self.split(query)[0], prototypes, class_precision)

    def get_config(self):
        return {
            **super().get_config(),
            "covariance": self.covariance,
            "precision_head": self.precision_head is not None,
        }


@keras.saving.register_keras_serializable(package="bookcode")
class PrecisionHead(keras.layers.Layer):
    """The raw precision of a Gaussian prototypical network's examples: a
    linear map of the embedding (b, d) to (b, 1) (``"radius"``) or (b, d)
    (``"diagonal"``), starting at zero (every precision starts at 1 + ln 2)."""

    def __init__(self, covariance: str = "radius", **kwargs):
        super().__init__(**kwargs)
        self.covariance = covariance

    def build(self, input_shape):
        units = 1 if self.covariance == "radius" else input_shape[-1]
        self.kernel = self.add_weight(shape=(input_shape[-1], units), initializer="zeros")
        self.bias = self.add_weight(shape=(units,), initializer="zeros")

    def call(self, embeddings):
        return tf.matmul(embeddings, tf.cast(self.kernel, embeddings.dtype)) + tf.cast(
            self.bias, embeddings.dtype
        )

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

    Episodes carry an extra input, ``unlabeled_x`` (u, ...): unlabelled
    examples of the episode's classes and possibly of distractor classes
    (``EpisodeSampler(..., unlabeled=, distractors=)``; in ``fit`` the fourth
    input ``{"unlabeled_x": ...}``, in ``predict_episode(..., unlabeled_x=)``,
    passed by ``evaluate`` from ``Episode.extras()``). The plain prototypes
    are refined by ``refinement_steps`` steps of soft k-means with them.

    With ``masked=True`` (Ren's "masked soft k-means"), a small MLP reads
    statistics of each class's normalised distances and outputs a threshold
    ``beta_c`` and slope ``gamma_c``; an unlabelled example contributes to
    class ``c`` with weight ``sigmoid(-gamma_c (d_jc - beta_c))``, so
    distractors far from every prototype are masked out. With
    ``distractor_cluster=True`` (Ren's "soft k-means + cluster"), the soft
    assignment has one more cluster at the origin, with a learned radius,
    that absorbs the distractors; it starts wide (``initial_distractor_radius``,
    100), so that its gradient does not vanish. ``refinement_steps=0`` (or no unlabelled
    input) gives plain prototypes.
    """

    extra_inputs = ("unlabeled_x",)

    def __init__(self, embedding=None, refinement_steps: int = 1, masked: bool = False,
                 mask_units: int = 20, distractor_cluster: bool = False,
                 initial_distractor_radius: float = 100.0, **kwargs):  # fmt: skip
        super().__init__(embedding, **kwargs)
        if not isinstance(refinement_steps, int) or refinement_steps < 0:
            raise ValueError(f"refinement_steps must be an integer >= 0, got {refinement_steps!r}")
        if masked and distractor_cluster:
            raise ValueError(
                "choose one of Ren et al.'s variants: masked=True or distractor_cluster=True, not both"
            )
        self.refinement_steps = refinement_steps
        self.masked = bool(masked)
        self.distractor_cluster = bool(distractor_cluster)
        self.initial_distractor_radius = float(initial_distractor_radius)
        if self.distractor_cluster:
            if not initial_distractor_radius > 0:
                raise ValueError(
                    f"initial_distractor_radius must be positive, got {initial_distractor_radius!r}"
                )
            # the distractor cluster's radius is exp(log_radius), learned
            self.distractor_log_radius = self.add_weight(
                shape=(),
                initializer=keras.initializers.Constant(float(np.log(initial_distractor_radius))),
                name="distractor_log_radius",
                dtype="float32",
            )
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
            radius = None
            if self.distractor_cluster:
                radius = tf.cast(tf.exp(self.distractor_log_radius), refined.dtype)
            refined = soft_kmeans_refinement(refined, support, support_y, unlabeled, mask, radius)
        return refined

    def predict_episode(self, support_x, support_y, query_x, unlabeled_x=None):
        """Logits (num_query, ways); ``unlabeled_x`` (u, ...) refines the prototypes."""
        extras = {} if unlabeled_x is None else {"unlabeled_x": unlabeled_x}
        return super().predict_episode(support_x, support_y, query_x, **extras)

    def process_support(self, support, support_y, unlabeled_x=None):
        prototypes = class_prototypes(support, support_y)
        if unlabeled_x is None:
            return prototypes
        flat = lambda x: tf.reshape(x, (tf.shape(x)[0], -1))
        shape = tf.shape(prototypes)
        refined = self.refine(flat(prototypes), flat(support), support_y, flat(unlabeled_x))
        return tf.reshape(refined, shape)

    def get_config(self):
        return {
            **super().get_config(),
            "refinement_steps": self.refinement_steps,
            "masked": self.masked,
            "mask_units": self.mask_units,
            "distractor_cluster": self.distractor_cluster,
            "initial_distractor_radius": self.initial_distractor_radius,
        }
