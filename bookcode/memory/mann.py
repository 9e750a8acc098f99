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

Two departures, both optional, made for speed of learning: with
``key_strength=True`` (default) the cosine is multiplied by a learned strength
``1 + softplus(.)`` as in the NTM's content addressing, because a softmax of a
bare cosine over many slots is nearly uniform (``key_strength=False`` is the
paper's rule). With ``key_value=True`` (default ``False``, the paper's rule) a
slot holds a key and a value: the write of step ``t`` stores the previous
step's key ``k_{t-1}`` (the one that looked up ``x_{t-1}``) beside a value
``v_t`` computed now, when ``y_{t-1}`` has arrived; reads compare the key with
the key part of each slot only. The paper writes ``k_t`` itself, which must then
serve both to look up ``x_t`` and to carry ``y_{t-1}``, a binding the controller
has to learn from the loss alone (chapter 5 measures the difference).
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
    ``key_value=True``: the first ``memory_width // 2`` columns of a slot hold a
    key, the others a value; step ``t`` writes ``[k_{t-1}, v_t]`` (``v_t =
    tanh(W h_t)``, one per head) and reads by cosine on the key columns.
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
        key_value: bool = False,
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
        self.key_value = bool(key_value)
        if self.key_value and memory_width < 2:
            raise ValueError(
                f"key_value=True splits a slot into a key and a value: memory_width must be "
                f"at least 2, got {memory_width}"
            )
        # width of a key: the whole slot, or its first half with key_value=True
        self.key_width = memory_width // 2 if self.key_value else memory_width
        per_head = self.key_width + 1 + int(self.key_strength)  # key, alpha, strength
        self.head_layer = keras.layers.Dense(
            read_heads * per_head, dtype=self.dtype_policy, name="heads"
        )
        self.value_layer = None
        if self.key_value:
            self.value_layer = keras.layers.Dense(
                read_heads * (memory_width - self.key_width), dtype=self.dtype_policy, name="values"
            )
        n, m = memory_slots, memory_width
        self.state_size = [units, units, n * m, read_heads * n, n, read_heads * m]
        if self.key_value:  # the previous step's keys
            self.state_size.append(read_heads * self.key_width)

    def _weight_parts(self):
        n, r = self.memory_slots, self.read_heads
        return {"read_weights": r * n, "write_weights": r * n, "usage": n}

    def build(self, input_shape):
        self._build_controller(input_shape[-1])
        self.head_layer.build((None, self.units))
        if self.value_layer is not None:
            self.value_layer.build((None, self.units))
        self.built = True

    def get_initial_state(self, batch_size=None):
        n, m, r = self.memory_slots, self.memory_width, self.read_heads
        dtype = self.compute_dtype
        first_slots = ops.one_hot(ops.tile(ops.arange(r)[None], (batch_size, 1)), n, dtype=dtype)
        states = [
            ops.zeros((batch_size, self.units), dtype),
            ops.zeros((batch_size, self.units), dtype),
            ops.full((batch_size, n * m), self.memory_init, dtype),
            ops.reshape(first_slots, (batch_size, r * n)),
            ops.zeros((batch_size, n), dtype),
            ops.zeros((batch_size, r * m), dtype),
        ]
        if self.key_value:
            states.append(ops.zeros((batch_size, r * self.key_width), dtype))
        return states

    def call(self, inputs, states, training=False):
        h, c, memory, previous_read, usage, reads = states[:6]
        r, m, km = self.read_heads, self.memory_width, self.key_width
        memory = self._memory(memory)
        previous_read = self._heads(previous_read, r)
        out, (h, c) = self.controller(
            ops.concatenate([inputs, reads], -1), [h, c], training=training
        )
        params = ops.reshape(self.head_layer(out), (-1, r, km + 1 + int(self.key_strength)))
        keys = ops.tanh(params[..., :km])  # (batch, heads, key width)
        alpha = params[..., km : km + 1]
        if self.key_value:  # [k_{t-1}, v_t]: the previous key beside a value computed now
            values = ops.tanh(ops.reshape(self.value_layer(out), (-1, r, m - km)))
            vectors = ops.concatenate([ops.reshape(states[6], (-1, r, km)), values], -1)
        else:
            vectors = keys
        least = addressing.least_used(usage, r)  # (batch, heads, N), from u_{t-1}
        write_weights = addressing.lrua_write_weights(previous_read, least, alpha)
        written = memory * (1.0 - ops.expand_dims(ops.sum(least, axis=1), -1))
        written = written + ops.einsum("bhn,bhm->bnm", write_weights, vectors)
        searched = written if self.read_after_write else memory
        read_weights, new_reads = [], []
        for i in range(r):
            strength = 1.0 + ops.softplus(params[:, i, km + 1 :]) if self.key_strength else 1.0
            similarity = addressing.cosine_similarity(keys[:, i], searched[..., :km])
            w = ops.softmax(strength * similarity, axis=-1)
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
        new_states = [h, c, flat_memory, flat_read, usage, reads]
        if self.key_value:
            new_states.append(ops.reshape(keys, (-1, r * km)))
        return y, new_states

    def get_config(self):
        return {
            **super().get_config(),
            "gamma": self.gamma,
            "key_strength": self.key_strength,
            "read_after_write": self.read_after_write,
            "memory_init": self.memory_init,
            "key_value": self.key_value,
        }
