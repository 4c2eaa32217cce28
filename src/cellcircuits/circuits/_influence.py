"""Graph math of attribution graphs: influence of nodes and edges, and the matrix helpers of pruning and paths.

Everything here is a pure function of an adjacency matrix ``A`` over nodes ``0..N-1`` with ``A[i, j]`` the direct
(signed) attribution of source node ``j`` to target node ``i``: rows are targets, columns are sources. Each node has a
kind (:class:`NodeKind`): a ``token`` (embedding) has no inputs, a ``feature`` has inputs and outputs, an ``error``
node has outputs only, and a ``target`` (a logit, or any quantity being explained) has inputs only. Targets carry
weights, e.g. the probabilities of the top logits, or a single target of weight 1.

The definitions follow the methods paper of circuit tracing (Ameisen et al. 2025, "Circuit Tracing: Revealing
Computational Graphs in Language Models", transformer-circuits.pub, appendix on graph pruning and the section on
attribution graph evaluation) and its reference implementation (``safety-research/circuit-tracer``,
``circuit_tracer/graph.py``); :func:`greedy_paths` follows the greedy path search of Dunefsky et al. 2024
("Transcoders find interpretable LLM feature circuits"). Where this module departs from the reference
implementation, the function's notes say so.

Matrices may be dense (:class:`numpy.ndarray`, or a :class:`torch.Tensor`, read on the CPU) or :mod:`scipy.sparse`;
results are NumPy arrays, and matrix-valued results keep the input's layout (dense, or sparse CSR). The graph must be
a DAG.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import scipy.sparse.linalg as spla

from .._compat import is_sparse
from ._kinds import NodeKind

if TYPE_CHECKING:
    from collections.abc import Sequence

Matrix = Any
"""A square matrix: a NumPy array, a torch tensor or a SciPy sparse matrix/array."""
Method = Literal["series", "solve"]


# --------------------------------------------------------------------------------------------------------------------
# influence


def normalize_matrix(A: Matrix) -> np.ndarray | sp.csr_array:
    """Absolute attributions, each row divided by its sum, so a node's incoming weights sum to 1.

    Parameters
    ----------
    A
        ``(N, N)`` adjacency matrix, ``A[i, j]`` the attribution of source ``j`` to target ``i``.

    Returns
    -------
    ``B`` with ``B[i, j] = |A[i, j]| / sum_k |A[i, k]|``, laid out like ``A`` (dense, or sparse CSR). A row summing
    to 0 (a node without inputs) stays 0.
    """
    M = _as_matrix(A)
    if sp.issparse(M):
        B = abs(M)
        sums = np.asarray(B.sum(axis=1)).ravel()
        scale = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
        return sp.csr_array(sp.diags_array(scale.astype(B.dtype)) @ B)
    B = np.abs(M)
    sums = B.sum(axis=1, keepdims=True)
    # a zero row is all zeros already, so leaving it undivided keeps it 0
    np.divide(B, sums, out=B, where=sums > 0)
    return B


def node_influence(
    A: Matrix, target_weights: np.ndarray | Sequence[float], *, method: Method = "series", max_iter: int | None = None
) -> np.ndarray:
    """Total influence of every node on the targets, through paths of every length.

    With ``B`` the normalised matrix (:func:`normalize_matrix`) and ``w`` the target weights, the influence is
    ``w^T (B + B^2 + B^3 + ...) = w^T ((I - B)^-1 - I)``: node ``j``'s influence sums, over every path from ``j`` to a
    target ``t``, ``w_t`` times the product of the normalised weights along the path. A target's own weight is not
    part of its influence.

    Parameters
    ----------
    A
        ``(N, N)`` adjacency matrix of a DAG.
    target_weights
        ``(N,)`` weight of each node as a target (0 for non-targets).
    method
        ``"series"`` sums ``w^T B^k`` until the term is exactly zero (``B`` of a DAG is nilpotent, and the terms are
        non-negative, so nothing cancels); it takes as many matrix-vector products as the longest path has edges, so
        it suits layered graphs. ``"solve"`` solves ``(I - B)^T y = w`` once (in float64) and returns ``y - w``, up
        to rounding (negative rounding is clipped to 0).
    max_iter
        Most terms of the series (default ``N``: a DAG's longest path has ``N - 1`` edges).

    Returns
    -------
    ``(N,)`` non-negative influences.

    Raises
    ------
    RuntimeError
        The series did not end within ``max_iter`` terms, which means the graph has a cycle.
    """
    M = _as_matrix(A)
    w = _weight_vector(target_weights, M.shape[0])
    return _influence(normalize_matrix(M), w, method=method, max_iter=max_iter)


def edge_influence(
    A: Matrix, target_weights: np.ndarray | Sequence[float], *, method: Method = "series"
) -> np.ndarray | sp.csr_array:
    """Influence of every edge on the targets.

    The edge ``j -> i`` carries the share ``B[i, j]`` of everything node ``i`` passes on, so its influence is
    ``B[i, j] * (influence_i + w_i)``: the normalised edge weight times the influence of its target node, counting a
    target's own weight. Summed over the edges into ``i`` it gives back ``influence_i + w_i``.

    Parameters
    ----------
    A
        ``(N, N)`` adjacency matrix of a DAG.
    target_weights
        ``(N,)`` weight of each node as a target.
    method
        How node influence is computed (:func:`node_influence`).

    Returns
    -------
    ``(N, N)`` non-negative edge influences, laid out like ``A`` (dense, or sparse CSR).
    """
    M = _as_matrix(A)
    w = _weight_vector(target_weights, M.shape[0])
    B = normalize_matrix(M)
    return _edge_scores(B, _influence(B, w, method=method) + w)


# --------------------------------------------------------------------------------------------------------------------
# helpers


def _as_matrix(A: Matrix) -> np.ndarray | sp.csr_array:
    """``A`` as a float NumPy array or sparse CSR array, checked square and finite."""
    if sp.issparse(A):
        M = sp.csr_array(A, copy=True)
        if M.dtype not in (np.float32, np.float64):
            M = M.astype(np.float64)
        M.eliminate_zeros()  # stored zeros are not edges
        values = M.data
    else:
        if hasattr(A, "detach"):  # a torch tensor; bf16/f16/int do not convert to NumPy losslessly, float64 does
            A = A.detach().cpu()
            A = A.numpy() if str(A.dtype) in ("torch.float32", "torch.float64") else A.double().numpy()
        M = np.asarray(A)
        if M.dtype not in (np.float32, np.float64):
            M = M.astype(np.float64)
        values = M
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        msg = f"the adjacency matrix must be square, got shape {M.shape}"
        raise ValueError(msg)
    if not np.isfinite(values).all():
        msg = "the adjacency matrix has NaN or infinite entries"
        raise ValueError(msg)
    return M


def _as_kinds(kinds: np.ndarray | Sequence[int] | Sequence[str], n: int) -> np.ndarray:
    """``kinds`` as an ``(n,)`` array of :class:`NodeKind` codes."""
    if hasattr(kinds, "detach"):
        kinds = kinds.detach().cpu().numpy()
    arr = np.asarray(kinds)
    if arr.shape != (n,):
        msg = f"kinds must have one entry per node ({n}), got shape {arr.shape}"
        raise ValueError(msg)
    return NodeKind.codes(arr)


def _weight_vector(weights: np.ndarray | Sequence[float], n: int) -> np.ndarray:
    """``(n,)`` float64 weights, checked finite."""
    if hasattr(weights, "detach"):
        weights = weights.detach().cpu().double().numpy()
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        msg = f"target_weights must have one entry per node ({n}), got shape {w.shape}"
        raise ValueError(msg)
    if not np.isfinite(w).all():
        msg = "target_weights has NaN or infinite entries"
        raise ValueError(msg)
    return w


def _target_vector(weights: np.ndarray | Sequence[float] | None, kinds: np.ndarray) -> np.ndarray:
    """``(N,)`` non-negative target weights from ``None``, ``(n_targets,)`` or ``(N,)`` weights."""
    targets = np.flatnonzero(kinds == NodeKind.TARGET)
    n = len(kinds)
    if weights is None:
        if len(targets) == 0:
            msg = "the graph has no target node (kind 'target') to attribute to"
            raise ValueError(msg)
        w = np.zeros(n)
        w[targets] = 1.0 / len(targets)
        return w
    if hasattr(weights, "detach"):
        weights = weights.detach().cpu().double().numpy()
    given = np.asarray(weights, dtype=np.float64).ravel()
    if given.shape == (n,):
        w = given.copy()
    elif given.shape == (len(targets),):
        w = np.zeros(n)
        w[targets] = given
    else:
        msg = f"target_weights must have one entry per node ({n}) or per target ({len(targets)}), got {given.shape}"
        raise ValueError(msg)
    if not np.isfinite(w).all() or (w < 0).any():
        msg = "target_weights must be finite and non-negative"
        raise ValueError(msg)
    return w


def _node_mask(mask: np.ndarray | None, n: int) -> np.ndarray:
    """``(n,)`` bool node mask, all True by default."""
    if mask is None:
        return np.ones(n, dtype=bool)
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    keep = np.asarray(mask, dtype=bool)
    if keep.shape != (n,):
        msg = f"node_mask must have one entry per node ({n}), got shape {keep.shape}"
        raise ValueError(msg)
    return keep


def _influence(
    B: np.ndarray | sp.csr_array, w: np.ndarray, *, method: Method = "series", max_iter: int | None = None
) -> np.ndarray:
    """``w^T (B + B^2 + ...)`` for a normalised matrix ``B``."""
    n = B.shape[0]
    if method == "series":
        max_iter = n if max_iter is None else max_iter
        term = w.astype(B.dtype)
        total = np.zeros(n, dtype=B.dtype)
        for _ in range(max_iter):
            term = B.T @ term
            if not term.any():
                return total.astype(np.float64)
            total += term
        msg = f"influence did not converge in {max_iter} terms: the graph has a cycle (or max_iter is too small)"
        raise RuntimeError(msg)
    if method == "solve":
        if sp.issparse(B):
            lhs = sp.csc_array(sp.eye_array(n, dtype=np.float64) - B.astype(np.float64).T)
            y = spla.spsolve(lhs, w)
        else:
            y = scipy.linalg.solve(np.eye(n) - B.astype(np.float64).T, w)
        return np.maximum(y - w, 0.0)
    msg = f"method must be 'series' or 'solve', got {method!r}"
    raise ValueError(msg)


def _row_sums(B: np.ndarray | sp.csr_array) -> np.ndarray:
    return np.asarray(B.sum(axis=1), dtype=np.float64).ravel()


def _scale_rows(B: np.ndarray | sp.csr_array, s: np.ndarray) -> np.ndarray | sp.csr_array:
    if sp.issparse(B):
        return sp.csr_array(sp.diags_array(s.astype(B.dtype)) @ B)
    return B * s.astype(B.dtype)[:, None]


def _scale_columns(B: np.ndarray | sp.csr_array, s: np.ndarray) -> np.ndarray | sp.csr_array:
    if sp.issparse(B):
        return sp.csr_array(B @ sp.diags_array(s.astype(B.dtype)))
    return B * s.astype(B.dtype)[None, :]


def _edge_scores(B: np.ndarray | sp.csr_array, downstream: np.ndarray) -> np.ndarray | sp.csr_array:
    """``B[i, j] * downstream[i]``: edge influence given each node's influence plus its target weight."""
    return _scale_rows(B, downstream)


def _restrict(
    M: np.ndarray | sp.csr_array, node_mask: np.ndarray, edge_mask: Matrix | None = None
) -> np.ndarray | sp.csr_array:
    """``M`` with entries off ``edge_mask`` and rows and columns of dropped nodes set to 0."""
    if edge_mask is not None:
        E = sp.csr_array(edge_mask) if is_sparse(edge_mask) else _as_bool(edge_mask)
        if E.shape != M.shape:
            msg = f"edge_mask must have the shape of the matrix {M.shape}, got {E.shape}"
            raise ValueError(msg)
        # multiply() of a sparse operand keeps only the entries stored in both
        if is_sparse(M):
            M = sp.csr_array(M.multiply(E.astype(M.dtype)))
        elif is_sparse(E):
            M = sp.csr_array(E.astype(M.dtype).multiply(M))
        else:
            M = M * E
    if is_sparse(M):
        # filter the stored entries: works for bool masks too, which sparse products do not
        coo = sp.coo_array(M)
        on = node_mask[coo.row] & node_mask[coo.col]
        return sp.csr_array((coo.data[on], (coo.row[on], coo.col[on])), shape=M.shape)
    return M * node_mask[:, None] * node_mask[None, :]


def _as_bool(mask: Any) -> np.ndarray:
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask, dtype=bool)


