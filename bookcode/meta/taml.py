"""Task-Agnostic Meta-Learning (Jamal & Qi 2019, "Task-Agnostic Meta-Learning
for Few-shot Learning", CVPR).

MAML's initialisation can favour some tasks over others. TAML adds a term to
the meta-objective that asks the initial model to be *unbiased*:

- **entropy** variant (classification): the initial model's predictions on a
  task should be as uncertain as possible (high entropy), and confident after
  adaptation (low entropy);
- **inequality-minimisation** variant: the initial model's losses on the
  tasks of a meta-batch should be equal; an *inequality measure* of them
  (Theil index, generalised entropy, Atkinson index, Gini coefficient,
  variance of logarithms, the economists' measures of income inequality) is
  added to the meta-objective.

The measures are functions of a vector of positive losses, in TensorFlow
(differentiable); :data:`INEQUALITY_MEASURES` lists them by name.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from .learners import MAML
from .objectives import CLASSIFICATION, metric_name, task_loss

_EPSILON = 1e-12


def _losses(losses):
    losses = tf.convert_to_tensor(losses)
    if not losses.dtype.is_floating:
        losses = tf.cast(losses, tf.float32)
    if losses.shape.rank != 1:
        raise ValueError(f"losses must be a vector (tasks,), got shape {losses.shape}")
    if tf.executing_eagerly():
        if losses.shape[0] < 2:
            raise ValueError("an inequality needs at least two losses (tasks)")
        if bool(tf.reduce_any(losses <= 0)):
            raise ValueError(
                "inequality measures take positive losses (cross-entropy and squared "
                f"errors are); got {losses.numpy().tolist()}"
            )
    return losses


def theil_index(losses):
    r"""Theil index :math:`T = \frac{1}{M}\sum_i \frac{\ell_i}{\mu}\ln\frac{\ell_i}{\mu}`
    of a vector of positive losses (M tasks, mean :math:`\mu`); 0 when all
    are equal, at most :math:`\ln M`."""
    losses = _losses(losses)
    ratio = losses / tf.reduce_mean(losses)
    return tf.reduce_mean(ratio * tf.math.log(ratio + _EPSILON))


def generalized_entropy(losses, alpha: float = 2.0):
    r"""Generalised entropy index
    :math:`GE(\alpha) = \frac{1}{M\alpha(\alpha-1)}\sum_i\left[(\ell_i/\mu)^\alpha - 1\right]`;
    ``alpha`` = 1 is the Theil index and 0 the mean log deviation (the
    limits); 2 is half the squared coefficient of variation."""
    losses = _losses(losses)
    ratio = losses / tf.reduce_mean(losses)
    if alpha == 1:
        return theil_index(losses)
    if alpha == 0:
        return -tf.reduce_mean(tf.math.log(ratio + _EPSILON))
    return tf.reduce_mean(ratio**alpha - 1.0) / (alpha * (alpha - 1.0))


def atkinson_index(losses, epsilon: float = 0.5):
    r"""Atkinson index
    :math:`A_\epsilon = 1 - \frac{1}{\mu}\left(\frac{1}{M}\sum_i \ell_i^{1-\epsilon}\right)^{1/(1-\epsilon)}`
    (:math:`\epsilon = 1`: one minus the geometric mean over the mean);
    ``epsilon`` > 0 is the aversion to inequality."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon!r}")
    losses = _losses(losses)
    mean = tf.reduce_mean(losses)
    if epsilon == 1:
        return 1.0 - tf.exp(tf.reduce_mean(tf.math.log(losses))) / mean
    power = 1.0 - epsilon
    return 1.0 - tf.reduce_mean(losses**power) ** (1.0 / power) / mean


def gini_coefficient(losses):
    r"""Gini coefficient :math:`G = \frac{\sum_i\sum_j |\ell_i - \ell_j|}{2M^2\mu}`:
    half the mean absolute difference over the mean; 0 when all are equal."""
    losses = _losses(losses)
    m = tf.cast(tf.shape(losses)[0], losses.dtype)
    differences = tf.abs(losses[:, None] - losses[None, :])
    return tf.reduce_sum(differences) / (2.0 * m * m * tf.reduce_mean(losses))


def variance_of_logarithms(losses):
    r"""Variance of logarithms
    :math:`V_L = \frac{1}{M}\sum_i\left(\ln\ell_i - \ln g\right)^2`, with
    :math:`g` the geometric mean (so :math:`\ln g` is the mean of the
    logarithms)."""
    logs = tf.math.log(_losses(losses))
    return tf.reduce_mean(tf.square(logs - tf.reduce_mean(logs)))


INEQUALITY_MEASURES = {
    "theil": theil_index,
    "generalized_entropy": generalized_entropy,
    "atkinson": atkinson_index,
    "gini": gini_coefficient,
    "variance_of_logarithms": variance_of_logarithms,
}
"""The inequality measures of Jamal & Qi (2019, section 3.2), by name."""

