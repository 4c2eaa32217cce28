"""Ranked features as a tidy DataFrame."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData


def rank_features_groups_df(
    adata: AnnData, group: str, *, key: str = "rank_features_groups", n_top_genes: int = 5
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
    if key not in adata.uns or "names" not in adata.uns[key]:
        msg = f"No ranking under .uns[{key!r}]; run cellcircuits.tl.rank_features_groups first."
        raise KeyError(msg)
    result = adata.uns[key]
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
    in_map = adata.varm.get(f"{params['key']}_L{params['layer']}_in")
    if in_map is None:
        df["top_genes"] = ""
    else:
        top = np.argsort(-np.asarray(in_map)[:, df["feature"].to_numpy()], axis=0, kind="stable")[:n_top_genes]
        names = np.asarray(adata.var_names)
        df["top_genes"] = [", ".join(names[top[:, j]]) for j in range(len(df))]
    return df
