"""Where results live in AnnData: lookups shared by the tools that write them and the plots that read them.

Light on purpose (numpy and anndata only), so reading results does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from anndata import AnnData
    from scipy import sparse


def feature_matrix(adata: AnnData, key: str, layer: int) -> np.ndarray | sparse.spmatrix:
    """The cells x features activations :func:`cellcircuits.tl.transcode` wrote for a layer; clear error if absent."""
    obsm_key = f"X_{key}_L{layer}"
    if obsm_key not in adata.obsm:
        msg = f".obsm[{obsm_key!r}] not found; run cellcircuits.tl.transcode(adata, model, transcoders) first."
        raise KeyError(msg)
    return adata.obsm[obsm_key]


def circuit_result(adata: AnnData, key: str) -> dict:
    """The circuit :func:`cellcircuits.tl.trace_circuit` stored under ``key``, with a clear error when absent."""
    store = adata.uns.get("circuits", {})
    if key not in store or "nodes" not in store[key]:
        have = sorted(store) if hasattr(store, "keys") else []
        msg = f"No circuit under .uns['circuits'][{key!r}]; run cellcircuits.tl.trace_circuit first."
        if have:
            msg += f" Stored circuits: {have}."
        raise KeyError(msg)
    return store[key]
