"""Relation networks (Sung et al. 2018, "Learning to Compare: Relation Network
for Few-Shot Learning").

The metric itself is learned: an embedding keeps feature maps (for Omniglot
64 x 5 x 5), the support maps of each class are summed, and a small
convolutional *relation module* reads the concatenation [class maps, query
maps] of every (query, class) pair and outputs a relation score in [0, 1].
Training regresses the scores onto one-hot targets with a mean squared error.

The first convolution of the relation module is linear in its input, so on
the concatenation it splits into a convolution of the class maps and one of
the query maps: ``conv([c, q]) = conv_c(c) + conv_q(q)``. :class:`RelationNetwork`
computes it that way, ``ways + queries`` convolutions instead of ``ways x
queries``, with the same result (``tests/test_relation_matching.py``).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from bookcode import nets

from .base import FewShotClassifier


def class_sums(features, labels, ways=None):
    """Sum of the support features of each class (Sung et al. 2018, K-shot):
    (n, ...) and labels (n,) in 0..ways-1 -> (ways, ...)."""
    labels = tf.cast(labels, tf.int32)
    if ways is None:
        ways = tf.reduce_max(labels) + 1
    return tf.math.unsorted_segment_sum(features, labels, ways)


def relation_pairs(classes, query):
    """Every (query, class) pair of feature maps, concatenated on channels as
    [class, query]: classes (c, h, w, k), query (q, h, w, k) -> (q * c, h, w,
    2k), query-major (pair ``i * c + j`` is query ``i`` with class ``j``)."""
    q, c = tf.shape(query)[0], tf.shape(classes)[0]
    return tf.concat([tf.tile(classes, [q, 1, 1, 1]), tf.repeat(query, c, axis=0)], axis=-1)


def papers_dense_initialisation(relation):
    """Initialise the dense layers of a relation module as the paper's public
    code does: kernels from N(0, 0.01^2), biases 1. The hidden ReLU units
    start active (a bias of 1 against inputs near 0), so none starts dead;
    with Keras's default (Glorot kernels, zero biases) the relation network
    learns several times more slowly in short runs (validation characters,
    ``benchmarks/RESULTS.md``). Returns ``relation``."""
    for layer in getattr(relation, "layers", [relation]):
        if isinstance(layer, keras.layers.Dense):
            normal = keras.initializers.RandomNormal(stddev=0.01)
            layer.kernel.assign(tf.cast(normal(layer.kernel.shape), layer.kernel.dtype))
            layer.bias.assign(tf.ones_like(layer.bias))
    return relation


@keras.saving.register_keras_serializable(package="bookcode")
class RelationNetwork(FewShotClassifier):
    """Relation network (Sung et al. 2018).

    ``embedding``: examples (b, ...) -> feature maps (b, h, w, k); default the
    paper's Omniglot embedding (:meth:`default_embedding`, 28x28 -> 5x5x64).
    ``relation``: pairs (b, h, w, 2k) -> relation logits (b, 1); default
    :func:`bookcode.nets.relation_module` sized for the embedding, its dense
    layers initialised as in the paper's code (:func:`papers_dense_initialisation`).

    ``combine``: how the K shots of a class make one feature map, ``"sum"``
    (the paper) or ``"mean"``. With one shot both are the same; a network
    trained with one shot and sums meets 5x larger inputs with 5 shots,
    which the mean avoids.

    The logits of :meth:`score` are the relation scores themselves, sigmoids
    in [0, 1] (``argmax`` picks the class); :meth:`episode_loss` is their mean
    squared error against the one-hot labels.
    """

    def __init__(self, embedding=None, relation=None, combine: str = "sum", **kwargs):
        if combine not in ("sum", "mean"):
            raise ValueError(f'combine must be "sum" or "mean", got {combine!r}')
        super().__init__(embedding, **kwargs)
        self.combine = combine
        shape = (
            tuple(self.embedding.output_shape[1:])
            if hasattr(self.embedding, "output_shape")
            else None
        )
        if shape is None or len(shape) != 3:
            raise ValueError(
                "the relation network's embedding must output feature maps (b, h, w, channels), "
                f"got output shape {shape}; use e.g. nets.conv4(flatten=False)"
            )
        if relation is None:
            relation = nets.relation_module(input_shape=shape[:2] + (2 * shape[2],))
            papers_dense_initialisation(relation)
        if not isinstance(relation, keras.layers.Layer):
            raise ValueError(  # noqa: TRY004 (the project's convention for bad inputs)
                f"relation must be a Keras model or layer, got {type(relation)}"
            )
        self.relation = relation

    @staticmethod
    def default_embedding() -> keras.Model:
        """The paper's Omniglot embedding: four [3x3 conv 64, batch norm, ReLU]
        blocks, max-pooling after the first two only, no padding in those two,
        so 28x28x1 -> 5x5x64 feature maps (fused batch norm, momentum 0.9)."""
        return nets.conv4(
            pooling_blocks=2, padding=["valid", "valid", "same", "same"], flatten=False,
            fused_batch_norm=True, batch_norm_momentum=0.9, name="relation_embedding",
        )  # fmt: skip

    def process_support(self, support, support_y):
        sums = class_sums(support, support_y)
        if self.combine == "sum":
            return sums
        counts = class_sums(tf.ones_like(support_y, tf.float32), support_y)
        return sums / tf.reshape(counts, (-1, 1, 1, 1))

    def _split_first_convolution(self):
        """The relation module's first convolution, its block and the layers
        after, if the module has the structure of nets.relation_module."""
        layers = getattr(self.relation, "layers", None)
        if not layers or not isinstance(layers[0], keras.Sequential):
            return None
        conv = layers[0].layers[0]
        if (
            not isinstance(conv, keras.layers.Conv2D)
            or conv.padding != "same"
            or conv.strides != (1, 1)
        ):
            return None
        return conv, layers[0].layers[1:], layers[1:]

    def relation_logits(self, classes, query):
        """Relation logits (q, c) of every (query, class) pair of feature maps."""
        q, c = tf.shape(query)[0], tf.shape(classes)[0]
        split = self._split_first_convolution()
        if split is None:
            out = self.relation(relation_pairs(classes, query))
            return tf.reshape(tf.cast(out, tf.float32), (q, c))
        conv, rest_of_block, rest = split
        dtype = conv.compute_dtype
        kernel = tf.cast(conv.kernel, dtype)
        channels = classes.shape[-1]
        convolve = lambda x, k: tf.nn.conv2d(tf.cast(x, dtype), k, 1, "SAME")
        by_class = convolve(classes, kernel[:, :, :channels])  # (c, h, w, f)
        by_query = convolve(query, kernel[:, :, channels:])  # (q, h, w, f)
        if conv.use_bias:
            by_query = by_query + tf.cast(conv.bias, dtype)
        x = by_query[:, None] + by_class[None]  # (q, c, h, w, f)
        x = tf.reshape(x, tf.concat([[q * c], tf.shape(x)[2:]], axis=0))
        for layer in list(rest_of_block) + list(rest):
            x = layer(x)
        return tf.reshape(tf.cast(x, tf.float32), (q, c))

    def score(self, classes, query):
        return tf.sigmoid(self.relation_logits(classes, query))

    def episode_loss(self, query_y, scores):
        """Mean squared error of the relation scores against one-hot labels."""
        targets = tf.one_hot(tf.cast(query_y, tf.int32), tf.shape(scores)[1])
        return tf.reduce_mean(tf.square(scores - targets))

    def get_config(self):
        return {
            **super().get_config(),
            "relation": keras.saving.serialize_keras_object(self.relation),
            "combine": self.combine,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["relation"] = keras.saving.deserialize_keras_object(config["relation"])
        return super().from_config(config)
