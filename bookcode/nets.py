"""Backbones and layers shared by the learners."""

from __future__ import annotations

import keras
from keras import layers


@keras.saving.register_keras_serializable(package="bookcode")
class BatchNormalization(layers.BatchNormalization):
    """Keras batch normalisation with batch statistics that are exact to
    second order.

    TensorFlow's ``tf.nn.moments`` (behind Keras's layer) stops the gradient
    of the mean inside the variance. That term sums to zero in first
    derivatives, so ordinary training is unaffected, but second-order MAML
    (Finn et al. 2017) through it is off: 0.45% relative error against finite
    differences on a tiny network (``tests/test_meta.py``). Here the variance
    is the plain mean of squared deviations, differentiable all the way.
    """

    def _moments(self, inputs, mask):
        if mask is not None or self.synchronized:
            return super()._moments(inputs, mask)
        from keras import ops

        half = inputs.dtype in ("float16", "bfloat16")
        x = ops.cast(inputs, "float32") if half else inputs
        axes = self._reduction_axes
        mean = ops.mean(x, axis=axes, keepdims=True)
        variance = ops.mean(ops.square(x - mean), axis=axes)
        mean = ops.squeeze(mean, axis=axes)
        if half:
            mean, variance = ops.cast(mean, inputs.dtype), ops.cast(variance, inputs.dtype)
        return mean, variance


@keras.saving.register_keras_serializable(package="bookcode")
class FusedBatchNormalization(layers.BatchNormalization):
    """``BatchNormalization`` computed by TensorFlow's fused kernel for 4-D
    channels-last inputs: same variables and results, 2-3x faster training on
    CPU (Keras 3 composes batch norm from separate ops). Other inputs fall back
    to the Keras layer."""

    def call(self, inputs, training=None, mask=None):
        import tensorflow as tf

        if mask is not None or len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        scale = self.gamma if self.scale else tf.ones((channels,))
        offset = self.beta if self.center else tf.zeros((channels,))
        scale, offset = tf.cast(scale, tf.float32), tf.cast(offset, tf.float32)
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, scale, offset, epsilon=self.epsilon, is_training=True
            )[:3]
            count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
            variance = variance * (count - 1.0) / count  # the kernel returns the unbiased one
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1 - self.momentum)
            )
        else:
            outputs = tf.compat.v1.nn.fused_batch_norm(
                inputs, scale, offset, mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32), epsilon=self.epsilon,
                is_training=False,
            )[0]  # fmt: skip
        return tf.cast(outputs, self.compute_dtype)


PRECISION_VAR = "BOOKCODE_PRECISION"


def fast_precision() -> str:
    """The Keras dtype policy that trains convolutions fastest here:
    ``"mixed_bfloat16"`` on CPUs with bfloat16 matrix units (x86 AMX or
    AVX512-BF16; 2-3x faster convolutions), else ``"float32"``.

    The environment variable ``BOOKCODE_PRECISION`` overrides the detection:
    ``float32`` or ``bfloat16`` (mixed precision, even without hardware
    support)."""
    import os

    choice = os.environ.get(PRECISION_VAR)
    if choice is not None:
        policies = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
        if choice not in policies:
            raise ValueError(
                f"{PRECISION_VAR}={choice!r}: choose one of {sorted(policies)} or unset it"
            )
        return policies[choice]
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return "float32"
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "float32"
    return "mixed_bfloat16" if flags & {"amx_bf16", "avx512_bf16"} else "float32"


