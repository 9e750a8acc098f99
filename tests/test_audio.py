import keras
import numpy as np
import pytest

from bookcode.audio import (
    AlignmentNearestNeighbour,
    LogMelSpectrogram,
    cosine_cost,
    dtw_distance,
    fft_length_for,
    log_mel_spectrogram,
    mel_band_centres,
    mfcc,
)


def tone(hz, seconds=1.0, sample_rate=8000):
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_shapes_for_one_second_at_8khz():
    waves = np.zeros((3, 8000), np.float32)
    # frames = 1 + (8000 - 256) // 80 = 97
    assert tuple(log_mel_spectrogram(waves).shape) == (3, 97, 40)
    assert tuple(mfcc(waves).shape) == (3, 97, 13)
    assert tuple(mfcc(waves, num_coefficients=20, num_mel_bins=64).shape) == (3, 97, 20)
    assert tuple(log_mel_spectrogram(waves[0], num_mel_bins=16).shape) == (97, 16)
    assert fft_length_for(256) == 256 and fft_length_for(200) == 256 and fft_length_for(257) == 512


@pytest.mark.parametrize("hz", [300.0, 1000.0, 2500.0])
def test_pure_tone_peaks_in_the_right_mel_band(hz):
    spectrogram = log_mel_spectrogram(tone(hz)[None]).numpy()[0]  # (frames, 40)
    loudest_band = np.bincount(spectrogram.argmax(axis=1)).argmax()
    centres = mel_band_centres()
    assert loudest_band == np.abs(centres - hz).argmin()
    # and the band is far louder than a distant one (log power ratio)
    assert spectrogram[:, loudest_band].mean() > spectrogram[:, (loudest_band + 20) % 40].mean() + 5


def test_silence_is_the_log_offset_and_mfcc_zeroth_coefficient_tracks_loudness():
    silence = log_mel_spectrogram(np.zeros((1, 8000), np.float32)).numpy()
    np.testing.assert_allclose(silence, np.log(1e-6), rtol=1e-6)
    quiet, loud = mfcc(np.stack([0.01 * tone(500), tone(500)])).numpy()[:, :, 0].mean(axis=1)
    assert loud > quiet


def test_layer_matches_function_and_reports_its_shape():
    waves = np.stack([tone(440), tone(880)])
    layer = LogMelSpectrogram()
    out = layer(waves)
    assert tuple(out.shape) == (2, 97, 40, 1)
    assert layer.compute_output_shape((None, 8000)) == (None, 97, 40, 1)
    np.testing.assert_allclose(out[..., 0], log_mel_spectrogram(waves), rtol=1e-5, atol=1e-5)
    mfcc_layer = LogMelSpectrogram(num_coefficients=13)
    assert tuple(mfcc_layer(waves).shape) == (2, 97, 13, 1)
    # inside a model, and rebuilt from its config
    model = keras.Sequential([keras.Input((8000,)), mfcc_layer])
    assert model.output_shape == (None, 97, 13, 1)
    again = LogMelSpectrogram.from_config(mfcc_layer.get_config())
    np.testing.assert_allclose(again(waves), mfcc_layer(waves), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"frame_length": 0}, "frame_length"),
        ({"num_mel_bins": 2.5}, "num_mel_bins"),
        ({"upper_hz": 5000.0}, "upper_hz"),
        ({"lower_hz": 4000.0}, "lower_hz"),
    ],
)
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        log_mel_spectrogram(np.zeros((1, 8000), np.float32), **kwargs)
    with pytest.raises(ValueError, match=message):
        LogMelSpectrogram(**kwargs)


def test_too_short_waveform_and_bad_mfcc_count_raise():
    with pytest.raises(ValueError, match="fewer than one frame"):
        log_mel_spectrogram(np.zeros((1, 100), np.float32))
    with pytest.raises(ValueError, match="num_coefficients"):
        mfcc(np.zeros((1, 8000), np.float32), num_coefficients=41)


