"""Gene-set enrichment of each transcoder feature's gene map."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse, stats

from ..pp._sentences import gene_names

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    NetLike = pd.DataFrame | Mapping[str, Sequence[str]] | str | Path | None

DEFAULT_NETS = ("markers_immune", "markers_heart", "go_bp_2023", "wikipathways_2023_human")
"""The shipped collections ``net=None`` combines (see :func:`cellcircuits.ds.gene_sets`)."""


# gene sets
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
                df = ds.gene_sets(name, format="dataframe")
            except ModuleNotFoundError as err:  # the pathway libraries come with an optional package
                warnings.warn(f"{err}; enrichment uses the other default collections", stacklevel=3)
                continue
            parts.append(df.assign(source=name + ": " + df["source"].astype(str)))
            names.append(name)
        df, label = pd.concat(parts, ignore_index=True), "+".join(names)
    elif isinstance(net, pd.DataFrame):
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
            df, label = ds.gene_sets(str(net), format="dataframe"), str(net)
    else:
        msg = f"net must be a DataFrame, a dict, a GMT path, a shipped collection name or None; got {type(net)}"
        raise TypeError(msg)
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
    return df, label


def membership(net: pd.DataFrame, universe: Sequence[str]) -> tuple[sparse.csr_matrix, np.ndarray]:
    """``(n_terms, n_universe)`` 0/1 matrix of which universe genes each term holds, and the term names."""
    column = {g: i for i, g in enumerate(universe)}
    kept = net[net["target"].isin(column)]
    terms, rows = np.unique(kept["source"].to_numpy(), return_inverse=True)
    cols = kept["target"].map(column).to_numpy()
    M = sparse.csr_matrix((np.ones(len(kept)), (rows, cols)), shape=(len(terms), len(universe)))
    M.data[:] = 1.0  # a gene listed twice in a term counts once
    return M, terms


# statistics
def top_gene_mask(values: np.ndarray, n_top: int) -> sparse.csr_matrix:
    """``(n_features, n_genes)`` 0/1: per row of ``values``, its ``n_top`` largest positive entries (ties by order)."""
    n_top = min(n_top, values.shape[1])
    top = np.argsort(-values, axis=1, kind="stable")[:, :n_top]
    rows = np.repeat(np.arange(values.shape[0]), n_top)
    keep = np.take_along_axis(values, top, axis=1).ravel() > 0
    return sparse.csr_matrix(
        (np.ones(int(keep.sum())), (rows[keep], top.ravel()[keep])), shape=values.shape, dtype=np.float64
    )


def ora(query: sparse.csr_matrix, terms: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over-representation of every term in every query gene set: the one-sided hypergeometric test.

    The same test as ``gseapy.enrich`` with a background and ``decoupler.mt.query_set`` (Fisher's exact test,
    ``alternative="greater"``), for all query sets at once: the overlaps come from one sparse product, the p-values
    from ``scipy.stats.hypergeom``.

    Parameters
    ----------
    query
        ``(n_queries, n_universe)`` 0/1, e.g. each feature's top genes.
    terms
        ``(n_terms, n_universe)`` 0/1 term membership.

    Returns
    -------
    ``(n_queries, n_terms)`` overlaps, p-values and odds ratios (Haldane-Anscombe corrected, as gseapy's).
    """
    n_universe = query.shape[1]
    x = np.asarray((query @ terms.T).todense())
    k = np.asarray(query.sum(1)).reshape(-1, 1)  # query sizes
    m = np.asarray(terms.sum(1)).reshape(1, -1)  # term sizes
    pvals = stats.hypergeom.sf(x - 1, n_universe, m, k)
    pvals = np.where(x > 0, pvals, 1.0)  # an empty overlap is never over-represented
    odds = ((x + 0.5) * (n_universe - m - k + x + 0.5)) / ((m - x + 0.5) * (k - x + 0.5))
    return x.astype(np.int64), np.clip(pvals, 0.0, 1.0), odds


