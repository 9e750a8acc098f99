import numpy as np
import pytest

from bookcode import nets


def test_conv4_embedding_and_head_shapes():
    model = nets.conv4()
    assert model.output_shape == (None, 64)
    assert len([l for l in model.layers]) == 5  # 4 blocks + flatten
    out = model(np.zeros((3, 28, 28, 1), np.float32))
    assert out.shape == (3, 64)
    head = nets.conv4(input_shape=(84, 84, 3), filters=32, num_classes=5)
    assert head.output_shape == (None, 5)
    assert head.count_params() > 0


def test_conv4_dtype_policy_and_weight_transfer_between_batch_norms():
    mixed = nets.conv4(filters=8, num_classes=5, fused_batch_norm=True, dtype="mixed_bfloat16")
    x = np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype(np.float32)
    assert mixed(x).dtype.name == "bfloat16"
    assert all(v.dtype == "float32" for v in mixed.weights)  # variables stay in full precision
    exact = nets.conv4(filters=8, num_classes=5)  # same variables, composite batch norm
    exact.set_weights(mixed.get_weights())
    fused = nets.conv4(filters=8, num_classes=5, fused_batch_norm=True)
    fused.set_weights(mixed.get_weights())
    np.testing.assert_allclose(exact(x, training=True), fused(x, training=True), atol=1e-4)
    assert nets.fast_precision() in ("float32", "mixed_bfloat16")


def test_conv4_blocks_and_batch_norm_choice():
    import keras

    from bookcode.nets import BatchNormalization, FusedBatchNormalization

    small = nets.conv4((12, 12, 1), filters=4, num_classes=3, blocks=2, batch_norm="keras")
    assert small.output_shape == (None, 3)
    assert [l.name for l in small.layers[:2]] == ["block1", "block2"] and len(small.layers) == 4
    # 2 x (conv 3*3*1*4+4 or 3*3*4*4+4, batch norm 4*4) + dense (3*3*4)*3+3
    assert small.count_params() == (40 + 16) + (148 + 16) + 111
    norms = {
        choice: type(nets.conv4(filters=2, blocks=1, batch_norm=choice).layers[0].layers[1])
        for choice in ("exact", "fused", "keras")
    }
    assert norms == {
        "exact": BatchNormalization,
        "fused": FusedBatchNormalization,
        "keras": keras.layers.BatchNormalization,
    }
    fused = nets.conv4(filters=2, blocks=1, fused_batch_norm=True).layers[0].layers[1]
    assert type(fused) is FusedBatchNormalization
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        nets.conv4(batch_norm="group")
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        nets.conv4(batch_norm="keras", fused_batch_norm=True)
    with pytest.raises(ValueError, match="blocks must be positive"):
        nets.conv4(blocks=0)


def test_fast_precision_environment_override(monkeypatch):
    monkeypatch.delenv(nets.PRECISION_VAR, raising=False)
    detected = nets.fast_precision()
    assert detected in ("float32", "mixed_bfloat16")
    monkeypatch.setenv(nets.PRECISION_VAR, "float32")
    assert nets.fast_precision() == "float32"
    monkeypatch.setenv(nets.PRECISION_VAR, "bfloat16")  # forced, whatever the hardware
    assert nets.fast_precision() == "mixed_bfloat16"
    for bad in ("float16", "mixed_bfloat16", ""):
        monkeypatch.setenv(nets.PRECISION_VAR, bad)
        with pytest.raises(ValueError, match="BOOKCODE_PRECISION"):
            nets.fast_precision()
    monkeypatch.delenv(nets.PRECISION_VAR)
    assert nets.fast_precision() == detected


