"""Tools: where AnnData meets the model."""

from ._circuits import trace_circuit
from ._detection import score_feature_labels
from ._enrichment import feature_enrichment
from ._evaluate import evaluate_transcoders
from ._generate import generate_cell_types, generated_labels
from ._interpret import interpret_features
from ._predict import predict_cell_types
from ._rank_circuit_genes import rank_circuit_genes
from ._rank_features import rank_features_groups
from ._train_c2s import train_c2s
from ._transcode import transcode
from ._transcoders import collect_activations, train_transcoders
from ._validate import validate_circuit
from ._validate_genes import validate_circuit_genes

__all__ = [
    "collect_activations",
    "evaluate_transcoders",
    "feature_enrichment",
    "generate_cell_types",
    "generated_labels",
    "interpret_features",
    "predict_cell_types",
    "rank_circuit_genes",
    "rank_features_groups",
    "score_feature_labels",
    "trace_circuit",
    "train_c2s",
    "train_transcoders",
    "transcode",
    "validate_circuit",
    "validate_circuit_genes",
]
