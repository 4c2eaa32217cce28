"""Plots that read results from AnnData by key."""

from ._circuit import circuit, circuit_genes
from ._enrichment import enrichment
from ._features import feature_embedding, feature_genes, rank_features_groups
from ._rank_circuit_genes import rank_circuit_genes

__all__ = [
    "circuit",
    "circuit_genes",
    "enrichment",
    "feature_embedding",
    "feature_genes",
    "rank_circuit_genes",
    "rank_features_groups",
]
