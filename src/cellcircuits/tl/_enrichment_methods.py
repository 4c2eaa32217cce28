"""The enrichment tests of feature maps: over-representation, univariate linear model and pre-ranked GSEA.

Each runner tests every feature (a row of ``maps``, over the universe genes) against every gene set and gives
one-sided p-values: enrichment among the genes with high map values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse, stats

if TYPE_CHECKING:
    from collections.abc import Sequence


@dataclass(frozen=True)
class Tested:
    """One method's tests of every feature against every term it tested."""

    score: np.ndarray
    """``(n_features, n_terms)`` odds ratio, ULM t-value or NES."""
    pvals: np.ndarray
    """``(n_features, n_terms)`` one-sided p-values."""
    members: sparse.csr_matrix
    """``(n_terms, n_universe)`` 0/1 membership of the tested terms."""
    terms: np.ndarray
    """Names of the tested terms."""
    overlap: np.ndarray | None = None
    """``(n_features, n_terms)`` overlaps of the terms with the features' top genes (ORA only)."""
    hits: sparse.csr_matrix | None = None
    """``(n_features, n_universe)`` 0/1 top genes of each feature (ORA only)."""


# runners
def run_ora(maps: np.ndarray, members: sparse.csr_matrix, terms: np.ndarray, *, n_top_genes: int) -> Tested:
    """Over-representation of every term among each feature's ``n_top_genes`` highest genes (positive values)."""
    query = top_gene_mask(maps, n_top_genes)
    overlap, pvals, score = ora(query, members)
    return Tested(score=score, pvals=pvals, members=members, terms=terms, overlap=overlap, hits=query)


def run_ulm(
    maps: np.ndarray,
    net: pd.DataFrame,
    universe: np.ndarray,
    members: sparse.csr_matrix,
    terms: np.ndarray,
    *,
    min_size: int,
) -> Tested:
    """Univariate linear model (decoupler) of each feature's map on term membership, made one-sided."""
    score, pvals, names = ulm(maps, net, universe, min_size)
    score, pvals, members, terms = _align(score, pvals, names, members, terms)
    return Tested(score=score, pvals=one_sided(score, pvals, "ulm"), members=members, terms=terms)


def run_gsea(
    maps: np.ndarray,
    net: pd.DataFrame,
    universe: np.ndarray,
    members: sparse.csr_matrix,
    terms: np.ndarray,
    *,
    min_size: int,
    max_size: int,
    permutations: int,
    seed: int,
    threads: int,
    progress: bool,
) -> Tested:
    """Pre-ranked GSEA (gseapy) of each feature's map, positive enrichment only."""
    score, pvals, names = prerank(
        maps, net, universe, min_size=min_size, max_size=max_size, permutations=permutations, seed=seed,
        threads=threads, progress=progress,
    )  # fmt: skip
    score, pvals, members, terms = _align(score, pvals, names, members, terms)
    return Tested(score=score, pvals=one_sided(score, pvals, "gsea"), members=members, terms=terms)


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
    pvals = np.ones(x.shape)  # an empty overlap is never over-represented
    rows, cols = np.nonzero(x)
    pvals[rows, cols] = _hypergeom_sf(x[rows, cols], m[0, cols], k[rows, 0], n_universe)
    odds = ((x + 0.5) * (n_universe - m - k + x + 0.5)) / ((m - x + 0.5) * (k - x + 0.5))
    return x.astype(np.int64), np.clip(pvals, 0.0, 1.0), odds


def _hypergeom_sf(x: np.ndarray, m: np.ndarray, k: np.ndarray, n: int) -> np.ndarray:
    """``P(X >= x)`` for hypergeometric ``X`` (``k`` draws from ``n``, ``m`` marked), per entry.

    Computed once per distinct ``(x, m, k)``: overlaps, term sizes and query sizes repeat across the many pairs, and
    each of scipy's evaluations is costly.
    """
    x, m, k = (np.asarray(v, dtype=np.int64) for v in (x, m, k))
    if x.size == 0:
        return np.zeros(0)
    key = (x * (m.max() + 1) + m) * (k.max() + 1) + k
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return stats.hypergeom.sf(x[first] - 1, n, m[first], k[first])[inverse.ravel()]


def fdr(pvals: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values over every entry of ``pvals`` at once (any shape)."""
    flat = np.asarray(pvals, dtype=float).ravel()
    if flat.size == 0:
        return np.asarray(pvals, dtype=float)
    return stats.false_discovery_control(flat, method="bh").reshape(np.shape(pvals))


def ulm(
    values: np.ndarray, net: pd.DataFrame, universe: Sequence[str] | np.ndarray, min_size: int
) -> tuple[np.ndarray, ...]:
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
    universe: Sequence[str] | np.ndarray,
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