VARIANTS = ("entropy",) + tuple(INEQUALITY_MEASURES)


def prediction_entropy(logits):
    r"""Mean entropy of the predicted class distributions,
    :math:`H = -\frac{1}{n}\sum_i \sum_c p_{ic}\ln p_{ic}` with
    :math:`p_i = \mathrm{softmax}(\text{logits}_i)`; ``logits`` (n, ways).
    At most :math:`\ln(\text{ways})` (uniform predictions)."""
    logits = tf.convert_to_tensor(logits)
    if logits.dtype.size == 2:
        logits = tf.cast(logits, tf.float32)
    log_p = tf.nn.log_softmax(logits, axis=-1)
    return -tf.reduce_mean(tf.reduce_sum(tf.exp(log_p) * log_p, axis=-1))


@keras.saving.register_keras_serializable(package="bookcode")
class TAML(MAML):
    """Task-Agnostic Meta-Learning (Jamal & Qi 2019) on MAML.

    ``variant="entropy"`` (classification only; the paper's TAML
    entropy-maximisation/reduction): each task's meta-loss is MAML's query
    loss after adaptation plus ``weight * (H(adapted) - H(initial))``, the
    mean prediction entropies (:func:`prediction_entropy`) of the adapted and
    the initial model on the task's query examples. The initial model is
    pushed towards uniform predictions (no class preferred before it has seen
    the task), the adapted one towards confident ones.

    Any name of :data:`INEQUALITY_MEASURES` (TAML inequality minimisation):
    the meta-objective of a meta-batch is the mean query loss after
    adaptation plus ``weight * I(l_1, ..., l_M)``, where ``l_i`` is the loss
    of the *initial* model on task i's support set and ``I`` the measure.
    ``measure_options`` go to the measure (``alpha`` for the generalised
    entropy, ``epsilon`` for Atkinson).

    Logged during ``fit``: ``loss`` (query loss after adaptation), the metric,
    ``initial_loss``, and for the entropy variant ``entropy_initial`` and
    ``entropy_adapted``; ``batch_objective`` is what the meta-gradient
    descends. Everything else is MAML's (``inner_lr``, ``inner_steps``,
    ``first_order``, ...).

    >>> taml = TAML(model, variant="theil", weight=1.0, inner_lr=0.4)
    """

    def __init__(self, model, variant: str = "entropy", weight: float = 1.0,
                 measure_options: dict | None = None, **kwargs):  # fmt: skip
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        if not float(weight) >= 0:
            raise ValueError(f"weight must be zero or positive, got {weight!r}")
        measure_options = dict(measure_options or {})
        if measure_options and variant not in ("generalized_entropy", "atkinson"):
            raise ValueError(
                f"measure_options apply to 'generalized_entropy' (alpha) and 'atkinson' "
                f"(epsilon), not to {variant!r}"
            )
        super().__init__(model, **kwargs)
        if variant == "entropy" and self.kind != CLASSIFICATION:
            raise ValueError(
                "the entropy variant needs class predictions (kind='classification'); "
                "for regression use an inequality variant such as 'theil'"
            )
        self.variant, self.weight = variant, float(weight)
        self.measure_options = measure_options

    @property
    def objective_keys(self):
        keys = ("loss", metric_name(self.kind), "initial_loss")
        return keys + (("entropy_initial", "entropy_adapted") if self.variant == "entropy" else ())

    def inequality(self, losses):
        """The chosen measure of a vector of losses (inequality variants)."""
        return INEQUALITY_MEASURES[self.variant](losses, **self.measure_options)

    def task_objective(self, meta_weights, support_x, support_y, query_x, query_y):
        initial = self.initial_fast_weights(meta_weights)
        initial_support = self.fast_forward(meta_weights, initial, support_x)
        fast, _ = self.adapt_task(
            meta_weights, support_x, support_y, self.inner_steps, self.first_order
        )
        adapted_query = self.fast_forward(meta_weights, fast, query_x)
        results = self.query_results(query_y, adapted_query)
        results["initial_loss"] = task_loss(self.kind, support_y, initial_support)
        if self.variant == "entropy":
            initial_query = self.fast_forward(meta_weights, initial, query_x)
            results["entropy_initial"] = prediction_entropy(initial_query)
            results["entropy_adapted"] = prediction_entropy(adapted_query)
        return results

    def batch_objective(self, task_results):
        objective = tf.reduce_mean(task_results["loss"])
        if self.variant == "entropy":
            gap = task_results["entropy_adapted"] - task_results["entropy_initial"]
            return objective + self.weight * tf.reduce_mean(gap)
        return objective + self.weight * self.inequality(task_results["initial_loss"])

    def get_config(self):
        return {
            **super().get_config(),
            "variant": self.variant,
            "weight": self.weight,
            "measure_options": self.measure_options,
        }
