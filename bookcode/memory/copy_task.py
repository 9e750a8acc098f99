"""The copy task of Graves et al. (2014), section 4.1.

A sequence of random binary vectors is shown, then a delimiter; the network
must then output the same sequence while its input is zero. Inputs have one
channel more than the vectors: the delimiter flag. The loss counts the recall
phase only (``mask``).
"""

from __future__ import annotations

import numpy as np


def copy_batch(
    batch_size: int,
    min_length: int = 1,
    max_length: int = 20,
    bits: int = 8,
    seed=None,
    steps: int | None = None,
):
    """A batch of copy sequences, lengths drawn uniformly from ``min_length ..
    max_length`` (one length per sequence).

    Returns ``(inputs, targets, mask, lengths)``: inputs (batch, steps, bits + 1),
    targets (batch, steps, bits), mask (batch, steps) float32 (1 on the recall
    steps), lengths (batch,). A sequence of length L uses 2L + 1 steps: L
    vectors, the delimiter, L recall steps; every sequence is padded with zeros
    (mask 0) to ``steps``, by default ``2 * max_length + 1``, so that all batches
    have one shape. ``seed`` is an int or a ``numpy.random.Generator``.
    """
    for name, value in (("batch_size", batch_size), ("min_length", min_length), ("bits", bits)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(max_length, (int, np.integer)) or max_length < min_length:
        raise ValueError(
            f"max_length must be an integer >= min_length={min_length}, got {max_length!r}"
        )
    steps = 2 * max_length + 1 if steps is None else steps
    if steps < 2 * max_length + 1:
        raise ValueError(f"steps={steps} is too short for length {max_length} (needs 2L + 1)")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    lengths = rng.integers(min_length, max_length + 1, size=batch_size)
    vectors = rng.integers(0, 2, size=(batch_size, max_length, bits)).astype(np.float32)
    inputs = np.zeros((batch_size, steps, bits + 1), np.float32)
    targets = np.zeros((batch_size, steps, bits), np.float32)
    mask = np.zeros((batch_size, steps), np.float32)
    for i, length in enumerate(lengths):
        inputs[i, :length, :bits] = vectors[i, :length]
        inputs[i, length, bits] = 1.0
        targets[i, length + 1 : 2 * length + 1] = vectors[i, :length]
        mask[i, length + 1 : 2 * length + 1] = 1.0
    return inputs, targets, mask, lengths


def bit_errors(outputs, targets, mask):
    """Wrong bits per sequence, (batch,): outputs are logits (a bit is 1 when
    its logit is positive), counted on the masked (recall) steps only."""
    outputs, targets = np.asarray(outputs), np.asarray(targets)
    mask = np.asarray(mask)
    if outputs.shape != targets.shape or mask.shape != targets.shape[:2]:
        raise ValueError(
            f"outputs {outputs.shape}, targets {targets.shape} and mask {mask.shape} "
            "must be (batch, steps, bits), (batch, steps, bits) and (batch, steps)"
        )
    wrong = (outputs > 0) != (targets > 0.5)
    return (wrong.sum(-1) * mask).sum(-1)


def copy_dataset(
    batch_size: int, min_length: int, max_length: int, bits: int = 8, seed=None, steps=None
):
    """An endless ``tf.data.Dataset`` of ``(inputs, targets, mask)`` batches
    (mask as the sample weight) for ``model.fit`` with ``steps_per_epoch``."""
    from bookcode.episodes import endless_dataset

    rng = np.random.default_rng(seed)

    def element():
        x, y, mask, _ = copy_batch(batch_size, min_length, max_length, bits, rng, steps)
        return x, y, mask

    return endless_dataset(element)