def fdr(pvals: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values over every entry of ``pvals`` at once (any shape)."""
    flat = np.asarray(pvals, dtype=float).ravel()
    if flat.size == 0:
        return np.asarray(pvals, dtype=float)
    return stats.false_discovery_control(flat, method="bh").reshape(np.shape(pvals))


def ulm(values: np.ndarray, net: pd.DataFrame, universe: Sequence[str], min_size: int) -> tuple[np.ndarray, ...]:
    """Univariate linear model (decoupler) of each row of ``values`` (genes in ``universe``) on each term.

    A row that is constant over the universe has no slope to test: score 0, p-value 1.
    """
    import decoupler as dc

    rows = [str(i) for i in range(len(values))]
    varies = np.ptp(values, axis=1) > 0 if values.size else np.zeros(len(values), dtype=bool)
    data = pd.DataFrame(values[varies], index=np.asarray(rows)[varies], columns=list(universe))
    net = net[net["target"].isin(set(universe))]
    if not varies.any():
        names = np.asarray(sorted(net["source"].unique()))
        return np.zeros((len(rows), len(names))), np.ones((len(rows), len(names))), names
    # empty=False: a gene at 0 in every tested row stays in the universe (decoupler would drop it)
    es, pv = dc.mt.ulm(data, net, tmin=min_size, empty=False)
    es, pv = es.reindex(rows).fillna(0.0), pv.reindex(rows).fillna(1.0)  # a constant row has no slope
    return es.to_numpy(), pv.to_numpy(), np.asarray(es.columns)


def prerank(
    values: np.ndarray,
    net: pd.DataFrame,
    universe: Sequence[str],
    *,
    min_size: int,
    max_size: int,
    permutations: int,
    seed: int,
    threads: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pre-ranked GSEA (gseapy) of each row of ``values``: normalised enrichment scores and nominal p-values."""
    import gseapy
    from tqdm.auto import tqdm

    sets = net[net["target"].isin(set(universe))].groupby("source")["target"].apply(list).to_dict()
    names = np.array(sorted(sets))
    nes = np.zeros((len(values), len(names)))
    pvals = np.ones((len(values), len(names)))
    column = {t: j for j, t in enumerate(names)}
    order = np.random.default_rng(seed).permutation(len(universe))
    for i in tqdm(range(len(values)), desc="prerank", disable=not progress):
        # genes of equal value (most maps are 0 on most genes) in random order, not alphabetical: gene families
        # share a prefix, and a stable sort would line their members up in the tail
        rnk = pd.Series(values[i][order], index=np.asarray(universe)[order]).sort_values(ascending=False, kind="stable")
        res = gseapy.prerank(
            rnk, sets, min_size=min_size, max_size=max_size, permutation_num=permutations, seed=seed,
            threads=threads, no_plot=True, outdir=None, verbose=False,
        ).res2d  # fmt: skip
        cols = res["Term"].map(column).to_numpy()
        nes[i, cols] = res["NES"].astype(float).to_numpy()
        pvals[i, cols] = res["NOM p-val"].astype(float).to_numpy()
    return nes, pvals, names


def one_sided(score: np.ndarray, pvals: np.ndarray, method: str) -> np.ndarray:
    """P-values of enrichment among the genes that activate a feature (high map values), as ORA tests.

    decoupler's ULM p-value is two-sided, so a term of genes where the feature is *least* active would count;
    halving it for a positive slope and taking ``1 - p/2`` for a negative one gives the one-sided t-test (a zero
    slope, or a row with nothing to test, keeps its p-value). GSEA's nominal p-value is already taken within the sign
    of the enrichment score, so a negative score gets p = 1.
    """
    if method == "ulm":
        return np.where(score > 0, pvals / 2, np.where(score < 0, 1 - pvals / 2, pvals))
    return np.where(score > 0, pvals, 1.0)


def _align(
    score: np.ndarray, pvals: np.ndarray, names: np.ndarray, M: sparse.csr_matrix, terms: np.ndarray
) -> tuple[np.ndarray, np.ndarray, sparse.csr_matrix, np.ndarray]:
    """Results of a method that names its own terms, cut to the terms of ``M`` it tested, in ``M``'s order."""
    column = {t: j for j, t in enumerate(names)}
    rows = np.array([j for j, t in enumerate(terms) if t in column], dtype=np.int64)
    cols = np.array([column[t] for t in terms[rows]], dtype=np.int64)
    return score[:, cols], pvals[:, cols], M[rows], terms[rows]


# AnnData
def gene_map(adata: AnnData, key: str, layer: int, side: str) -> np.ndarray:
    """The ``(n_vars, n_features)`` gene map :func:`cellcircuits.tl.transcode` wrote; clear error when absent."""
    varm_key = f"{key}_L{layer}_{side}"
    if varm_key not in adata.varm:
        msg = f".varm[{varm_key!r}] not found; run cellcircuits.tl.transcode(adata, model, transcoders) first."
        raise KeyError(msg)
    return np.asarray(adata.varm[varm_key], dtype=np.float64)


def feature_enrichment(
    adata: AnnData,
    net: NetLike = None,
    *,
    layer: int,
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
    layer
        Model layer whose features are tested.
    side
        ``"in"``: the input map ``.varm[f"{key}_L{layer}_in"]``; ``"out"``: the output map.
    method
        ``"ora"``: over-representation (one-sided hypergeometric test, as ``gseapy.enrich``) of each feature's
        ``n_top_genes`` highest genes with a positive value; ``"ulm"``: decoupler's univariate linear model of the
        whole map on set membership (its two-sided p-value made one-sided); ``"gsea"``: gseapy's pre-ranked GSEA
        (slow: one permutation test per feature, best with ``features``).
    n_top_genes
        Genes per feature for ``"ora"``.
    features
        Feature indices to test; default every live feature (one that fires in some cell,
        ``.obsm[f"X_{key}_L{layer}"]``, or has a non-zero map when that matrix is absent).
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
        Key in ``.uns``; default ``f"{key}_L{layer}_{side}_enrichment"``.
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
        ``key``, ``layer``, ``side``, ``method``, ``net``, ``n_top_genes``, ``universe_size``, ``n_terms``,
        ``n_features``, ``n_tests`` and the size limits.

    Raises
    ------
    KeyError
        When the gene map is absent.
    ValueError
        For an empty gene-set collection, no gene shared by the model and the sets, no set of a testable size, or
        a bad ``method``, ``side`` or ``n_top_genes``.

    Examples
    --------
    >>> cc.tl.feature_enrichment(adata, layer=2)  # doctest: +SKIP
    >>> adata.uns["transcoder_L2_in_enrichment"]["best"].query("fdr < 0.05")  # doctest: +SKIP
    """
    if method not in ("ora", "ulm", "gsea"):
        msg = f"method must be 'ora', 'ulm' or 'gsea', got {method!r}"
        raise ValueError(msg)
    if side not in ("in", "out"):
        msg = f"side must be 'in' or 'out', got {side!r}"
        raise ValueError(msg)
    if n_top_genes < 1:
        msg = f"n_top_genes must be at least 1, got {n_top_genes}"
        raise ValueError(msg)
    values = gene_map(adata, key, layer, side)
    net_df, net_label = as_net(net)

    symbols = np.asarray(gene_names(adata.var, gene_symbols))
    seen = np.ones(len(symbols), dtype=bool)
    if side == "in":
        unseen = set(np.asarray(adata.uns.get(key, {}).get("unseen_genes", []), dtype=str))
        seen = ~np.isin(symbols, list(unseen))
    # one column per universe gene (a symbol shared by several var rows keeps its first)
    in_sets = np.isin(symbols, net_df["target"].unique()) & seen
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
    M, terms = membership(net_df, universe)
    sizes = np.asarray(M.sum(1)).ravel()
    ok = (sizes >= min_size) & (sizes <= max_size)
    if not ok.any():
        msg = (
            f"no gene set of {net_label!r} has between {min_size} and {max_size} of the {len(universe)} genes the "
            "model and the sets share"
        )
        raise ValueError(msg)
    M, terms = M[ok], terms[ok]

    if features is None:
        obsm_key = f"X_{key}_L{layer}"
        if obsm_key in adata.obsm:
            X = adata.obsm[obsm_key]
            live = np.asarray((X > 0).sum(0)).ravel() > 0
        else:
            live = np.abs(values).sum(0) > 0
        features = np.flatnonzero(live)
    features = np.asarray(features, dtype=np.int64)
    if features.size and (features.min() < 0 or features.max() >= values.shape[1]):
        msg = f"features must be in [0, {values.shape[1]}); got {features.min()}..{features.max()}"
        raise ValueError(msg)
    V = values[keep][:, features].T  # (n_features, n_universe)

    overlap = None
    if method == "ora":
        query = top_gene_mask(V, n_top_genes)
        overlap, pvals, score = ora(query, M)
        hits = query
    elif method == "ulm":
        score, pvals, names = ulm(V, net_df, universe, min_size)
        score, pvals, M, terms = _align(score, pvals, names, M, terms)
        hits = None
    else:
        score, pvals, names = prerank(
            V, net_df, universe, min_size=min_size, max_size=max_size, permutations=permutations, seed=seed,
            threads=threads, progress=progress,
        )  # fmt: skip
        score, pvals, M, terms = _align(score, pvals, names, M, terms)
        hits = None
    if method != "ora":
        pvals = one_sided(score, pvals, method)
    adjusted = fdr(pvals)

    def table(rows: np.ndarray, cols: np.ndarray) -> pd.DataFrame:
        genes = []
        for i, j in zip(rows, cols, strict=True):
            members = M[j].indices
            if hits is not None:
                members = np.intersect1d(members, hits[i].indices)
            members = members[np.argsort(-V[i, members], kind="stable")]
            genes.append(";".join(universe[members[:20]]))
        return pd.DataFrame(
            {
                "feature": features[rows],
                "term": terms[cols].astype(str),
                "score": score[rows, cols].astype(float),
                "pval": pvals[rows, cols].astype(float),
                "fdr": adjusted[rows, cols].astype(float),
                "n_overlap": overlap[rows, cols] if overlap is not None else np.full(len(rows), -1),
                "genes": genes,
            }
        )

    n = len(features)
    if n:
        # lowest p-value per feature; ties go to the larger score
        best_cols = np.array([np.lexsort((-np.nan_to_num(score[i]), pvals[i]))[0] for i in range(n)])
        best = table(np.arange(n), best_cols)
        r, c = np.nonzero(pvals <= max_pval)
        order = np.lexsort((-score[r, c], pvals[r, c]))
        results = table(r[order], c[order])
    else:
        best = results = table(np.zeros(0, dtype=int), np.zeros(0, dtype=int))

    adata = adata.copy() if copy else adata
    key_added = key_added or f"{key}_L{layer}_{side}_enrichment"
    adata.uns[key_added] = {
        "best": best,
        "results": results.reset_index(drop=True),
        "params": {
            "key": key,
            "layer": int(layer),
            "side": side,
            "method": method,
            "net": net_label,
            "n_top_genes": int(n_top_genes),
            "min_size": int(min_size),
            "max_size": int(max_size),
            "universe_size": len(universe),
            "n_terms": len(terms),
            "n_features": n,
            "n_tests": int(pvals.size),
        },
    }
    return adata if copy else None
