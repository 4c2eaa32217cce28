"""Circuit markers: the genes of a traced circuit ranked by their influence on the target, beside their expression.

The circuit's answer to ``sc.tl.rank_genes_groups``: per group of a circuit from
:func:`cellcircuits.tl.trace_circuit`, each gene of the traced sentences is scored by its mean whole-graph influence
over the group's traced cells, with a bootstrap interval, its signed attribution, knockout effect, expression and
differential-expression ranks, marker sets, and its influence beyond what its place in the sentence predicts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.stats import rankdata

from .._keys import (
    GENE_RANKING,
    GENE_VALIDATION,
    SentenceSettings,
    circuit_genes,
    circuit_result,
    encode_optional_bool,
    store_circuit,
)
from ..pp._sentences import check_writable, gene_names, sentence_matrix, var_where
from ._circuits import MARKER_COLLECTIONS
from ._rank_features import keep_torch_threads

if TYPE_CHECKING:
    from anndata import AnnData

#: Columns of the stored table, in order.
RANKING_COLUMNS = [
    "group", "rank", "gene", "influence", "influence_lo", "influence_hi", "attribution", "frequency",
    "position_adjusted", "positional", "knockout", "expression_rank", "de_rank", "de_score", "is_marker",
    "marker_sets",
]  # fmt: skip
_KNOCKOUT_COLUMNS = ("group", "gene", "deletion")


# the math: small functions on arrays
def cell_gene_matrix(cell: np.ndarray, gene: np.ndarray, values: np.ndarray, n_cells: int, n_genes: int) -> np.ndarray:
    """Cells x genes matrix of ``values`` at ``(cell, gene)`` (integer codes); 0 where a cell lacks the gene."""
    out = np.zeros((n_cells, n_genes), dtype=np.float64)
    np.add.at(out, (cell, gene), values)
    return out


def bootstrap_interval(
    matrix: np.ndarray, n_bootstrap: int, ci: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of each column's mean, resampling the rows (cells) with replacement.

    A draw of ``n`` cells with replacement is a multinomial count per cell, so every draw's column means are one row
    of ``counts @ matrix / n``: all draws and all genes at once, memory ``n_bootstrap x n_genes``.
    """
    n = matrix.shape[0]
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(np.float64)
    means = counts @ matrix / n
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return lo, hi


def positional_expectation(rank: np.ndarray, influence: np.ndarray) -> np.ndarray:
    """Per (cell, gene) pair, the mean influence of all the pairs at the same sentence position (``rank``).

    No shape is assumed: influence need not fall with the position (genes near the answer can weigh more), and a
    mean per position has no smoothing bias at the steep head of the curve. The positions' means sum the
    influence, so the residuals of a position sum to 0 over its pairs.
    """
    total = np.bincount(rank, weights=influence)
    count = np.bincount(rank)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return mean[rank]


def expression_ranks(mean_expression: np.ndarray) -> np.ndarray:
    """Rank of each gene by mean expression, 1 the highest (ties share the best rank)."""
    return rankdata(-mean_expression, method="min").astype(np.float64)


# inputs, checked before any work
def _check_options(ci: float, n_bootstrap: int) -> None:
    if not 0.0 < float(ci) < 1.0:
        msg = f"ci must lie in (0, 1), got {ci!r}"
        raise ValueError(msg)
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 1:
        msg = f"n_bootstrap must be a positive integer, got {n_bootstrap!r}"
        raise ValueError(msg)


def _settings(result: dict, layer: str | None, use_raw: bool | None) -> SentenceSettings:
    """The circuit's sentence settings, with ``layer``/``use_raw`` in place of its own when either is given."""
    stored = SentenceSettings.from_params(result.get("params", {}).get("sentences", {}))
    if layer is None and use_raw is None:
        return stored
    return SentenceSettings(stored.sentence_key, layer, use_raw, stored.gene_symbols, stored.random_state)