def test_dtw_distance_hand_computed():
    # Paths through [[1, 2], [3, 4]]: diagonal 1 + 4 = 5, right-down 1 + 2 + 4 = 7,
    # down-right 1 + 3 + 4 = 8; the best (5) divided by L + M = 4.
    cost = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert dtw_distance(cost) == pytest.approx(1.25)
    # Band 0 keeps only the diagonal: 1 + 5 + 9 over 6.
    square = np.arange(1.0, 10.0).reshape(3, 3)
    assert dtw_distance(square, band=0) == pytest.approx(15 / 6)
    # Vectorised over leading axes.
    stacked = np.stack([cost, 2 * cost, 0 * cost])
    np.testing.assert_allclose(dtw_distance(stacked), [1.25, 2.5, 0.0])
    with pytest.raises(ValueError, match="shape"):
        dtw_distance(np.ones(3))
    with pytest.raises(ValueError, match="band"):
        dtw_distance(cost, band=-1)


def test_dtw_ignores_a_change_of_speed():
    rng = np.random.default_rng(0)
    word = rng.normal(size=(10, 4))
    slow = np.repeat(word, 2, axis=0)  # the same frames, each held twice as long
    assert dtw_distance(cosine_cost(word[None], slow[None])[0, 0]) == pytest.approx(0.0, abs=1e-9)
    other = rng.normal(size=(20, 4))
    assert dtw_distance(cosine_cost(word[None], other[None])[0, 0]) > 0.2


def test_alignment_nearest_neighbour_finds_stretched_words():
    rng = np.random.default_rng(1)
    support = rng.normal(size=(3, 12, 5))  # three "words"
    queries = np.stack(
        [np.repeat(w, 2, axis=0)[::2] + 0.05 * rng.normal(size=(12, 5)) for w in support]
    )
    queries = np.stack([np.roll(q, 1, axis=0) for q in queries])  # shifted by one frame
    learner = AlignmentNearestNeighbour(band=4)
    logits = learner.predict_episode(support[:, :, :, None], np.array([0, 1, 2]), queries)
    assert logits.shape == (3, 3)
    np.testing.assert_array_equal(logits.argmax(1), [0, 1, 2])
    # With a frame network: the learner embeds both sides with it.
    doubled = AlignmentNearestNeighbour(lambda x: 2 * np.asarray(x), band=4)
    np.testing.assert_allclose(
        doubled.predict_episode(support, np.array([0, 1, 2]), queries), logits, atol=1e-9
    )
    with pytest.raises(ValueError, match="support_y"):
        learner.predict_episode(support, np.array([0, 1]), queries)


def test_soft_dtw_approaches_dtw_and_has_gradients():
    import tensorflow as tf

    from bookcode.audio import dtw_distance, soft_dtw_distance

    rng = np.random.default_rng(0)
    cost = rng.uniform(0, 1, (3, 6, 5)).astype(np.float32)
    for band in (None, 2):
        hard = dtw_distance(cost, band)
        soft = soft_dtw_distance(cost, gamma=1e-3, band=band).numpy()
        np.testing.assert_allclose(soft, hard, atol=2e-3)
        # the soft minimum is below the minimum
        assert (soft_dtw_distance(cost, gamma=0.1, band=band).numpy() < hard).all()
    # 2 x 2 by hand with gamma -> 0: path (0,0) -> (1,1) costs 1 + 1, divided by 4
    two = np.array([[[1.0, 5.0], [5.0, 1.0]]], np.float32)
    np.testing.assert_allclose(soft_dtw_distance(two, gamma=1e-3).numpy(), [0.5], atol=1e-3)
    x = tf.constant(cost)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = tf.reduce_sum(soft_dtw_distance(x, gamma=0.05))
    grad = tape.gradient(value, x).numpy()
    assert np.isfinite(grad).all() and grad.min() >= 0 and grad.sum() > 0
    with pytest.raises(ValueError, match="gamma"):
        soft_dtw_distance(cost, gamma=0.0)
    with pytest.raises(ValueError, match="band"):
        soft_dtw_distance(cost, band=-1)
    with pytest.raises(ValueError, match="shape"):
        soft_dtw_distance(np.zeros((2, 0, 3), np.float32))
