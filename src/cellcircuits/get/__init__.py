"""Results from AnnData as DataFrames and graphs."""

from ._predictions import cell_type_probabilities
from ._rank_features import rank_features_groups_df

__all__ = ["cell_type_probabilities", "rank_features_groups_df"]
