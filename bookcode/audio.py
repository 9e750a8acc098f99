"""Audio features with ``tf.signal``: log-mel spectrograms and MFCCs.

A waveform is cut into overlapping frames, each frame's power spectrum is
computed with a short-time Fourier transform, pooled into triangular mel
bands (Stevens, Volkmann & Newman 1937; the HTK mel scale) and log-compressed.
MFCCs (Davis & Mermelstein 1980) are the first coefficients of the discrete
cosine transform of the log-mel spectrum. The defaults suit 8 kHz speech such
as the Free Spoken Digit Dataset: 32 ms frames every 10 ms, 40 mel bands from
20 Hz to 4 kHz.

Recordings of one word differ in speed; :func:`dtw_distance` (dynamic time
warping, Sakoe & Chiba 1978) compares two frame sequences along their
cheapest alignment, and :class:`AlignmentNearestNeighbour` uses it for
one-shot classification, on raw features or on learned frame vectors.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def _check(sample_rate, frame_length, frame_step, num_mel_bins, lower_hz, upper_hz):
    for name, value in {
        "sample_rate": sample_rate,
        "frame_length": frame_length,
        "frame_step": frame_step,
        "num_mel_bins": num_mel_bins,
    }.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    upper_hz = sample_rate / 2 if upper_hz is None else upper_hz
    if not 0 <= lower_hz < upper_hz <= sample_rate / 2:
        raise ValueError(
            f"need 0 <= lower_hz < upper_hz <= sample_rate / 2 = {sample_rate / 2}, "
            f"got lower_hz={lower_hz}, upper_hz={upper_hz}"
        )
    return upper_hz


def fft_length_for(frame_length: int) -> int:
    """The smallest power of two holding a frame: the FFT size used."""
    return 1 << (int(frame_length) - 1).bit_length()


def mel_band_centres(
    num_mel_bins: int = 40, sample_rate: int = 8000, lower_hz: float = 20.0, upper_hz=None
) -> np.ndarray:
    """Centre frequencies in Hz of the mel bands of :func:`log_mel_spectrogram`,
    shape (num_mel_bins,): equally spaced on the HTK mel scale
    ``mel = 1127 ln(1 + hz / 700)``."""
    upper_hz = sample_rate / 2 if upper_hz is None else upper_hz
    to_mel = lambda hz: 1127.0 * np.log1p(hz / 700.0)
    edges = np.linspace(to_mel(lower_hz), to_mel(upper_hz), num_mel_bins + 2)
    return 700.0 * np.expm1(edges[1:-1] / 1127.0)


def log_mel_spectrogram(
    waveforms,
    sample_rate: int = 8000,
    frame_length: int = 256,
    frame_step: int = 80,
    num_mel_bins: int = 40,
    lower_hz: float = 20.0,
    upper_hz: float | None = None,
    log_offset: float = 1e-6,
):
    """Log-mel spectrogram of waveforms.

    ``waveforms``: (..., samples) float. Returns (..., frames, num_mel_bins)
    float32 with ``frames = 1 + (samples - frame_length) // frame_step``
    (97 for one second at 8 kHz with the defaults): ``log(mel power + offset)``
    of Hann-windowed frames.
    """
    upper_hz = _check(sample_rate, frame_length, frame_step, num_mel_bins, lower_hz, upper_hz)
    waveforms = tf.convert_to_tensor(waveforms, tf.float32)
    if waveforms.shape.rank is not None and waveforms.shape.rank < 1:
        raise ValueError("waveforms must have at least one axis (samples)")
    if waveforms.shape[-1] is not None and waveforms.shape[-1] < frame_length:
        raise ValueError(
            f"waveforms have {waveforms.shape[-1]} samples, fewer than one frame ({frame_length})"
        )
    fft_length = fft_length_for(frame_length)
    stft = tf.signal.stft(waveforms, frame_length, frame_step, fft_length=fft_length)
    power = tf.math.square(tf.abs(stft))  # (..., frames, fft_length // 2 + 1)
    mel_matrix = tf.signal.linear_to_mel_weight_matrix(
        num_mel_bins, fft_length // 2 + 1, sample_rate, lower_hz, upper_hz
    )
    mel_power = tf.tensordot(power, mel_matrix, axes=1)
    mel_power.set_shape(power.shape[:-1].concatenate([num_mel_bins]))
    return tf.math.log(mel_power + log_offset)


def mfcc(waveforms, num_coefficients: int = 13, **mel_options):
    """Mel-frequency cepstral coefficients (Davis & Mermelstein 1980).

    ``waveforms``: (..., samples). Returns (..., frames, num_coefficients):
    the first coefficients of the orthonormal DCT-II of the log-mel
    spectrogram (``mel_options`` go to :func:`log_mel_spectrogram`).
    """
    num_mel_bins = mel_options.get("num_mel_bins", 40)
    if not isinstance(num_coefficients, (int, np.integer)) or not (
        1 <= num_coefficients <= num_mel_bins
    ):
        raise ValueError(
            f"num_coefficients must be in 1..num_mel_bins={num_mel_bins}, got {num_coefficients!r}"
        )
    log_mel = log_mel_spectrogram(waveforms, **mel_options)
    return tf.signal.mfccs_from_log_mel_spectrograms(log_mel)[..., :num_coefficients]


@keras.saving.register_keras_serializable(package="bookcode")
class LogMelSpectrogram(keras.layers.Layer):
    """Keras layer: waveforms (batch, samples) -> log-mel spectrograms
    (batch, frames, num_mel_bins, 1), ready for a 2-D convnet; with
    ``num_coefficients`` it gives MFCCs (batch, frames, num_coefficients, 1).
    See :func:`log_mel_spectrogram` for the options."""

    def __init__(
        self,
        sample_rate: int = 8000,
        frame_length: int = 256,
        frame_step: int = 80,
        num_mel_bins: int = 40,
        lower_hz: float = 20.0,
        upper_hz: float | None = None,
        num_coefficients: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.options = {
            "sample_rate": sample_rate,
            "frame_length": frame_length,
            "frame_step": frame_step,
            "num_mel_bins": num_mel_bins,
            "lower_hz": lower_hz,
            "upper_hz": upper_hz,
        }
        _check(sample_rate, frame_length, frame_step, num_mel_bins, lower_hz, upper_hz)
        self.num_coefficients = num_coefficients

    def call(self, waveforms):
        if self.num_coefficients is None:
            features = log_mel_spectrogram(waveforms, **self.options)
        else:
            features = mfcc(waveforms, self.num_coefficients, **self.options)
        return features[..., None]

    def compute_output_shape(self, input_shape):
        samples = input_shape[-1]
        length, step = self.options["frame_length"], self.options["frame_step"]
        frames = None if samples is None else 1 + (samples - length) // step
        bins = self.num_coefficients or self.options["num_mel_bins"]
        return tuple(input_shape[:-1]) + (frames, bins, 1)

    def get_config(self):
        return {**super().get_config(), **self.options, "num_coefficients": self.num_coefficients}


# -- comparing recordings of different lengths and speeds ------------------------------
def _check_alignment_input(shape, band):
    if len(shape) < 2 or 0 in tuple(shape)[-2:]:
        raise ValueError(f"cost must have shape (..., L, M) with L, M >= 1, got {tuple(shape)}")
    if band is not None and band < 0:
        raise ValueError(f"band must be non-negative, got {band}")


def _inside_band(i, j, length, other, band):
    """Cells (i, j), 1-based, inside the Sakoe-Chiba band ``|i * M / L - j| <= band``."""
    return np.abs((i - 1) * (other / length) - (j - 1)) <= band


def dtw_distance(cost, band: int | None = None):
    """Dynamic time warping (Sakoe & Chiba 1978): the cheapest monotonic
    alignment of two sequences, given the cost of matching each pair of frames.

    ``cost``: (..., L, M) array, ``cost[..., i, j]`` the cost of matching frame
    ``i`` of the first sequence with frame ``j`` of the second. An alignment
    starts at (0, 0), ends at (L-1, M-1) and moves by (1, 1), (1, 0) or (0, 1).
    ``band``: Sakoe-Chiba band, only cells with ``|i * M / L - j| <= band``
    (``None``: no limit). Returns (...,): the total cost of the best alignment
    divided by ``L + M`` (so the lengths do not matter). Computed one
    anti-diagonal at a time, vectorised over the leading axes.
    """
    cost = np.asarray(cost, dtype=np.float64)
    _check_alignment_input(cost.shape, band)
    *batch, length, other = cost.shape
    total = np.full((*batch, length + 1, other + 1), np.inf)
    total[..., 0, 0] = 0.0
    for k in range(2, length + other + 1):  # cells with i + j = k (1-based)
        i = np.arange(max(1, k - other), min(length, k - 1) + 1)
        j = k - i
        if band is not None:
            inside = _inside_band(i, j, length, other, band)
            i, j = i[inside], j[inside]
        if len(i) == 0:
            continue
        previous = np.minimum(
            np.minimum(total[..., i - 1, j], total[..., i, j - 1]), total[..., i - 1, j - 1]
        )
        total[..., i, j] = cost[..., i - 1, j - 1] + previous
    return total[..., length, other] / (length + other)


def cosine_cost(a, b):
    """Frame-matching costs ``1 - cos`` between two sets of sequences:
    ``a`` (n, L, dim), ``b`` (m, M, dim) -> (n, m, L, M)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return 1.0 - np.einsum("ntd,mud->nmtu", a, b)


