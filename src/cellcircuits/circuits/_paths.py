"""The strongest source-to-target paths of an attribution graph (greedy search, Dunefsky et al. 2024).

Definitions and conventions as in :mod:`cellcircuits.circuits._influence`.
"""

from __future__ import annotations

import heapq
import itertools
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import scipy.sparse as sp

from .._compat import is_sparse
from ._influence import (
    Matrix,
    _as_kinds,
    _as_matrix,
    normalize_matrix,
)
from ._kinds import NodeKind

if TYPE_CHECKING:
    from collections.abc import Sequence


class Path(NamedTuple):
    """One source-to-target path of :func:`greedy_paths`."""

    nodes: list[int]
    """Node indices from the source (first) to the target (last)."""
    score: float
    """Product of the normalised absolute attributions along the path: its share of the target's influence."""
    sign: int
    """Product of the signs of the raw attributions along the path: +1 excites the target, -1 inhibits it."""


# --------------------------------------------------------------------------------------------------------------------
# paths


def greedy_paths(
    A: Matrix,
    kinds: np.ndarray | Sequence[int] | Sequence[str],
    target: int,
    k: int = 5,
    *,
    beam: int | None = None,
    max_length: int | None = None,
) -> list[Path]:
    """Top source-to-target paths into ``target``, found by a greedy (beam) search backwards from it.

    As in the greedy computational-path search of Dunefsky et al. (2024): start at the target and repeatedly extend
    the paths found so far by the strongest incoming edges of their first node. A path scores the product of the
    normalised absolute attributions (:func:`normalize_matrix`) along it, i.e. its share of the target's total
    influence: summed over all paths from a source this gives the source's :func:`node_influence` for a target of
    weight 1. Extending a path never raises its score, so a partial path that already scores no more than the
    ``k``-th best complete one is dropped.

    A path is complete when it reaches a token or error node, or any node without inputs. At each step every partial
    path is extended by the ``beam`` strongest incoming edges of its first node, and the ``beam`` best partial paths
    are kept. The search is exact when ``beam`` is at least the number of paths, and deterministic: ties are broken
    by node index.

    Parameters
    ----------
    A
        ``(N, N)`` adjacency matrix of a DAG.
    kinds
        ``(N,)`` kind of each node (:func:`prune_graph`).
    target
        Index of the node whose inputs are traced (usually a target node; any node works).
    k
        Number of paths to return.
    beam
        Partial paths kept, and incoming edges tried per path, at each step (default ``4 * k``).
    max_length
        Most edges on a path (default ``N - 1``).

    Returns
    -------
    At most ``k`` paths, best first (ties in order of their node lists).
    """
    M = _as_matrix(A)
    n = M.shape[0]
    kind = _as_kinds(kinds, n)
    if not 0 <= target < n:
        msg = f"target must be a node index in [0, {n}), got {target}"
        raise ValueError(msg)
    if k < 1:
        msg = f"k must be at least 1, got {k}"
        raise ValueError(msg)
    beam = 4 * k if beam is None else beam
    if beam < 1:
        msg = f"beam must be at least 1, got {beam}"
        raise ValueError(msg)
    max_length = n - 1 if max_length is None else max_length
    B = normalize_matrix(M)
    B_csr = B if is_sparse(B) else sp.csr_array(B)
    M_csr = M if is_sparse(M) else sp.csr_array(M)
    is_end = (kind == NodeKind.TOKEN) | (kind == NodeKind.ERROR) | (np.diff(B_csr.indptr) == 0)

    # paths are tuples from the target backwards; the score is the product of normalised weights
    frontier: list[tuple[float, tuple[int, ...]]] = [(1.0, (int(target),))]
    complete: list[tuple[float, tuple[int, ...]]] = []
    for _ in range(max_length):
        candidates = []
        for score, path in frontier:
            lo, hi = B_csr.indptr[path[-1]], B_csr.indptr[path[-1] + 1]
            sources, weights = B_csr.indices[lo:hi], B_csr.data[lo:hi]
            for i in np.lexsort((sources, -weights))[:beam]:
                candidates.append((score * float(weights[i]), (*path, int(sources[i]))))
        candidates.sort(key=lambda c: (-c[0], c[1]))
        frontier = []
        for cand in candidates:
            if is_end[cand[1][-1]]:
                complete.append(cand)
            elif len(frontier) < beam:
                frontier.append(cand)
        if len(complete) >= k:
            kth = heapq.nlargest(k, (s for s, _ in complete))[-1]
            frontier = [c for c in frontier if c[0] > kth]
        if not frontier:
            break

    best = sorted(((s, p[::-1]) for s, p in complete), key=lambda c: (-c[0], c[1]))[:k]
    return [Path(list(p), s, _path_sign(M_csr, p)) for s, p in best]


def _path_sign(M: sp.csr_array, path: tuple[int, ...]) -> int:
    """Sign of the product of the raw attributions along ``path`` (source first)."""
    sign = 1
    for src, dst in itertools.pairwise(path):
        sign *= 1 if M[dst, src] > 0 else -1
    return sign
