"""A recurrent model around a memory cell (or any Keras RNN cell), trained with
``fit()``: optional per-step encoder, ``keras.layers.RNN(cell)``, optional
per-step output layer. The training step's forward and backward pass can run
as one XLA computation (``xla=True``, default), several times faster on a CPU
for these small cells than TensorFlow's step-by-step while loop."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="bookcode")
class SequenceModel(keras.Model):
    """``outputs[t] = head(cell(encoder(inputs[t]), state))`` over a sequence.

    ``cell``: an RNN cell (:class:`~bookcode.memory.NTMCell`,
    :class:`~bookcode.memory.MANNCell`, ``keras.layers.LSTMCell``...);
    ``output_size``: if given, a dense layer on the cell's output (a cell
    such as ``LSTMCell`` has none of its own); ``encoder``: if given, a Keras
    model applied to every step's ``inputs[..., :encoded_features]``, the
    remaining features (e.g. the previous label) passed on unchanged.
    Inputs (batch, time, features); outputs (batch, time, cell output or
    ``output_size``), logits.

    Compile with a loss on logits; the step uses ``sample_weight`` (batch,
    time) as a mask. ``xla=True`` compiles forward and backward with XLA.
    """

    def __init__(
        self,
        cell,
        output_size: int | None = None,
        encoder=None,
        encoded_features: int | None = None,
        xla: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if output_size is not None and (not isinstance(output_size, int) or output_size < 1):
            raise ValueError(f"output_size must be a positive integer or None, got {output_size!r}")
        if encoder is not None and encoded_features is None:
            raise ValueError("an encoder needs encoded_features: how many input features it reads")
        self.cell, self.output_size, self.xla = cell, output_size, bool(xla)
        self.encoder, self.encoded_features = encoder, encoded_features
        self.rnn = keras.layers.RNN(cell, return_sequences=True, name="rnn")
        self.head = None if output_size is None else keras.layers.Dense(output_size, name="head")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self._step = None

    def call(self, inputs, training=False):
        x = inputs
        if self.encoder is not None:
            batch, time = tf.shape(x)[0], tf.shape(x)[1]
            raw = x[..., : self.encoded_features]
            shape = (
                self.encoder.inputs[0].shape[1:]
                if self.encoder.inputs
                else (self.encoded_features,)
            )
            flat = tf.reshape(raw, (-1,) + tuple(shape))
            codes = tf.cast(self.encoder(flat, training=training), x.dtype)
            codes = tf.reshape(codes, (batch, time, codes.shape[-1]))
            x = tf.concat([codes, x[..., self.encoded_features :]], -1)
        y = self.rnn(x, training=training)
        return y if self.head is None else self.head(y)

    @property
    def metrics(self):
        return [self.loss_tracker]

    def _gradients(self, x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.loss(y, y_pred, sample_weight=sample_weight)
            if self.losses:
                loss = loss + tf.add_n(self.losses)
        return loss, tape.gradient(loss, self.trainable_variables)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self._step is None:
            self._step = tf.function(self._gradients, jit_compile=self.xla)
        loss, grads = self._step(x, y, sample_weight)
        self.optimizer.apply(grads, self.trainable_variables)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def get_config(self):
        return {
            **super().get_config(),
            "cell": keras.saving.serialize_keras_object(self.cell),
            "output_size": self.output_size,
            "encoder": None
            if self.encoder is None
            else keras.saving.serialize_keras_object(self.encoder),
            "encoded_features": self.encoded_features,
            "xla": self.xla,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["cell"] = keras.saving.deserialize_keras_object(config["cell"])
        if config.get("encoder") is not None:
            config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)
