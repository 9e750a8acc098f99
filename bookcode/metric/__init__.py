"""Metric-based few-shot learners: they embed examples and classify a query
by its distances to the support set (chapters 2-4)."""

from .siamese import (  # noqa: E402
    SiameseNetwork,
    all_pairs_contrastive_loss,
    best_threshold,
    contrastive_loss,
    euclidean_distance,
    roc_auc,
    roc_curve,
    verification_accuracy,
)

from .prototypical import (
    GaussianPrototypicalNetwork,
    PrototypicalNetwork,
    SemiSupervisedPrototypicalNetwork,
    class_prototypes,
    mahalanobis_distance,
    soft_kmeans_refinement,
    squared_euclidean_distance,
)