def test_conv4_feature_maps_without_pooling_and_relation_module():
    # the relation network's embedding (Sung et al. 2018): 28 -> 26 -> 13 -> 11 -> 5 -> 5 -> 5
    maps = nets.conv4(
        filters=4, pooling_blocks=2, padding=["valid", "valid", "same", "same"], flatten=False
    )
    assert maps.output_shape == (None, 5, 5, 4)
    assert [len(block.layers) for block in maps.layers] == [4, 4, 3, 3]  # no pool in 3-4
    out = maps(np.zeros((2, 28, 28, 1), np.float32))
    assert out.shape == (2, 5, 5, 4)
    assert nets.conv4(filters=4, pooling_blocks=0).output_shape == (None, 28 * 28 * 4)
    assert nets.conv4(filters=4, padding="valid", blocks=2).output_shape == (None, 5 * 5 * 4)
    # defaults unchanged: every block pools, padding same, flattened
    structure = lambda m: [
        [(type(l).__name__, getattr(l, "padding", None)) for l in getattr(b, "layers", [b])]
        for b in m.layers
    ]
    default = nets.conv4()
    assert structure(default) == structure(nets.conv4(pooling_blocks=4, padding="same"))
    assert default.output_shape == (None, 64) and len(default.layers[0].layers) == 4
    for bad, match in [
        ({"pooling_blocks": 5}, "pooling_blocks must be"),
        ({"padding": ["same"] * 3}, "one entry per block"),
        ({"padding": "full"}, "padding must be"),
        ({"num_classes": 5, "flatten": False}, "needs flatten=True"),
    ]:
        with pytest.raises(ValueError, match=match):
            nets.conv4(**bad)
    relation = nets.relation_module((5, 5, 8), filters=4, hidden=3)
    assert relation.output_shape == (None, 1)
    # 5x5 -> pool 2x2 -> pool 1x1; conv 3*3*8*4+4, bn 16, conv 3*3*4*4+4, bn 16, dense 4*3+3, 3+1
    assert relation.count_params() == 292 + 16 + 148 + 16 + 15 + 4


def _relu_then_pool(model):
    """``model`` (a conv4) with every block in the order conv, batch norm,
    ReLU, max-pool; it shares ``model``'s layers, so its variables too."""
    import keras

    blocks = []
    for block in model.layers:
        if isinstance(block, keras.Sequential):
            conv, norm, pool, relu = block.layers
            assert isinstance(pool, keras.layers.MaxPooling2D) and isinstance(
                relu, keras.layers.ReLU
            )
            block = keras.Sequential([conv, norm, relu, pool])
        blocks.append(block)
    return keras.Sequential([keras.Input(model.input_shape[1:])] + blocks)


@pytest.mark.parametrize(
    "batch_norm, dtype",
    [("exact", None), ("fused", None), ("keras", None), ("fused", "mixed_bfloat16")],
)
def test_conv4_pools_before_the_relu_bit_identically(batch_norm, dtype):
    # Max-pooling and ReLU commute exactly (the ReLU is monotone and max picks
    # the same element), so conv4's blocks pool first and apply the ReLU to a
    # quarter of the values. Losses, gradients, second derivatives and two
    # SGD steps equal the ReLU-then-pool order bit for bit.
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(3)
    model = nets.conv4((16, 16, 1), 4, 3, batch_norm=batch_norm, dtype=dtype)
    reference = _relu_then_pool(model)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(6, 16, 16, 1)).astype(np.float32))
    y = tf.constant([0, 1, 2, 0, 1, 2])
    start = [v.numpy() for v in model.variables]

    def run(net):
        for variable, value in zip(model.variables, start):
            variable.assign(value)
        record = []
        for _ in range(2):
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    logits = tf.cast(net(x, training=True), tf.float32)
                    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
                grads = inner.gradient(loss, net.trainable_variables)
                penalty = tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads])
            second = outer.gradient(penalty, net.trainable_variables)
            record += [loss, *grads, *second]
            for variable, g in zip(net.trainable_variables, grads):
                variable.assign_sub(0.1 * g)
        record.append(tf.cast(net(x, training=False), tf.float32))
        return [r.numpy() for r in record] + [v.numpy() for v in model.variables]

    assert [type(l).__name__ for l in model.layers[0].layers][2:] == [
        "MaxPooling2D",
        "ReLU",
    ]
    new, old = run(model), run(reference)
    assert len(new) == len(old)
    for a, b in zip(new, old):
        np.testing.assert_array_equal(a, b)
    per_step = 1 + 2 * len(model.trainable_variables)
    assert new[0] > new[per_step]  # the SGD steps lowered the loss


def test_onednn_enabled_follows_tensorflows_rule():
    import os
    import subprocess
    import sys

    forced = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    expected = bool(flags & nets.ONEDNN_CPU_FLAGS) if forced is None else forced in ("1", "true")
    assert nets.onednn_enabled() is expected
    # the environment variable, set before TensorFlow is imported, decides
    code = "from bookcode import nets; print(nets.onednn_enabled())"
    env = {
        **os.environ,
        "TF_ENABLE_ONEDNN_OPTS": "0" if expected else "1",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip().splitlines()[-1] == str(not expected), out.stderr[-2000:]
