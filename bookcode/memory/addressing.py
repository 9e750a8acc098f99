"""The addressing stages of the Neural Turing Machine, as plain functions.

Graves, Wayne & Danihelka (2014), *Neural Turing Machines*, section 3.3: a head
turns its parameters into a weighting over the ``N`` memory slots in four
stages, each a function here:

1. :func:`content_weights`: softmax of ``strength * cosine(key, M_i)`` (3.3.1);
2. :func:`interpolate`: ``g * w_content + (1 - g) * w_previous`` (3.3.2);
3. :func:`circular_shift`: circular convolution with a shift distribution (3.3.2);
4. :func:`sharpen`: ``w_i ** gamma / sum_j w_j ** gamma`` (3.3.2).

Reading (:func:`read`) and writing with erase and add vectors (:func:`write`,
section 3.2) complete the memory. The least-recently-used access of Santoro et
al. (2016) adds :func:`least_used` and :func:`lrua_write_weights`.

Shapes: ``memory`` (batch, N, M); keys (batch, M); weightings (batch, N); scalars
such as ``strength``, ``gate`` and ``gamma`` (batch, 1). All functions take
tensors or arrays and return tensors (``keras.ops``).
"""

from __future__ import annotations

from keras import ops

EPSILON = 1e-8


def cosine_similarity(key, memory, epsilon: float = EPSILON):
    """``K[u, M_i] = u . M_i / (|u| |M_i|)`` for every slot: (batch, M), (batch, N, M) -> (batch, N).

    ``epsilon`` keeps a zero vector (an empty slot) from dividing by zero."""
    dot = ops.einsum("bm,bnm->bn", key, memory)
    key_norm = ops.sqrt(ops.sum(key * key, axis=-1, keepdims=True) + epsilon)
    slot_norm = ops.sqrt(ops.sum(memory * memory, axis=-1) + epsilon)
    return dot / (key_norm * slot_norm)


def content_weights(memory, key, strength):
    """Content addressing: ``softmax_i(strength * cosine(key, M_i))``, (batch, N).

    ``strength`` (the key strength beta >= 0, shape (batch, 1)) sharpens the focus."""
    return ops.softmax(strength * cosine_similarity(key, memory), axis=-1)


def interpolate(content, previous, gate):
    """``gate * content + (1 - gate) * previous``: the gate (batch, 1), in [0, 1],
    chooses between the content weighting and the previous step's weighting."""
    return gate * content + (1.0 - gate) * previous


def circular_shift(weights, shift):
    """Rotate the weighting by a distribution over shifts (circular convolution).

    ``shift`` (batch, 2r+1) gives the probability of the shifts ``-r .. r``;
    ``result_i = sum_j weights_j * shift[i - j]`` (indices modulo N), so a shift
    of +1 moves the focus one slot forward."""
    width = shift.shape[-1]
    if width is None or width % 2 == 0:
        raise ValueError(f"shift must have an odd number of entries (-r..r), got {width}")
    radius = width // 2
    rolled = [ops.roll(weights, k, axis=-1) for k in range(-radius, radius + 1)]
    return ops.einsum("bsn,bs->bn", ops.stack(rolled, axis=1), shift)


def sharpen(weights, gamma, epsilon: float = EPSILON):
    """``w_i ** gamma / sum_j w_j ** gamma`` with ``gamma >= 1`` (batch, 1): undoes
    the blur of the shift."""
    powered = ops.power(weights + epsilon, gamma)
    return powered / ops.sum(powered, axis=-1, keepdims=True)


def address(memory, previous, key, strength, gate, shift, gamma):
    """The four stages in order: a head's new weighting (batch, N)."""
    content = content_weights(memory, key, strength)
    return sharpen(circular_shift(interpolate(content, previous, gate), shift), gamma)


def read(memory, weights):
    """``r = sum_i w_i M_i``: (batch, N, M), (batch, N) -> (batch, M)."""
    return ops.einsum("bn,bnm->bm", weights, memory)


def write(memory, weights, erase, add):
    """``M_i <- M_i * (1 - w_i e) + w_i a``: erase then add (Graves et al. 2014, 3.2).

    ``erase`` (batch, M) in [0, 1], ``add`` (batch, M); returns the new memory."""
    w = ops.expand_dims(weights, -1)
    return memory * (1.0 - w * ops.expand_dims(erase, 1)) + w * ops.expand_dims(add, 1)


def least_used(usage, count: int = 1):
    """One-hot weightings of the ``count`` least-used slots, (batch, count, N):
    row ``k`` marks the slot with the (k+1)-th smallest usage (ties go to the
    lower index). Santoro et al. (2016): ``w^lu``, whose sum over rows is 1 on
    the ``count`` least-used slots and 0 elsewhere."""
    n = usage.shape[-1]
    _, slots = ops.top_k(-usage, k=count)
    return ops.one_hot(slots, n, dtype=usage.dtype)


def lrua_write_weights(previous_read, previous_least_used, alpha):
    """``w^w = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}``
    (Santoro et al. 2016, eq. 7): write to the slot just read (update it) or to
    the least used one (a new memory). ``alpha`` (batch, 1) is a logit."""
    g = ops.sigmoid(alpha)
    return g * previous_read + (1.0 - g) * previous_least_used


def decay_usage(usage, read_weights, write_weights, gamma: float):
    """``u_t = gamma u_{t-1} + w^r_t + w^w_t`` (Santoro et al. 2016, eq. 6)."""
    return gamma * usage + read_weights + write_weights
