"""The few-shot classifier base of every metric learner: process the support
set, then score the queries (the structure of easyfsl's ``FewShotClassifier``).

A subclass defines two methods on *embedded* examples (float32, the shape
the embedding gives, not flattened: feature maps stay feature maps)::

    process_support(support, support_y, **extras) -> state   # any nest of tensors
    score(state, query) -> logits (num_query, ways)           # float32

and may override ``episode_loss(query_y, logits)`` (default: softmax
cross-entropy) and ``default_embedding()``. The base does the rest:

- ``call((support_x, support_y, query_x[, extras]))`` embeds support, query
  and extra examples in one batch, so batch normalisation sees the whole
  episode in training (Snell et al. 2017), casts embeddings to float32 (so
  scores stay float32 under ``mixed_bfloat16``) and returns the logits;
- ``train_step``/``test_step`` for ``fit(..., validation_data=...)`` on
  ``EpisodeSampler.tf_dataset()``, reporting ``loss`` and ``accuracy``; on
  ``tf_dataset(batch_size=...)`` (a leading task axis) one update per
  meta-batch of episodes, which is how the learners train under a
  ``tf.distribute`` strategy (:meth:`FewShotClassifier.meta_batch_step`);
- ``predict_episode(support_x, support_y, query_x, **extras)`` (numpy in,
  numpy out, checked inputs) and ``adapt(support_x, support_y, **extras)``
  returning a function that scores queries, with the same result;
- saving: ``get_config``/``from_config`` serialise the embedding.

``extras`` are further example batches of an episode, named in the class
attribute ``extra_inputs`` (e.g. ``("unlabeled_x",)`` for Ren et al. 2018):
they are embedded with the episode and given, embedded, to
``process_support`` as keyword arguments. ``Episode.extras()`` provides them
and ``bookcode.evaluation.evaluate`` passes those a learner declares.

Two sketches of learners written on it::

    class RelationNetwork(FewShotClassifier):        # Sung et al. 2018
        def __init__(self, embedding=None, relation=None, **kw):
            super().__init__(embedding, **kw)      # feature maps (b, 5, 5, 64)
            self.relation = relation or nets.relation_module()
        def process_support(self, support, support_y):     # class sums of maps
            return tf.math.unsorted_segment_sum(support, support_y, tf.reduce_max(support_y) + 1)
        def score(self, classes, query):            # every (query, class) pair
            q, c = tf.shape(query)[0], tf.shape(classes)[0]
            pairs = tf.concat([tf.repeat(query, c, 0), tf.tile(classes, [q, 1, 1, 1])], -1)
            return tf.reshape(tf.sigmoid(self.relation(pairs)), (q, c))
        def episode_loss(self, query_y, scores):     # MSE to one-hot
            return tf.reduce_mean((scores - tf.one_hot(query_y, tf.shape(scores)[1])) ** 2)

    class MatchingNetwork(FewShotClassifier):        # Vinyals et al. 2016, FCE
        def process_support(self, support, support_y):
            g = self.support_lstm(support[None])[0]     # bidirectional LSTM g
            return g, tf.one_hot(support_y, tf.reduce_max(support_y) + 1)
        def score(self, state, query):
            g, labels = state
            f = self.attention_lstm(query, g)           # attLSTM f over g
            attention = tf.nn.softmax(cosine_similarity(f, g))   # (q, n)
            return tf.math.log(attention @ labels + 1e-8)        # log p(y | x)

``compile(loss=...)`` and ``compile(metrics=...)`` are refused with an
error: the loss is a method (override ``episode_loss``), and learners report
``loss`` and ``accuracy``; use ``evaluate`` or a callback for more.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from .. import distribute


def _has_task_axis(inputs) -> bool:
    """Whether ``(support_x, support_y, query_x, ...)`` is a meta-batch:
    support labels with a leading task axis, (tasks, n)."""
    if not isinstance(inputs, (tuple, list)) or len(inputs) < 3:
        return False
    shape = getattr(inputs[1], "shape", None)
    return len(shape if shape is not None else np.shape(inputs[1])) == 2


def check_episode(support_x, support_y, query_x):
    """Clear errors for malformed episodes; returns int32 labels and ways."""
    support_y = np.asarray(support_y)
    if support_y.ndim != 1 or len(support_y) != len(support_x):
        raise ValueError(
            f"support_y must have shape ({len(support_x)},), one label per support example; "
            f"got {support_y.shape}"
        )
    if not np.issubdtype(support_y.dtype, np.integer):
        raise ValueError(f"support_y must hold integer labels, got dtype {support_y.dtype}")
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
    return support_y.astype(np.int32), int(support_y.max()) + 1


@keras.saving.register_keras_serializable(package="bookcode")
class FewShotClassifier(keras.Model):
    """Base of the metric learners: see the module docstring.

    ``embedding``: a Keras model or layer mapping examples (b, ...) to
    embeddings (b, ...); ``None`` builds :meth:`default_embedding`.
    """

    extra_inputs: tuple[str, ...] = ()

    def __init__(self, embedding: keras.Layer | None = None, **kwargs):
        super().__init__(**kwargs)
        if embedding is None:
            embedding = self.default_embedding()
        if not isinstance(embedding, keras.layers.Layer):
            raise ValueError(  # noqa: TRY004 (the project's convention for bad inputs)
                f"embedding must be a Keras model or layer, got {type(embedding)}"
            )
        self.embedding = embedding
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        self._functions = {}

    @staticmethod
    def default_embedding() -> keras.Model:
        """The fast Conv-4 of few-shot learning for 28x28x1 inputs: fused batch
        norm (momentum 0.9, as PyTorch) under the global dtype policy; see
        :func:`bookcode.nets.conv4`."""
        from bookcode import nets

        return nets.conv4(fused_batch_norm=True, batch_norm_momentum=0.9)

    # -- what a subclass defines ---------------------------------------------------
    def process_support(self, support, support_y, **extras):
        """Embedded support (n, ...) and labels (n,) -> a state for :meth:`score`."""
        raise NotImplementedError

    def score(self, state, query):
        """State and embedded queries (q, ...) -> logits (q, ways)."""
        raise NotImplementedError

    def episode_loss(self, query_y, logits):
        """Training loss of one episode: mean softmax cross-entropy of the queries."""
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=query_y, logits=logits)
        )

    # -- the episode -------------------------------------------------------------
    def embed(self, parts, training=False):
        """Embed a list of example batches in one pass: float32, shapes kept."""
        sizes = [tf.shape(p)[0] for p in parts]
        outputs = self.embedding(tf.concat(parts, axis=0), training=training)
        return tf.split(tf.cast(outputs, tf.float32), sizes, axis=0)

    def _check_extras(self, extras):
        unknown = sorted(set(extras) - set(self.extra_inputs))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} takes the extra inputs {self.extra_inputs}, got {unknown}"
            )

    def episode_logits(self, support_x, support_y, query_x, training=False, **extras):
        """Logits (num_query, ways) of one episode, tensors in and out."""
        names = sorted(extras)
        support, query, *rest = self.embed(
            [support_x, query_x] + [extras[n] for n in names], training
        )
        state = self.process_support(support, support_y, **dict(zip(names, rest)))
        return tf.cast(self.score(state, query), tf.float32)

    def call(self, inputs, training=False):
        """``inputs = (support_x, support_y, query_x[, extras dict])`` -> logits
        (num_query, ways); with a leading task axis (a meta-batch), logits
        (tasks, num_query, ways), each episode computed on its own."""
        if _has_task_axis(inputs):
            return tf.map_fn(
                lambda episode: self.call(episode, training=training),
                tuple(inputs),
                fn_output_signature=tf.TensorSpec(None, tf.float32),
            )
        support_x, support_y, query_x, *extras = inputs
        extras = dict(extras[0]) if extras else {}
        self._check_extras(extras)
        support_y = tf.cast(support_y, tf.int32)
        return self.episode_logits(support_x, support_y, query_x, training=training, **extras)

    # -- training ----------------------------------------------------------------
    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def compile(self, optimizer="adam", loss=None, loss_weights=None, metrics=None,
                weighted_metrics=None, **kwargs):  # fmt: skip
        """Keras's ``compile``, with Adam (rate 1e-3, Snell et al. 2017) as the
        default optimiser; ``loss`` and ``metrics`` are refused (see the module)."""
        if loss is not None or loss_weights is not None:
            raise ValueError(
                f"{type(self).__name__} computes its own loss: override episode_loss() "
                "instead of compile(loss=...)"
            )
        if metrics is not None or weighted_metrics is not None:
            raise ValueError(
                f"{type(self).__name__} reports loss and accuracy only: use "
                "bookcode.evaluation.evaluate() or a callback for other metrics"
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        """Compile a loaded model as saved (Keras skips a custom ``compile``)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def _update_metrics(self, loss, accuracy):
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(accuracy)
        return {m.name: m.result() for m in self.metrics}

    def _accuracy(self, query_y, logits):
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return tf.reduce_mean(tf.cast(tf.equal(predicted, tf.cast(query_y, tf.int32)), tf.float32))

    def train_step(self, data):
        """One episode, or a meta-batch of episodes (leading task axis, from
        ``tf_dataset(batch_size=...)``): see :meth:`meta_batch_step`."""
        inputs, query_y = data
        if _has_task_axis(inputs):
            return self.meta_batch_step(inputs, query_y)
        if distribute.replica_count() > 1:
            raise ValueError(
                f"{type(self).__name__} under a tf.distribute strategy trains on meta-batches "
                "of episodes (a leading task axis), which the replicas share out: use "
                "sampler.tf_dataset(batch_size=...) instead of single episodes"
            )
        with tf.GradientTape() as tape:
            logits = self(inputs, training=True)
            loss = self.episode_loss(query_y, logits)
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        return self._update_metrics(loss, self._accuracy(query_y, logits))

    def meta_batch_step(self, inputs, query_y):
        """One update from the mean loss of a meta-batch's episodes. Each
        episode is embedded on its own (batch normalisation sees one episode, as
        in :meth:`train_step`); batch-norm moving averages take the mean of the
        episodes' updates. Under a ``tf.distribute`` strategy each replica takes
        a slice of the episodes and the update equals the one-device update
        (:mod:`bookcode.distribute`)."""
        variables, states = self.trainable_variables, self.non_trainable_variables
        signature = (
            tf.TensorSpec((), tf.float32),
            tf.TensorSpec((), tf.float32),
            [tf.TensorSpec(v.shape, v.dtype) for v in states],
        )
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            weights = [tf.convert_to_tensor(v) for v in variables]
            tape.watch(weights)
            current = [tf.convert_to_tensor(v) for v in states]

            def one_episode(episode):
                episode_inputs, episode_y = episode
                logits, updated = self.stateless_call(
                    weights, current, episode_inputs, training=True
                )
                loss = tf.cast(self.episode_loss(episode_y, logits), tf.float32)
                return loss, self._accuracy(episode_y, logits), list(updated)

            losses, accuracies, updated = tf.map_fn(
                one_episode, (tuple(inputs), query_y), fn_output_signature=signature
            )
            loss = tf.reduce_mean(losses)
        grads = tape.gradient(loss, weights)
        new_states = [tf.reduce_mean(u, 0) if u.dtype.is_floating else u[-1] for u in updated]
        if distribute.replica_count() > 1:
            share = distribute.replica_share(tf.shape(query_y)[0])
            grads = distribute.scale(grads, share)
            context = tf.distribute.get_replica_context()
            new_states = [
                context.all_reduce("sum", u * tf.cast(share, u.dtype)) if u.dtype.is_floating else u
                for u in new_states
            ]
        self.optimizer.apply(grads, variables)
        for variable, value in zip(states, new_states):
            variable.assign(value)
        return self._update_metrics(loss, tf.reduce_mean(accuracies))

    def test_step(self, data):
        inputs, query_y = data
        if _has_task_axis(inputs):

            def one_episode(episode):
                episode_inputs, episode_y = episode
                logits = self.call(episode_inputs, training=False)
                loss = tf.cast(self.episode_loss(episode_y, logits), tf.float32)
                return loss, self._accuracy(episode_y, logits)

            losses, accuracies = tf.map_fn(
                one_episode,
                (tuple(inputs), query_y),
                fn_output_signature=(tf.float32, tf.float32),
            )
            return self._update_metrics(tf.reduce_mean(losses), tf.reduce_mean(accuracies))
        logits = self(inputs, training=False)
        return self._update_metrics(
            self.episode_loss(query_y, logits), self._accuracy(query_y, logits)
        )

    # -- inference on numpy episodes -------------------------------------------------
    def _function(self, name, fn):
        """One compiled function per purpose, kept across calls."""
        if name not in self._functions:
            self._functions[name] = tf.function(fn, reduce_retracing=True)
        return self._functions[name]

    def _tensors(self, support_x, support_y, query_x, extras):
        support_y, _ = check_episode(support_x, support_y, query_x)
        self._check_extras(extras)
        for name, x in extras.items():
            if np.shape(x)[1:] != np.shape(support_x)[1:]:
                raise ValueError(
                    f"{name} examples have shape {np.shape(x)[1:]} but support examples "
                    f"{np.shape(support_x)[1:]}"
                )
        as_float = lambda x: tf.convert_to_tensor(x, tf.float32)
        extras = {n: as_float(x) for n, x in extras.items() if x is not None and len(x)}
        return as_float(support_x), tf.constant(support_y), extras

    def predict_episode(self, support_x, support_y, query_x, **extras):
        """Logits (num_query, ways) of the queries of one episode, in inference
        mode. ``support_y`` holds every label ``0..ways-1``; ``extras`` are the
        learner's :attr:`extra_inputs` (e.g. ``unlabeled_x=``)."""
        support_x, support_y, extras = self._tensors(support_x, support_y, query_x, extras)
        fn = self._function("predict", self.episode_logits)
        return fn(support_x, support_y, tf.convert_to_tensor(query_x, tf.float32), **extras).numpy()

    def _support_state(self, support_x, support_y, **extras):
        names = sorted(extras)
        support, *rest = self.embed([support_x] + [extras[n] for n in names])
        return self.process_support(support, support_y, **dict(zip(names, rest)))

    def _query_logits(self, state, query_x):
        (query,) = self.embed([query_x])
        return tf.cast(self.score(state, query), tf.float32)

    def adapt(self, support_x, support_y, **extras):
        """Process a support set once; returns ``scores(query_x) -> logits``
        (num_query, ways), equal to :meth:`predict_episode` on the same episode."""
        sx, sy, extras = self._tensors(support_x, support_y, support_x, extras)
        state = self._function("support", self._support_state)(sx, sy, **extras)
        fn = self._function("score", self._query_logits)
        shape = np.shape(support_x)[1:]

        def scores(query_x):
            if np.shape(query_x)[1:] != shape:
                raise ValueError(
                    f"query examples have shape {np.shape(query_x)[1:]} but support examples {shape}"
                )
            return fn(state, tf.convert_to_tensor(query_x, tf.float32)).numpy()

        return scores

    # -- saving ------------------------------------------------------------------------
    def get_config(self):
        return {
            **super().get_config(),
            "embedding": keras.saving.serialize_keras_object(self.embedding),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["embedding"] = keras.saving.deserialize_keras_object(config["embedding"])
        return cls(**config)
