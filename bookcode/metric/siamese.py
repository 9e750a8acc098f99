"""Siamese networks: one embedding applied to both inputs of a pair, and a
similarity learned from same/different pairs.

Two training criteria are offered:

- ``head="contrastive"``: the energy of a pair is the Euclidean distance of
  the two embeddings, trained with the contrastive loss of Hadsell, Chopra &
  LeCun (2006), "Dimensionality Reduction by Learning an Invariant Mapping".
- ``head="l1"``: the head of Koch, Zemel & Salakhutdinov (2015), "Siamese
  Neural Networks for One-shot Image Recognition": a weighted L1 distance
  ``sum_k alpha_k |f(a)_k - f(b)_k| + b`` passed to a sigmoid, trained with
  binary cross-entropy.

Label convention (used everywhere in bookcode): ``same = 1`` for a pair of
the same class, ``same = 0`` for a pair of different classes. Hadsell et al.
write the loss with the opposite convention (their Y = 0 for similar pairs).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

HEADS = ("contrastive", "l1")


def euclidean_distance(a, b, epsilon: float = 1e-9):
    """Euclidean distance between rows: (batch, dim), (batch, dim) -> (batch,).
    ``epsilon`` inside the square root keeps the gradient finite at zero."""
    return tf.sqrt(tf.reduce_sum(tf.square(a - b), axis=-1) + epsilon)


def contrastive_loss(same, distance, margin: float = 1.0):
    """Contrastive loss of Hadsell et al. (2006), per pair, shape (batch,).

    ``same``: (batch,) 1 for a same-class pair, 0 for a different-class pair.
    ``distance``: (batch,) Euclidean distance of the two embeddings.

        loss = same * D^2 / 2 + (1 - same) * max(0, margin - D)^2 / 2

    Same pairs are pulled together; different pairs are pushed apart until
    they are ``margin`` away, and then left alone.
    """
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin}")
    same = tf.cast(same, distance.dtype)
    pull = 0.5 * tf.square(distance)
    push = 0.5 * tf.square(tf.nn.relu(margin - distance))
    return same * pull + (1.0 - same) * push


def all_pairs_contrastive_loss(
    labels, embeddings, margin: float = 1.0, active_negatives: bool = False
):
    """Contrastive loss over every pair of a batch (Hadsell et al. 2006).

    ``labels``: (batch,) integer classes; ``embeddings``: (batch, dim). Each
    of the batch*(batch-1)/2 pairs is a same pair (equal labels) or a
    different pair; the result is the mean loss of the same pairs plus the
    mean loss of the different pairs, so both count equally however many of
    each the batch holds. A batch of P classes x K examples gives
    P*K*(K-1)/2 same pairs and far more different ones from only P*K
    embeddings: the data is used much more efficiently than independent pairs.

    ``active_negatives=True`` averages the different-pair term only over the
    *active* different pairs, those still closer than ``margin`` (non-zero
    loss). Once most different pairs are beyond the margin, a plain mean is
    dominated by zeros and the few hard pairs get a tiny weight; the active
    mean keeps their weight (a mild form of the hard-negative mining of
    Schroff et al. 2015, FaceNet, and Hermans et al. 2017).
    """
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin}")
    same, distance, valid = _all_pairs(labels, embeddings)
    losses = contrastive_loss(same, distance, margin)
    return _balanced_mean(losses, same, valid, active_negatives)


def _all_pairs(labels, embeddings):
    """Labels, distances and a mask of the pairs i < j: each (batch, batch)."""
    labels = tf.reshape(labels, [-1])
    n = tf.shape(labels)[0]
    same = tf.cast(tf.equal(labels[:, None], labels[None, :]), embeddings.dtype)
    squared = tf.reduce_sum(tf.square(embeddings[:, None] - embeddings[None, :]), axis=-1)
    distance = tf.sqrt(squared + 1e-9)
    valid = tf.linalg.band_part(tf.ones((n, n), embeddings.dtype), 0, -1) - tf.eye(
        n, dtype=embeddings.dtype
    )
    return same, distance, valid


def _balanced_mean(losses, same, valid, active_negatives=False):
    positive, negative = same * valid, (1.0 - same) * valid
    if active_negatives:
        negative = negative * tf.cast(losses > 0, losses.dtype)
    mean_positive = tf.reduce_sum(losses * positive) / tf.maximum(tf.reduce_sum(positive), 1.0)
    mean_negative = tf.reduce_sum(losses * negative) / tf.maximum(tf.reduce_sum(negative), 1.0)
    return mean_positive + mean_negative


@keras.saving.register_keras_serializable(package="bookcode")
class SiameseNetwork(keras.Model):
    """A Siamese network over pairs, for verification and one-shot learning.

    ``embedding``: a Keras model mapping examples (batch, ...) to vectors
    (batch, dim). ``head``: ``"contrastive"`` (Hadsell et al. 2006, energy =
    Euclidean distance, ``margin``) or ``"l1"`` (Koch et al. 2015, sigmoid of
    a learned weighted L1 distance, binary cross-entropy).

    Called on a pair ``(left, right)`` of (batch, ...) arrays it returns a
    score (batch,) that is higher for pairs it believes to be of the same
    class: minus the distance for the contrastive head, the logit of
    "same" for the L1 head. Train it with ``fit`` on
    :meth:`bookcode.episodes.PairSampler.tf_dataset`, whose elements are
    ``((left, right), same)`` with ``same = 1`` for a same-class pair.

    :meth:`predict_episode` does one-shot (or few-shot) classification: each
    query takes the class of its most similar support example.

    ``active_negatives`` (contrastive head, all-pairs training only): average
    the different-pair loss over the pairs still inside the margin, see
    :func:`all_pairs_contrastive_loss`.
    """

    def __init__(
        self,
        embedding,
        head: str = "contrastive",
        margin: float = 1.0,
        active_negatives: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")
        if margin <= 0:
            raise ValueError(f"margin must be positive, got {margin}")
        self.embedding = embedding
        self.head = head
        self.margin = float(margin)
        self.active_negatives = bool(active_negatives)
        # Koch et al.: p = sigmoid(sum_k alpha_k |f(a)_k - f(b)_k| + b).
        self.similarity = keras.layers.Dense(1, name="l1_similarity") if head == "l1" else None
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")

    # -- the energy ------------------------------------------------------------
    def score_embeddings(self, a, b):
        """Score of embedded pairs: (batch, dim), (batch, dim) -> (batch,)."""
        if self.head == "contrastive":
            return -euclidean_distance(a, b)
        return self.similarity(tf.abs(a - b))[:, 0]

    def call(self, inputs, training=False):
        left, right = inputs
        both = self.embedding(tf.concat([left, right], axis=0), training=training)
        a, b = tf.split(both, 2, axis=0)
        return self.score_embeddings(a, b)

    def distance(self, left, right):
        """Euclidean distance of the embeddings of a pair, (batch,)."""
        a = self.embedding(left, training=False)
        b = self.embedding(right, training=False)
        return euclidean_distance(a, b)

    def pair_loss(self, same, scores):
        """Mean loss of a batch of pairs given their scores (from :meth:`call`)."""
        if self.head == "contrastive":
            return tf.reduce_mean(contrastive_loss(same, -scores, self.margin))
        return tf.reduce_mean(
            tf.nn.sigmoid_cross_entropy_with_logits(
                labels=tf.cast(same, scores.dtype), logits=scores
            )
        )

    def default_threshold(self) -> float:
        """The score above which a pair is called "same" before any tuning:
        half the margin (distance < margin / 2) or probability 0.5."""
        return -self.margin / 2 if self.head == "contrastive" else 0.0

    # -- training ----------------------------------------------------------------
    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def _update(self, loss, same, scores):
        predicted = tf.cast(scores > self.default_threshold(), tf.float32)
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(
            tf.reduce_mean(tf.cast(tf.equal(predicted, tf.cast(same, tf.float32)), tf.float32))
        )
        return {m.name: m.result() for m in self.metrics}

    def all_pairs_loss(self, labels, embeddings):
        """Balanced loss over every pair of a labelled batch (batch,), (batch, dim):
        mean over same pairs + mean over different pairs, with this network's head."""
        if self.head == "contrastive":
            return all_pairs_contrastive_loss(
                labels, embeddings, self.margin, self.active_negatives
            )
        same, _, valid = _all_pairs(labels, embeddings)
        n = tf.shape(embeddings)[0]
        scores = self.score_embeddings(
            tf.repeat(embeddings, n, axis=0), tf.tile(embeddings, [n, 1])
        )
        losses = tf.nn.sigmoid_cross_entropy_with_logits(
            labels=same, logits=tf.reshape(scores, (n, n))
        )
        return _balanced_mean(losses, same, valid)

    def _train_all_pairs(self, data):
        # An episode ((support_x, support_y, query_x), query_y) of the episode
        # sampler, used as one labelled batch: every pair in it is a training pair.
        (support_x, support_y, query_x), query_y = data
        x = tf.concat([support_x, query_x], axis=0)
        labels = tf.concat([support_y, query_y], axis=0)
        with tf.GradientTape() as tape:
            embeddings = self.embedding(x, training=True)
            loss = self.all_pairs_loss(labels, embeddings)
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        # Pair accuracy over all pairs at the default threshold.
        same, _, valid = _all_pairs(labels, embeddings)
        n = tf.shape(embeddings)[0]
        scores = tf.reshape(
            self.score_embeddings(tf.repeat(embeddings, n, axis=0), tf.tile(embeddings, [n, 1])),
            (n, n),
        )
        correct = tf.cast(
            tf.equal(tf.cast(scores > self.default_threshold(), same.dtype), same), same.dtype
        )
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(tf.reduce_sum(correct * valid) / tf.reduce_sum(valid))
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        """One step on a batch of pairs ``((left, right), same)`` from
        :class:`~bookcode.episodes.PairSampler`, or on every pair of an episode
        ``((support_x, support_y, query_x), query_y)`` from
        :class:`~bookcode.episodes.EpisodeSampler` (see :meth:`all_pairs_loss`)."""
        if len(data[0]) == 3:
            return self._train_all_pairs(data)
        (left, right), same = data
        with tf.GradientTape() as tape:
            scores = self((left, right), training=True)
            loss = self.pair_loss(same, scores)
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply(grads, variables)
        return self._update(loss, same, scores)

    def test_step(self, data):
        (left, right), same = data
        scores = self((left, right), training=False)
        return self._update(self.pair_loss(same, scores), same, scores)

    # -- one-shot classification -------------------------------------------------
    @tf.function(reduce_retracing=True)
    def _episode_logits(self, support_x, support_y, query_x, ways):
        s = self.embedding(support_x, training=False)  # (n_support, dim)
        q = self.embedding(query_x, training=False)  # (n_query, dim)
        n_q, n_s = tf.shape(q)[0], tf.shape(s)[0]
        # Every query against every support example: (n_query, n_support).
        q_all = tf.repeat(q, n_s, axis=0)
        s_all = tf.tile(s, [n_q, 1])
        scores = tf.reshape(self.score_embeddings(q_all, s_all), (n_q, n_s))
        # Nearest support example of each class: max score over its examples.
        per_class = tf.math.unsorted_segment_max(tf.transpose(scores), support_y, ways)
        return tf.transpose(per_class)  # (n_query, ways)

    def predict_episode(self, support_x, support_y, query_x):
        """Logits (num_query, ways): the score of each query against its most
        similar support example of each class.

        ``support_x`` (n_support, ...), ``support_y`` (n_support,) in
        ``0..ways-1``, ``query_x`` (n_query, ...).
        """
        support_y = tf.convert_to_tensor(support_y, tf.int32)
        if len(support_x) != int(support_y.shape[0]):
            raise ValueError(
                f"support_x has {len(support_x)} examples but support_y has {support_y.shape[0]}"
            )
        ways = int(tf.reduce_max(support_y)) + 1
        return self._episode_logits(
            tf.convert_to_tensor(support_x, tf.float32),
            support_y,
            tf.convert_to_tensor(query_x, tf.float32),
            tf.constant(ways),
        ).numpy()

    def get_config(self):
        return {
            **super().get_config(),
            "embedding": keras.saving.serialize_keras_object(self.embedding),
            "head": self.head,
            "margin": self.margin,
            "active_negatives": self.active_negatives,
        }

    @classmethod
    def from_config(cls, config):
        config["embedding"] = keras.saving.deserialize_keras_object(config["embedding"])
        return cls(**config)


