"""Results from AnnData as DataFrames and graphs."""

from ._predictions import cell_type_probabilities

__all__ = ["cell_type_probabilities"]
