"""Labels the plots share: a feature named by its layer, index and top input genes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._keys import gene_map_varm
from ..get._rank_features import top_input_genes

if TYPE_CHECKING:
    from anndata import AnnData


def feature_label(adata: AnnData, key: str, layer: int, feature: int, n_genes: int = 3) -> str:
    """``"L3 F12: GENE1, GENE2, GENE3"`` from the feature's input map, when present and not all zero."""
    label = f"L{layer} F{feature}"
    top = top_input_genes(adata, key, layer, np.array([feature]), n_genes)
    if top is not None and np.any(np.asarray(adata.varm[gene_map_varm(key, layer, "in")])[:, feature] > 0):
        label += ": " + ", ".join(top[0])
    return label