# -- embeddings trained as classifiers, and ensembles of embeddings ---------------------
@keras.saving.register_keras_serializable(package="bookcode")
class CosineClassifier(keras.layers.Layer):
    """Normalised softmax head: ``logits[c] = scale * cos(x, w_c)``.

    Trained with cross-entropy over the training classes on top of an
    embedding, it turns the embedding into a classifier whose features are
    compared by angle, so the embedding (L2-normalised) can then be used for
    nearest-neighbour comparison of *new* classes (Wang et al. 2018, CosFace,
    without the margin; Chen et al. 2019, "A Closer Look at Few-shot
    Classification"). ``scale`` sets how peaked the softmax can get: cosines
    lie in [-1, 1], so without it the loss could not approach zero.
    Inputs (batch, dim) -> logits (batch, num_classes).
    """

    def __init__(self, num_classes: int, scale: float = 16.0, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.num_classes = int(num_classes)
        self.scale = float(scale)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel", shape=(input_shape[-1], self.num_classes), initializer="glorot_uniform"
        )

    def call(self, x):
        x = tf.math.l2_normalize(x, axis=-1)
        w = tf.math.l2_normalize(tf.cast(self.kernel, x.dtype), axis=0)
        return self.scale * tf.matmul(x, w)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "scale": self.scale}


