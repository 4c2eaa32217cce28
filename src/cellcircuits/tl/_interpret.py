"""Automatic interpretation of transcoder features: a label, a cell type and flags per feature."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._compat import model_layers_renamed
from .._keys import (
    INTERPRET,
    TRANSCODE,
    enrichment_uns,
    feature_matrix,
    gene_map,
    gene_map_varm,
    transcode_result,
)
from ._enrichment import feature_enrichment
from ._interpret_controls import (
    chosen_circuits,
    circuit_influence,
    enriched_fractions,
    layer_influence,
    shuffled_enrichment,
)
from ._rank_features import auroc

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ._enrichment import NetLike

DENSE_FREQUENCY = 0.5
"""A feature active in more than this fraction of cells is flagged ``dense``."""


def group_means(X: sparse.spmatrix | np.ndarray, labels: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(n_groups, n_features)`` mean activation per group, and the group names (NaN labels left out)."""
    codes = pd.Categorical(labels.astype("object").where(labels.notna(), None))
    valid = codes.codes >= 0
    indicator = sparse.csr_matrix(
        (np.ones(int(valid.sum())), (codes.codes[valid], np.flatnonzero(valid))),
        shape=(len(codes.categories), len(labels)),
    )
    counts = np.asarray(indicator.sum(1)).ravel()
    sums = indicator @ X
    sums = sums.toarray() if sparse.issparse(sums) else np.asarray(sums)
    return sums / np.maximum(counts, 1)[:, None], np.asarray(codes.categories.astype(str))


def top_names(values: np.ndarray, names: np.ndarray, n: int) -> list[str]:
    """Per column of ``values``, its ``n`` highest positive rows' names, comma-separated."""
    top = np.argsort(-values, axis=0, kind="stable")[:n]
    return [", ".join(names[top[:, j]][values[top[:, j], j] > 0]) for j in range(values.shape[1])]


def shared_spelling(genes: list[str], n: int = 3) -> tuple[str, float]:
    """The letter ``n``-gram most of ``genes`` contain, and the fraction of them that do.

    A feature whose top genes mostly share a piece of spelling ("HNRNPA1, HNRNPK, HNRNPF") may read the tokens
    rather than the biology; gene families share both, so this is a flag, not a verdict.
    """
    counts: dict[str, int] = {}
    for g in genes:
        for gram in {g[i : i + n] for i in range(len(g) - n + 1)}:
            counts[gram] = counts.get(gram, 0) + 1
    if not counts:
        return "", 0.0
    best = max(sorted(counts), key=counts.__getitem__)
    return best, counts[best] / len(genes)


