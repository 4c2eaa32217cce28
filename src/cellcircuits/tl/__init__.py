"""Tools: where AnnData meets the model."""

from ._evaluate import evaluate_transcoders
from ._predict import predict_cell_types
from ._transcode import transcode
from ._transcoders import collect_activations, train_transcoders

__all__ = ["collect_activations", "evaluate_transcoders", "predict_cell_types", "train_transcoders", "transcode"]
