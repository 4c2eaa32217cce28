"""Results from AnnData as DataFrames and graphs."""

from ._circuit import circuit, circuit_df, write_circuit, write_graph
from ._predictions import cell_type_probabilities
from ._rank_circuit_genes import rank_circuit_genes_df
from ._rank_features import rank_features_groups_df

__all__ = [
    "cell_type_probabilities",
    "circuit",
    "circuit_df",
    "rank_circuit_genes_df",
    "rank_features_groups_df",
    "write_circuit",
    "write_graph",
]
