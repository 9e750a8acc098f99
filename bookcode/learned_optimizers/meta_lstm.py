"""The meta-LSTM few-shot learner of "Optimization as a model for few-shot
learning" (Ravi & Larochelle 2017). The cell state of an LSTM *is* the
learner's parameter vector; the input gate is a learned per-coordinate
learning rate, the forget gate a learned shrinkage, and the initial cell
state the learned initialisation. It adapts a small convolutional learner to
an episode's support set in a few steps."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from .. import distribute, meta
from .lstm_optimizer import _refuse_compiled_losses_and_metrics, preprocess_gradients


def _logit(p):
    return float(np.log(p / (1 - p)))


@keras.saving.register_keras_serializable(package="bookcode")
class MetaLSTMCell(layers.Layer):
    """The second layer of the meta-learner: an LSTM cell whose cell state is
    the learner's parameter vector (Ravi & Larochelle 2017, eq. 2-5).

    For every coordinate, with ``x_t`` the first layer's output (n, hidden):

        f_t = sigmoid(W_F [x_t, theta_{t-1}, f_{t-1}] + b_F)    learned shrinkage
        i_t = sigmoid(W_I [x_t, theta_{t-1}, i_{t-1}] + b_I)    learned learning rate
        theta_t = f_t * theta_{t-1} - i_t * grad_t               (the cell update)

    With ``f = 1`` and ``i = lr`` this is exactly a gradient-descent step.
    """

    def __init__(self, initial_learning_rate=0.1, initial_forget=0.99, **kwargs):
        super().__init__(**kwargs)
        self.initial_learning_rate, self.initial_forget = initial_learning_rate, initial_forget

    def get_config(self):
        return {
            **super().get_config(),
            "initial_learning_rate": self.initial_learning_rate,
            "initial_forget": self.initial_forget,
        }

    def build(self, input_shape):
        features = int(input_shape[-1]) + 2
        small = keras.initializers.RandomUniform(-0.01, 0.01)
        self.w_forget = self.add_weight(shape=(features, 1), initializer=small, name="w_forget")
        self.w_input = self.add_weight(shape=(features, 1), initializer=small, name="w_input")
        self.b_forget = self.add_weight(
            shape=(1,),
            initializer=keras.initializers.Constant(_logit(self.initial_forget)),
            name="b_forget",
        )
        self.b_input = self.add_weight(
            shape=(1,),
            initializer=keras.initializers.Constant(_logit(self.initial_learning_rate)),
            name="b_input",
        )

    def call(self, x, theta, gradient, previous_forget, previous_input):
        """All arguments (n,) except ``x`` (n, hidden); returns ``(theta_t, f_t, i_t)``."""
        forget = tf.sigmoid(
            tf.concat([x, theta[:, None], previous_forget[:, None]], -1) @ self.w_forget
            + self.b_forget
        )[:, 0]
        learning_rate = tf.sigmoid(
            tf.concat([x, theta[:, None], previous_input[:, None]], -1) @ self.w_input
            + self.b_input
        )[:, 0]
        return forget * theta - learning_rate * gradient, forget, learning_rate


class MetaLSTMUpdate(meta.UpdateRule):
    """The meta-LSTM's update rule for :func:`bookcode.meta.adapt` (Ravi &
    Larochelle 2017): a coordinatewise LSTM reads the preprocessed gradient
    and loss of every parameter, and a :class:`MetaLSTMCell` turns its output
    into the forget and input gates of ``theta_t = f_t theta_{t-1} - i_t
    grad_t``. The fast tensors are ``[theta, f_{t-1}, i_{t-1}]`` (flat, (n,));
    the state is the LSTM's ``[h, c]``."""

    def __init__(self, lstm, meta_cell, preprocess_p=10.0):
        self.lstm, self.meta_cell, self.preprocess_p = lstm, meta_cell, preprocess_p

    def initial_state(self, params):
        zeros = tf.zeros((tf.shape(params[0])[0], self.lstm.units))
        return [zeros, zeros]

    def apply(self, params, grads, state, loss):
        theta, forget, learning_rate = params
        gradient, n = grads[0], tf.shape(theta)[0]
        p = self.preprocess_p
        inputs = tf.concat(
            [
                preprocess_gradients(gradient, p),
                tf.broadcast_to(preprocess_gradients(loss[None], p), (n, 2)),
            ],
            -1,
        )
        x, state = self.lstm(inputs, state)
        theta, forget, learning_rate = self.meta_cell(x, theta, gradient, forget, learning_rate)
        return [theta, forget, learning_rate], list(state)


