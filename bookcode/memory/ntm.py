"""The Neural Turing Machine as a Keras RNN cell (Graves, Wayne & Danihelka 2014).

An LSTM controller reads the input and the previous step's read vectors; one
dense layer turns its output into the parameters of the heads; every head
addresses the N x M memory in four stages (:mod:`bookcode.memory.addressing`);
the write heads erase and add; the output is a dense layer on the controller
output and the new read vectors.

What makes NTMs train reliably, after Collier & Beel (2018), *Implementing
Neural Turing Machines*: the memory starts as a small constant (1e-6), the
controller output is clipped to +-20, key strengths are softplus and
sharpening exponents 1 + softplus; clip the global gradient norm in the
optimiser (e.g. ``keras.optimizers.Adam(1e-3, global_clipnorm=50)``).
"""

from __future__ import annotations

import keras
from keras import ops

from bookcode.memory import addressing


def _check_positive(**values):
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@keras.saving.register_keras_serializable(package="bookcode")
class MemoryCell(keras.layers.Layer):
    """What the NTM and MANN cells share: an LSTM controller, a memory of
    ``memory_slots`` x ``memory_width``, float32 arithmetic by default (the
    addressing is sensitive to rounding), and an output that can carry the
    head weightings (``return_weights=True``; split it with :meth:`split_output`)."""

    def __init__(
        self,
        units: int,
        output_size: int,
        memory_slots: int = 128,
        memory_width: int = 20,
        read_heads: int = 1,
        return_weights: bool = False,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        _check_positive(
            units=units,
            output_size=output_size,
            memory_slots=memory_slots,
            memory_width=memory_width,
            read_heads=read_heads,
        )
        self.units, self.out_size = units, output_size
        self.memory_slots, self.memory_width = memory_slots, memory_width
        self.read_heads, self.return_weights = read_heads, bool(return_weights)
        self.controller = keras.layers.LSTMCell(units, dtype=self.dtype_policy, name="controller")
        self.output_layer = keras.layers.Dense(output_size, dtype=self.dtype_policy, name="output")

    def _weight_parts(self) -> dict[str, int]:
        raise NotImplementedError

    @property
    def output_size(self) -> int:
        extra = sum(self._weight_parts().values()) if self.return_weights else 0
        return self.out_size + extra

    def split_output(self, outputs) -> dict:
        """The output of ``keras.layers.RNN(cell, return_sequences=True)`` as a
        dict of NumPy arrays: ``"output"`` (batch, time, output_size) and, with
        ``return_weights=True``, the weightings (batch, time, heads, N) (and for
        the MANN the usage, (batch, time, N))."""
        import numpy as np

        outputs = np.asarray(outputs)
        parts = {"output": outputs[..., : self.out_size]}
        start = self.out_size
        if self.return_weights:
            for name, size in self._weight_parts().items():
                value = outputs[..., start : start + size]
                if name.endswith("weights"):  # (..., heads, N); usage stays (..., N)
                    heads = size // self.memory_slots
                    value = value.reshape(value.shape[:-1] + (heads, self.memory_slots))
                parts[name] = value
                start += size
        return parts

    def _build_controller(self, input_dim: int):
        self.controller.build((None, input_dim + self.read_heads * self.memory_width))
        self.output_layer.build((None, self.units + self.read_heads * self.memory_width))

    def _memory(self, flat):
        return ops.reshape(flat, (-1, self.memory_slots, self.memory_width))

    def _heads(self, flat, heads):
        return ops.reshape(flat, (-1, heads, self.memory_slots))

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "output_size": self.out_size,
            "memory_slots": self.memory_slots,
            "memory_width": self.memory_width,
            "read_heads": self.read_heads,
            "return_weights": self.return_weights,
        }


