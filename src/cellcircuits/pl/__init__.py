"""Plots that read results from AnnData by key."""

from ._features import feature_embedding, feature_genes, rank_features_groups

__all__ = ["feature_embedding", "feature_genes", "rank_features_groups"]
