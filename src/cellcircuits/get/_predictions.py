"""Prediction results as DataFrames."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import pandas as pd

from .._keys import PREDICTION, prediction_obsm

if TYPE_CHECKING:
    from anndata import AnnData


def cell_type_probabilities(
    adata: AnnData, key: str = PREDICTION, kind: Literal["proba", "logprob"] = "proba"
) -> pd.DataFrame:
    """Per-cell label probabilities (or log-likelihoods) from :func:`cellcircuits.tl.predict_cell_types`.

    Parameters
    ----------
    adata
        Annotated data matrix with prediction results.
    key
        The ``key_added`` of the prediction.
    kind
        ``"proba"`` for probabilities, ``"logprob"`` for the labels' log-likelihoods.

    Returns
    -------
    Cells x labels, indexed by ``obs_names``, columns in the order the labels were scored.
    """
    if kind not in ("proba", "logprob"):
        msg = f"kind must be 'proba' or 'logprob', got {kind!r}"
        raise ValueError(msg)
    if key not in adata.uns or prediction_obsm(key, kind) not in adata.obsm:
        msg = f"No prediction under key {key!r}; run cellcircuits.tl.predict_cell_types(adata, model) first."
        raise KeyError(msg)
    labels = list(adata.uns[key]["params"]["labels"])
    return pd.DataFrame(adata.obsm[prediction_obsm(key, kind)], index=adata.obs_names, columns=labels)
