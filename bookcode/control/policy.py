"""Policies of the control chapters: a multilayer perceptron from position to
action mean (Finn et al. 2017 use two hidden layers of 100 ReLU units), run
with one set of weights per task at once (:func:`batched_forward`)."""

from __future__ import annotations

import keras
import tensorflow as tf


def mlp_policy(hidden=(100, 100), activation: str = "relu", inputs: int = 2, outputs: int = 2,
               seed: int | None = None) -> keras.Sequential:  # fmt: skip
    """A ``keras.Sequential`` of ``Dense`` layers: ``inputs`` -> ``hidden`` ->
    ``outputs`` (linear output). ``seed`` fixes the initial weights."""
    if not hidden or any(int(h) < 1 for h in hidden):
        raise ValueError(f"hidden must be a non-empty list of positive sizes, got {hidden!r}")
    layers = [keras.Input((inputs,))]
    for i, h in enumerate(hidden):
        init = keras.initializers.GlorotUniform(seed=None if seed is None else seed + i)
        layers.append(keras.layers.Dense(int(h), activation=activation, kernel_initializer=init))
    init = keras.initializers.GlorotUniform(seed=None if seed is None else seed + len(hidden))
    layers.append(keras.layers.Dense(outputs, kernel_initializer=init))
    return keras.Sequential(layers)


def dense_layers(model: keras.Model) -> list:
    """The ``Dense`` layers of a model made only of them (``ValueError`` else)."""
    found = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    bad = [type(layer).__name__ for layer in found if not isinstance(layer, keras.layers.Dense)]
    if bad or not found:
        raise ValueError(
            "a control policy must be a keras.Sequential of Dense layers (e.g. mlp_policy()); "
            f"found {bad or 'no layers'}"
        )
    for layer in found:
        if not layer.use_bias:
            raise ValueError(f"Dense layer {layer.name} has no bias; build it with use_bias=True")
    return found


def batched_forward(model: keras.Model, params, x):
    """``model(x)`` with one set of weights per task: ``params`` are the
    model's trainable tensors (kernel, bias per Dense layer) each with a
    leading task axis ``B``; ``x`` is (B, ..., inputs). Returns (B, ...,
    outputs) in float32. Computes in the layers' compute dtype (bfloat16 under
    a mixed-precision policy)."""
    layers = dense_layers(model)
    if len(params) != 2 * len(layers):
        raise ValueError(f"expected {2 * len(layers)} tensors (kernel, bias per layer), "
                         f"got {len(params)}")  # fmt: skip
    dtype = layers[0].compute_dtype
    shape = tf.shape(x)
    h = tf.cast(tf.reshape(x, tf.stack([shape[0], -1, shape[-1]])), dtype)
    for i, layer in enumerate(layers):
        kernel, bias = (tf.cast(p, dtype) for p in params[2 * i : 2 * i + 2])
        h = layer.activation(tf.einsum("bni,bio->bno", h, kernel) + bias[:, None, :])
    out = tf.cast(h, tf.float32)
    return tf.reshape(out, tf.concat([shape[:-1], tf.shape(out)[-1:]], 0))
