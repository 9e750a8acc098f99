"""Gradient-based meta-learning on one inner-loop engine (chapters 1, 6-8).

The engine is :func:`adapt`: ``steps`` updates of *fast weights* (tensors
standing in for a Keras model's trainable variables, run through
:func:`forward`, ``keras.Model.stateless_call``) by a pluggable
:class:`UpdateRule` (:class:`SGD` with one rate or one per parameter,
:class:`Adam`), on a step-aware loss ``loss_fn(params, step)``. Gradients
flow through the inner loop (second order) unless ``first_order=True``;
long first-order loops run as one graph loop.

Learners, ``keras.Model`` subclasses trained with ``fit()`` on meta-batches
``((support_x, support_y, query_x), query_y)`` with a leading task axis,
saved with ``save()``/``keras.models.load_model``, all with
``predict_episode`` and ``adapt``:

- :class:`MAML` (Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning
  for Fast Adaptation of Deep Networks"), classification and regression;
- :class:`ADML` (Yin et al. 2018, "Adversarial Meta-Learning"), FGSM
  adversarial support and query sets;
- :class:`CAML` (Zintgraf et al. 2019, "Fast Context Adaptation via
  Meta-Learning", CAVIA): only a context vector is adapted per task;
- :class:`MetaSGD` (Li et al. 2017, "Meta-SGD: Learning to Learn Quickly for
  Few-Shot Learning"): one learned inner rate per weight;
- :class:`Reptile` (Nichol, Achiam & Schulman 2018, "On First-Order
  Meta-Learning Algorithms"): the update is initial minus adapted weights;
- :class:`TAML` (Jamal & Qi 2019, "Task-Agnostic Meta-Learning for Few-shot
  Learning"): MAML plus an entropy term or an inequality measure of the
  tasks' initial losses (:data:`INEQUALITY_MEASURES`: :func:`theil_index`,
  :func:`generalized_entropy`, :func:`atkinson_index`,
  :func:`gini_coefficient`, :func:`variance_of_logarithms`);
- :class:`ConceptSpaceLearner` (Zhou, Wu & Li 2018, "Deep Meta-Learning:
  Learning to Learn in the Concept Space"): MAML on the concepts of a
  generator trained jointly with a concept discriminator on labelled external
  classes (:func:`concept_dataset`);
- :class:`FineTuning`, the fine-tuning baseline (Ravi & Larochelle 2017).

The tasks of a meta-batch run inside one compiled ``tf.function`` through
``tf.map_fn``, each returning its own meta-gradient, which a ``combiner``
merges (default :func:`mean_gradients`; :data:`gradient_agreement`, Eshratifar,
Eigen & Pedram 2018, weighs each task by the agreement of its inner update
``theta - theta'_i`` with the others', :func:`agreement_weights`, which
:class:`AgreementLog` records during ``fit()``).
With ``task_batching="batched"`` (the default ``"auto"`` on a GPU) MAML and
Meta-SGD run the meta-batch's tasks as one computation instead
(:func:`task_forward`, one grouped convolution for every task's Conv-4).
"""

from .baselines import FineTuning
from .batched import task_forward
from .callbacks import AgreementLog
from .combiners import (
    GradientAgreement,
    agreement_gram,
    agreement_weights,
    gradient_agreement,
    mean_gradients,
)
from .concept_space import ConceptSpaceLearner, concept_dataset
from .inner_loop import adapt, connect_gradients, forward, forward_with_statistics
from .learners import ADML, CAML, MAML, AdaptedModel, GradientMetaLearner, adversarial_queries
from .meta_sgd import MetaSGD
from .objectives import CLASSIFICATION, REGRESSION, fgsm, metric_name, task_loss, task_metric
from .reptile import Reptile
from .taml import (
    INEQUALITY_MEASURES,
    TAML,
    atkinson_index,
    generalized_entropy,
    gini_coefficient,
    prediction_entropy,
    theil_index,
    variance_of_logarithms,
)
from .update_rules import SGD, Adam, UpdateRule

__all__ = [
    "ADML",
    "CAML",
    "CLASSIFICATION",
    "INEQUALITY_MEASURES",
    "MAML",
    "REGRESSION",
    "SGD",
    "TAML",
    "Adam",
    "AdaptedModel",
    "AgreementLog",
    "ConceptSpaceLearner",
    "FineTuning",
    "GradientAgreement",
    "GradientMetaLearner",
    "MetaSGD",
    "Reptile",
    "UpdateRule",
    "adapt",
    "adversarial_queries",
    "agreement_gram",
    "agreement_weights",
    "atkinson_index",
    "concept_dataset",
    "connect_gradients",
    "fgsm",
    "forward",
    "forward_with_statistics",
    "generalized_entropy",
    "gini_coefficient",
    "gradient_agreement",
    "mean_gradients",
    "metric_name",
    "prediction_entropy",
    "task_forward",
    "task_loss",
    "task_metric",
    "theil_index",
    "variance_of_logarithms",
]
