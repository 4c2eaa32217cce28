"""Layout of a circuit plot: a row per model layer, rows ordered against edge crossings, edges bent around nodes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

_SWEEPS = 8
_CLEARANCE = 0.35  # edges passing closer than this (in node spacings) to a node of a row they skip are bent
_MAX_CROSSING_EDGES = 2000  # beyond this, keep the last sweep's order instead of counting crossings


@dataclass(frozen=True)
class CircuitLayout:
    """Where a circuit's nodes sit: x within the common width, y the row (bottom up)."""

    row_names: list[str]
    """The rows' names, bottom up: ``"genes"``, ``"layer 0"``, ..., ``"target"`` (those that hold nodes)."""
    rows: list[list[str]]
    """Node ids per row."""
    row_of: dict[str, int]
    """Each node's row."""
    x: dict[str, float]
    """Each node's x, in ``[0, width]``."""
    width: float
    """Common width of the rows: the most nodes in a row."""
    xy: np.ndarray
    """``(n_nodes, 2)`` positions, in the order of the nodes' table."""

    def edge_path(self, source: str, target: str) -> np.ndarray:
        """The points of the edge from ``source`` to ``target``, bent around the nodes of the rows it skips."""
        return _edge_path(self.position(source), self.position(target), self.rows, self.x, self.width)

    def position(self, node: str) -> tuple[float, float]:
        """``(x, y)`` of a node."""
        return self.x[node], self.row_of[node]


def circuit_layout(nodes: pd.DataFrame, edges: pd.DataFrame) -> CircuitLayout:
    """Positions of a circuit's nodes: a row each, ordered against crossings of the edges and spread evenly.

    The rows, bottom up: genes and other prompt tokens, one per model layer holding features or errors, the target.
    Edges are weighted by ``|weight|``; a row's starting order has its most influential node (first in ``nodes``) in
    the middle.
    """
    ids = nodes["node"].astype(str).tolist()
    row_names, row_of = _rows(nodes)
    rows = [_middle_out([n for n in ids if row_of[n] == r]) for r in range(len(row_names))]
    source, target = edges["source"].astype(str).tolist(), edges["target"].astype(str).tolist()
    strength = edges["weight"].abs().to_numpy(dtype=float)
    x, width = _layout(rows, list(zip(source, target, strength, strict=True)), row_of)
    xy = np.array([(x[n], row_of[n]) for n in ids], dtype=float).reshape(-1, 2)
    return CircuitLayout(row_names=row_names, rows=rows, row_of=row_of, x=x, width=width, xy=xy)


def _rows(nodes: pd.DataFrame) -> tuple[list[str], dict[str, int]]:
    """The names of the rows that hold nodes, bottom up, and each node's row."""
    kind = nodes["kind"].astype(str).to_numpy()
    layer = nodes["layer"].to_numpy(dtype=int)
    is_input = np.isin(kind, ["gene", "token"])
    layers = sorted(set(layer[~is_input & (kind != "target")].tolist()))
    row_names = (["genes"] if is_input.any() else []) + [f"layer {li}" for li in layers]
    row_names += ["target"] if (kind == "target").any() else []
    row_index = {name: i for i, name in enumerate(row_names)}
    names = [
        "genes" if inp else "target" if k == "target" else f"layer {li}"
        for inp, k, li in zip(is_input, kind, layer, strict=True)
    ]
    return row_names, {n: row_index[name] for n, name in zip(nodes["node"].astype(str), names, strict=True)}


def _crossings(seg: np.ndarray, weight: np.ndarray) -> float:
    """Sum over pairs of crossing segments ``(x1, y1, x2, y2)`` of the product of their weights."""
    if len(seg) < 2:
        return 0.0
    p1, p2 = seg[:, None, :2], seg[:, None, 2:]
    q1, q2 = seg[None, :, :2], seg[None, :, 2:]
    cross = (_orient(p1, p2, q1) * _orient(p1, p2, q2) < 0) & (_orient(q1, q2, p1) * _orient(q1, q2, p2) < 0)
    return float((cross * np.outer(weight, weight)).sum() / 2)


