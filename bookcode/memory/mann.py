"""Memory-augmented neural network with least-recently-used access (LRUA),
Santoro, Bartunov, Botvinick, Wierstra & Lillicrap (2016), *Meta-Learning with
Memory-Augmented Neural Networks*, section 3.

An LSTM controller reads ``(x_t, y_{t-1})`` and the previous read vectors and
emits one key per read head. Each step:

1. the previous step's least-used slots are cleared;
2. every key is written, with weights ``sigmoid(alpha) w^r_{t-1} + (1 -
   sigmoid(alpha)) w^lu_{t-1}``: to the slot just read or to a least-used one;
3. reads are a softmax over slots of the cosine similarity between the key
   and every slot (times a learned key strength, see below);
4. usage decays: ``u_t = gamma u_{t-1} + w^r_t + w^w_t``;
5. the output is a dense layer on the controller output and the reads.

One departure, made for speed of learning: with ``key_strength=True``
(default) the cosine is multiplied by a learned strength ``1 + softplus(.)``
as in the NTM's content addressing, because a softmax of a bare cosine over
many slots is nearly uniform. ``key_strength=False`` is the paper's rule.
"""

from __future__ import annotations

import keras
from keras import ops

from bookcode.memory import addressing
from bookcode.memory.ntm import MemoryCell


@keras.saving.register_keras_serializable(package="bookcode")
class MANNCell(MemoryCell):
    """The MANN (LRUA) cell of Santoro et al. (2016) for ``keras.layers.RNN``.

    ``units``: LSTM controller size; ``output_size``: logits per step; memory
    ``memory_slots`` x ``memory_width`` (a key is as wide as a slot);
    ``read_heads`` (the paper: 4); usage decay ``gamma`` (0.95 in the public
    code). The memory starts at ``memory_init`` and the usage at zero.
    ``read_after_write=True`` (the paper's equations) reads ``M_t``, which
    already holds this step's keys; ``False`` reads ``M_{t-1}``, so a key never
    finds itself.
    ``return_weights=True`` appends the read weights, the write weights and
    the usage to every output step (:meth:`split_output`).
    """

    def __init__(
        self,
        units: int,
        output_size: int,
        memory_slots: int = 128,
        memory_width: int = 40,
        read_heads: int = 4,
        gamma: float = 0.95,
        key_strength: bool = True,
        read_after_write: bool = True,
        memory_init: float = 1e-6,
        return_weights: bool = False,
        **kwargs,
    ):
        super().__init__(
            units, output_size, memory_slots, memory_width, read_heads, return_weights, **kwargs
        )
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma (usage decay) must lie in [0, 1], got {gamma!r}")
        if read_heads > memory_slots:
            raise ValueError(f"read_heads={read_heads} exceeds memory_slots={memory_slots}")
        self.gamma, self.key_strength = float(gamma), bool(key_strength)
        self.read_after_write = bool(read_after_write)
        self.memory_init = float(memory_init)
        per_head = memory_width + 1 + int(self.key_strength)  # key, alpha, strength
        self.head_layer = keras.layers.Dense(
            read_heads * per_head, dtype=self.dtype_policy, name="heads"
        )
        n, m = memory_slots, memory_width
        self.state_size = [units, units, n * m, read_heads * n, n, read_heads * m]

    def _weight_parts(self):
        n, r = self.memory_slots, self.read_heads
        return {"read_weights": r * n, "write_weights": r * n, "usage": n}

    def build(self, input_shape):
        self._build_controller(input_shape[-1])
        self.head_layer.build((None, self.units))
        self.built = True

    def get_initial_state(self, batch_size=None):
        n, m, r = self.memory_slots, self.memory_width, self.read_heads
        dtype = self.compute_dtype
        first_slots = ops.one_hot(ops.tile(ops.arange(r)[None], (batch_size, 1)), n, dtype=dtype)
        return [
            ops.zeros((batch_size, self.units), dtype),
            ops.zeros((batch_size, self.units), dtype),
            ops.full((batch_size, n * m), self.memory_init, dtype),
            ops.reshape(first_slots, (batch_size, r * n)),
            ops.zeros((batch_size, n), dtype),
            ops.zeros((batch_size, r * m), dtype),
        ]

    def call(self, inputs, states, training=False):
        h, c, memory, previous_read, usage, reads = states
        r, m = self.read_heads, self.memory_width
        memory = self._memory(memory)
        previous_read = self._heads(previous_read, r)
        out, (h, c) = self.controller(
            ops.concatenate([inputs, reads], -1), [h, c], training=training
        )
        params = ops.reshape(self.head_layer(out), (-1, r, m + 1 + int(self.key_strength)))
        keys = ops.tanh(params[..., :m])  # (batch, heads, M)
        alpha = params[..., m : m + 1]
        least = addressing.least_used(usage, r)  # (batch, heads, N), from u_{t-1}
        write_weights = addressing.lrua_write_weights(previous_read, least, alpha)
        written = memory * (1.0 - ops.expand_dims(ops.sum(least, axis=1), -1))
        written = written + ops.einsum("bhn,bhm->bnm", write_weights, keys)
        searched = written if self.read_after_write else memory
        read_weights, new_reads = [], []
        for i in range(r):
            strength = 1.0 + ops.softplus(params[:, i, m + 1 :]) if self.key_strength else 1.0
            w = ops.softmax(strength * addressing.cosine_similarity(keys[:, i], searched), axis=-1)
            read_weights.append(w)
            new_reads.append(addressing.read(searched, w))
        read_weights = ops.stack(read_weights, axis=1)
        memory = written
        usage = addressing.decay_usage(
            usage, ops.sum(read_weights, axis=1), ops.sum(write_weights, axis=1), self.gamma
        )
        reads = ops.concatenate(new_reads, -1)
        y = self.output_layer(ops.concatenate([out, reads], -1))
        flat_read = ops.reshape(read_weights, (-1, r * self.memory_slots))
        if self.return_weights:
            flat_write = ops.reshape(write_weights, (-1, r * self.memory_slots))
            y = ops.concatenate([y, flat_read, flat_write, usage], -1)
        flat_memory = ops.reshape(memory, (-1, self.memory_slots * m))
        return y, [h, c, flat_memory, flat_read, usage, reads]

    def get_config(self):
        return {
            **super().get_config(),
            "gamma": self.gamma,
            "key_strength": self.key_strength,
            "read_after_write": self.read_after_write,
            "memory_init": self.memory_init,
        }
