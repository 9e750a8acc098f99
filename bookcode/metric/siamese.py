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
import tensorflow as tf

from .. import distribute
from .base import FewShotClassifier
from .distances import euclidean_distance

# Embedding heads used with Siamese networks in chapter 2, importable from here too.
from .heads import ConcatenatedEmbedding, CosineClassifier, concatenate_embeddings  # noqa: F401

HEADS = ("contrastive", "l1")


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
    distance = euclidean_distance(embeddings, embeddings)
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
class SiameseNetwork(FewShotClassifier):
    """A Siamese network over pairs, for verification and one-shot learning.

    ``embedding``: a Keras model mapping examples (batch, ...) to vectors
    (batch, dim); default: the fast Conv-4. ``head``: ``"contrastive"``
    (Hadsell et al. 2006, energy = Euclidean distance, ``margin``) or ``"l1"``
    (Koch et al. 2015, sigmoid of a learned weighted L1 distance, binary
    cross-entropy).

    Called on a pair ``(left, right)`` of (batch, ...) arrays it returns a
    score (batch,) that is higher for pairs it believes to be of the same
    class: minus the distance for the contrastive head, the logit of
    "same" for the L1 head. Train it with ``fit`` on
    :meth:`bookcode.episodes.PairSampler.tf_dataset`, whose elements are
    ``((left, right), same)`` with ``same = 1`` for a same-class pair, or on
    ``EpisodeSampler.tf_dataset()``, each episode a batch of all its pairs
    (:meth:`all_pairs_loss`); validation data may be either kind.

    As a :class:`~bookcode.metric.base.FewShotClassifier`,
    :meth:`predict_episode` does one-shot (or few-shot) classification: the
    logit of a class is the query's score with its most similar support
    example of that class.

    ``active_negatives`` (contrastive head, all-pairs training only): average
    the different-pair loss over the pairs still inside the margin, see
    :func:`all_pairs_contrastive_loss`.
    """

    def __init__(
        self,
        embedding=None,
        head: str = "contrastive",
        margin: float = 1.0,
        active_negatives: bool = False,
        **kwargs,
    ):
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")
        if margin <= 0:
            raise ValueError(f"margin must be positive, got {margin}")
        super().__init__(embedding, **kwargs)
        self.head = head
        self.margin = float(margin)
        self.active_negatives = bool(active_negatives)
        # Koch et al.: p = sigmoid(sum_k alpha_k |f(a)_k - f(b)_k| + b).
        self.similarity = keras.layers.Dense(1, name="l1_similarity") if head == "l1" else None

    # -- the energy ------------------------------------------------------------
    def score_embeddings(self, a, b, paired: bool = True):
        """Scores of embedded examples: (n, dim), (n, dim) -> (n,) if ``paired``,
        else every row of ``a`` against every row of ``b``, (n, m)."""
        if self.head == "contrastive":
            return -euclidean_distance(a, b, paired=paired)
        if paired:
            return self.similarity(tf.abs(a - b))[:, 0]
        return self.similarity(tf.abs(a[:, None] - b[None]))[..., 0]

    def call(self, inputs, training=False):
        """A pair ``(left, right)`` -> scores (batch,); an episode
        ``(support_x, support_y, query_x)`` -> logits (num_query, ways)."""
        if len(inputs) != 2:
            return super().call(inputs, training=training)
        a, b = self.embed(list(inputs), training)
        return self.score_embeddings(a, b)

    def distance(self, left, right):
        """Euclidean distance of the embeddings of a pair, (batch,)."""
        a, b = self.embed([left, right])
        return euclidean_distance(a, b, paired=True)

    def process_support(self, support, support_y):
        return support, support_y

    def score(self, state, query):
        support, support_y = state
        scores = self.score_embeddings(query, support, paired=False)  # (n_query, n_support)
        # Nearest support example of each class: max score over its examples.
        per_class = tf.math.unsorted_segment_max(
            tf.transpose(scores), support_y, tf.reduce_max(support_y) + 1
        )
        return tf.transpose(per_class)  # (n_query, ways)

    # -- losses --------------------------------------------------------------------
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

    def all_pairs_loss(self, labels, embeddings):
        """Balanced loss over every pair of a labelled batch (batch,), (batch, dim):
        mean over same pairs + mean over different pairs, with this network's head."""
        if self.head == "contrastive":
            return all_pairs_contrastive_loss(
                labels, embeddings, self.margin, self.active_negatives
            )
        same, _, valid = _all_pairs(labels, embeddings)
        losses = tf.nn.sigmoid_cross_entropy_with_logits(
            labels=same, logits=self.score_embeddings(embeddings, embeddings, paired=False)
        )
        return _balanced_mean(losses, same, valid)

    # -- training on pairs or on all pairs of episodes ------------------------------
    def _pair_accuracy(self, same, scores, valid=None):
        correct = tf.cast(
            tf.equal(
                tf.cast(scores > self.default_threshold(), tf.float32), tf.cast(same, tf.float32)
            ),
            tf.float32,
        )
        if valid is None:
            return tf.reduce_mean(correct)
        return tf.reduce_sum(correct * valid) / tf.reduce_sum(valid)

    def _step(self, data, training):
        inputs, y = data
        with tf.GradientTape() as tape:
            if len(inputs) == 2:  # ((left, right), same) from the pair sampler
                scores = self(inputs, training=training)
                loss = self.pair_loss(y, scores)
                accuracy = self._pair_accuracy(y, scores)
            else:  # an episode, used as one labelled batch: every pair in it counts
                support_x, support_y, query_x = inputs[:3]
                embeddings = tf.concat(self.embed([support_x, query_x], training), axis=0)
                labels = tf.concat([support_y, tf.cast(y, support_y.dtype)], axis=0)
                loss = self.all_pairs_loss(labels, embeddings)
                same, _, valid = _all_pairs(labels, embeddings)
                scores = self.score_embeddings(embeddings, embeddings, paired=False)
                accuracy = self._pair_accuracy(same, scores, valid)
        if training:
            variables = self.trainable_variables
            grads = tape.gradient(loss, variables)
            share = distribute.replica_share(tf.shape(y)[0])  # 1 on one device
            self.optimizer.apply(distribute.scale(grads, share), variables)
        return self._update_metrics(loss, accuracy)

    def train_step(self, data):
        """One step on a batch of pairs ``((left, right), same)`` from
        :class:`~bookcode.episodes.PairSampler`, or on every pair of an episode
        ``((support_x, support_y, query_x), query_y)`` from
        :class:`~bookcode.episodes.EpisodeSampler` (see :meth:`all_pairs_loss`)."""
        return self._step(data, training=True)

    def test_step(self, data):
        """The loss and pair accuracy of :meth:`train_step`, without training."""
        return self._step(data, training=False)

    def get_config(self):
        return {
            **super().get_config(),
            "head": self.head,
            "margin": self.margin,
            "active_negatives": self.active_negatives,
        }