def feature_table(
    adata: AnnData,
    layer: int,
    *,
    key: str,
    enrichment: pd.DataFrame,
    groupby: str | None,
    n_genes: int,
    fdr_threshold: float,
    shuffled: pd.DataFrame | None = None,
    influence: pd.Series | None = None,
) -> pd.DataFrame:
    """One row per feature of a layer: activity, best enrichment, most specific group, top genes, flags.

    With ``shuffled`` (the ``best`` table of the enrichment re-run with shuffled gene labels) the columns
    ``enrichment_fdr_shuffled`` and ``enriched_shuffled``; ``influence`` gives ``circuit_influence``
    (:func:`circuit_influence`; NaN when ``None``).
    """
    X = feature_matrix(adata, key, layer)
    X = sparse.csr_matrix(X)
    n_cells, n_features = X.shape
    mean = np.asarray(X.mean(0)).ravel()
    frequency = np.asarray((X > 0).sum(0)).ravel() / max(n_cells, 1)
    genes = np.asarray(adata.var_names)
    df = pd.DataFrame(
        {
            "layer": np.full(n_features, int(layer)),
            "feature": np.arange(n_features),
            "mean_activation": mean,
            "frequency": frequency,
            "live": frequency > 0,
            "dense": frequency > DENSE_FREQUENCY,
        }
    )
    in_map = gene_map(adata, key, layer, "in")
    df["top_input_genes"] = top_names(in_map, genes, n_genes)
    spelled = [shared_spelling(top.split(", ")) if top else ("", 0.0) for top in top_names(in_map, genes, 10)]
    df["shared_spelling"] = [s for s, _ in spelled]
    df["spelling_share"] = [f for _, f in spelled]
    out_key = gene_map_varm(key, layer, "out")
    df["top_output_genes"] = top_names(np.asarray(adata.varm[out_key]), genes, n_genes) if out_key in adata.varm else ""

    best = enrichment.set_index("feature")
    df["best_term"] = best["term"].reindex(df["feature"]).fillna("").to_numpy()
    df["enrichment_score"] = best["score"].reindex(df["feature"]).to_numpy()
    df["enrichment_fdr"] = best["fdr"].reindex(df["feature"]).fillna(1.0).to_numpy()
    df["enriched"] = df["enrichment_fdr"] < fdr_threshold
    if shuffled is not None:
        control = shuffled.set_index("feature")["fdr"].reindex(df["feature"]).fillna(1.0).to_numpy()
        df["enrichment_fdr_shuffled"] = control
        df["enriched_shuffled"] = control < fdr_threshold
    df["circuit_influence"] = layer_influence(influence, int(layer), n_features)

    df["cell_type"] = ""
    df["specificity"] = np.nan
    df["cell_type_auroc"] = np.nan
    if groupby is not None:
        labels = adata.obs[groupby]
        means, groups = group_means(X, labels)
        top = means.argmax(0)
        total = means.sum(0)
        df["cell_type"] = np.where(df["live"], groups[top], "")
        # share of the summed group means that the top group holds: 1/n_groups everywhere alike, 1 in one group only
        df["specificity"] = np.where(total > 0, means.max(0) / np.where(total > 0, total, 1), np.nan)
        valid = labels.notna().to_numpy()
        dense_X = X[valid].toarray()
        group_of_cell = labels[valid].astype(str).to_numpy()
        scores = np.full(n_features, np.nan)
        for g in np.unique(groups[top[df["live"].to_numpy()]]):
            cols = np.flatnonzero((groups[top] == g) & df["live"].to_numpy())
            inside = group_of_cell == g
            if 0 < inside.sum() < len(inside):
                scores[cols] = auroc(dense_X[:, cols], inside)
        df["cell_type_auroc"] = scores
    labels = np.where(df["enriched"], df["best_term"], df["top_input_genes"])
    df["label"] = np.where(df["live"], labels, "")  # no activity on gene tokens: nothing to name it by
    first = ["layer", "feature", "label", "enriched", "best_term", "enrichment_fdr", "enrichment_score", "cell_type"]
    return df[first + [c for c in df.columns if c not in first]]


def layer_summary(table: pd.DataFrame, n_top: int) -> dict:
    """One summary row: how many features are live, and what fraction of them are enriched.

    The fractions of the top-``n_top`` by activation and by circuit use and of the live features, with their
    shuffled-label controls (:func:`enriched_fractions`).
    """
    live = table[table["live"]]
    top = live.nlargest(n_top, "mean_activation")
    fractions = enriched_fractions(table, n_top)
    return {
        "layer": int(table["layer"].iloc[0]),
        "n_features": len(table),
        "n_live_features": len(live),
        "n_dense_features": int(table["dense"].sum()),
        f"fraction_enriched_top{n_top}": fractions.pop(f"fraction_enriched_top{n_top}"),
        "fraction_enriched_live": fractions.pop("fraction_enriched_live"),
        "n_enriched_live": int(live["enriched"].sum()),
        "median_cell_type_auroc_top": float(top["cell_type_auroc"].median())
        if top["cell_type_auroc"].notna().any()
        else np.nan,
        **fractions,
    }


