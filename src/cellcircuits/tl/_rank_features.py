"""Features that tell groups of cells apart, in the layout of ``sc.tl.rank_genes_groups``."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from .._compat import is_sparse, model_layers_renamed
from .._keys import RANK_FEATURES, TRANSCODE, feature_matrix, features_obsm

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anndata import AnnData


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Restore torch's thread count after the block: numba (scanpy's Wilcoxon test) resets it to every core."""
    torch = sys.modules.get("torch")  # never import torch just for this
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if torch is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def auroc(X: np.ndarray, in_group: np.ndarray) -> np.ndarray:
    """Per column, the area under the ROC curve of the values for telling ``in_group`` rows from the others.

    Computed from the Mann-Whitney rank sum (ties get average ranks): ``(R1 - n1 (n1 + 1) / 2) / (n1 n0)``.
    """
    n1 = int(in_group.sum())
    n0 = len(in_group) - n1
    if n1 == 0 or n0 == 0:
        msg = "AUROC needs cells in and out of the group"
        raise ValueError(msg)
    ranks = rankdata(X, axis=0)
    return (ranks[in_group].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _one_layer(layers: object) -> int:
    """The one model layer of a tool that reads one: an int, or a sequence holding one."""
    value = np.atleast_1d(np.asarray(layers))
    if value.shape != (1,) or not np.issubdtype(value.dtype, np.integer):
        msg = f"layers must be one model layer (an int), got {layers!r}"
        raise TypeError(msg)
    return int(value[0])


@model_layers_renamed
def rank_features_groups(
    adata: AnnData,
    groupby: str,
    *,
    layers: int,
    key: str = TRANSCODE,
    method: Literal["wilcoxon", "t-test", "auroc"] = "wilcoxon",
    groups: list[str] | Literal["all"] = "all",
    reference: str = "rest",
    corr_method: Literal["benjamini-hochberg", "bonferroni"] = "benjamini-hochberg",
    key_added: str = RANK_FEATURES,
    copy: bool = False,
) -> AnnData | None:
    """Rank transcoder features by how well they tell each group of cells from the rest.

    Reads the per-cell activations written by :func:`cellcircuits.tl.transcode` and tests each feature with scanpy's
    own ``rank_genes_groups`` (Wilcoxon rank-sum or t-test), so the result has exactly its layout; ``auroc`` ranks
    by the area under the ROC curve, with Wilcoxon p-values.

    Parameters
    ----------
    adata
        Annotated data matrix with transcoder features.
    groupby
        Column of ``.obs`` with the groups (e.g. cell types).
    layers
        The model layer whose features are ranked (``.obsm[f"X_{key}_L{layers}"]``). Formerly ``layer``, which
        still works with a :class:`FutureWarning`.
    key
        The ``key_added`` of :func:`cellcircuits.tl.transcode`.
    method
        ``"wilcoxon"``, ``"t-test"`` (Welch) or ``"auroc"``.
    groups
        Groups to test, or ``"all"``.
    reference
        ``"rest"`` or a group to compare against.
    corr_method
        Multiple-testing correction of the p-values (per group, over features).
    key_added
        Key in ``.uns`` for the result.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets the following fields:

    ``.uns[key_added]`` : :class:`dict`
        As ``sc.tl.rank_genes_groups``: ``names`` (feature indices as strings), ``scores`` (z-score, t statistic or
        AUROC), ``logfoldchanges`` (log2 ratio of mean activations in and out of the group), ``pvals``,
        ``pvals_adj``, ``params`` (with ``key``, ``layer`` and ``method``). Read it with
        :func:`cellcircuits.get.rank_features_groups_df`.
    """
    import anndata as ad
    import scanpy as sc

    layer = _one_layer(layers)
    obsm_key = features_obsm(key, layer)
    X = feature_matrix(adata, key, layer)
    if groupby not in adata.obs.columns:
        msg = f"groupby {groupby!r} is not a column of .obs; columns are {list(adata.obs.columns)}"
        raise KeyError(msg)
    labels = adata.obs[groupby]
    present = labels.dropna().astype(str).unique()
    if len(present) < 2:
        msg = f".obs[{groupby!r}] has {len(present)} group(s); ranking needs at least two."
        raise ValueError(msg)
    if method not in ("wilcoxon", "t-test", "auroc"):
        msg = f"method must be 'wilcoxon', 't-test' or 'auroc', got {method!r}"
        raise ValueError(msg)
    X = X.toarray() if is_sparse(X) else np.asarray(X)
    features = pd.Index([str(i) for i in range(X.shape[1])])
    tmp = ad.AnnData(
        X.astype(np.float32),
        obs=pd.DataFrame({groupby: labels.astype("category").to_numpy()}, index=adata.obs_names),
        var=pd.DataFrame(index=features),
    )
    sc_method = "t-test" if method == "t-test" else "wilcoxon"  # auroc takes its p-values from wilcoxon
    with keep_torch_threads():
        sc.tl.rank_genes_groups(
            tmp,
            groupby,
            groups=groups,
            reference=reference,
            method=sc_method,
            corr_method=corr_method,
            use_raw=False,
            key_added="result",
        )
    result = tmp.uns["result"]
    names = result["names"]
    order_groups = list(names.dtype.names)
    group_labels = labels.astype(str).to_numpy()
    for g in order_groups:
        inside = group_labels == g
        outside = group_labels == reference if reference != "rest" else ~inside & labels.notna().to_numpy()
        idx = names[g].astype(int)
        m_in, m_out = X[inside].mean(0), X[outside].mean(0)
        # activations are not log-expression, so fold changes are recomputed on the activations themselves
        result["logfoldchanges"][g] = np.log2((m_in[idx] + 1e-9) / (m_out[idx] + 1e-9)).astype(np.float32)
        if method == "auroc":
            score = auroc(X[inside | outside], inside[inside | outside])
            order = np.argsort(-score, kind="stable")
            pvals = pd.Series(result["pvals"][g], index=idx)
            pvals_adj = pd.Series(result["pvals_adj"][g], index=idx)
            lfc = pd.Series(result["logfoldchanges"][g], index=idx)
            names[g] = order.astype(str)
            result["scores"][g] = score[order].astype(np.float32)
            result["pvals"][g] = pvals.loc[order].to_numpy()
            result["pvals_adj"][g] = pvals_adj.loc[order].to_numpy()
            result["logfoldchanges"][g] = lfc.loc[order].to_numpy()
    result["params"] = {
        **result["params"],
        "method": method,
        "key": key,
        "layer": int(layer),
        "obsm_key": obsm_key,
    }
    adata = adata.copy() if copy else adata
    adata.uns[key_added] = result
    return adata if copy else None