class ConcatenatedEmbedding(keras.Model):
    """Several embeddings as one: their outputs side by side, divided by
    ``sqrt(len(embeddings))`` (see :func:`concatenate_embeddings`)."""

    def __init__(self, embeddings, **kwargs):
        super().__init__(**kwargs)
        self.members = list(embeddings)
        self.factor = 1.0 / float(np.sqrt(len(self.members)))

    def call(self, x, training=False):
        outputs = [tf.cast(e(x, training=training), tf.float32) for e in self.members]
        return tf.concat(outputs, axis=-1) * self.factor


def concatenate_embeddings(*embeddings, name: str = "concatenated_embedding"):
    """One embedding from several trained ones: their outputs side by side,
    divided by ``sqrt(len(embeddings))``.

    For unit-length embeddings the result has unit length, and its squared
    Euclidean distance is the mean of the members' squared distances: an
    ensemble that averages the members' energies. All members must take the
    same input shape (members may share a name).
    """
    if len(embeddings) < 2:
        raise ValueError(f"need at least two embeddings, got {len(embeddings)}")
    shape = tuple(embeddings[0].input_shape[1:])
    for e in embeddings[1:]:
        if tuple(e.input_shape[1:]) != shape:
            raise ValueError(f"input shapes differ: {shape} and {tuple(e.input_shape[1:])}")
    return ConcatenatedEmbedding(embeddings, name=name)