def _orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Sign of the turn ``a -> b -> c``: 1 counter-clockwise, -1 clockwise, 0 collinear."""
    return np.sign(
        (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])
    )


def _barycentre(node: str, near: list[tuple[str, float]], x: dict[str, float]) -> float:
    """The weighted mean x of ``near``; the node's own x when it has no such neighbour."""
    total = sum(w for _, w in near)
    return sum(x[o] * w for o, w in near) / total if total > 0 else x[node]


def _spread(rows: list[list[str]], width: float) -> dict[str, float]:
    """Each row's nodes spread evenly over ``width``, in the row's order."""
    return {n: (k + 0.5) * width / len(r) for r in rows for k, n in enumerate(r)}


def _score(x: dict[str, float], edges: list[tuple[str, str, float]], row_of: dict[str, int]) -> float:
    """Weighted crossings of the edges at positions ``x`` (0 for more than ``_MAX_CROSSING_EDGES`` edges)."""
    if len(edges) > _MAX_CROSSING_EDGES:
        return 0.0
    seg = np.array([(x[u], row_of[u], x[v], row_of[v]) for u, v, _ in edges], dtype=float).reshape(-1, 4)
    return _crossings(seg, np.array([w for _, _, w in edges], dtype=float))


def _layout(
    rows: list[list[str]], edges: list[tuple[str, str, float]], row_of: dict[str, int]
) -> tuple[dict[str, float], float]:
    """The x of every node: rows spread evenly over a common width, ordered by weighted barycentre sweeps.

    Sweeps alternate upward (order a row by the mean x of its neighbours in lower rows) and downward (neighbours in
    higher rows); the order with the fewest weighted edge crossings is kept.
    """
    width = float(max(len(r) for r in rows))
    rows = [list(r) for r in rows]
    neighbours: dict[str, list[tuple[str, float]]] = {n: [] for r in rows for n in r}
    for u, v, w in edges:
        neighbours[u].append((v, w))
        neighbours[v].append((u, w))
    x = _spread(rows, width)
    best_x, best = x, _score(x, edges, row_of)
    for sweep in range(_SWEEPS):
        upward = sweep % 2 == 0
        for r in range(1, len(rows)) if upward else range(len(rows) - 2, -1, -1):
            keys = {}
            for n in rows[r]:
                near = [(o, w) for o, w in neighbours[n] if (row_of[o] < r if upward else row_of[o] > r)]
                keys[n] = _barycentre(n, near, x)
            rows[r] = sorted(rows[r], key=keys.__getitem__)
            x = _spread(rows, width)
        if (current := _score(x, edges, row_of)) < best or len(edges) > _MAX_CROSSING_EDGES:
            best_x, best = x, current
    return best_x, width


def _edge_path(
    start: tuple[float, float], end: tuple[float, float], rows: list[list[str]], x_of: dict[str, float], width: float
) -> np.ndarray:
    """A straight line, or a quadratic Bézier bent around the nodes of the rows it skips when it would cross them."""
    (x0, y0), (x1, y1) = start, end
    low, high = sorted((round(y0), round(y1)))
    bend = 0.0
    for r in range(low + 1, high):
        if not rows[r]:
            continue
        at = x0 + (x1 - x0) * (r - y0) / (y1 - y0)
        near = min((x_of[n] for n in rows[r]), key=lambda xn: abs(xn - at))
        if abs(near - at) < _CLEARANCE:
            # the control point's shift (the curve moves up to half of it), away from the node and inside the plot
            bend = -2 * _CLEARANCE if near >= at else 2 * _CLEARANCE
            if not 0 < (x0 + x1) / 2 + bend / 2 < width:
                bend = -bend
            break
    if bend == 0.0:
        return np.array([start, end], dtype=float)
    t = np.linspace(0.0, 1.0, 24)[:, None]
    control = np.array([(x0 + x1) / 2 + bend, (y0 + y1) / 2])
    return (1 - t) ** 2 * np.array(start) + 2 * (1 - t) * t * control + t**2 * np.array(end)


def _middle_out(order: list[str]) -> list[str]:
    """Most influential in the middle, the rest alternating outward (a start for the sweeps)."""
    left: list[str] = []
    right: list[str] = []
    for k, node in enumerate(order):
        (right if k % 2 == 0 else left).append(node)
    return left[::-1] + right
