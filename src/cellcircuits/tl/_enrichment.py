"""Gene-set enrichment of each transcoder feature's gene map."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np
import pandas as pd
from scipy import sparse

from .._compat import model_layers_renamed
from .._keys import enrichment_uns, features_obsm, gene_map
from ..pp._sentences import gene_names
from ._enrichment_methods import Tested, fdr, run_gsea, run_ora, run_ulm

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    NetLike: TypeAlias = pd.DataFrame | Mapping[str, Sequence[str]] | str | Path | None

DEFAULT_NETS = ("markers_immune", "markers_heart", "go_bp_2023", "wikipathways_2023_human")
"""The shipped collections ``net=None`` combines (see :func:`cellcircuits.ds.gene_sets`)."""


# gene sets
def _without_attrs(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (a table of our own) without its ``attrs``, which pandas deep-copies on every operation."""
    df.attrs = {}
    return df


def as_net(net: NetLike) -> tuple[pd.DataFrame, str]:
    """A decoupler-style ``source``/``target``/``weight`` table with upper-case targets, and a name for it.

    ``net`` is a DataFrame with ``source`` and ``target`` columns, a dict of set name to genes, a path to a GMT file,
    the name of a shipped collection, or ``None`` for every shipped collection (term names then carry the
    collection's name, ``"markers_immune: CD14+ Monocyte"``).
    """
    from .. import ds

    if net is None:
        parts, names = [], []
        for name in DEFAULT_NETS:
            try:
                parts.append(_collection(name, prefixed=True))
            except ModuleNotFoundError as err:  # the pathway libraries come with an optional package
                warnings.warn(f"{err}; enrichment uses the other default collections", stacklevel=3)
                continue
            names.append(name)
        return pd.concat(parts, ignore_index=True), "+".join(names)
    if isinstance(net, pd.DataFrame):
        missing = {"source", "target"} - set(net.columns)
        if missing:
            msg = f"net needs columns 'source' and 'target' (decoupler layout); missing {sorted(missing)}"
            raise ValueError(msg)
        df, label = net, "DataFrame"
    elif isinstance(net, Mapping):
        df = pd.DataFrame([(s, g) for s, genes in net.items() for g in genes], columns=["source", "target"])
        label = "dict"
    elif isinstance(net, str | Path):
        path = Path(net)
        if path.suffix in (".gmt", ".gz") or path.exists():
            if not path.exists():
                msg = f"gene-set file {str(path)!r} not found"
                raise FileNotFoundError(msg)
            df = pd.DataFrame(
                [(s, g) for s, genes in ds.read_gmt(path).items() for g in genes], columns=["source", "target"]
            )
            label = str(path)
        else:
            return _collection(str(net), prefixed=False).copy(), str(net)
    else:
        msg = f"net must be a DataFrame, a dict, a GMT path, a shipped collection name or None; got {type(net)}"
        raise TypeError(msg)
    return _normalised(df, label), label


def _normalised(df: pd.DataFrame, label: str) -> pd.DataFrame:
    """``source``/``target``/``weight`` with stripped upper-case targets, no empty target, no duplicate pair."""
    df = pd.DataFrame(
        {
            "source": df["source"].astype(str).to_numpy(),
            "target": df["target"].astype(str).str.strip().str.upper().to_numpy(),
            "weight": df["weight"].to_numpy(dtype=float) if "weight" in df else 1.0,
        }
    )
    df = df[df["target"] != ""].drop_duplicates(["source", "target"], ignore_index=True)
    if df.empty:
        msg = f"the gene-set collection {label!r} is empty"
        raise ValueError(msg)
    return df


@cache
def _collection(name: str, *, prefixed: bool) -> pd.DataFrame:
    """A shipped or installed collection, normalised once per process (the enrichment of every layer reads it).

    ``prefixed``: term names carry the collection's name (``"markers_immune: CD14+ Monocyte"``). Callers must not
    change the table (:func:`as_net` hands out a copy or a concatenation).
    """
    from .. import ds

    df = _normalised(_without_attrs(ds.gene_sets(name, format="dataframe")), name)
    return df.assign(source=name + ": " + df["source"]) if prefixed else df


