import keras
import numpy as np
import pytest

from bookcode.audio import (
    LogMelSpectrogram,
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