class AlignmentNearestNeighbour:
    """One-shot classification of sequences by their nearest support example
    under dynamic time warping (:func:`dtw_distance`) of ``1 - cos`` frame costs.

    ``frames``: a callable (a Keras model, or ``None`` for the raw features)
    mapping examples (batch, frames, features[, 1]) to frame vectors (batch,
    frames, dim). ``predict_episode`` returns logits (num_query, ways): minus
    the DTW cost to the nearest support example of each class.
    """

    def __init__(self, frames=None, band: int | None = 12):
        self.frames = frames
        self.band = band

    def _frames(self, x):
        if self.frames is not None:
            x = (
                self.frames(x, training=False)
                if isinstance(self.frames, keras.Model)
                else self.frames(x)
            )
            x = np.asarray(x)
        x = np.asarray(x)
        return x.reshape(x.shape[0], x.shape[1], -1)

    def predict_episode(self, support_x, support_y, query_x):
        support_y = np.asarray(support_y)
        if len(support_x) != len(support_y):
            raise ValueError(
                f"support_x has {len(support_x)} examples but support_y has {len(support_y)}"
            )
        costs = dtw_distance(
            cosine_cost(self._frames(query_x), self._frames(support_x)), self.band
        )  # (num_query, num_support)
        ways = int(support_y.max()) + 1
        logits = np.full((len(costs), ways), -np.inf)
        for c in range(ways):
            logits[:, c] = -costs[:, support_y == c].min(axis=1)
        return logits


