"""Ranked features as a tidy DataFrame."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._keys import RANK_FEATURES, gene_map_varm

if TYPE_CHECKING:
    from anndata import AnnData


def ranking(adata: AnnData, key: str) -> dict:
    """The result :func:`cellcircuits.tl.rank_features_groups` stored under ``key``, with a clear error when absent."""
    if key not in adata.uns or "names" not in adata.uns[key]:
        msg = f"No ranking under .uns[{key!r}]; run cellcircuits.tl.rank_features_groups first."
        raise KeyError(msg)
    return adata.uns[key]


def top_input_genes(adata: AnnData, key: str, layer: int, features: np.ndarray, n: int) -> list[list[str]] | None:
    """Per feature, the ``n`` genes highest in its input map (``.varm[f"{key}_L{layer}_in"]``); ``None`` without it."""
    in_map = adata.varm.get(gene_map_varm(key, layer, "in"))
    if in_map is None:
        return None
    top = np.argsort(-np.asarray(in_map)[:, np.asarray(features)], axis=0, kind="stable")[:n]
    names = np.asarray(adata.var_names)
    return [list(names[top[:, j]]) for j in range(top.shape[1])]


def rank_features_groups_df(
    adata: AnnData, group: str, *, key: str = RANK_FEATURES, n_top_genes: int = 5
) -> pd.DataFrame:
    """One group's ranked features from :func:`cellcircuits.tl.rank_features_groups`, with their top genes.

    Parameters
    ----------
    adata
        Annotated data matrix with a ranking.
    group
        The group whose ranking is returned.
    key
        The ``key_added`` of the ranking.
    n_top_genes
        Genes listed per feature: the highest of its input map (``.varm[f"{key}_L{layer}_in"]`` of the transcode
        key), comma-separated; empty when the map is absent.

    Returns
    -------
    Columns ``feature`` (int), ``score``, ``logfoldchange``, ``pval``, ``pval_adj`` and ``top_genes``, best first;
    ``score`` is the AUROC when the ranking's method was ``"auroc"``.
    """
    result = ranking(adata, key)
    groups = list(result["names"].dtype.names)
    if group not in groups:
        msg = f"group {group!r} was not ranked; ranked groups are {groups}"
        raise KeyError(msg)
    params = result["params"]
    df = pd.DataFrame(
        {
            "feature": np.asarray(result["names"][group]).astype(int),
            "score": np.asarray(result["scores"][group]),
            "logfoldchange": np.asarray(result["logfoldchanges"][group]),
            "pval": np.asarray(result["pvals"][group]),
            "pval_adj": np.asarray(result["pvals_adj"][group]),
        }
    )
    top = top_input_genes(adata, params["key"], params["layer"], df["feature"].to_numpy(), n_top_genes)
    df["top_genes"] = "" if top is None else [", ".join(genes) for genes in top]
    return df
