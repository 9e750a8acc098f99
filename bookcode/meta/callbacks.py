"""Callbacks for the gradient-based learners' ``fit()``."""

from __future__ import annotations

import keras
import numpy as np


class AgreementLog(keras.callbacks.Callback):
    """Collects a value a combiner reports for every meta-batch (default: the
    gradient-agreement weights of :class:`~bookcode.meta.GradientAgreement`,
    key ``agreement_weights``) during ``fit()``.

    After training, :attr:`values` is an array (meta-batches, tasks): row
    ``b`` holds the weights of the tasks of meta-batch ``b``, in the order the
    dataset stacked them. It accumulates over several ``fit()`` calls;
    :meth:`reset` empties it.

    >>> log = AgreementLog()
    >>> learner.fit(dataset, steps_per_epoch=100, callbacks=[log], verbose=0)
    >>> log.values.shape    # (100, meta_batch)
    """

    def __init__(self, key: str = "agreement_weights"):
        super().__init__()
        self.key = key
        self._rows = []

    def on_train_batch_end(self, batch, logs=None):
        if not logs or self.key not in logs:
            raise ValueError(
                f"the training logs have no {self.key!r}: pass combiner=gradient_agreement "
                "(or a combiner whose batch_logs() reports it) to the learner"
            )
        self._rows.append(np.asarray(logs[self.key], dtype=np.float64))

    @property
    def values(self) -> np.ndarray:
        """The logged values, shape (meta-batches, tasks)."""
        return np.stack(self._rows) if self._rows else np.zeros((0, 0))

    def reset(self):
        """Forget the values logged so far."""
        self._rows = []