def _loaded(X: Any) -> np.ndarray | sparse.spmatrix:
    """An in-memory matrix (backed ones are read)."""
    if isinstance(X, np.ndarray) or sparse.issparse(X):
        return X
    if hasattr(X, "to_memory"):
        return X.to_memory()
    return np.asarray(X[()])


def _traced_cells(result: dict, genes: pd.DataFrame, groups: list[str]) -> dict[str, np.ndarray]:
    """Per group, the obs names of its traced cells: from the cells table (a cell with no gene counts too)."""
    source = pd.DataFrame(result["cells"]) if "cells" in result else genes
    group_of = source["group"].astype(str).to_numpy()
    names = source["obs_name"].astype(str).to_numpy()
    return {g: np.asarray(pd.unique(names[group_of == g]), dtype=object) for g in groups}


def _groups(result: dict, genes: pd.DataFrame) -> list[str]:
    groups = result.get("params", {}).get("groups")
    if groups is None or len(np.atleast_1d(groups)) == 0:
        groups = pd.unique(genes["group"].astype(str))
    return [str(g) for g in np.atleast_1d(groups)]


def _member_rows(adata: AnnData, groupby: str, traced: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per group, the rows of its cells: all cells of the group in ``.obs[groupby]``, else its traced cells."""
    if groupby:
        labels = adata.obs[groupby].astype(str).to_numpy()
        present = adata.obs[groupby].notna().to_numpy()
        return {g: np.flatnonzero((labels == g) & present) for g in traced}
    rows = {}
    for g, names in traced.items():
        index = adata.obs_names.get_indexer(names.astype(str))
        if (index < 0).any():
            msg = f"traced cells {list(names[index < 0][:5])} of group {g!r} are not in adata.obs_names"
            raise KeyError(msg)
        rows[g] = np.sort(index)
    return rows


def _knockouts(result: dict) -> pd.DataFrame | None:
    """The gene knockout effects of :func:`cellcircuits.tl.validate_circuit_genes`, when stored."""
    if GENE_VALIDATION not in result:
        return None
    stored = result[GENE_VALIDATION]
    if "effects" not in stored:
        msg = f"The circuit's {GENE_VALIDATION!r} holds no 'effects' table; run validate_circuit_genes again."
        raise KeyError(msg)
    effects = pd.DataFrame(stored["effects"])
    missing = [c for c in _KNOCKOUT_COLUMNS if c not in effects.columns]
    if missing:
        msg = f"The circuit's gene knockout effects lack the columns {missing}; run validate_circuit_genes again."
        raise KeyError(msg)
    effects = effects.assign(group=effects["group"].astype(str), gene=effects["gene"].astype(str))
    return effects.groupby(["group", "gene"])["deletion"].mean().rename("knockout").reset_index()


def _marker_sets(genes: np.ndarray) -> np.ndarray:
    """The shipped marker sets holding each gene, joined by ``;`` (as the circuit's nodes name them)."""
    from .. import ds

    sets_of: dict[str, list[str]] = {}
    for collection in MARKER_COLLECTIONS:
        for name, members in ds.gene_sets(collection).items():
            for g in members:
                sets_of.setdefault(str(g).upper(), []).append(name)
    return np.asarray([";".join(sets_of.get(str(g).upper(), [])) for g in genes], dtype=object)


def _labels(adata: AnnData, groupby: str) -> pd.Series:
    """The groups of all cells as strings (as the circuit names them), missing ones left missing."""
    labels = adata.obs[groupby]
    return labels.astype(str).astype(object).where(labels.notna().to_numpy(), None)


def _de(X: Any, symbols: np.ndarray, labels: pd.Series, groups: list[str], uns_log1p: Any) -> dict[str, pd.DataFrame]:
    """Per group with at least two cells (and cells outside it), scanpy's Wilcoxon ranking against the rest.

    Runs on a new AnnData holding only the matrix and the labels, so the user's AnnData is left as it was.
    """
    import anndata as ad
    import scanpy as sc

    counts = labels.value_counts()
    tested = [g for g in groups if 2 <= counts.get(g, 0) < len(labels)]
    if not tested:
        return {}
    tmp = ad.AnnData(
        _loaded(X),
        obs=pd.DataFrame({"group": labels.astype("category").to_numpy()}, index=np.arange(len(labels)).astype(str)),
        var=pd.DataFrame(index=pd.Index(symbols.astype(str))),
    )
    if uns_log1p is not None:
        tmp.uns["log1p"] = dict(uns_log1p)
    with keep_torch_threads():
        sc.tl.rank_genes_groups(tmp, "group", groups=tested, method="wilcoxon", use_raw=False, key_added="de")
    out = {}
    for g in tested:
        names = np.asarray(tmp.uns["de"]["names"][g]).astype(str)
        out[g] = pd.DataFrame(
            {"de_rank": np.arange(1, len(names) + 1, dtype=np.float64), "de_score": tmp.uns["de"]["scores"][g]},
            index=names,
        )
    return out


def _group_table(
    genes: pd.DataFrame, cells: np.ndarray, n_bootstrap: int, ci: float, rng: np.random.Generator
) -> pd.DataFrame:
    """One group's genes with their influence, interval, attribution, frequency and positional scores."""
    cell_code = pd.Index(cells).get_indexer(genes["obs_name"].astype(str))
    genes = genes[cell_code >= 0]
    cell_code = cell_code[cell_code >= 0]
    gene_code, names = pd.factorize(genes["gene"].astype(str))
    n, m = len(cells), len(names)
    influence = genes["influence"].to_numpy(dtype=np.float64)
    attribution = genes["attribution"].to_numpy(dtype=np.float64)
    expected = positional_expectation(genes["rank"].to_numpy(dtype=np.int64), influence)
    by_cell = cell_gene_matrix(cell_code, gene_code, influence, n, m)
    lo, hi = bootstrap_interval(by_cell, n_bootstrap, ci, rng)
    present = cell_gene_matrix(cell_code, gene_code, np.ones(len(genes)), n, m) > 0
    return pd.DataFrame(
        {
            "gene": np.asarray(names, dtype=object),
            "influence": by_cell.mean(0),
            "influence_lo": lo,
            "influence_hi": hi,
            "attribution": np.bincount(gene_code, weights=attribution, minlength=m) / n,
            "frequency": present.mean(0),
            # absent genes have no position and no influence: residual 0, so influence = positional + adjusted
            "position_adjusted": np.bincount(gene_code, weights=influence - expected, minlength=m) / n,
            "positional": np.bincount(gene_code, weights=expected, minlength=m) / n,
        }
    )


def rank_circuit_genes(
    adata: AnnData,
    key: str,
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    layer: str | None = None,
    use_raw: bool | None = None,
    random_state: int = 0,
    key_added: str = GENE_RANKING,
    copy: bool = False,
) -> AnnData | None:
    """Rank the genes of a traced circuit by their influence on the target, per group (circuit markers).

    :func:`cellcircuits.tl.trace_circuit` stores, per traced cell, every gene of its sentence with its influence on
    the target in the cell's whole attribution graph. Per group, each gene is scored by its mean influence over the
    group's traced cells, a cell whose sentence lacks the gene counting 0 (as the circuit's nodes are aggregated),
    and set beside what else is known of it: its knockout effect, its expression and differential expression in
    the group, and the shipped marker sets holding it.

    Influence depends strongly on where a gene sits in the sentence (the most expressed genes come first), so a
    gene can rank high for its position alone. ``position_adjusted`` removes that: over all (cell, gene) pairs of
    the group, the expected influence at each sentence position is the mean influence of the pairs at that
    position (no shape assumed, so no smoothing bias where influence falls steeply over the first positions); a
    gene's score is its mean residual (influence minus the expectation at its position) over the group's cells, a
    cell without the gene adding 0 (it has neither position nor influence there). So
    ``influence = positional + position_adjusted``, a gene whose influence follows its position alone scores about
    0, and the scores of the genes at a position sum to 0. A gene holding the same position in every cell cannot be
    told apart from that position (its score is about 0); with few cells per group the per-position means are
    noisy.

    Parameters
    ----------
    adata
        Annotated data matrix with a circuit from :func:`cellcircuits.tl.trace_circuit`.
    key
        The circuit's key in ``.uns["circuits"]``.
    n_bootstrap
        Bootstrap draws of the group's traced cells (with replacement) for the interval of the mean influence.
    ci
        Coverage of the percentile bootstrap interval, in ``(0, 1)``.
    layer, use_raw
        Expression read for ``expression_rank`` and the Wilcoxon test (``de_rank``), as
        :func:`cellcircuits.pp.cell_sentences` chooses it; default (both ``None``) the circuit's own sentence
        settings, so the values the sentences were built from.
    random_state
        Seed of the bootstrap draws.
    key_added
        Entry of the circuit's dict (``.uns["circuits"][key]``) that receives the ranking.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets ``.uns["circuits"][key][key_added]``, a dict of:

    ``table`` : :class:`pandas.DataFrame`
        One row per group and gene of the group's traced sentences, most influential first within a group:
        ``group``, ``rank`` (1 the most influential), ``gene``, ``influence`` (mean over the traced cells),
        ``influence_lo`` and ``influence_hi`` (bootstrap interval), ``attribution`` (mean signed effect on the
        target), ``frequency`` (fraction of the cells whose sentence holds the gene), ``position_adjusted``
        (influence beyond the sentence position, see above), ``positional`` (influence its positions predict),
        ``knockout`` (mean ``deletion`` effect over the cells where
        :func:`cellcircuits.tl.validate_circuit_genes` knocked the gene out; NaN without it), ``expression_rank``
        (by mean expression over the group's cells, 1 the highest; NaN for a gene not in the matrix), ``de_rank``
        and ``de_score`` (position and z-score in scanpy's Wilcoxon ``rank_genes_groups`` of the group against the
        rest; NaN when the circuit has no ``groupby`` or the group fewer than two cells), ``is_marker`` and
        ``marker_sets`` (shipped marker sets holding the gene). The group's cells, for expression and the test,
        are its cells in ``.obs[groupby]``, or its traced cells when the circuit was traced without ``groupby``.
        Read it with :func:`cellcircuits.get.rank_circuit_genes_df`.
    ``params`` : :class:`dict`
        ``n_bootstrap``, ``ci``, ``random_state``, ``layer``, ``use_raw``, ``gene_symbols``, ``expression`` (the
        matrix read), ``groupby``, ``groups``, ``n_cells`` (traced cells per group) and ``knockout`` (whether
        knockouts were found).

    Raises
    ------
    KeyError
        When there is no circuit under ``key``, it has no per-cell gene table (traced by an older version), its
        ``groupby`` column is gone from ``.obs``, ``layer`` is not a layer, or (without ``groupby``) its traced
        cells are not in ``adata``.
    ValueError
        For ``ci`` outside ``(0, 1)``, ``n_bootstrap`` below 1, both ``layer`` and ``use_raw=True``,
        ``use_raw=True`` without ``.raw``, or gene names that are not usable symbols. Nothing is written to
        ``adata`` when an error is raised.
    """
    result = circuit_result(adata, key)
    genes = pd.DataFrame(circuit_genes(adata, key))
    _check_options(ci, n_bootstrap)
    check_writable(adata, copy, "rank_circuit_genes")
    settings = _settings(result, layer, use_raw)
    X, var, where = sentence_matrix(adata, settings.layer, settings.use_raw)
    symbols = gene_names(var, settings.gene_symbols, where=var_where(where))
    groupby = str(result.get("params", {}).get("groupby", "") or "")
    if groupby and groupby not in adata.obs.columns:
        msg = f"The circuit {key!r} was traced by groupby={groupby!r}, which is no longer a column of .obs."
        raise KeyError(msg)
    knockouts = _knockouts(result)
    groups = _groups(result, genes)
    traced = _traced_cells(result, genes, groups)
    rows = _member_rows(adata, groupby, traced)

    genes = genes.assign(group=genes["group"].astype(str), obs_name=genes["obs_name"].astype(str))
    de = _de(X, symbols, _labels(adata, groupby), groups, adata.uns.get("log1p")) if groupby else {}
    X = _loaded(X)
    symbol_index = pd.Index(symbols.astype(str))
    rng = np.random.default_rng(random_state)
    tables = []
    for g in groups:
        if len(traced[g]) == 0:
            continue
        table = _group_table(genes[genes["group"] == g], traced[g], int(n_bootstrap), float(ci), rng)
        column = symbol_index.get_indexer(table["gene"].astype(str))
        if len(rows[g]):
            means = np.asarray(X[rows[g]].mean(axis=0)).ravel()
            ranks = expression_ranks(means)
            table["expression_rank"] = np.where(column >= 0, ranks[column], np.nan)
        else:
            table["expression_rank"] = np.nan
        found = de.get(g)
        table["de_rank"] = found["de_rank"].reindex(table["gene"]).to_numpy() if found is not None else np.nan
        table["de_score"] = found["de_score"].reindex(table["gene"]).to_numpy() if found is not None else np.nan
        tables.append(table.assign(group=g))
    ranking = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=RANKING_COLUMNS)
    ranking = _finish(ranking, knockouts, groups)

    adata = adata.copy() if copy else adata
    stored = dict(circuit_result(adata, key))
    stored[key_added] = {
        "table": ranking,
        "params": {
            "n_bootstrap": int(n_bootstrap),
            "ci": float(ci),
            "random_state": int(random_state),
            "layer": settings.layer or "",
            "use_raw": encode_optional_bool(settings.use_raw),
            "gene_symbols": settings.gene_symbols or "",
            "expression": where,
            "groupby": groupby,
            "groups": np.asarray([g for g in groups if len(traced[g])], dtype=str),
            "n_cells": np.asarray([len(traced[g]) for g in groups if len(traced[g])], dtype=np.int64),
            "knockout": knockouts is not None,
        },
    }
    store_circuit(adata, key, stored)
    return adata if copy else None


def _finish(ranking: pd.DataFrame, knockouts: pd.DataFrame | None, groups: list[str]) -> pd.DataFrame:
    """Knockouts and marker sets added, rows sorted by influence within the groups' order, ``rank`` numbered."""
    if knockouts is not None and len(ranking):
        ranking = ranking.merge(knockouts, on=["group", "gene"], how="left")
    else:
        ranking["knockout"] = np.nan
    ranking["marker_sets"] = _marker_sets(ranking["gene"].to_numpy())
    ranking["is_marker"] = ranking["marker_sets"] != ""
    order = pd.Categorical(ranking["group"], categories=groups, ordered=True)
    ranking = ranking.assign(_order=order.codes).sort_values(
        ["_order", "influence", "gene"], ascending=[True, False, True], kind="stable"
    )
    ranking["rank"] = ranking.groupby("_order").cumcount() + 1
    ranking = ranking[RANKING_COLUMNS].reset_index(drop=True)
    for column in ("group", "gene", "marker_sets"):
        ranking[column] = ranking[column].astype(str).astype(object)
    for column in ("knockout", "expression_rank", "de_rank", "de_score"):
        ranking[column] = ranking[column].astype(np.float64)
    return ranking.astype({"rank": np.int64, "is_marker": bool})