def membership(net: pd.DataFrame, universe: Sequence[str] | np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray]:
    """``(n_terms, n_universe)`` 0/1 matrix of which universe genes each term holds, and the term names."""
    column = {g: i for i, g in enumerate(universe)}
    kept = net[net["target"].isin(column)]
    terms, rows = np.unique(kept["source"].to_numpy(), return_inverse=True)
    cols = kept["target"].map(column).to_numpy()
    M = sparse.csr_matrix((np.ones(len(kept)), (rows, cols)), shape=(len(terms), len(universe)))
    M.data[:] = 1.0  # a gene listed twice in a term counts once
    return M, terms


# the tool
@model_layers_renamed
def feature_enrichment(
    adata: AnnData,
    net: NetLike = None,
    *,
    layers: int,
    side: Literal["in", "out"] = "in",
    method: Literal["ora", "ulm", "gsea"] = "ora",
    n_top_genes: int = 50,
    features: Sequence[int] | None = None,
    key: str = "transcoder",
    gene_symbols: str | None = None,
    min_size: int = 5,
    max_size: int = 500,
    max_pval: float = 0.05,
    permutations: int = 1000,
    seed: int = 0,
    threads: int = 1,
    key_added: str | None = None,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Gene-set enrichment of every transcoder feature's gene map.

    Each feature's map over genes (:func:`cellcircuits.tl.transcode`: ``side="in"``, the genes whose tokens activate
    it; ``side="out"``, the genes whose tokens it promotes) is tested against every gene set. The universe is the
    genes that both the model and the gene sets know (for ``side="in"``, the genes the model saw), symbols upper-cased
    on both sides; sets are cut to the universe and kept when ``min_size <= size <= max_size``. Every method tests
    one side, enrichment among the genes with high map values (a term the feature avoids is not an enrichment);
    p-values are Benjamini-Hochberg corrected across all features and terms together.

    Parameters
    ----------
    adata
        Annotated data matrix with transcoder gene maps.
    net
        Gene sets: a decoupler-style DataFrame (``source``, ``target``, optional ``weight``), a dict of set name to
        genes, a GMT path, the name of a collection shipped with the package (:func:`cellcircuits.ds.gene_sets`), or
        ``None`` for every shipped collection (immune and heart markers, GO Biological Process 2023,
        WikiPathways 2023 Human).
    layers
        Model layer whose features are tested.
    side
        ``"in"``: the input map ``.varm[f"{key}_L{layers}_in"]``; ``"out"``: the output map.
    method
        ``"ora"``: over-representation (one-sided hypergeometric test, as ``gseapy.enrich``) of each feature's
        ``n_top_genes`` highest genes with a positive value; ``"ulm"``: decoupler's univariate linear model of the
        whole map on set membership (its two-sided p-value made one-sided); ``"gsea"``: gseapy's pre-ranked GSEA
        (slow: one permutation test per feature, best with ``features``).
    n_top_genes
        Genes per feature for ``"ora"``.
    features
        Feature indices to test; default every live feature (one that fires in some cell,
        ``.obsm[f"X_{key}_L{layers}"]``, or has a non-zero map when that matrix is absent).
    key
        The ``key_added`` of :func:`cellcircuits.tl.transcode`.
    gene_symbols
        Column of ``.var`` with gene symbols, when ``var_names`` are not symbols.
    min_size, max_size
        Sizes (within the universe) of the sets that are tested.
    max_pval
        Term-feature pairs kept in ``results``: nominal p-value at most this.
    permutations, seed, threads
        For ``"gsea"``: permutations per feature, random seed, gseapy threads.
    key_added
        Key in ``.uns``; default ``f"{key}_L{layers}_{side}_enrichment"``.
    progress
        Show a progress bar (``"gsea"``).
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets the following fields:

    ``.uns[key_added]["best"]`` : :class:`pandas.DataFrame`
        One row per tested feature: ``feature``, ``term`` (the lowest p-value; ties by score), ``score`` (odds
        ratio, ULM t-value or NES), ``pval``, ``fdr``, ``n_overlap`` and ``genes`` (``"ora"``: the overlapping genes,
        ``;``-separated; else the term's genes highest in the map).
    ``.uns[key_added]["results"]`` : :class:`pandas.DataFrame`
        The same columns for every feature-term pair with ``pval <= max_pval``, by p-value.
    ``.uns[key_added]["params"]`` : :class:`dict`
        ``key``, ``layer`` (the model layer), ``side``, ``method``, ``net``, ``n_top_genes``, ``universe_size``,
        ``n_terms``, ``n_features``, ``n_tests`` and the size limits.

    Raises
    ------
    KeyError
        When the gene map is absent.
    ValueError
        For an empty gene-set collection, no gene shared by the model and the sets, no set of a testable size, or
        a bad ``method``, ``side`` or ``n_top_genes``.

    Examples
    --------
    >>> cc.tl.feature_enrichment(adata, layers=2)  # doctest: +SKIP
    >>> adata.uns["transcoder_L2_in_enrichment"]["best"].query("fdr < 0.05")  # doctest: +SKIP
    """
    _check_options(method, side, n_top_genes)
    maps = gene_map(adata, key, layers, side)
    net_df, net_label = as_net(net)
    keep, universe = gene_universe(adata, net_df, net_label, key=key, side=side, gene_symbols=gene_symbols)
    members, terms = sized_sets(net_df, net_label, universe, min_size=min_size, max_size=max_size)
    tested_index = tested_features(adata, maps, key, layers, features)
    V = maps[keep][:, tested_index].T  # (n_features, n_universe)
    if method == "ora":
        tested = run_ora(V, members, terms, n_top_genes=n_top_genes)
    elif method == "ulm":
        tested = run_ulm(V, net_df, universe, members, terms, min_size=min_size)
    else:
        tested = run_gsea(
            V, net_df, universe, members, terms, min_size=min_size, max_size=max_size, permutations=permutations,
            seed=seed, threads=threads, progress=progress,
        )  # fmt: skip
    best, results = result_tables(tested, V, universe, tested_index, max_pval=max_pval)

    adata = adata.copy() if copy else adata
    adata.uns[key_added or enrichment_uns(key, layers, side)] = {
        "best": best,
        "results": results,
        "params": {
            "key": key,
            "layer": int(layers),
            "side": side,
            "method": method,
            "net": net_label,
            "n_top_genes": int(n_top_genes),
            "min_size": int(min_size),
            "max_size": int(max_size),
            "universe_size": len(universe),
            "n_terms": len(tested.terms),
            "n_features": len(tested_index),
            "n_tests": int(tested.pvals.size),
        },
    }
    return adata if copy else None


# inputs
def _check_options(method: str, side: str, n_top_genes: int) -> None:
    """Raise for an unknown ``method`` or ``side``, or fewer than one top gene."""
    if method not in ("ora", "ulm", "gsea"):
        msg = f"method must be 'ora', 'ulm' or 'gsea', got {method!r}"
        raise ValueError(msg)
    if side not in ("in", "out"):
        msg = f"side must be 'in' or 'out', got {side!r}"
        raise ValueError(msg)
    if n_top_genes < 1:
        msg = f"n_top_genes must be at least 1, got {n_top_genes}"
        raise ValueError(msg)


def tested_features(
    adata: AnnData, maps: np.ndarray, key: str, layer: int, features: Sequence[int] | None
) -> np.ndarray:
    """``features`` as indices, checked; default the live ones (firing in some cell, else a non-zero map)."""
    chosen: Sequence[int] | np.ndarray
    if features is None:
        obsm_key = features_obsm(key, layer)
        if obsm_key in adata.obsm:
            X = adata.obsm[obsm_key]
            live = np.asarray((X > 0).sum(0)).ravel() > 0
        else:
            live = np.abs(maps).sum(0) > 0
        chosen = np.flatnonzero(live)
    else:
        chosen = features
    index = np.asarray(chosen, dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= maps.shape[1]):
        msg = f"features must be in [0, {maps.shape[1]}); got {index.min()}..{index.max()}"
        raise ValueError(msg)
    return index


# universe and gene sets
def gene_universe(
    adata: AnnData, net: pd.DataFrame, net_label: str, *, key: str, side: str, gene_symbols: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """The var rows tested (a mask) and their symbols, the universe: genes both the model and the sets know.

    For ``side="in"`` the genes the model never saw (``.uns[key]["unseen_genes"]``) are left out; a symbol shared by
    several var rows keeps its first.
    """
    symbols = np.asarray(gene_names(adata.var, gene_symbols))
    seen = np.ones(len(symbols), dtype=bool)
    if side == "in":
        unseen = set(np.asarray(adata.uns.get(key, {}).get("unseen_genes", []), dtype=str))
        seen = ~pd.Index(symbols).isin(list(unseen))  # pandas hashes; np.isin sorts strings
    in_sets = pd.Index(symbols).isin(net["target"].unique()) & seen
    _, first = np.unique(symbols, return_index=True)
    keep = np.zeros(len(symbols), dtype=bool)
    keep[first] = True
    keep &= in_sets
    universe = symbols[keep]
    if len(universe) == 0:
        msg = (
            f"no gene is shared by the model's genes and the gene sets {net_label!r}; check that they are of the "
            "same organism and use symbols (gene_symbols= names a .var column of symbols)"
        )
        raise ValueError(msg)
    return keep, universe


def sized_sets(
    net: pd.DataFrame, net_label: str, universe: np.ndarray, *, min_size: int, max_size: int
) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Membership (:func:`membership`) and names of the terms with ``min_size`` to ``max_size`` universe genes."""
    M, terms = membership(net, universe)
    sizes = np.asarray(M.sum(1)).ravel()
    ok = (sizes >= min_size) & (sizes <= max_size)
    if not ok.any():
        msg = (
            f"no gene set of {net_label!r} has between {min_size} and {max_size} of the {len(universe)} genes the "
            "model and the sets share"
        )
        raise ValueError(msg)
    return M[ok], terms[ok]


# results
def result_tables(
    tested: Tested, maps: np.ndarray, universe: np.ndarray, features: np.ndarray, *, max_pval: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``best`` (each feature's lowest p-value, ties to the larger score) and ``results`` (``pval <= max_pval``).

    ``maps`` is ``(n_features, n_universe)``; p-values are FDR-corrected across all features and terms together.
    """
    adjusted = fdr(tested.pvals)
    n = len(features)
    if not n:
        empty = _pair_table(tested, adjusted, maps, universe, features, np.zeros(0, dtype=int), np.zeros(0, dtype=int))
        return empty, empty.reset_index(drop=True)
    best_cols = np.array([np.lexsort((-np.nan_to_num(tested.score[i]), tested.pvals[i]))[0] for i in range(n)])
    best = _pair_table(tested, adjusted, maps, universe, features, np.arange(n), best_cols)
    r, c = np.nonzero(tested.pvals <= max_pval)
    order = np.lexsort((-tested.score[r, c], tested.pvals[r, c]))
    results = _pair_table(tested, adjusted, maps, universe, features, r[order], c[order])
    return best, results.reset_index(drop=True)


def _pair_table(
    tested: Tested,
    adjusted: np.ndarray,
    maps: np.ndarray,
    universe: np.ndarray,
    features: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
) -> pd.DataFrame:
    """One row per feature-term pair ``(rows[k], cols[k])`` (indices into ``tested``)."""
    overlap = tested.overlap[rows, cols] if tested.overlap is not None else np.full(len(rows), -1)
    return pd.DataFrame(
        {
            "feature": features[rows],
            "term": tested.terms[cols].astype(str),
            "score": tested.score[rows, cols].astype(float),
            "pval": tested.pvals[rows, cols].astype(float),
            "fdr": adjusted[rows, cols].astype(float),
            "n_overlap": overlap,
            "genes": _pair_genes(tested, maps, universe, rows, cols),
        }
    )


def _pair_genes(
    tested: Tested, maps: np.ndarray, universe: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> list[str]:
    """Per pair, up to 20 of the term's genes (ORA: those among the feature's top genes), highest in the map first.

    Ties go to the gene earlier in ``universe``. All pairs at once: their gene lists are the rows of one sparse
    matrix (the terms' rows, times the features' top genes for ORA), sorted together.
    """
    if len(rows) == 0:
        return []
    genes = sparse.csr_matrix(tested.members[cols], dtype=np.float64)
    if tested.hits is not None:
        genes = sparse.csr_matrix(genes.multiply(tested.hits[rows]))
    genes.eliminate_zeros()
    genes.sort_indices()
    counts = np.diff(genes.indptr)
    pair = np.repeat(np.arange(len(rows)), counts)
    order = np.lexsort((genes.indices, -np.asarray(maps)[rows[pair], genes.indices], pair))
    rank = np.arange(len(order)) - np.repeat(genes.indptr[:-1], counts)  # place within the pair, after sorting
    top = order[rank < 20]
    names = universe[genes.indices[top]]
    bounds = np.cumsum(np.minimum(counts, 20))[:-1]
    return [";".join(part) for part in np.split(names, bounds)]
