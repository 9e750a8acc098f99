"""Learning to learn in the concept space (Zhou, Wu & Li 2018, "Deep
Meta-Learning: Learning to Learn in the Concept Space").

Three parts trained together:

- a **concept generator** ``G`` (a deep network) maps an image to a concept
  vector;
- a **concept discriminator** ``D`` classifies the concepts of images from a
  *labelled* external dataset of other classes (the paper: ImageNet classes
  for miniImageNet tasks), which teaches ``G`` general features;
- a **meta-learner** (here MAML's inner loop on a small head) learns each
  few-shot task on the concepts ``G(x)`` instead of the raw images.

The meta-loss of the tasks and the discriminator's cross-entropy are added
(weighted by ``concept_weight``) and minimised jointly; the meta-loss reaches
``G`` through the adapted head (second order unless ``first_order=True``).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from .. import distribute
from ..episodes import ClassDataset, endless_dataset
from .inner_loop import forward
from .learners import GradientMetaLearner, _check_second_order_support
from .objectives import CLASSIFICATION, task_loss


@keras.saving.register_keras_serializable(package="bookcode")
class ConceptSpaceLearner(GradientMetaLearner):
    """Deep meta-learning (Zhou, Wu & Li 2018) with MAML as meta-learner.

    ``generator``: Keras model, images -> concepts (b, d). ``model``: the
    meta-learner's head, concepts (b, d) -> logits (b, ways); the inner loop
    adapts only the head, starting from its meta-learned weights, on the
    concepts of the support set. ``discriminator``: Keras model, concepts ->
    logits over the external dataset's classes (default: one dense layer to
    ``external_classes``).

    ``fit()`` takes ``((support_x, support_y, query_x, concept_x, concept_y),
    query_y)`` with a leading task axis on the episode arrays and a batch of
    labelled external images ``concept_x`` (b, ...) with labels ``concept_y``
    (b,): :func:`concept_dataset` makes them. The objective is the mean query
    loss after adaptation plus ``concept_weight`` times the discriminator's
    cross-entropy (with ``meta_loss_to_generator=False`` the meta-loss trains
    the head only and the generator learns from the external data alone: the
    reference that tells what the meta-loss adds to the concepts); logged as
    ``loss``, ``accuracy``, ``concept_loss`` and ``concept_accuracy``. Prediction (``predict_episode``) adapts the head on
    the support concepts as MAML does; the generator's batch normalisation
    uses the batch's statistics, as in MAML's inner loop.

    Second order costs little here: the inner loop adapts only the head, so
    the meta-gradient reaches the generator by one ordinary backward pass
    (first derivatives of ``G``; a generator with TensorFlow's fused batch
    normalisation, faster on a CPU, is allowed).
    """

    def __init__(self, model, generator, discriminator=None, external_classes=None,
                 concept_weight: float = 1.0, meta_loss_to_generator: bool = True,
                 **kwargs):  # fmt: skip
        if not generator.built:
            raise ValueError("build the generator first (give it an Input or call it once)")
        if discriminator is None:
            if not isinstance(external_classes, (int, np.integer)) or external_classes < 2:
                raise ValueError(
                    "give a discriminator, or external_classes (the number of classes of the "
                    f"labelled external dataset, at least 2); got {external_classes!r}"
                )
            dim = generator.output_shape[-1]
            discriminator = keras.Sequential(
                [keras.Input((dim,)), keras.layers.Dense(int(external_classes), dtype="float32")],
                name="concept_discriminator",
            )
        if not float(concept_weight) >= 0:
            raise ValueError(f"concept_weight must be zero or positive, got {concept_weight!r}")
        if kwargs.get("kind", CLASSIFICATION) != CLASSIFICATION:
            raise ValueError("ConceptSpaceLearner is for classification tasks")
        super().__init__(model, **kwargs)
        self.generator, self.discriminator = generator, discriminator
        self.concept_weight = float(concept_weight)
        self.meta_loss_to_generator = bool(meta_loss_to_generator)
        self._metric("concept_loss"), self._metric("concept_accuracy")

    @property
    def first_order(self) -> bool:
        return self._first_order

    @first_order.setter
    def first_order(self, value: bool):
        # only the head needs second derivatives: the inner loop adapts the head
        # alone, so the meta-gradient passes through the generator once, as an
        # ordinary backward pass (a fused batch-norm generator is fine)
        _check_second_order_support(self.model, value)
        self._first_order = bool(value)
        self.train_function = None

    @property
    def meta_variables(self):
        return list(self.model.trainable_variables) + list(self.generator.trainable_variables)

    def _split(self, meta_weights):
        n = len(self.model.trainable_variables)
        return list(meta_weights[:n]), list(meta_weights[n:])

    def initial_fast_weights(self, meta_weights):
        return self._split(meta_weights)[0]

    def concepts(self, meta_weights, x):
        """The generator's concepts of ``x`` with its weights in ``meta_weights``."""
        return tf.cast(forward(self.generator, self._split(meta_weights)[1], x), tf.float32)

    def task_concepts(self, meta_weights, x):
        """The concepts a task's head sees: :meth:`concepts`, through which the
        meta-loss reaches the generator unless ``meta_loss_to_generator`` is
        False (then only the discriminator's loss trains the generator)."""
        concepts = self.concepts(meta_weights, x)
        return concepts if self.meta_loss_to_generator else tf.stop_gradient(concepts)

    def fast_forward(self, meta_weights, fast_weights, x):
        return forward(self.model, fast_weights, self.task_concepts(meta_weights, x))

    def task_objective(self, meta_weights, support_x, support_y, query_x, query_y):
        # the concepts of the support set are computed once for all inner steps
        support = self.task_concepts(meta_weights, support_x)

        def loss_fn(fast, step):
            return task_loss(self.kind, support_y, forward(self.model, fast, support))

        fast, _ = self.adapt_task(
            meta_weights,
            support_x,
            support_y,
            self.inner_steps,
            self.first_order,
            inner_loss=loss_fn,
        )
        return self.query_results(query_y, self.fast_forward(meta_weights, fast, query_x))

    def joint_objective(self, weights, critic_weights, data):
        """``(results, concept_loss, concept_logits, objective)`` of one
        training element (see :meth:`train_step`) with the meta-variables'
        values ``weights`` and the discriminator's ``critic_weights``."""
        (support_x, support_y, query_x, concept_x, concept_y), query_y = data
        results = self._map_tasks(
            lambda task: self._task_results(weights, task),
            (support_x, support_y, query_x, query_y),
            self._results_signature(weights[0].dtype),
        )
        logits = forward(self.discriminator, critic_weights, self.concepts(weights, concept_x))
        concept_loss = task_loss(CLASSIFICATION, concept_y, logits)
        objective = tf.reduce_mean(results["loss"]) + self.concept_weight * concept_loss
        return results, concept_loss, logits, objective

    def train_step(self, data):
        inputs, query_y, _ = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.meta_variables
        critic = list(self.discriminator.trainable_variables)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            weights = [tf.convert_to_tensor(v) for v in variables]
            critic_weights = [tf.convert_to_tensor(v) for v in critic]
            tape.watch(weights + critic_weights)
            results, concept_loss, logits, _ = self.joint_objective(
                weights, critic_weights, (inputs, query_y)
            )
            # under tf.distribute each replica holds a slice of the tasks and of the
            # external batch: its shares of both means, summed by the optimiser over
            # the replicas, give the whole objective's gradient (1 on one device)
            tasks_share = distribute.replica_share(tf.shape(inputs[1])[0])
            external_share = distribute.replica_share(tf.shape(inputs[4])[0])
            objective = (
                tf.cast(tasks_share, results["loss"].dtype) * tf.reduce_mean(results["loss"])
                + self.concept_weight * tf.cast(external_share, concept_loss.dtype) * concept_loss
            )
        grads = tape.gradient(
            objective, weights + critic_weights, unconnected_gradients=tf.UnconnectedGradients.NONE
        )
        grads = self._check_meta_gradients(grads[: len(weights)], weights, variables) + [
            tf.zeros_like(w) if g is None else g
            for g, w in zip(grads[len(weights) :], critic_weights)
        ]
        self.optimizer.apply(grads, variables + critic)
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
        concept_accuracy = tf.reduce_mean(
            tf.cast(predicted == tf.cast(inputs[4], tf.int32), tf.float32)
        )
        return self._log(
            {
                **{k: tf.reduce_mean(v) for k, v in results.items()},
                "concept_loss": concept_loss,
                "concept_accuracy": concept_accuracy,
            }
        )

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        self.optimizer.build(self.meta_variables + list(self.discriminator.trainable_variables))

    def get_config(self):
        return {
            **super().get_config(),
            "generator": keras.saving.serialize_keras_object(self.generator),
            "discriminator": keras.saving.serialize_keras_object(self.discriminator),
            "concept_weight": self.concept_weight,
            "meta_loss_to_generator": self.meta_loss_to_generator,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("generator", "discriminator"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return super().from_config(config)


def concept_dataset(episodes, external: ClassDataset, concept_batch: int = 64, batch_size=None,
                    seed=None, prefetch: int = 2):  # fmt: skip
    """An endless ``tf.data.Dataset`` for :class:`ConceptSpaceLearner.fit`:
    each element joins a (meta-batch of) episode(s) from ``episodes`` (an
    :class:`~bookcode.episodes.EpisodeSampler` or any sampler with
    ``sample``/``sample_batch``) with ``concept_batch`` labelled examples
    drawn at random (seeded) from ``external``, whose classes must not be
    those of the episodes. Elements: ``((support_x, support_y, query_x,
    concept_x, concept_y), query_y)``."""
    if not isinstance(concept_batch, (int, np.integer)) or concept_batch < 1:
        raise ValueError(f"concept_batch must be a positive integer, got {concept_batch!r}")
    rng = np.random.default_rng(seed)

    def element():
        e = episodes.sample() if batch_size is None else episodes.sample_batch(batch_size)
        picked = rng.integers(len(external.y), size=concept_batch)
        inputs = (
            e.support_x,
            e.support_y.astype(np.int32),
            e.query_x,
            external.x[picked],
            external.y[picked].astype(np.int32),
        )
        return inputs, e.query_y.astype(np.int32)

    return endless_dataset(element, prefetch)
