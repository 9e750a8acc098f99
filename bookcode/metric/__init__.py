"""Metric-based few-shot learners: they embed examples and classify a query
by its distances to the support set (chapters 2-4)."""
