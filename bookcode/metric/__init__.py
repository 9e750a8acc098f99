"""Metric-based few-shot learners: they embed examples and classify a query
by its distances to the support set (chapters 2-4)."""

from .prototypical import (
    GaussianPrototypicalNetwork,
    PrototypicalNetwork,
    SemiSupervisedPrototypicalNetwork,
    class_prototypes,
    mahalanobis_distance,
    soft_kmeans_refinement,
    squared_euclidean_distance,
)
from .siamese import (
    CosineClassifier,
    SiameseNetwork,
    all_pairs_contrastive_loss,
    best_threshold,
    concatenate_embeddings,
    contrastive_loss,
    euclidean_distance,
    roc_auc,
    roc_curve,
    verification_accuracy,
)

__all__ = [
    "CosineClassifier",
    "GaussianPrototypicalNetwork",
    "PrototypicalNetwork",
    "SemiSupervisedPrototypicalNetwork",
    "SiameseNetwork",
    "all_pairs_contrastive_loss",
    "best_threshold",
    "class_prototypes",
    "concatenate_embeddings",
    "contrastive_loss",
    "euclidean_distance",
    "mahalanobis_distance",
    "roc_auc",
    "roc_curve",
    "soft_kmeans_refinement",
    "squared_euclidean_distance",
    "verification_accuracy",
]
