"""Embedding heads: a cosine classifier that trains an embedding on ordinary
classes, and the concatenation of several embeddings into one (chapter 2)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from .distances import cosine_similarity


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
        # the class weight vectors are the columns of the kernel
        return cosine_similarity(x, tf.transpose(tf.cast(self.kernel, x.dtype)), self.scale)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "scale": self.scale}


@keras.saving.register_keras_serializable(package="bookcode")
class ConcatenatedEmbedding(keras.Model):
    """Several embeddings as one: their outputs side by side (float32),
    divided by ``sqrt(len(embeddings))`` (see :func:`concatenate_embeddings`)."""

    def __init__(self, embeddings, **kwargs):
        super().__init__(**kwargs)
        self.members = list(embeddings)
        self.factor = 1.0 / float(np.sqrt(len(self.members)))

    def call(self, x, training=False):
        outputs = [tf.cast(e(x, training=training), tf.float32) for e in self.members]
        return tf.concat(outputs, axis=-1) * self.factor

    def get_config(self):
        members = [keras.saving.serialize_keras_object(e) for e in self.members]
        return {**super().get_config(), "embeddings": members}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["embeddings"] = [
            keras.saving.deserialize_keras_object(e) for e in config["embeddings"]
        ]
        return cls(**config)


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
