"""Memory-augmented networks (chapter 5).

- :class:`NTMCell`: the Neural Turing Machine (Graves et al. 2014) as a Keras
  RNN cell, LSTM controller, content and location addressing.
- :class:`MANNCell`: the memory-augmented network with least-recently-used
  access (Santoro et al. 2016).
- :mod:`~bookcode.memory.addressing`: the addressing stages as plain functions.
- :class:`SequenceModel`: a cell (plus optional encoder and output layer) trained
  with ``fit()``, forward and backward compiled with XLA.
- :func:`copy_batch`, :func:`copy_dataset`, :func:`bit_errors`: the copy task.
"""

from bookcode.memory import addressing
from bookcode.memory.copy_task import bit_errors, copy_batch, copy_dataset
from bookcode.memory.mann import MANNCell
from bookcode.memory.model import SequenceModel
from bookcode.memory.ntm import MemoryCell, NTMCell

__all__ = [
    "MANNCell",
    "MemoryCell",
    "NTMCell",
    "SequenceModel",
    "addressing",
    "bit_errors",
    "copy_batch",
    "copy_dataset",
]
