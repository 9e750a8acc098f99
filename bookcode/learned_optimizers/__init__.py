"""Optimisers that are learned rather than designed.

- :mod:`.problems`: the optimisees, random quadratics and small MLP tasks, and
  Keras optimisers run on them as baselines.
- :mod:`.lstm_optimizer`: :class:`LSTMOptimizer`, "Learning to learn by
  gradient descent by gradient descent" (Andrychowicz et al. 2016).
- :mod:`.meta_lstm`: :class:`MetaLSTMLearner`, "Optimization as a model for
  few-shot learning" (Ravi & Larochelle 2017), whose inner loop is
  :func:`bookcode.meta.adapt` with the :class:`MetaLSTMUpdate` rule, and its
  baseline :class:`~bookcode.meta.FineTuning` (re-exported).
"""

from ..meta import FineTuning  # the fine-tuning baseline the meta-LSTM is compared with
from .lstm_optimizer import LSTMOptimizer, preprocess_gradients
from .meta_lstm import MetaLSTMCell, MetaLSTMLearner, MetaLSTMUpdate
from .problems import (
    MLP_PARAMETERS,
    init_mlp_parameters,
    mlp_loss,
    mlp_tasks,
    optimize_mlps_with,
    optimize_quadratics_with,
    quadratic_loss,
    quadratic_loss_and_gradient,
    random_quadratics,
)

__all__ = [
    "MLP_PARAMETERS",
    "FineTuning",
    "LSTMOptimizer",
    "MetaLSTMCell",
    "MetaLSTMLearner",
    "MetaLSTMUpdate",
    "init_mlp_parameters",
    "mlp_loss",
    "mlp_tasks",
    "optimize_mlps_with",
    "optimize_quadratics_with",
    "preprocess_gradients",
    "quadratic_loss",
    "quadratic_loss_and_gradient",
    "random_quadratics",
]
