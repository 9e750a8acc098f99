"""Distances and similarities between embeddings, shared by every metric learner.

Every function compares each row of ``a`` (n, ...) with each row of ``b``
(m, ...) and returns (n, m); with ``paired=True`` it compares ``a[i]`` with
``b[i]`` only and returns (n,). Trailing axes are flattened, so feature maps
(n, h, w, c) are compared as vectors. Results keep the inputs' dtype.

- squared Euclidean: prototypical networks (Snell et al. 2017, eq. 2);
- Euclidean: the energy of contrastive Siamese networks (Hadsell et al. 2006);
- cosine similarity with a scale (temperature ``1 / scale``): matching
  networks (Vinyals et al. 2016) and cosine classifiers (Chen et al. 2019);
- diagonal Mahalanobis: Gaussian prototypical networks (Fort 2017).
"""

from __future__ import annotations

import tensorflow as tf


def _flat(x):
    x = tf.convert_to_tensor(x)
    return x if x.shape.rank == 2 else tf.reshape(x, (tf.shape(x)[0], -1))


def squared_euclidean_distance(a, b, paired: bool = False):
    """``||a_i - b_j||^2``: (n, ...), (m, ...) -> (n, m), or (n,) if ``paired``."""
    a, b = _flat(a), _flat(b)
    if paired:
        return tf.reduce_sum(tf.square(a - b), axis=-1)
    a_sq = tf.reduce_sum(tf.square(a), axis=-1, keepdims=True)  # (n, 1)
    b_sq = tf.reduce_sum(tf.square(b), axis=-1)[None, :]  # (1, m)
    # ||a||^2 - 2 a.b + ||b||^2: one matrix product instead of an (n, m, d) tensor
    return tf.maximum(a_sq - 2.0 * tf.matmul(a, b, transpose_b=True) + b_sq, 0.0)


def euclidean_distance(a, b, paired: bool = False, epsilon: float = 1e-9):
    """``sqrt(||a_i - b_j||^2 + epsilon)``: (n, ...), (m, ...) -> (n, m), or (n,)
    if ``paired``. ``epsilon`` keeps the gradient finite at distance zero."""
    return tf.sqrt(squared_euclidean_distance(a, b, paired) + epsilon)


def cosine_similarity(a, b, scale: float = 1.0, paired: bool = False):
    """``scale * cos(a_i, b_j)``: (n, ...), (m, ...) -> (n, m), or (n,) if ``paired``.

    Used as logits, ``scale`` is an inverse temperature: cosines lie in
    [-1, 1], so without it a softmax over them can never be confident.
    """
    a = tf.math.l2_normalize(_flat(a), axis=-1)
    b = tf.math.l2_normalize(_flat(b), axis=-1)
    if paired:
        return scale * tf.reduce_sum(a * b, axis=-1)
    return scale * tf.matmul(a, b, transpose_b=True)


def mahalanobis_distance(queries, prototypes, precisions):
    """Squared distance of each query to each class under a diagonal class
    precision (Fort 2017): ``sum_k S_ck (x_ik - p_ck)^2``.

    ``queries`` (n, d), ``prototypes`` (m, d), ``precisions`` (m, d) -> (n, m).
    """
    diff = queries[:, None, :] - prototypes[None, :, :]  # (n, m, d)
    return tf.reduce_sum(precisions[None] * tf.square(diff), axis=-1)