@model_layers_renamed
def interpret_features(
    adata: AnnData,
    *,
    layers: int | Sequence[int] | None = None,
    groupby: str | None = None,
    key: str = TRANSCODE,
    net: NetLike = None,
    side: Literal["in", "out"] = "in",
    method: Literal["ora", "ulm", "gsea"] = "ora",
    n_top_genes: int = 50,
    n_top: int = 20,
    n_genes: int = 5,
    fdr_threshold: float = 0.05,
    circuits: str | Sequence[str] | None = None,
    shuffled_control: bool = True,
    random_state: int = 0,
    key_added: str = INTERPRET,
    copy: bool = False,
) -> AnnData | None:
    """Label every transcoder feature automatically and count how many carry a significant enrichment.

    Per feature: its activity over cells, its best gene-set enrichment (:func:`cellcircuits.tl.feature_enrichment`;
    run here with ``net``, ``side``, ``method`` and ``n_top_genes`` unless ``.uns[f"{key}_L{layer}_{side}_enrichment"]``
    already holds a result, which is then used as is), the group of ``groupby`` where it is most active, and its top
    input and output genes. A feature's label is its best term when that is significant (FDR < ``fdr_threshold``),
    else its top input genes. The summary gives, per layer, the fraction enriched of three sets of features: the
    ``n_top`` most active live features, every live feature, and the ``n_top`` features the traced circuits use
    most (their summed influence over ``.uns["circuits"]``), which are the features an explanation of the model's
    calls rests on. Each fraction comes with its control: the same enrichment of the same maps with the gene labels
    shuffled, which a calibrated test keeps near 0.

    An enrichment says which genes activate a feature, not why. Genes are spelled in several tokens, and a feature
    firing on a shared name prefix (" HLA" "-" "D", " RPL") maps to the whole family, which often shares a function;
    the maps of ``cellcircuits.tl.transcode(..., gene_tokens="identifying")`` read only the tokens that name single
    genes. This summary is of the maps under ``key`` and records how they were read (``gene_tokens``): transcode both
    ways under two keys and interpret each to compare. :func:`cellcircuits.tl.score_feature_labels` then tests the
    labels on held-out cells.

    Parameters
    ----------
    adata
        Annotated data matrix with transcoder features (:func:`cellcircuits.tl.transcode`).
    layers
        Model layer(s); default every layer ``transcode`` wrote. Formerly ``layer``, which still works with a
        :class:`FutureWarning`.
    groupby
        Column of ``.obs`` with cell types; without it the cell-type columns stay empty.
    key
        The ``key_added`` of :func:`cellcircuits.tl.transcode`.
    net, side, method, n_top_genes
        The enrichment run when none is stored (see :func:`cellcircuits.tl.feature_enrichment`).
    n_top
        How many of the most active live features (by mean activation over cells) the top fraction counts.
    n_genes
        Top input and output genes listed per feature.
    fdr_threshold
        FDR under which an enrichment is significant.
    circuits
        Keys of ``.uns["circuits"]`` (:func:`cellcircuits.tl.trace_circuit`) whose feature nodes rank the features by
        circuit use; default every stored circuit. The circuits must have been traced with the transcoders
        ``key`` was transcoded with. Without circuits the circuit-use column and fractions are NaN.
    shuffled_control
        Re-run each layer's enrichment (with its stored settings) on the maps with their rows permuted among the
        genes the model saw, and count the features enriched there; ``False`` skips it (the controls are then NaN).
    random_state
        Seed of the gene-label permutation (one per layer).
    key_added
        Key in ``.uns`` for the result.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets the following fields:

    ``.uns[key_added]["features"]`` : :class:`pandas.DataFrame`
        One row per feature and layer: ``layer``, ``feature``, ``label`` (empty for a feature that never fires on
        gene tokens), ``enriched``, ``best_term``,
        ``enrichment_fdr``, ``enrichment_score``, ``cell_type`` (highest mean activation), ``specificity`` (that
        group's share of the summed group means), ``cell_type_auroc`` (that group against the rest),
        ``mean_activation``, ``frequency`` (fraction of cells where it fires), flags ``live`` and ``dense`` (fires in
        more than half the cells), ``top_input_genes`` and ``top_output_genes``, and ``shared_spelling`` with
        ``spelling_share``: the three letters most of its 10 top input genes contain and the fraction that do (a
        feature reading tokens rather than biology has a high share; so do gene families),
        ``circuit_influence`` (summed influence of the feature's nodes over every group of the circuits, 0 for a
        feature they do not hold, NaN without circuits), and with ``shuffled_control`` ``enrichment_fdr_shuffled``
        and ``enriched_shuffled`` (the best FDR with shuffled gene labels, and whether it is significant).
    ``.uns[key_added]["summary"]`` : :class:`pandas.DataFrame`
        One row per layer: ``layer``, ``n_features``, ``n_live_features``, ``n_dense_features``,
        ``fraction_enriched_top{n_top}``, ``fraction_enriched_live``, ``n_enriched_live``,
        ``median_cell_type_auroc_top``, ``fraction_enriched_top{n_top}_shuffled``,
        ``fraction_enriched_live_shuffled``, ``fraction_enriched_top{n_top}_circuit`` (the ``n_top`` features of
        highest ``circuit_influence`` above 0; fewer when the circuits use fewer) with its
        ``..._circuit_shuffled``, ``n_circuit_features`` (features of the layer the circuits use),
        ``gene_tokens`` (how ``transcode`` read the maps: ``"all"`` or ``"identifying"``) and ``enrichment_key``.
    ``.uns[key_added]["params"]`` : :class:`dict`
        The settings, ``gene_tokens`` and ``circuits`` (the circuit keys used, empty when none).
    ``.uns[f"{key}_L{layer}_{side}_enrichment"]``
        The enrichment of each layer, when it was run here.

    Raises
    ------
    KeyError
        When ``transcode`` has not run, ``groupby`` is not a column of ``.obs``, or a named circuit is not stored.
    ValueError
        When ``groupby`` has fewer than two groups, or for a bad ``n_top``/``fdr_threshold``.

    Examples
    --------
    >>> cc.tl.interpret_features(adata, groupby="bulk_labels")  # doctest: +SKIP
    >>> adata.uns["interpret_features"]["summary"]  # doctest: +SKIP
    """
    transcoded = transcode_result(adata, key)
    if groupby is not None:
        if groupby not in adata.obs.columns:
            msg = f"groupby {groupby!r} is not a column of .obs; columns are {list(adata.obs.columns)}"
            raise KeyError(msg)
        n_groups = adata.obs[groupby].dropna().nunique()
        if n_groups < 2:
            msg = f".obs[{groupby!r}] has {n_groups} group(s); a most specific cell type needs at least two."
            raise ValueError(msg)
    if n_top < 1:
        msg = f"n_top must be at least 1, got {n_top}"
        raise ValueError(msg)
    if not 0 < fdr_threshold <= 1:
        msg = f"fdr_threshold must be in (0, 1], got {fdr_threshold}"
        raise ValueError(msg)
    used_circuits = chosen_circuits(adata, circuits)
    circuit_use = circuit_influence(adata, used_circuits)
    gene_tokens = str(transcoded["params"].get("gene_tokens", "all"))
    done = [int(i) for i in np.atleast_1d(transcoded["params"]["layers"])]
    chosen = done if layers is None else [int(i) for i in np.atleast_1d(layers)]
    missing = [i for i in chosen if i not in done]
    if missing:
        msg = f"layer(s) {missing} were not transcoded under {key!r}; transcoded layers are {done}"
        raise ValueError(msg)

    adata = adata.copy() if copy else adata
    tables, rows = [], []
    for i in chosen:
        enrichment_key = enrichment_uns(key, i, side)
        if enrichment_key not in adata.uns:
            feature_enrichment(
                adata, net, layers=i, side=side, method=method, n_top_genes=n_top_genes, key=key,
                key_added=enrichment_key,
            )  # fmt: skip
        best = adata.uns[enrichment_key]["best"]
        shuffled = shuffled_enrichment(adata, enrichment_key, net, random_state) if shuffled_control else None
        table = feature_table(
            adata, i, key=key, enrichment=best, groupby=groupby, n_genes=n_genes, fdr_threshold=fdr_threshold,
            shuffled=shuffled, influence=circuit_use,
        )  # fmt: skip
        tables.append(table)
        rows.append({**layer_summary(table, n_top), "gene_tokens": gene_tokens, "enrichment_key": enrichment_key})
    adata.uns[key_added] = {
        "features": pd.concat(tables, ignore_index=True),
        "summary": pd.DataFrame(rows),
        "params": {
            "key": key,
            "layers": np.asarray(chosen, dtype=np.int64),
            "groupby": groupby or "",
            "side": side,
            "n_top": int(n_top),
            "fdr_threshold": float(fdr_threshold),
            "gene_tokens": gene_tokens,
            "circuits": np.asarray(used_circuits, dtype=str),
            "shuffled_control": bool(shuffled_control),
            "random_state": int(random_state),
        },
    }
    return adata if copy else None