@keras.saving.register_keras_serializable(package="bookcode")
class MetaLSTMLearner(keras.Model):
    """Optimization as a model for few-shot learning (Ravi & Larochelle 2017).

    ``learner`` is a Keras model mapping images to ``ways`` logits; its weights
    are the learned initial parameters theta_0 (the initial cell state). An
    episode is learned in ``steps`` updates on the support set: a coordinatewise
    LSTM (``hidden_size`` units) reads the preprocessed gradient and loss of
    every parameter, and a :class:`MetaLSTMCell` turns its output into the
    forget and input gates of the parameter update. The query loss after the
    last step trains theta_0, the LSTM and the gates (``fit`` on
    ``sampler.tf_dataset(batch_size)``). As in the paper, the learner's
    gradients are inputs, not differentiated through (first order), and batch
    normalisation uses batch statistics also at test time.

    ``encoder`` (optional) is a frozen Keras model applied to all images first,
    e.g. the lower blocks of a pretrained network, so that the meta-LSTM only
    learns the upper layers (``learner`` then takes the encoder's features).

    ``initialisation_optimizer`` (optional) trains theta_0 alone, e.g. with a
    smaller learning rate than the LSTM and the gates when theta_0 starts from
    a pretrained network; by default the compiled optimiser trains everything.

    ``model.save("x.keras")`` and ``keras.models.load_model`` keep everything:
    the learner (theta_0), the encoder, the LSTM, the gates, both optimisers
    and their states.
    """

    def __init__(
        self,
        learner: keras.Model,
        steps: int = 5,
        hidden_size: int = 20,
        initial_learning_rate: float = 0.1,
        preprocess_p: float = 10.0,
        encoder: keras.Model | None = None,
        initial_forget: float = 0.99,
        initialisation_optimizer: keras.optimizers.Optimizer | None = None,
        **kwargs,
    ):
        # the meta-learner (theta, the LSTM, the gates) computes in float32 under any
        # dtype policy; the learner network keeps its own (bfloat16 under a mixed one)
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.initialisation_optimizer = initialisation_optimizer
        if steps < 1 or hidden_size < 1:
            raise ValueError("steps and hidden_size must be positive")
        self.learner, self.steps, self.hidden_size = learner, steps, hidden_size
        self.encoder = encoder
        if encoder is not None:
            encoder.trainable = False
        self.preprocess_p, self.initial_learning_rate = preprocess_p, initial_learning_rate
        self.initial_forget = initial_forget
        self.ways = int(learner.output_shape[-1])
        self.lstm = layers.LSTMCell(hidden_size, name="lstm", dtype="float32")
        self.meta_cell = MetaLSTMCell(
            initial_learning_rate, initial_forget, name="meta_lstm", dtype="float32"
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        self.lstm(tf.zeros((1, 4)), [tf.zeros((1, hidden_size))] * 2)
        self.meta_cell(tf.zeros((1, hidden_size)), *[tf.zeros((1,))] * 4)
        self.built = True  # every variable exists now

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            **super().get_config(),
            "learner": serialize(self.learner),
            "steps": self.steps,
            "hidden_size": self.hidden_size,
            "initial_learning_rate": self.initial_learning_rate,
            "preprocess_p": self.preprocess_p,
            "encoder": None if self.encoder is None else serialize(self.encoder),
            "initial_forget": self.initial_forget,
            "initialisation_optimizer": None
            if self.initialisation_optimizer is None
            else serialize(self.initialisation_optimizer),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("learner", "encoder", "initialisation_optimizer"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def _meta_and_initial_variables(self):
        """(the LSTM's and the gates' variables, theta_0's variables)."""
        initial = self.learner.trainable_variables
        return [v for v in self.trainable_variables if not any(v is w for w in initial)], initial

    def compile(self, *args, **kwargs):
        """Like ``keras.Model.compile``; also creates the optimisers' variables
        now, so that the training step is traced once, not twice (a
        ``tf.function`` that creates variables is traced again). Set
        ``initialisation_optimizer`` before compiling. The loss (the query
        cross-entropy) and the metrics (it and the query accuracy) are built
        in: ``loss`` and ``metrics`` are refused."""
        _refuse_compiled_losses_and_metrics(args, kwargs, "MetaLSTMLearner")
        super().compile(*args, **kwargs)
        if self.optimizer is None:
            return
        if self.initialisation_optimizer is None:
            self.optimizer.build(self.trainable_variables)
        else:
            meta, initial = self._meta_and_initial_variables()
            self.optimizer.build(meta)
            self.initialisation_optimizer.build(initial)

    def compile_from_config(self, config):
        """Compile with the saved settings when loading (Keras skips a custom
        ``compile``)."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    # -- the learner as a function of a flat parameter vector -------------------

    def _shapes(self):
        return [tuple(v.shape) for v in self.learner.trainable_variables]

    def initial_parameters(self):
        """theta_0, the learned initialisation, flat (num_parameters,)."""
        return tf.concat([tf.reshape(v, (-1,)) for v in self.learner.trainable_variables], 0)

    def learner_logits(self, theta, x):
        """Logits of the learner with flat parameters ``theta`` on ``x``
        (batch-norm in training mode: batch statistics)."""
        shapes = self._shapes()
        sizes = [int(np.prod(s)) for s in shapes]
        tensors = [tf.reshape(t, s) for t, s in zip(tf.split(theta, sizes), shapes)]
        non_trainable = [tf.convert_to_tensor(v) for v in self.learner.non_trainable_variables]
        logits, _ = self.learner.stateless_call(tensors, non_trainable, x, training=True)
        return tf.cast(logits, tf.float32)

    def _support_loss(self, theta, x, y):
        return tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(
                y, self.learner_logits(theta, x), from_logits=True
            )
        )

    def _support_loss_and_gradient(self, theta, x, y):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = self._support_loss(theta, x, y)
        return loss, tape.gradient(loss, theta)

    def encode(self, x):
        """The learner's inputs: ``x`` through the frozen ``encoder`` if there is one."""
        x = tf.cast(tf.convert_to_tensor(x), tf.float32)
        return x if self.encoder is None else tf.cast(self.encoder(x, training=False), tf.float32)

    def adapt(self, support_x, support_y):
        """Learn one episode with :func:`bookcode.meta.adapt` and the
        :class:`MetaLSTMUpdate` rule: returns theta_T (flat) and the gates of
        every step, forget (steps, n) and input (steps, n).

        First order, as in the paper: the learner's gradients and losses are
        inputs to the LSTM, not differentiated through, while theta_0, the
        LSTM and the gates get meta-gradients through the graph loop."""
        support_x = self.encode(support_x)
        support_y = tf.cast(tf.convert_to_tensor(support_y), tf.int32)
        theta = self.initial_parameters()
        zeros = tf.zeros_like(theta)
        # the previous gates f_{t-1}, i_{t-1} ride along with theta as fast tensors
        # (no gradient of the support loss reaches them), so their history is returned
        (theta, _, _), gates = meta.adapt(
            lambda params, step: self._support_loss(params[0], support_x, support_y),
            [theta, zeros, zeros],
            self.steps,
            MetaLSTMUpdate(self.lstm, self.meta_cell, self.preprocess_p),
            first_order=True,
            metric_fn=lambda params: tf.stack(params[1:]),
            names=["theta", "forget", "input"],
            unused=(1, 2),
        )
        return theta, gates[1:, 0], gates[1:, 1]

    def call(self, inputs):
        """Query logits (num_query, ways) for one episode ``(support_x, support_y, query_x)``."""
        support_x, support_y, query_x = inputs
        theta, _, _ = self.adapt(support_x, support_y)
        return self.learner_logits(theta, self.encode(query_x))

    @tf.function(reduce_retracing=True)
    def _predict(self, support_x, support_y, query_x):
        return self((support_x, support_y, query_x))

    def predict_episode(self, support_x, support_y, query_x):
        """Logits (num_query, ways) after learning the support set."""
        return _compiled_episode_logits(self, support_x, support_y, query_x)

    @tf.function(reduce_retracing=True)
    def _query_loss_and_accuracy(self, support_x, support_y, query_x, query_y):
        # one compiled function for every episode of a meta-batch: traced once, not per episode
        logits = self((support_x, support_y, query_x))
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(query_y, logits, from_logits=True)
        )
        hits = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), query_y)
        return loss, tf.reduce_mean(tf.cast(hits, tf.float32))

    def _meta_batch_loss_and_accuracy(self, data):
        """Mean query loss and accuracy over a meta-batch of episodes (or one)."""
        (support_x, support_y, query_x), query_y = data
        if support_x.shape.rank is None:
            raise ValueError(
                "episodes of unknown rank: one compiled step was given both single episodes "
                "and meta-batches; use one kind per model, or compile() again in between"
            )
        if support_x.shape.rank == 4:  # one episode, not a batch
            support_x, support_y, query_x, query_y = (
                t[None] for t in (support_x, support_y, query_x, query_y)
            )
        tasks = support_x.shape[0]
        losses, accuracies = zip(
            *(
                self._query_loss_and_accuracy(support_x[i], support_y[i], query_x[i], query_y[i])
                for i in range(tasks)
            )
        )
        return tf.add_n(losses) / tasks, tf.add_n(accuracies) / tasks

    def _report(self, loss, accuracy):
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(accuracy)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        meta, initial = self._meta_and_initial_variables()
        variables = meta + initial
        with tf.GradientTape() as tape:
            loss, accuracy = self._meta_batch_loss_and_accuracy(data)
        grads = tape.gradient(loss, variables)
        local_tasks = 1 if data[0][0].shape.rank == 4 else tf.shape(data[0][0])[0]
        grads = distribute.scale(grads, distribute.replica_share(local_tasks))
        grads = distribute.clip_by_global_norm(grads, 10.0)
        if self.initialisation_optimizer is None:
            self.optimizer.apply(grads, variables)
        else:
            self.optimizer.apply(grads[: len(meta)], meta)
            self.initialisation_optimizer.apply(grads[len(meta) :], initial)
        return self._report(loss, accuracy)

    def test_step(self, data):
        """Query loss and accuracy after adaptation, for ``fit(validation_data=...)``
        and ``evaluate`` on episode datasets (Keras's default would call the
        model on the whole meta-batch at once)."""
        return self._report(*self._meta_batch_loss_and_accuracy(data))


def _compiled_episode_logits(learner, support_x, support_y, query_x):
    """Run ``learner._predict`` (a compiled function) on one episode, checking
    that the episode has as many ways as the learner has outputs."""
    ways = int(np.max(support_y)) + 1
    if ways != learner.ways:
        raise ValueError(f"the learner has {learner.ways} outputs but the episode has {ways} ways")
    return learner._predict(
        tf.convert_to_tensor(support_x, tf.float32),
        tf.convert_to_tensor(support_y, tf.int32),
        tf.convert_to_tensor(query_x, tf.float32),
    ).numpy()