# -- verification: is this pair the same class? ------------------------------------
def _check_pairs(same, scores):
    same = np.asarray(same, dtype=np.float64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if same.shape != scores.shape:
        raise ValueError(f"same has {same.size} labels but scores has {scores.size} values")
    if not np.isin(same, (0, 1)).all():
        raise ValueError("same must hold only 0 (different class) and 1 (same class)")
    if same.min() == same.max():
        raise ValueError("need both same (1) and different (0) pairs")
    return same, scores


def roc_curve(same, scores):
    """Receiver operating characteristic of a verifier that says "same" when
    ``score >= threshold``.

    ``same``: (pairs,) 1 for same-class pairs, 0 otherwise; ``scores``:
    (pairs,) higher means more alike. Returns ``(false_positive_rate,
    true_positive_rate, thresholds)``, each (distinct scores + 1,), from the
    strictest threshold (+inf: nothing is "same") to the loosest.
    """
    same, scores = _check_pairs(same, scores)
    order = np.argsort(-scores, kind="stable")
    scores, same = scores[order], same[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_pos = np.cumsum(same)[last_of_value]
    false_pos = (last_of_value + 1) - true_pos
    tpr = np.r_[0.0, true_pos / same.sum()]
    fpr = np.r_[0.0, false_pos / (len(same) - same.sum())]
    return fpr, tpr, np.r_[np.inf, scores[last_of_value]]


def roc_auc(same, scores) -> float:
    """Area under the ROC curve: the probability that a random same-class pair
    scores higher than a random different-class pair (ties count half)."""
    fpr, tpr, _ = roc_curve(same, scores)
    return float(np.trapezoid(tpr, fpr))


def best_threshold(same, scores) -> tuple[float, float]:
    """The threshold with the highest verification accuracy on these pairs,
    and that accuracy. Choose it on training classes, then apply it to new
    ones with :func:`verification_accuracy`."""
    fpr, tpr, thresholds = roc_curve(same, scores)
    same = np.asarray(same).reshape(-1)
    positives = same.sum()
    accuracy = (tpr * positives + (1 - fpr) * (len(same) - positives)) / len(same)
    best = int(np.argmax(accuracy[1:])) + 1  # skip +inf
    return float(thresholds[best]), float(accuracy[best])


def verification_accuracy(same, scores, threshold: float) -> float:
    """Fraction of pairs classified correctly by ``score >= threshold`` (all
    pairs count, same and different: not the precision on predicted-same pairs)."""
    same, scores = _check_pairs(same, scores)
    return float(np.mean((scores >= threshold) == (same == 1)))