@keras.saving.register_keras_serializable(package="bookcode")
class NTMCell(MemoryCell):
    """A Neural Turing Machine cell for ``keras.layers.RNN`` (Graves et al. 2014).

    ``units``: LSTM controller size; ``output_size``: outputs per step (logits,
    no activation); memory ``memory_slots`` x ``memory_width``; ``read_heads``
    and ``write_heads``; shifts ``-shift_range .. shift_range``.
    ``clip_value`` clips the controller output; ``memory_init`` is the constant
    the memory starts from. Head weightings start on slot 0, reads at zero.

    >>> cell = NTMCell(100, output_size=8, memory_slots=128, memory_width=20)
    >>> y = keras.layers.RNN(cell, return_sequences=True)(x)  # x: (batch, time, features)

    With ``return_weights=True`` each output step also carries the read and
    write weightings; :meth:`split_output` separates them.
    """

    def __init__(
        self,
        units: int,
        output_size: int,
        memory_slots: int = 128,
        memory_width: int = 20,
        read_heads: int = 1,
        write_heads: int = 1,
        shift_range: int = 1,
        clip_value: float = 20.0,
        memory_init: float = 1e-6,
        return_weights: bool = False,
        **kwargs,
    ):
        super().__init__(
            units, output_size, memory_slots, memory_width, read_heads, return_weights, **kwargs
        )
        _check_positive(write_heads=write_heads, shift_range=shift_range)
        if 2 * shift_range + 1 > memory_slots:
            raise ValueError(
                f"shift_range={shift_range} needs at least {2 * shift_range + 1} memory slots"
            )
        if clip_value <= 0:
            raise ValueError(f"clip_value must be positive, got {clip_value!r}")
        self.write_heads, self.shift_range = write_heads, shift_range
        self.clip_value, self.memory_init = float(clip_value), float(memory_init)
        m, shifts = memory_width, 2 * shift_range + 1
        self._address_size = m + 3 + shifts  # key, strength, gate, shift, gamma
        size = read_heads * self._address_size + write_heads * (self._address_size + 2 * m)
        self.head_layer = keras.layers.Dense(size, dtype=self.dtype_policy, name="heads")
        n, heads = memory_slots, read_heads + write_heads
        self.state_size = [units, units, n * m, heads * n, read_heads * m]

    def _weight_parts(self):
        n = self.memory_slots
        return {"read_weights": self.read_heads * n, "write_weights": self.write_heads * n}

    def build(self, input_shape):
        self._build_controller(input_shape[-1])
        self.head_layer.build((None, self.units))
        self.built = True

    def get_initial_state(self, batch_size=None):
        n, m = self.memory_slots, self.memory_width
        heads = self.read_heads + self.write_heads
        dtype = self.compute_dtype
        first_slot = ops.one_hot(ops.zeros((batch_size, heads), "int32"), n, dtype=dtype)
        return [
            ops.zeros((batch_size, self.units), dtype),
            ops.zeros((batch_size, self.units), dtype),
            ops.full((batch_size, n * m), self.memory_init, dtype),
            ops.reshape(first_slot, (batch_size, heads * n)),
            ops.zeros((batch_size, self.read_heads * m), dtype),
        ]

    def _head_parameters(self, params, erase_add: bool):
        m, shifts = self.memory_width, 2 * self.shift_range + 1
        key, strength, gate, shift, gamma = ops.split(
            params[:, : self._address_size], [m, m + 1, m + 2, m + 2 + shifts], axis=-1
        )
        head = {
            "key": ops.tanh(key),
            "strength": ops.softplus(strength),
            "gate": ops.sigmoid(gate),
            "shift": ops.softmax(shift, axis=-1),
            "gamma": 1.0 + ops.softplus(gamma),
        }
        if erase_add:
            erase, add = ops.split(params[:, self._address_size :], 2, axis=-1)
            head["erase"], head["add"] = ops.sigmoid(erase), ops.tanh(add)
        return head

    def call(self, inputs, states, training=False):
        h, c, memory, weights, reads = states
        memory = self._memory(memory)
        weights = self._heads(weights, self.read_heads + self.write_heads)
        out, (h, c) = self.controller(
            ops.concatenate([inputs, reads], -1), [h, c], training=training
        )
        out = ops.clip(out, -self.clip_value, self.clip_value)
        params = self.head_layer(out)
        a, r = self._address_size, self.read_heads
        new_weights = []
        # write heads first: this step's reads see this step's writes
        for i in range(self.write_heads):
            start = r * a + i * (a + 2 * self.memory_width)
            head = self._head_parameters(params[:, start : start + a + 2 * self.memory_width], True)
            w = self._address(memory, weights[:, r + i], head)
            memory = addressing.write(memory, w, head["erase"], head["add"])
            new_weights.append(w)
        read_weights, new_reads = [], []
        for i in range(r):
            head = self._head_parameters(params[:, i * a : (i + 1) * a], False)
            w = self._address(memory, weights[:, i], head)
            read_weights.append(w)
            new_reads.append(addressing.read(memory, w))
        reads = ops.concatenate(new_reads, -1)
        y = self.output_layer(ops.concatenate([out, reads], -1))
        all_weights = ops.concatenate(read_weights + new_weights, -1)
        if self.return_weights:
            y = ops.concatenate([y, all_weights], -1)
        new_state = [h, c, ops.reshape(memory, (-1, self.memory_slots * self.memory_width))]
        return y, new_state + [all_weights, reads]

    @staticmethod
    def _address(memory, previous, head):
        return addressing.address(
            memory,
            previous,
            head["key"],
            head["strength"],
            head["gate"],
            head["shift"],
            head["gamma"],
        )

    def get_config(self):
        return {
            **super().get_config(),
            "write_heads": self.write_heads,
            "shift_range": self.shift_range,
            "clip_value": self.clip_value,
            "memory_init": self.memory_init,
        }
