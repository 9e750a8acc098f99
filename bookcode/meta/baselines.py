"""Baselines on the inner-loop engine."""

from __future__ import annotations

import keras
import numpy as np

from .learners import GradientMetaLearner, _check_steps
from .objectives import CLASSIFICATION


@keras.saving.register_keras_serializable(package="bookcode")
class FineTuning(GradientMetaLearner):
    """Baseline few-shot learner: plain gradient descent on the support set
    from fixed initial weights (random, or pretrained on the training classes
    with a fresh head), ``steps`` steps of rate ``learning_rate``, as one
    graph loop; batch normalisation uses batch statistics. Ravi & Larochelle
    (2017) compare the meta-LSTM against this ("Baseline-finetune").

    Nothing is meta-trained (``compile``/``fit`` refuse); ``learning_rate``
    and ``steps`` can be changed without retracing.

    >>> tuner = FineTuning(pretrained_network, steps=10, learning_rate=0.1)
    >>> logits = tuner.predict_episode(support_x, support_y, query_x)
    """

    def __init__(self, model, steps: int = 10, learning_rate: float = 0.1, kind=CLASSIFICATION,
                 **kwargs):  # fmt: skip
        if _check_steps(steps, "steps") < 1 or not learning_rate > 0:
            raise ValueError("steps and learning_rate must be positive")
        super().__init__(model, inner_lr=learning_rate, inner_steps=steps, first_order=True,
                         test_inner_steps=steps, kind=kind, **kwargs)  # fmt: skip

    @property
    def learning_rate(self) -> float:
        """The fine-tuning step size; can be changed without retracing."""
        return self.inner_lr

    @learning_rate.setter
    def learning_rate(self, value: float):
        if not value > 0:
            raise ValueError("learning_rate must be positive")
        self.inner_lr = value

    @property
    def steps(self) -> int:
        """The number of fine-tuning steps; can be changed without retracing."""
        return self.test_inner_steps

    @steps.setter
    def steps(self, value: int):
        if _check_steps(value, "steps") < 1:
            raise ValueError("steps must be positive")
        self.test_inner_steps = self.inner_steps = int(value)

    @property
    def ways(self) -> int:
        """The number of outputs of the network."""
        return int(self.model.output_shape[-1])

    def compile(self, *args, **kwargs):
        raise TypeError(
            "FineTuning is not meta-trained: train or pretrain its network with Keras, "
            "then use predict_episode"
        )

    def predict_episode(self, support_x, support_y, query_x, steps: int | None = None):
        """Logits (num_query, ways) after fine-tuning on the support set."""
        if self.kind == CLASSIFICATION:
            ways = int(np.max(support_y)) + 1
            if ways != self.ways:
                raise ValueError(
                    f"the learner has {self.ways} outputs but the episode has {ways} ways"
                )
        return super().predict_episode(support_x, support_y, query_x, steps)

    def get_config(self):
        config = super().get_config()
        for name in ("inner_lr", "inner_steps", "test_inner_steps", "first_order"):
            config.pop(name)
        return {**config, "steps": self.steps, "learning_rate": self.learning_rate}
