"""Backbones and layers shared by the learners."""

from __future__ import annotations

import keras
from keras import layers


def conv_block(filters: int, name: str | None = None) -> keras.Sequential:
    """3x3 convolution, batch normalisation, ReLU, 2x2 max-pooling."""
    return keras.Sequential(
        [
            layers.Conv2D(filters, 3, padding="same"),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.MaxPooling2D(2),
        ],
        name=name,
    )


def conv4(
    input_shape=(28, 28, 1),
    filters: int = 64,
    num_classes: int | None = None,
    name: str = "conv4",
) -> keras.Sequential:
    """The Conv-4 backbone of few-shot learning (Vinyals et al. 2016; Snell et
    al. 2017; Finn et al. 2017): four blocks of [3x3 conv ``filters``, batch
    norm, ReLU, 2x2 max-pool], flattened. For 28x28 inputs the embedding has
    ``filters`` dimensions. With ``num_classes`` a dense head gives logits.
    """
    model = keras.Sequential(name=name)
    model.add(keras.Input(shape=input_shape))
    for i in range(4):
        model.add(conv_block(filters, name=f"block{i + 1}"))
    model.add(layers.Flatten())
    if num_classes is not None:
        model.add(layers.Dense(num_classes, name="logits"))
    return model
