"""Pruning attribution graphs by influence, and their replacement and completeness scores.

Definitions and conventions as in :mod:`cellcircuits.circuits._influence`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import scipy.sparse as sp

from .._compat import is_sparse
from ._influence import (
    Matrix,
    Method,
    _as_kinds,
    _as_matrix,
    _cutoff,
    _edge_scores,
    _influence,
    _keep_top,
    _mask_at_least,
    _node_mask,
    _pruned_normalized,
    _reaches,
    _restrict,
    _row_sums,
    _scale_columns,
    _target_vector,
    normalize_matrix,
)
from ._kinds import NodeKind

if TYPE_CHECKING:
    from collections.abc import Sequence


class PruneResult(NamedTuple):
    """What :func:`prune_graph` keeps, and the scores it ranked by."""

    node_mask: np.ndarray
    """``(N,)`` bool, the nodes kept."""
    edge_mask: np.ndarray | sp.csr_array
    """``(N, N)`` bool, laid out like ``A`` (dense, or sparse CSR), the edges kept; both ends of each are kept."""
    node_influence: np.ndarray
    """``(N,)`` influence of each node on the targets in the whole graph (:func:`node_influence`)."""
    edge_influence: np.ndarray | sp.csr_array
    """``(N, N)`` influence of each edge on the targets in the graph restricted to the nodes that passed the node
    threshold (:func:`edge_influence` of that graph), which is what edges are ranked by."""


# --------------------------------------------------------------------------------------------------------------------
# pruning


def prune_graph(
    A: Matrix,
    kinds: np.ndarray | Sequence[int] | Sequence[str],
    target_weights: np.ndarray | Sequence[float] | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    *,
    prune_errors: bool = True,
    method: Method = "series",
) -> PruneResult:
    """Keep the nodes and edges that carry most of the influence on the targets.

    1. Rank the prunable nodes (features, and error nodes when ``prune_errors``) by :func:`node_influence` and keep
       the fewest of the top ones whose influence reaches ``node_threshold`` of theirs in total. Token and target
       nodes are always kept, as in the paper and its reference implementation (which also prunes error nodes).
    2. Restrict the graph to the kept nodes, renormalise it, and rank its edges by :func:`edge_influence` in that
       graph; keep the fewest of the top edges whose influence reaches ``edge_threshold`` of the total.
    3. Drop every feature and error node left without a path of kept edges to a target, and the edges at dropped
       nodes. Tokens stay even when isolated (they spell the input).

    Ties at a cut-off are all kept, and a node or edge of zero influence is never kept by a threshold. So
    ``node_threshold = edge_threshold = 1`` keeps exactly the nodes and edges of nonzero influence (and the tokens and
    targets).

    Parameters
    ----------
    A
        ``(N, N)`` adjacency matrix of a DAG.
    kinds
        ``(N,)`` kind of each node: :class:`NodeKind` codes or the names ``"token"``, ``"feature"``, ``"error"``,
        ``"target"``.
    target_weights
        Non-negative weights of the targets: ``(N,)`` over all nodes, or ``(n_targets,)`` over the target nodes in
        index order; by default the targets share weight 1 equally.
    node_threshold
        Fraction of the prunable nodes' influence to keep, in ``(0, 1]``.
    edge_threshold
        Fraction of edge influence to keep, in ``(0, 1]``.
    prune_errors
        Rank and prune error nodes with the features; otherwise keep every error node through step 1.
    method
        How influence is computed (:func:`node_influence`).

    Returns
    -------
    The masks of kept nodes and edges, the node influence in the whole graph and the edge influence of step 2.

    Notes
    -----
    Two departures from the reference implementation: it ranks the node threshold over all nodes' influence (tokens
    included, though it keeps every token anyway), where here only the prunable nodes' influence counts; and it also
    drops features left without incoming edges, where here a feature whose inputs were all pruned stays (its
    unexplained input counts as error in :func:`replacement_score` and :func:`completeness_score` of the pruned
    graph). Edges are ranked in the node-pruned graph renormalised, as in the reference implementation.
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < value <= 1:
            msg = f"{name} must be in (0, 1] (a fraction of the total influence to keep), got {value!r}"
            raise ValueError(msg)
    M = _as_matrix(A)
    n = M.shape[0]
    k = _as_kinds(kinds, n)
    w = _target_vector(target_weights, k)

    influence = _influence(normalize_matrix(M), w, method=method)
    prunable = k == NodeKind.FEATURE
    if prune_errors:
        prunable |= k == NodeKind.ERROR
    node_mask = ~prunable
    node_mask[prunable] = _keep_top(influence[prunable], node_threshold)

    scores = _edge_scores(*_pruned_normalized(M, node_mask, w, method))
    edge_mask = _mask_at_least(scores, _cutoff(scores.data if is_sparse(scores) else scores, edge_threshold))

    # dropping a node without a path to a target cuts no other node's path, so one pass suffices
    node_mask &= _reaches(edge_mask, np.flatnonzero(k == NodeKind.TARGET)) | (k == NodeKind.TOKEN)
    return PruneResult(node_mask, _restrict(edge_mask, node_mask), influence, scores)