ONEDNN_CPU_FLAGS = frozenset(
    {"avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}
)


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN kernels (convolutions, batch norm,
    pooling) in this process.

    TensorFlow decides once, when it is imported: on Linux it turns oneDNN on
    by default only on CPUs with one of :data:`ONEDNN_CPU_FLAGS` (AVX512-VNNI,
    AVX512-BF16, AVX-VNNI, AMX); ``TF_ENABLE_ONEDNN_OPTS=1`` (or ``0``) set
    before the import overrides it. On an AVX2-only CPU the default is off,
    and Conv-4 training takes Eigen's kernels, 2-3x more CPU time
    (``benchmarks/RESULTS.md``); results differ in the last digits between
    the two."""
    import tensorflow as tf  # noqa: F401 (the decision is taken at import)

    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # a TensorFlow build without the probe
        return False
    return bool(_pywrap_util_port.IsMklEnabled())


_BATCH_NORMS = {
    "exact": BatchNormalization,
    "fused": FusedBatchNormalization,
    "keras": layers.BatchNormalization,
}


def _batch_norm_class(batch_norm, fused_batch_norm):
    if batch_norm is None:
        return FusedBatchNormalization if fused_batch_norm else BatchNormalization
    if batch_norm not in _BATCH_NORMS or (fused_batch_norm and batch_norm != "fused"):
        raise ValueError(
            f"batch_norm must be one of {sorted(_BATCH_NORMS)} (fused_batch_norm=True "
            f'is "fused"), got {batch_norm!r} with fused_batch_norm={fused_batch_norm}'
        )
    return _BATCH_NORMS[batch_norm]


def conv_block(
    filters: int,
    name: str | None = None,
    fused_batch_norm: bool = False,
    batch_norm_momentum: float = 0.99,
    dtype=None,
    batch_norm: str | None = None,
    pool: bool = True,
    padding: str = "same",
) -> keras.Sequential:
    """3x3 convolution, batch normalisation, ReLU, 2x2 max-pooling (left out
    with ``pool=False``). ``padding``: the convolution's, ``"same"`` or
    ``"valid"``. ``batch_norm``: see :func:`conv4`.

    The layers pool before the ReLU: max-pooling and ReLU commute exactly
    (values and gradients, bit for bit; ``tests/test_nets.py``), and the ReLU
    then touches a quarter of the values (5% less CPU per Conv-4 training
    step with TensorFlow's Eigen kernels, 2% with oneDNN)."""
    norm = _batch_norm_class(batch_norm, fused_batch_norm)
    if padding not in ("same", "valid"):
        raise ValueError(f'padding must be "same" or "valid", got {padding!r}')
    return keras.Sequential(
        [
            layers.Conv2D(filters, 3, padding=padding, dtype=dtype),
            norm(momentum=batch_norm_momentum, dtype=dtype),
        ]
        + ([layers.MaxPooling2D(2, dtype=dtype)] if pool else [])
        + [layers.ReLU(dtype=dtype)],
        name=name,
    )


def conv4(
    input_shape=(28, 28, 1),
    filters: int = 64,
    num_classes: int | None = None,
    name: str = "conv4",
    fused_batch_norm: bool = False,
    batch_norm_momentum: float = 0.99,
    dtype=None,
    blocks: int = 4,
    batch_norm: str | None = None,
    pooling_blocks: int | None = None,
    padding="same",
    flatten: bool = True,
) -> keras.Sequential:
    """The Conv-4 backbone of few-shot learning (Vinyals et al. 2016; Snell et
    al. 2017; Finn et al. 2017; Ravi & Larochelle 2017 with 32 filters):
    ``blocks`` (default four) blocks of [3x3 conv ``filters``, batch norm,
    ReLU, 2x2 max-pool], flattened. For 28x28 inputs the embedding has
    ``filters`` dimensions. With ``num_classes`` a dense head gives logits.

    ``batch_norm`` chooses the normalisation layer: ``"exact"`` (default,
    :class:`BatchNormalization`, exact second derivatives), ``"fused"``
    (:class:`FusedBatchNormalization`, faster on CPU; ``fused_batch_norm=True``
    is the same) or ``"keras"`` (``keras.layers.BatchNormalization``).
    ``batch_norm_momentum=0.9`` matches PyTorch's default, whose moving
    averages settle within a short training run. ``dtype`` is a Keras dtype
    policy for every layer (e.g. :func:`fast_precision`), default the global
    one.

    Feature maps instead of vectors (the relation network's embedding, Sung et
    al. 2018): ``pooling_blocks`` (default: all) is how many of the first
    blocks pool, the others keep their resolution; ``padding`` is the
    convolutions' padding, one string or one per block; ``flatten=False``
    keeps the (h, w, filters) maps. The relation network's Omniglot embedding
    is ``conv4(pooling_blocks=2, padding=["valid", "valid", "same", "same"],
    flatten=False)``: 28x28 -> 5x5x64.
    """
    if blocks < 1:
        raise ValueError(f"blocks must be positive, got {blocks}")
    pooling_blocks = blocks if pooling_blocks is None else pooling_blocks
    if not 0 <= pooling_blocks <= blocks:
        raise ValueError(f"pooling_blocks must be in 0..blocks={blocks}, got {pooling_blocks}")
    paddings = [padding] * blocks if isinstance(padding, str) else list(padding)
    if len(paddings) != blocks:
        raise ValueError(f"padding needs one entry per block ({blocks}), got {padding!r}")
    if num_classes is not None and not flatten:
        raise ValueError("a dense head (num_classes) needs flatten=True")
    _batch_norm_class(batch_norm, fused_batch_norm)  # check the choice early
    model = keras.Sequential(name=name)
    model.add(keras.Input(shape=input_shape))
    for i in range(blocks):
        model.add(
            conv_block(
                filters,
                f"block{i + 1}",
                fused_batch_norm,
                batch_norm_momentum,
                dtype,
                batch_norm,
                pool=i < pooling_blocks,
                padding=paddings[i],
            )
        )
    if flatten:
        model.add(layers.Flatten(dtype=dtype))
    if num_classes is not None:
        model.add(layers.Dense(num_classes, name="logits", dtype=dtype))
    return model


def relation_module(
    input_shape=(5, 5, 128),
    filters: int = 64,
    hidden: int = 8,
    name: str = "relation_module",
    batch_norm_momentum: float = 0.9,
    dtype=None,
    batch_norm: str = "fused",
) -> keras.Sequential:
    """The relation module of Sung et al. 2018 ("Learning to Compare"):
    two blocks of [3x3 conv ``filters`` (padding same), batch norm, ReLU, 2x2
    max-pool], a dense layer of ``hidden`` ReLU units and one output unit.

    Input: concatenated feature-map pairs (b, h, w, 2c), for Omniglot
    (b, 5, 5, 128); output: the relation *logit* (b, 1), before the sigmoid
    that turns it into a score in [0, 1] (the learner applies it in float32).
    ``batch_norm``: as in :func:`conv4` (default ``"fused"``).
    """
    model = keras.Sequential(name=name)
    model.add(keras.Input(shape=input_shape))
    for i in range(2):
        name = f"relation_block{i + 1}"
        model.add(conv_block(filters, name, False, batch_norm_momentum, dtype, batch_norm))
    model.add(layers.Flatten(dtype=dtype))
    model.add(layers.Dense(hidden, activation="relu", name="hidden", dtype=dtype))
    model.add(layers.Dense(1, name="relation", dtype=dtype))
    return model
