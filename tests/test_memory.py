"""bookcode.memory: the NTM addressing stages against hand computations, erase
and add, LRUA's least-used selection and usage decay, the cells inside
keras.layers.RNN, the copy task, and SequenceModel."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from bookcode.memory import (
    MANNCell,
    NTMCell,
    SequenceModel,
    addressing,
    bit_errors,
    copy_batch,
)


def f32(x):
    return np.asarray(x, np.float32)


def np_(x):
    return keras.ops.convert_to_numpy(x)


MEMORY = f32([[[1, 0], [0, 1], [1, 1]]])  # (1, 3 slots, 2)


def test_cosine_similarity_by_hand():
    key = f32([[1, 0]])
    got = np_(addressing.cosine_similarity(key, MEMORY))
    np.testing.assert_allclose(got, [[1.0, 0.0, 1 / np.sqrt(2)]], atol=1e-6)


def test_content_weights_softmax_of_strength_times_cosine():
    key, strength = f32([[1, 0]]), f32([[2.0]])
    scores = 2.0 * np.array([1.0, 0.0, 1 / np.sqrt(2)])
    expected = np.exp(scores) / np.exp(scores).sum()
    got = np_(addressing.content_weights(MEMORY, key, strength))
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    # a stronger key focuses more
    sharper = np_(addressing.content_weights(MEMORY, key, f32([[20.0]])))
    assert sharper[0, 0] > got[0, 0] > 0.5


def test_interpolation():
    got = np_(addressing.interpolate(f32([[1, 0, 0]]), f32([[0, 0, 1]]), f32([[0.25]])))
    np.testing.assert_allclose(got, [[0.25, 0, 0.75]])


def test_circular_shift_moves_and_wraps():
    w = f32([[0.7, 0.2, 0.0, 0.1]])
    forward = np_(addressing.circular_shift(w, f32([[0, 0, 1]])))  # all mass on +1
    np.testing.assert_allclose(forward, [[0.1, 0.7, 0.2, 0.0]])
    backward = np_(addressing.circular_shift(w, f32([[1, 0, 0]])))  # -1
    np.testing.assert_allclose(backward, [[0.2, 0.0, 0.1, 0.7]])
    # a blurred shift: result_i = sum_j w_j s(i - j)
    s = np.array([0.2, 0.5, 0.3])  # shifts -1, 0, +1
    expected = [0.5 * 0.7 + 0.3 * 0.1 + 0.2 * 0.2, 0.5 * 0.2 + 0.3 * 0.7 + 0.2 * 0.0,
                0.5 * 0.0 + 0.3 * 0.2 + 0.2 * 0.1, 0.5 * 0.1 + 0.3 * 0.0 + 0.2 * 0.7]  # fmt: skip
    got = np_(addressing.circular_shift(w, f32([s])))
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        addressing.circular_shift(w, f32([[0.5, 0.5]]))


def test_sharpen():
    w = f32([[0.5, 0.3, 0.2]])
    got = np_(addressing.sharpen(w, f32([[2.0]])))
    expected = np.array([0.25, 0.09, 0.04]) / 0.38
    np.testing.assert_allclose(got[0], expected, atol=1e-5)
    np.testing.assert_allclose(np_(addressing.sharpen(w, f32([[1.0]]))), w, atol=1e-6)


def test_address_chains_the_four_stages():
    key, strength, gate = f32([[0, 1]]), f32([[5.0]]), f32([[0.6]])
    previous, shift, gamma = f32([[0.2, 0.3, 0.5]]), f32([[0.1, 0.8, 0.1]]), f32([[1.5]])
    c = np.exp(5 * np.array([0, 1, 1 / np.sqrt(2)]))
    c /= c.sum()
    g = 0.6 * c + 0.4 * np.array([0.2, 0.3, 0.5])
    s = 0.8 * g + 0.1 * np.roll(g, 1) + 0.1 * np.roll(g, -1)
    expected = s**1.5 / (s**1.5).sum()
    got = np_(addressing.address(MEMORY, previous, key, strength, gate, shift, gamma))
    np.testing.assert_allclose(got[0], expected, atol=1e-5)


def test_read_and_write_erase_add_on_a_tiny_memory():
    w = f32([[0.0, 1.0, 0.5]])
    np.testing.assert_allclose(np_(addressing.read(MEMORY, w)), [[0.5, 1.5]])
    erase, add = f32([[1.0, 0.0]]), f32([[2.0, 3.0]])
    got = np_(addressing.write(MEMORY, w, erase, add))
    # slot 0 untouched; slot 1 first column erased, then + (2, 3); slot 2 half
    expected = [[1, 0], [0 + 2, 1 + 3], [0.5 + 1, 1 + 1.5]]
    np.testing.assert_allclose(got[0], expected)


def test_least_used_and_usage_decay():
    usage = f32([[0.5, 0.1, 0.9, 0.3]])
    lu = np_(addressing.least_used(usage, 2))
    np.testing.assert_allclose(lu[0], [[0, 1, 0, 0], [0, 0, 0, 1]])
    ties = np_(addressing.least_used(f32([[0, 0, 0]]), 1))  # lower index first
    np.testing.assert_allclose(ties[0], [[1, 0, 0]])
    u = np_(addressing.decay_usage(usage, f32([[0, 1, 0, 0]]), f32([[0, 0, 0.5, 0.5]]), 0.9))
    np.testing.assert_allclose(u, [[0.45, 1.09, 1.31, 0.77]], atol=1e-6)
    w = np_(addressing.lrua_write_weights(f32([[1, 0]]), f32([[0, 1]]), f32([[0.0]])))
    np.testing.assert_allclose(w, [[0.5, 0.5]])


def _run(cell, steps=6, features=5, batch=2, seed=0):
    x = np.random.default_rng(seed).random((batch, steps, features), dtype=np.float32)
    layer = keras.layers.RNN(cell, return_sequences=True)
    return x, layer, np_(layer(x))


def test_ntm_cell_in_rnn_returns_normalised_weights():
    cell = NTMCell(8, output_size=3, memory_slots=6, memory_width=4, read_heads=2,
                   return_weights=True)  # fmt: skip
    _, _, out = _run(cell)
    parts = cell.split_output(out)
    assert parts["output"].shape == (2, 6, 3)
    assert parts["read_weights"].shape == (2, 6, 2, 6)
    assert parts["write_weights"].shape == (2, 6, 1, 6)
    for name in ("read_weights", "write_weights"):
        np.testing.assert_allclose(parts[name].sum(-1), 1.0, atol=1e-5)
        assert (parts[name] >= 0).all()
    plain = NTMCell(8, output_size=3, memory_slots=6, memory_width=4)
    assert plain.output_size == 3 and cell.output_size == 3 + 3 * 6


def test_mann_cell_usage_follows_its_decay_rule():
    cell = MANNCell(8, output_size=3, memory_slots=7, memory_width=4, read_heads=2,
                    gamma=0.9, return_weights=True)  # fmt: skip
    _, _, out = _run(cell, steps=8)
    parts = cell.split_output(out)
    r, w, u = parts["read_weights"], parts["write_weights"], parts["usage"]
    assert r.shape == (2, 8, 2, 7) and u.shape == (2, 8, 7)
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    previous = np.zeros((2, 7))
    for t in range(8):
        expected = 0.9 * previous + r[:, t].sum(1) + w[:, t].sum(1)
        np.testing.assert_allclose(u[:, t], expected, atol=1e-5)
        previous = u[:, t]
    # the first writes go to slots 0 and 1 (least used at zero usage, lower index
    # first) or to the slots read before (also 0 and 1 at the start)
    np.testing.assert_allclose(w[:, 0, :, 2:], 0.0, atol=1e-6)


def test_mann_cell_writes_new_items_to_the_least_used_slot():
    """With the write gate shut (alpha -> -inf) every key goes to the least-used
    slot, which is cleared first: after k steps, slots 0..k-1 hold the keys."""
    cell = MANNCell(4, output_size=2, memory_slots=5, memory_width=3, read_heads=1,
                    gamma=0.5)  # fmt: skip
    x = np.random.default_rng(1).random((1, 3, 2), dtype=np.float32)
    keras.layers.RNN(cell)(x)
    kernel, bias = cell.head_layer.weights
    bias_value = np.zeros(bias.shape, np.float32)
    bias_value[3] = -50.0  # alpha of the head: write to the least-used slot
    bias.assign(bias_value)
    states = cell.get_initial_state(1)
    written = []
    for t in range(3):
        _, states = cell(x[:, t], states)
        h = np_(states[0])
        key = np.tanh(h @ np_(kernel)[:, :3] + bias_value[:3])
        written.append(key[0])
    memory = np_(states[2]).reshape(5, 3)
    np.testing.assert_allclose(memory[:3], np.array(written), atol=1e-5)
    np.testing.assert_allclose(memory[3:], 1e-6, atol=1e-7)


def test_cells_reject_bad_arguments():
    with pytest.raises(ValueError, match="memory_slots"):
        NTMCell(8, 3, memory_slots=0)
    with pytest.raises(ValueError, match="shift_range"):
        NTMCell(8, 3, memory_slots=2, shift_range=1)
    with pytest.raises(ValueError, match="gamma"):
        MANNCell(8, 3, gamma=1.5)
    with pytest.raises(ValueError, match="read_heads"):
        MANNCell(8, 3, memory_slots=2, read_heads=4)


def test_copy_batch():
    x, y, mask, lengths = copy_batch(4, 2, 5, bits=3, seed=0)
    assert x.shape == (4, 11, 4) and y.shape == (4, 11, 3) and mask.shape == (4, 11)
    for i, n in enumerate(lengths):
        assert 2 <= n <= 5
        assert x[i, n, 3] == 1 and x[i, :, 3].sum() == 1  # one delimiter
        np.testing.assert_array_equal(y[i, n + 1 : 2 * n + 1], x[i, :n, :3])
        assert mask[i].sum() == n and mask[i, n + 1 : 2 * n + 1].all()
        assert not x[i, n + 1 :].any()  # nothing to see while recalling
    again = copy_batch(4, 2, 5, bits=3, seed=0)
    np.testing.assert_array_equal(again[0], x)
    with pytest.raises(ValueError, match="max_length"):
        copy_batch(2, 5, 3)
    with pytest.raises(ValueError, match="steps"):
        copy_batch(2, 1, 5, steps=8)


def test_bit_errors_counts_recall_steps_only():
    targets = np.zeros((1, 3, 2), np.float32)
    targets[0, 1] = [1, 0]
    logits = np.full((1, 3, 2), -1.0, np.float32)
    logits[0, 0] = [5, 5]  # wrong but not masked
    logits[0, 2] = [5, -5]  # one wrong bit, masked
    mask = np.array([[0, 1, 1]], np.float32)
    np.testing.assert_array_equal(bit_errors(logits, targets, mask), [2.0])


@pytest.mark.parametrize("xla", [True, False])
def test_sequence_model_learns_to_echo_with_fit(xla):
    """An LSTM (no memory) learns to output its input of the previous step."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (64, 6, 2)).astype(np.float32)
    y = np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    model = SequenceModel(keras.layers.LSTMCell(16), output_size=2, xla=xla)
    model.compile(keras.optimizers.Adam(0.02), keras.losses.BinaryCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=15, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    assert np.mean((np_(model(x))[:, 1:] > 0) == (y[:, 1:] > 0.5)) > 0.9


def test_sequence_model_round_trip(tmp_path):
    cell = MANNCell(6, output_size=3, memory_slots=5, memory_width=4, read_heads=1)
    encoder = keras.Sequential(
        [keras.Input((2, 2, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    model = SequenceModel(cell, encoder=encoder, encoded_features=4)
    x = np.random.default_rng(0).random((2, 4, 7), dtype=np.float32)
    before = np_(model(x))
    assert before.shape == (2, 4, 3)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np_(loaded(x)), before, atol=1e-6)
    with pytest.raises(ValueError, match="encoded_features"):
        SequenceModel(cell, encoder=encoder)


def test_mann_read_order():
    """read_after_write=False searches the memory before this step's write: at
    the first step the memory is still constant, so every slot is equally
    similar and the read is uniform; reading after the write finds the keys."""
    x = np.random.default_rng(2).random((1, 1, 3), dtype=np.float32)
    for after in (False, True):
        cell = MANNCell(4, 2, memory_slots=6, memory_width=3, read_heads=1,
                        read_after_write=after, return_weights=True)  # fmt: skip
        read = cell.split_output(np_(keras.layers.RNN(cell, return_sequences=True)(x)))
        uniform = np.allclose(read["read_weights"][0, 0, 0], 1 / 6, atol=1e-6)
        assert uniform == (not after)


def test_mann_key_value_writes_the_previous_key_beside_a_new_value():
    """key_value=True: with the write gate shut, step t writes [k_{t-1}, v_t] into
    the least-used slot (k_{-1} = 0), and reads (before the write) by cosine on
    the key half of each slot only; the whole slot is read."""
    cell = MANNCell(4, output_size=2, memory_slots=5, memory_width=4, read_heads=1,
                    gamma=0.5, read_after_write=False, key_value=True)  # fmt: skip
    assert cell.key_width == 2
    x = np.random.default_rng(3).random((1, 4, 2), dtype=np.float32)
    keras.layers.RNN(cell)(x)
    kernel, bias = (np_(w) for w in cell.head_layer.weights)  # per head: key (2), alpha, strength
    bias = bias.copy()
    bias[2] = -50.0  # alpha: write to the least-used slot
    cell.head_layer.weights[1].assign(bias)
    v_kernel, v_bias = (np_(w) for w in cell.value_layer.weights)
    states = cell.get_initial_state(1)
    memory = np.full((5, 4), 1e-6, np.float32)
    previous_key = np.zeros(2, np.float32)
    for t in range(4):
        _, states = cell(x[:, t], states)
        h = np_(states[0])[0]
        params = h @ kernel + bias
        key, strength = np.tanh(params[:2]), 1 + np.log1p(np.exp(params[3]))
        value = np.tanh(h @ v_kernel + v_bias)
        cosine = (
            memory[:, :2]
            @ key
            / (np.sqrt(np.sum(memory[:, :2] ** 2, 1) + 1e-8) * np.sqrt(key @ key + 1e-8))
        )
        read = np.exp(strength * cosine) / np.exp(strength * cosine).sum()
        np.testing.assert_allclose(np_(states[3])[0], read, atol=1e-5)
        np.testing.assert_allclose(np_(states[5])[0], read @ memory, atol=1e-5)
        memory[t] = np.concatenate([previous_key, value])  # slot t was the least used
        np.testing.assert_allclose(np_(states[2])[0].reshape(5, 4), memory, atol=1e-5)
        np.testing.assert_allclose(np_(states[6])[0], key, atol=1e-6)
        previous_key = key
    with pytest.raises(ValueError, match="memory_width"):
        MANNCell(4, 2, memory_width=1, key_value=True)


def test_mann_key_value_round_trip(tmp_path):
    cell = MANNCell(6, 3, memory_slots=5, memory_width=4, read_heads=2, key_value=True)
    model = keras.Sequential([keras.Input((4, 5)), keras.layers.RNN(cell, return_sequences=True)])
    x = np.random.default_rng(0).random((2, 4, 5), dtype=np.float32)
    before = np_(model(x))
    model.save(tmp_path / "kv.keras")
    loaded = keras.models.load_model(tmp_path / "kv.keras")
    assert loaded.layers[0].cell.key_value
    np.testing.assert_allclose(np_(loaded(x)), before, rtol=1e-5, atol=1e-6)