def soft_dtw_distance(cost, gamma: float = 0.05, band: int | None = None):
    """Soft dynamic time warping (Cuturi & Blondel 2017) in TensorFlow, so a
    network can be trained through the alignment: :func:`dtw_distance` with
    the minimum over the three moves replaced by the soft minimum
    ``-gamma * log(sum(exp(-x / gamma)))`` (``gamma -> 0`` gives DTW).

    ``cost``: (pairs, L, M) tensor of frame-matching costs; ``band`` as in
    :func:`dtw_distance`. Returns (pairs,): the soft alignment cost divided by
    ``L + M``. Computed one anti-diagonal at a time.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    cost = tf.convert_to_tensor(cost, tf.float32)
    _check_alignment_input(cost.shape, band)
    length, other = int(cost.shape[-2]), int(cost.shape[-1])
    big = 1e4  # stands for +inf, finite so that gradients stay finite
    pairs = tf.shape(cost)[0]
    flat = tf.reshape(cost, (pairs, length * other))
    previous2 = tf.concat([tf.zeros((pairs, 1)), tf.fill((pairs, length), big)], 1)  # i + j = 0
    previous1 = tf.fill((pairs, length + 1), big)  # i + j = 1
    pad = tf.fill((pairs, 1), big)
    for k in range(2, length + other + 1):  # cells (i, j), 1-based, with i + j = k
        i = np.arange(length + 1)
        j = k - i
        valid = (i >= 1) & (j >= 1) & (j <= other)
        if band is not None:
            valid &= _inside_band(i, j, length, other, band)
        index = np.where(valid, (i - 1) * other + (j - 1), 0)
        moves = tf.stack(
            [
                tf.concat([pad, previous1[:, :-1]], 1),  # from (i - 1, j)
                previous1,  # from (i, j - 1)
                tf.concat([pad, previous2[:, :-1]], 1),  # from (i - 1, j - 1)
            ],
            -1,
        )
        soft_min = -gamma * tf.reduce_logsumexp(-moves / gamma, axis=-1)
        current = tf.minimum(tf.gather(flat, index, axis=1) + soft_min, big)
        previous2, previous1 = previous1, tf.where(valid[None], current, big)
    return previous1[:, length] / (length + other)
