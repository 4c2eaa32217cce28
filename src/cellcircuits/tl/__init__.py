"""Tools: where AnnData meets the model."""

from ._predict import predict_cell_types

__all__ = ["predict_cell_types"]
