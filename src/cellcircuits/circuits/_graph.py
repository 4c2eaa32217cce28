"""The attribution graph of one prompt: which sources, through which features, make up a target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from ._kinds import NodeKind
from ._prune import completeness_score, prune_graph, replacement_score
from ._select import AUTO, DEFAULT_BATCH_SIZE, DEFAULT_FEATURE_NODES, InfluenceTracker, select_features
from ._targets import FeatureTarget

if TYPE_CHECKING:
    from ._replacement import ReplacementModel
    from ._targets import Target


@dataclass(eq=False)
class Graph:
    """A pruned attribution graph of one prompt.

    ``nodes`` has one row per kept node: ``node`` (index into the replacement model's nodes; -1 for the target),
    ``kind``, ``layer``, ``position``, ``feature``, ``activation``, ``value`` (a feature's pre-activation, the target's
    value), ``influence`` (on the target, through all paths of the whole graph) and ``effect`` (signed: the part of
    the target's value that flows from the node, through the direct edge and through features). ``edges`` has
    ``source`` and ``target`` (row numbers of ``nodes``), ``weight`` (direct attribution), ``via`` (the first attention
    head the edge crosses, ``"residual"`` or ``"skip"``) and ``via_share`` (that part's share of the edge's absolute
    split). ``tokens`` has every input token of the prompt, pruned or not: ``position``, ``influence`` and ``effect``
    in the whole graph.
    """

    nodes: pd.DataFrame
    edges: pd.DataFrame
    target_value: float
    scores: dict[str, float]
    """``replacement`` and ``completeness`` of the whole graph, and of the pruned one (``*_pruned``)."""
    tokens: pd.DataFrame


def compact_matrix(
    rm: ReplacementModel, selected: np.ndarray, tracker: InfluenceTracker
) -> tuple[sparse.csr_array, np.ndarray]:
    """The square adjacency matrix over ``[target, selected features, tokens, errors]`` and each row's node index.

    Features that were not selected are folded into the error node of their layer and position: with the error,
    they are the part of that MLP output the graph does not resolve into its features. Only the target and the
    selected features have inputs, so the matrix is kept sparse: ``(1 + S) x N`` values, not ``N x N``. The folding
    runs where the rows are kept (:class:`~cellcircuits.circuits._select.RowStore`); only the compact
    ``(1 + S) x (1 + S + tokens + errors)`` block moves to the host.
    """
    nodes = rm.nodes
    tokens = np.arange(nodes.token_slice.start, nodes.token_slice.stop)
    errors = np.concatenate([np.arange(s.start, s.stop) for s in nodes.error_slices.values()])
    order = np.concatenate([[-1], selected, tokens, errors]).astype(np.int64)
    column = np.full(len(nodes), -1, dtype=np.int64)
    column[order[1:]] = np.arange(1, len(order))
    unselected = np.flatnonzero((nodes.kind == "feature") & (column < 0))
    layer, position = np.asarray(nodes.layer, dtype=np.int64), np.asarray(nodes.position, dtype=np.int64)
    errors_at = np.full((layer.max(initial=0) + 1, position.max(initial=0) + 1), -1, dtype=np.int64)
    errors_at[layer[errors], position[errors]] = column[errors]  # each (layer, position)'s error column
    column[unselected] = errors_at[layer[unselected], position[unselected]]
    if (column[unselected] < 0).any():
        msg = "a feature has no error node at its layer and position"
        raise RuntimeError(msg)
    block = tracker.fold(torch.as_tensor(column), len(order))
    A = sparse.vstack([sparse.csr_array(block), sparse.csr_array((len(order) - len(block), len(order)))])
    return sparse.csr_array(A), order


def total_effect(A: np.ndarray, values: np.ndarray, n_rows: int) -> np.ndarray:
    """Signed part of the target (row 0) flowing from each node, through direct edges and through feature rows.

    A feature passes on each source's share of its pre-activation (``A[i, j] / values[i]``) of the effect it has
    itself, as an active feature's activation follows its pre-activation. ``A`` needs only its first ``n_rows``
    rows (the target and the features).
    """
    scale = np.where(np.abs(values[1:n_rows]) > 1e-12, values[1:n_rows], np.inf)
    shares = A[1:n_rows] / scale[:, None]  # the features' rows as shares of their values
    effect = np.array(A[0], dtype=np.float64)
    frontier = effect.copy()
    for _ in range(n_rows):
        frontier = frontier[1:n_rows] @ shares
        if not np.any(np.abs(frontier) > 1e-15):
            break
        effect += frontier
    return effect


def attribution_graph(
    rm: ReplacementModel,
    target: Target,
    *,
    max_feature_nodes: int = DEFAULT_FEATURE_NODES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    via_heads: bool = True,
    memory_budget: int | str | None = AUTO,
) -> Graph:
    """The pruned attribution graph of a target in one prompt's replacement model.

    Parameters
    ----------
    rm
        The prompt's replacement model (:meth:`~cellcircuits.circuits.ReplacementModel.record`).
    target
        A logit target (e.g. a cell-type label's distinguishing token) or a feature's pre-activation.
    max_feature_nodes
        Features given attribution rows, picked by estimated influence (:func:`select_features`).
    batch_size
        Most targets per backward pass; memory grows with it. Features are also selected in rounds of at most
        ``batch_size`` (an eighth of ``max_feature_nodes``, at least 32), the influence estimate updated after each.
    node_threshold, edge_threshold
        Fractions of influence kept by pruning (:func:`cellcircuits.circuits.prune_graph`), in ``(0, 1]``.
    via_heads
        Split each kept edge by the first attention head it crosses (batched backward passes, ``batch_size`` kept
        nodes with inputs each).
    memory_budget
        Bytes of attribution rows kept on the model's device (an int, or a size such as ``"8GB"``); rows past it are
        kept in host memory. ``"auto"``: on a GPU, up to half its free memory; ``None``: all on the device.

    Returns
    -------
    The pruned graph with its scores.
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < value <= 1:
            msg = f"{name} must be in (0, 1], got {value!r}"
            raise ValueError(msg)
    attribution = rm.attribute([target], batch_size=1)
    target_row = attribution.matrix[0].numpy().astype(np.float64)
    selected, tracker = select_features(
        rm, target_row, max_feature_nodes=max_feature_nodes, batch_size=batch_size, memory_budget=memory_budget
    )
    A, order = compact_matrix(rm, selected, tracker)
    n_rows = 1 + len(selected)
    # folding keeps each row's total, so the compact rows give the features' summed attributions
    row_sums = np.asarray(A[1:n_rows].sum(1)).ravel()
    nodes = rm.nodes
    kind = np.array([NodeKind.TARGET.tag, *nodes.kind[order[1:]]], dtype=object)
    codes = NodeKind.codes(kind)

    pruned = prune_graph(A, codes, None, node_threshold, edge_threshold)
    scores = {
        "replacement": replacement_score(A, codes),
        "completeness": completeness_score(A, codes),
        "replacement_pruned": replacement_score(A, codes, node_mask=pruned.node_mask, edge_mask=pruned.edge_mask),
        "completeness_pruned": completeness_score(A, codes, node_mask=pruned.node_mask, edge_mask=pruned.edge_mask),
    }
    values = np.concatenate([[float(attribution.values[0])], row_sums + _biases(rm, selected)])
    values = np.concatenate([values, np.full(len(order) - n_rows, np.nan)])
    effect = total_effect(A[:n_rows].toarray(), values, n_rows)

    keep = np.flatnonzero(pruned.node_mask)
    # isolated tokens say nothing about this target: keep a token only when a kept edge leaves it
    edge_mask = sparse.csr_array(pruned.edge_mask)
    has_edge = (np.asarray(edge_mask.sum(0)).ravel() > 0) | (np.asarray(edge_mask.sum(1)).ravel() > 0)
    keep = keep[(kind[keep] != "token") | has_edge[keep]]
    src_node = order[keep]
    node_table = pd.DataFrame(
        {
            "node": src_node,
            "kind": kind[keep].astype(str),
            "layer": np.where(kind[keep] == "target", rm.n_layers, nodes.layer[np.maximum(src_node, 0)]),
            "position": np.where(kind[keep] == "target", int(target.position), nodes.position[np.maximum(src_node, 0)]),
            "feature": np.where(kind[keep] == "feature", nodes.feature[np.maximum(src_node, 0)], -1),
            "activation": np.where(kind[keep] == "feature", nodes.activation[np.maximum(src_node, 0)], np.nan),
            "value": values[keep],
            "influence": np.where(kind[keep] == "target", 1.0, pruned.node_influence[keep]),
            "effect": np.where(kind[keep] == "target", values[0], effect[keep]),
        }
    )
    tgt, src = edge_mask[keep][:, keep].nonzero()
    edges = pd.DataFrame(
        {
            "source": src,
            "target": tgt,
            "weight": np.asarray(A[keep[tgt], keep[src]]).ravel(),
            "via": "",
            "via_share": np.nan,
        }
    )
    if via_heads and len(edges):
        _split_edges(rm, target, node_table, edges, order, keep, batch_size)
    is_token = np.flatnonzero(kind == "token")
    tokens = pd.DataFrame(
        {
            "position": nodes.position[order[is_token]],
            "influence": pruned.node_influence[is_token],
            "effect": effect[is_token],
        }
    )
    return Graph(node_table, edges, float(attribution.values[0]), scores, tokens)


def _biases(rm: ReplacementModel, selected: np.ndarray) -> np.ndarray:
    """Each selected feature's pre-activation minus its sources: the constant part of it."""
    if len(selected) == 0:
        return np.zeros(0)
    nodes = rm.nodes
    targets = [FeatureTarget(int(nodes.layer[i]), int(nodes.position[i]), int(nodes.feature[i])) for i in selected]
    # every source zeroed: by linearity, what the frozen model adds on its own
    zero = np.zeros(len(rm.nodes), dtype=np.float32)
    return rm.evaluate(targets, node_scale=zero).cpu().numpy().astype(np.float64)


def _split_edges(
    rm: ReplacementModel,
    target: Target,
    node_table: pd.DataFrame,
    edges: pd.DataFrame,
    order: np.ndarray,
    keep: np.ndarray,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> None:
    """Fill ``via`` and ``via_share`` of every edge: the head split of every node with kept inputs, batched."""
    nodes = rm.nodes
    groups = list(edges.groupby("target"))
    readouts: list[Target] = []
    sources = []
    for t_row, group in groups:
        node = int(order[keep[t_row]])
        if node < 0:
            readouts.append(target)
        else:
            readouts.append(FeatureTarget(int(nodes.layer[node]), int(nodes.position[node]), int(nodes.feature[node])))
        sources.append(order[keep[group["source"].to_numpy()]])
    splits = rm.edges_via_heads(readouts, sources, batch_size=batch_size)
    if not splits:
        return
    parts = np.abs(np.concatenate([split.values.numpy() for split in splits]))
    best = parts.argmax(1)
    at = edges.index.get_indexer(np.concatenate([group.index.to_numpy() for _, group in groups]))
    via, share = edges["via"].to_numpy(dtype=object).copy(), edges["via_share"].to_numpy(dtype=float).copy()
    via[at] = np.asarray(splits[0].columns, dtype=object)[best]
    share[at] = parts.max(1) / np.maximum(parts.sum(1), 1e-30)
    edges["via"], edges["via_share"] = via, share
