"""Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly
for Few-Shot Learning"): MAML with one learned learning rate per weight."""

from __future__ import annotations

import keras
import numpy as np

from .learners import GradientMetaLearner
from .update_rules import SGD


@keras.saving.register_keras_serializable(package="bookcode")
class MetaSGD(GradientMetaLearner):
    """Meta-SGD (Li et al. 2017): the inner step is
    ``theta' = theta - alpha * grad`` with ``alpha`` a tensor of the same
    shape as ``theta`` (one rate per weight, elementwise product), and the
    outer loop meta-learns ``theta`` and ``alpha`` together through the inner
    step (second order unless ``first_order=True``).

    Rates start uniform in ``rate_range`` (the paper's U[0.005, 0.1]) and are
    free to become negative. ``rate_multiplier`` speeds up their learning:
    each rate is stored divided by it and multiplied back when used, so the
    meta-optimiser's steps on the rates are ``rate_multiplier`` times larger
    (exactly so for Adam, whose steps do not depend on the gradient's scale);
    1 (default) is the paper's parametrisation. :meth:`learned_rates` gives
    the rates themselves. One inner step by default, as in the paper;
    test-time adaptation (``predict_episode``) uses the learned rates too.
    ``inner_lr`` is not used. ``kind`` is ``"classification"`` or
    ``"regression"``.

    >>> learner = MetaSGD(bookcode.nets.conv4(num_classes=5))
    >>> learner.compile(keras.optimizers.Adam(1e-3))
    >>> learner.fit(sampler.tf_dataset(batch_size=32), steps_per_epoch=100)
    >>> learner.rates  # one variable per model weight
    """

    def __init__(
        self, model, rate_range=(0.005, 0.1), rate_seed=None, rate_multiplier=1.0, **kwargs
    ):
        low, high = (float(r) for r in rate_range)
        if not 0 <= low <= high:
            raise ValueError(
                f"rate_range must be (low, high) with 0 <= low <= high, got {rate_range!r}"
            )
        if np.ndim(rate_multiplier) != 0 or not float(rate_multiplier) > 0:
            raise ValueError(f"rate_multiplier must be a positive number, got {rate_multiplier!r}")
        super().__init__(model, **kwargs)
        self.rate_range, self.rate_seed = (low, high), rate_seed
        self.rate_multiplier = float(rate_multiplier)
        low, high = low / self.rate_multiplier, high / self.rate_multiplier
        self.rates = []
        for i, v in enumerate(model.trainable_variables):
            seed = None if rate_seed is None else int(rate_seed) + i
            name = "rate_" + v.path.replace("/", "_")
            self.rates.append(
                self.add_weight(
                    shape=v.shape,
                    initializer=keras.initializers.RandomUniform(low, high, seed=seed),
                    dtype=v.dtype,
                    name=name,
                )
            )

    @property
    def meta_variables(self):
        return list(self.model.trainable_variables) + list(self.rates)

    def initial_fast_weights(self, meta_weights):
        return list(meta_weights[: len(self.rates)])

    def update_rule(self, meta_weights):
        rates = list(meta_weights[len(self.rates) :])
        if self.rate_multiplier != 1.0:
            rates = [r * self.rate_multiplier for r in rates]
        return SGD(rates)

    def learned_rates(self) -> dict:
        """The rates as NumPy arrays, by the path of the weight they scale."""
        return {
            v.path: np.asarray(r.numpy()) * self.rate_multiplier
            for v, r in zip(self.model.trainable_variables, self.rates)
        }

    def get_config(self):
        return {
            **super().get_config(),
            "rate_range": self.rate_range,
            "rate_seed": self.rate_seed,
            "rate_multiplier": self.rate_multiplier,
        }
