"""Matching networks (Vinyals et al. 2016, "Matching Networks for One Shot
Learning").

A query is labelled by attention over the support set: with ``f`` the
query's embedding and ``g_i`` the support embeddings,

    a(x, x_i) = softmax_i(scale * cos(f(x), g(x_i))),   p(y | x) = sum_i a(x, x_i) y_i.

``scale`` is an inverse temperature (learned, starting at 10 by default):
cosines lie in [-1, 1], and a softmax over them alone is never confident.

With *full context embeddings* (FCE, the paper's appendix) the embeddings
depend on the whole support set:

- ``g(x_i, S) = h_fw_i + h_bw_i + g'(x_i)``: a bidirectional LSTM over the
  embedded support set, plus a skip connection (:class:`SupportContext`);
- ``f(x, S)``: an LSTM run for ``K`` processing steps on the embedded query
  ``f'(x)``, whose state is ``[h_{k-1}, r_{k-1}]`` concatenated with the read
  vector ``r_{k-1} = sum_i softmax_i(h_{k-1}^T g_i) g_i`` (a dot-product
  attention over ``g``), ``h_k = LSTM output + f'(x)``, ``f = h_K``
  (:class:`AttentionLSTM`).

A support *set* has no order, but an LSTM reads a sequence. Samplers often
sort the support by class (``EpisodeSampler`` does), which would let the LSTM
read labels from positions. :class:`MatchingNetwork` therefore feeds the
support to the LSTM in an order that depends on the images only (by the sum
of their embeddings), in training and at test time, and puts the outputs back
in place: the predictions do not change when the support set is permuted.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from .base import FewShotClassifier
from .distances import cosine_similarity


def _flat(x):
    return tf.reshape(x, (tf.shape(x)[0], -1))


@keras.saving.register_keras_serializable(package="bookcode")
class SupportContext(keras.layers.Layer):
    """``g(x_i, S) = h_fw_i + h_bw_i + g'(x_i)`` (Vinyals et al. 2016,
    appendix A.2): a bidirectional LSTM of ``units`` (the embedding size)
    over the support sequence (n, units), outputs summed with the input."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.lstm = keras.layers.Bidirectional(
            keras.layers.LSTM(self.units, return_sequences=True, dtype="float32"),
            merge_mode="sum",
            dtype="float32",
        )

    def build(self, input_shape):
        self.lstm.build((None, None, self.units))

    def call(self, support):
        support = tf.cast(support, "float32")  # the LSTM computes in float32 under any policy
        return support + self.lstm(support[None])[0]

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="bookcode")
class AttentionLSTM(keras.layers.Layer):
    """``f(x, S)`` of Vinyals et al. 2016 (appendix A.1), ``steps`` processing
    steps ``K``: with ``h_0 = c_0 = 0``,

        r_{k-1} = sum_i softmax_i(h_{k-1}^T g_i) g_i
        h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})
        h_k = h^_k + f'(x)

    An LSTM whose recurrent state is ``[h, r]`` has gates ``W_x f'(x) + W_h h
    + W_r r + b``, the gates of a ``keras.layers.LSTMCell`` of ``units`` fed
    with the input ``[f'(x), r]`` and the state ``(h, c)``: that is how it is
    computed. ``call(query (q, units), support (n, units)) -> (q, units)``.
    """

    def __init__(self, units: int, steps: int = 5, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.units, self.steps = int(units), int(steps)
        self.cell = keras.layers.LSTMCell(self.units, dtype="float32")

    def build(self, query_shape, support_shape=None):
        self.cell.build((None, 2 * self.units))

    def read(self, h, support):
        """The read vector: dot-product attention of ``h`` (q, d) over ``support`` (n, d)."""
        return tf.nn.softmax(tf.matmul(h, support, transpose_b=True)) @ support

    def call(self, query, support):
        query, support = tf.cast(query, "float32"), tf.cast(support, "float32")  # as the cell
        h = tf.zeros_like(query)
        c = tf.zeros_like(query)
        for _ in range(self.steps):
            r = self.read(h, support)
            h_hat, (_, c) = self.cell(tf.concat([query, r], axis=-1), [h, c])
            h = h_hat + query
        return h

    def get_config(self):
        return {**super().get_config(), "units": self.units, "steps": self.steps}


def matching_log_probabilities(query, support, support_y, scale, ways=None):
    """``log p(y = c | x) = log sum_{i: y_i = c} softmax_i(scale * cos(f, g_i))``:
    query (q, d), support (n, d), labels (n,) -> (q, ways), computed in log
    space (log-sum-exp) so it stays finite for confident attention."""
    support_y = tf.cast(support_y, tf.int32)
    if ways is None:
        ways = tf.reduce_max(support_y) + 1
    logits = cosine_similarity(query, support, scale)  # (q, n)
    member = tf.transpose(tf.one_hot(support_y, ways, dtype=logits.dtype))  # (ways, n)
    masked = logits[:, None, :] + (member[None] - 1.0) * 1e9  # (q, ways, n)
    return tf.reduce_logsumexp(masked, axis=-1) - tf.reduce_logsumexp(logits, -1, keepdims=True)


@keras.saving.register_keras_serializable(package="bookcode")
class MatchingNetwork(FewShotClassifier):
    """Matching network (Vinyals et al. 2016), optionally with full context
    embeddings (``fce=True``, ``processing_steps`` K of the attention LSTM).

    ``embedding``: examples -> vectors (b, d) (feature maps are flattened);
    default the fast Conv-4 (64-d). ``scale``: the starting inverse
    temperature of the cosine attention, learned unless ``learn_scale=False``.
    The logits are ``log p(y | x)``; the loss is their cross-entropy.
    """

    def __init__(self, embedding=None, fce: bool = False, processing_steps: int = 5,
                 scale: float = 10.0, learn_scale: bool = True, **kwargs):  # fmt: skip
        super().__init__(embedding, **kwargs)
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.fce, self.processing_steps = bool(fce), int(processing_steps)
        self.initial_scale, self.learn_scale = float(scale), bool(learn_scale)
        self.log_scale = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(np.log(scale)),
            trainable=self.learn_scale, name="log_scale", dtype="float32",
            autocast=False,  # the attention is float32 under any policy
        )  # fmt: skip
        if self.fce:
            shape = getattr(self.embedding, "output_shape", None)
            if shape is None or None in shape[1:]:
                raise ValueError(
                    "full context embeddings need an embedding with a known output shape "
                    f"(a keras.Model with an Input), got {shape}"
                )
            units = int(np.prod(shape[1:]))
            self.support_context = SupportContext(units, name="support_context")
            self.attention_lstm = AttentionLSTM(units, processing_steps, name="attention_lstm")
            self.support_context.build((None, units))
            self.attention_lstm.build((None, units))

    @property
    def scale(self):
        return tf.exp(self.log_scale)

    @staticmethod
    def content_order(support):
        """An order of the support set (n, d) that depends on its examples only
        (ascending sum of the embedding), never on their positions or labels."""
        return tf.argsort(tf.reduce_sum(support, axis=-1), stable=True)

    def process_support(self, support, support_y):
        support = _flat(support)
        if self.fce:
            order = self.content_order(support)
            context = self.support_context(tf.gather(support, order))
            support = tf.gather(context, tf.argsort(order))  # back in the input's order
        return tf.cast(support, "float32"), support_y  # attention in float32 under any policy

    def embed_query(self, state, query):
        """The query embedding ``f``: ``f'(x)``, or the attention LSTM's with FCE."""
        support, _ = state
        query = _flat(query)
        query = self.attention_lstm(query, support) if self.fce else query
        return tf.cast(query, "float32")

    def attention(self, state, query):
        """Attention weights (q, n) of the queries over the support examples."""
        support, _ = state
        return tf.nn.softmax(cosine_similarity(self.embed_query(state, query), support, self.scale))

    def score(self, state, query):
        support, support_y = state
        return matching_log_probabilities(
            self.embed_query(state, query), support, support_y, self.scale
        )

    def attention_weights(self, support_x, support_y, query_x):
        """Numpy attention weights (num_query, num_support) of an episode, in inference mode."""
        sx, sy, _ = self._tensors(support_x, support_y, query_x, {})

        def weights(sx, sy, qx):
            support, query = self.embed([sx, qx])
            return self.attention(self.process_support(support, sy), query)

        fn = self._function("attention", weights)
        return fn(sx, sy, tf.convert_to_tensor(query_x, tf.float32)).numpy()

    def get_config(self):
        return {
            **super().get_config(),
            "fce": self.fce,
            "processing_steps": self.processing_steps,
            "scale": self.initial_scale,
            "learn_scale": self.learn_scale,
        }
