"""Metric-based few-shot learners: they embed examples and classify a query
by its distances to the support set (chapters 2-4).

- :mod:`.base`: :class:`FewShotClassifier`, the base of every learner here;
- :mod:`.distances`: the distances and similarities they share;
- :mod:`.prototypical`: prototypical networks (plain, Gaussian, semi-supervised);
- :mod:`.siamese`: Siamese networks and contrastive losses;
- :mod:`.relation`: relation networks (a learned comparison of feature maps);
- :mod:`.matching`: matching networks (cosine attention, full context embeddings);
- :mod:`.heads`: cosine classifier and concatenated embeddings.

The verification metrics (``roc_curve``, ``roc_auc``, ``best_threshold``,
``verification_accuracy``) live in :mod:`bookcode.evaluation` and are
re-exported here.
"""

from bookcode.evaluation import best_threshold, roc_auc, roc_curve, verification_accuracy

from .base import FewShotClassifier
from .distances import (
    cosine_similarity,
    euclidean_distance,
    mahalanobis_distance,
    squared_euclidean_distance,
)
from .heads import ConcatenatedEmbedding, CosineClassifier, concatenate_embeddings
from .matching import AttentionLSTM, MatchingNetwork, SupportContext, matching_log_probabilities
from .prototypical import (
    GaussianPrototypicalNetwork,
    PrototypicalNetwork,
    SemiSupervisedPrototypicalNetwork,
    class_prototypes,
    soft_kmeans_refinement,
)
from .relation import RelationNetwork, class_sums, relation_pairs
from .siamese import SiameseNetwork, all_pairs_contrastive_loss, contrastive_loss

__all__ = [
    "AttentionLSTM",
    "ConcatenatedEmbedding",
    "CosineClassifier",
    "FewShotClassifier",
    "GaussianPrototypicalNetwork",
    "MatchingNetwork",
    "PrototypicalNetwork",
    "RelationNetwork",
    "SemiSupervisedPrototypicalNetwork",
    "SiameseNetwork",
    "SupportContext",
    "all_pairs_contrastive_loss",
    "best_threshold",
    "class_prototypes",
    "class_sums",
    "concatenate_embeddings",
    "contrastive_loss",
    "cosine_similarity",
    "euclidean_distance",
    "mahalanobis_distance",
    "matching_log_probabilities",
    "relation_pairs",
    "roc_auc",
    "roc_curve",
    "soft_kmeans_refinement",
    "squared_euclidean_distance",
    "verification_accuracy",
]