# --------------------------------------------------------------------------------------------------------------------
# scores


def replacement_score(
    A: Matrix,
    kinds: np.ndarray | Sequence[int] | Sequence[str],
    target_weights: np.ndarray | Sequence[float] | None = None,
    *,
    node_mask: np.ndarray | None = None,
    edge_mask: Matrix | None = None,
    method: Method = "series",
) -> float:
    """Fraction of the end-to-end influence on the targets that starts at tokens rather than at error nodes.

    ``sum_{token} influence / (sum_{token} influence + sum_{error} influence)`` with :func:`node_influence`. The
    paper describes it as the fraction of end-to-end graph paths, weighted by strength, that go from embedding nodes
    to the targets through features only, rather than starting at an error node.

    Parameters
    ----------
    A
        ``(N, N)`` adjacency matrix of a DAG.
    kinds
        ``(N,)`` kind of each node (:func:`prune_graph`).
    target_weights
        Target weights (:func:`prune_graph`).
    node_mask, edge_mask
        A pruned graph (:func:`prune_graph`): score the kept subgraph. Everything pruned counts as error: the
        tokens' influence is computed along kept edges through kept nodes only, with the normalisation of the whole
        graph (no renormalising, which would hide what was dropped), and divided by the token and error influence of
        the whole graph. With nothing pruned this is the score of the whole graph.
    method
        How influence is computed (:func:`node_influence`).

    Returns
    -------
    The score in ``[0, 1]``, or NaN when no token or error node influences the targets.
    """
    M = _as_matrix(A)
    k = _as_kinds(kinds, M.shape[0])
    w = _target_vector(target_weights, k)
    B = normalize_matrix(M)
    influence = _influence(B, w, method=method)
    token, error = k == NodeKind.TOKEN, k == NodeKind.ERROR
    total = influence[token].sum() + influence[error].sum()
    if total <= 0:
        return float("nan")
    if node_mask is None and edge_mask is None:
        return float(influence[token].sum() / total)
    keep = _node_mask(node_mask, M.shape[0])
    kept = _influence(_restrict(B, keep, edge_mask), np.where(keep, w, 0.0), method=method)
    return float(kept[token & keep].sum() / total)


def completeness_score(
    A: Matrix,
    kinds: np.ndarray | Sequence[int] | Sequence[str],
    target_weights: np.ndarray | Sequence[float] | None = None,
    *,
    node_mask: np.ndarray | None = None,
    edge_mask: Matrix | None = None,
    method: Method = "series",
) -> float:
    """Fraction of the nodes' input that comes from non-error nodes, weighted by each node's influence.

    Over the nodes with inputs (features and targets), ``sum_i (influence_i + w_i) c_i / sum_i (influence_i + w_i)``
    where ``c_i = sum_{j not error} B[i, j]`` is the share of node ``i``'s normalised absolute input coming from
    token and feature nodes, and ``influence_i + w_i`` is its influence on the targets counting a target's own weight.

    Parameters
    ----------
    A
        ``(N, N)`` adjacency matrix of a DAG.
    kinds
        ``(N,)`` kind of each node (:func:`prune_graph`).
    target_weights
        Target weights (:func:`prune_graph`).
    node_mask, edge_mask
        A pruned graph (:func:`prune_graph`): average over the kept nodes with inputs, with the weights and the
        normalisation of the whole graph, and count only input along kept edges from kept non-error nodes in ``c_i``:
        input from pruned nodes or along pruned edges counts as error.
    method
        How influence is computed (:func:`node_influence`).

    Returns
    -------
    The score in ``[0, 1]``, or NaN when no node with inputs has influence.

    Notes
    -----
    The paper defines the score as the fraction of input edges, weighted by the target node's influence on the
    output, that come from feature or embedding nodes rather than error nodes; nodes without inputs have no input
    edges, so they are left out of the average here. The reference implementation's ``compute_graph_scores``
    averages over all nodes, counting token and error nodes as complete (``c = 1``); its value is therefore higher,
    and never 0 when an error node has influence.
    """
    M = _as_matrix(A)
    n = M.shape[0]
    k = _as_kinds(kinds, n)
    w = _target_vector(target_weights, k)
    B = normalize_matrix(M)
    weight = _influence(B, w, method=method) + w
    rows = _row_sums(B) > 0
    keep = None if node_mask is None and edge_mask is None else _node_mask(node_mask, n)
    if keep is not None:
        rows &= keep
        B = _restrict(B, keep, edge_mask)
    # B restricted to non-error sources: scale the error columns by 0
    complete = _row_sums(_scale_columns(B, (k != NodeKind.ERROR).astype(B.dtype)))
    total = weight[rows].sum()
    if total <= 0:
        return float("nan")
    return float((weight[rows] * complete[rows]).sum() / total)