def _pruned_normalized(
    M: np.ndarray | sp.csr_array, node_mask: np.ndarray, w: np.ndarray, method: Method
) -> tuple[np.ndarray | sp.csr_array, np.ndarray]:
    """Normalised matrix of the graph restricted to ``node_mask``, and its nodes' influence plus target weight."""
    B = normalize_matrix(_restrict(M, node_mask))
    wk = np.where(node_mask, w, 0.0)
    return B, _influence(B, wk, method=method) + wk


def _cutoff(scores: np.ndarray, threshold: float) -> float:
    """Smallest score among the fewest top positive scores whose sum reaches ``threshold`` of the positive total."""
    values = np.sort(scores[scores > 0], axis=None)[::-1]
    if len(values) == 0:
        return np.inf
    fraction = np.cumsum(values, dtype=np.float64) / values.sum(dtype=np.float64)
    # at threshold 1 rounding can leave the last fraction just below 1; clamping keeps every positive score
    return float(values[min(int(np.searchsorted(fraction, threshold)), len(values) - 1)])


def _keep_top(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Mask of the scores kept by :func:`_cutoff`."""
    return (scores >= _cutoff(scores, threshold)) & (scores > 0)


def _mask_at_least(scores: np.ndarray | sp.csr_array, cutoff: float) -> np.ndarray | sp.csr_array:
    """Bool mask of ``scores >= cutoff`` (``cutoff > 0``), laid out like ``scores``."""
    if is_sparse(scores):
        mask = scores.copy()
        mask.data = mask.data >= cutoff
        mask.eliminate_zeros()
        return sp.csr_array(mask, dtype=bool)
    return scores >= cutoff


def _reaches(edge_mask: np.ndarray | sp.csr_array, targets: np.ndarray) -> np.ndarray:
    """Nodes with a path of kept edges to one of ``targets``."""
    # row i of the mask lists the sources of node i, so a search from the targets along rows walks upstream
    graph = sp.csr_array(edge_mask, dtype=np.int8)
    seen = np.zeros(graph.shape[0], dtype=bool)
    for t in targets:
        if not seen[t]:
            seen[csgraph.breadth_first_order(graph, int(t), directed=True, return_predecessors=False)] = True
    return seen
