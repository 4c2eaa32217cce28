"""Plots of traced circuits: the layered attribution graph and the genes that drive the target."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._docs import doc_params
from .._keys import circuit_result
from ..get._circuit import circuit_df, resolve_group
from ._plotter import Plotter

if TYPE_CHECKING:
    from pathlib import Path

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# node categories in drawing order: colour, marker, legend name
_STYLE = {
    "marker": ("#D55E00", "o", "marker gene"),
    "gene": ("#A6A6A6", "o", "gene"),
    "token": ("#E6E6E6", "o", "prompt token"),
    "feature": ("#4C72B0", "o", "feature"),
    "error": ("#7F7F7F", "s", "error"),
    "target": ("#222222", "D", "target"),
}
_SWEEPS = 8
_CLEARANCE = 0.35  # edges passing closer than this (in node spacings) to a node of a row they skip are bent
_MAX_CROSSING_EDGES = 2000  # beyond this, keep the last sweep's order instead of counting crossings


def _truthy(values: pd.Series) -> np.ndarray:
    if values.dtype == bool:
        return values.to_numpy()
    return values.astype(str).str.lower().isin(["true", "1", "yes"]).to_numpy()


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _name(node: pd.Series) -> str:
    """The gene or token text of a gene or token node."""
    gene = str(node.get("gene", "") or "")
    if node["kind"] == "gene" and gene:
        return gene
    return str(node["node"]).split(":", 1)[-1]


def _node_text(node: pd.Series, label: str) -> str:
    if label == "none":
        return ""
    if label == "node":
        return _shorten(str(node["node"]), 28)
    kind = node["kind"]
    if kind == "gene":
        return _name(node)
    if kind == "token":
        return f"“{_shorten(_name(node), 12)}”"
    if kind == "target":
        return _name(node)
    if kind == "error":
        gene = str(node.get("gene", "") or "")
        return f"err L{int(node['layer'])}" + (f" @{gene}" if gene else "")
    text = str(node.get("label", "") or "") if label == "auto" else ""
    if kind == "feature" and not text:
        return f"L{int(node['layer'])} F{int(node['feature'])}"
    return _wrap(_shorten(text or str(node["node"]), 28), 15)


def _wrap(text: str, width: int) -> str:
    """At most two lines of about ``width`` characters, the second shortened when the text needs more."""
    lines = textwrap.wrap(text, width)
    if len(lines) <= 2:
        return "\n".join(lines)
    return lines[0] + "\n" + _shorten(text[len(lines[0]) :].strip(), width)


def _target_name(nodes: pd.DataFrame, params: dict) -> str:
    """The group's target label: from its target node, else the stored parameter."""
    targets = nodes[nodes["kind"] == "target"]
    if len(targets):
        return _name(targets.iloc[0])
    return str(params.get("target", "") or "the target")


def _category(node: pd.Series, marker: bool) -> str:
    kind = node["kind"]
    if kind == "gene":
        return "marker" if marker else "gene"
    return kind if kind in _STYLE else "feature"


def _crossings(seg: np.ndarray, weight: np.ndarray) -> float:
    """Sum over pairs of crossing segments ``(x1, y1, x2, y2)`` of the product of their weights."""
    if len(seg) < 2:
        return 0.0

    def orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.sign(
            (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])
        )

    p1, p2 = seg[:, None, :2], seg[:, None, 2:]
    q1, q2 = seg[None, :, :2], seg[None, :, 2:]
    cross = (orient(p1, p2, q1) * orient(p1, p2, q2) < 0) & (orient(q1, q2, p1) * orient(q1, q2, p2) < 0)
    return float((cross * np.outer(weight, weight)).sum() / 2)


def _barycentre(node: str, near: list[tuple[str, float]], x: dict[str, float]) -> float:
    """The weighted mean x of ``near``; the node's own x when it has no such neighbour."""
    total = sum(w for _, w in near)
    return sum(x[o] * w for o, w in near) / total if total > 0 else x[node]


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

    def spread() -> dict[str, float]:
        return {n: (k + 0.5) * width / len(r) for r in rows for k, n in enumerate(r)}

    def score(x: dict[str, float]) -> float:
        if len(edges) > _MAX_CROSSING_EDGES:
            return 0.0
        seg = np.array([(x[u], row_of[u], x[v], row_of[v]) for u, v, _ in edges], dtype=float).reshape(-1, 4)
        return _crossings(seg, np.array([w for _, _, w in edges], dtype=float))

    x = spread()
    best_x, best = x, score(x)
    for sweep in range(_SWEEPS):
        upward = sweep % 2 == 0
        for r in range(1, len(rows)) if upward else range(len(rows) - 2, -1, -1):
            keys = {}
            for n in rows[r]:
                near = [(o, w) for o, w in neighbours[n] if (row_of[o] < r if upward else row_of[o] > r)]
                keys[n] = _barycentre(n, near, x)
            rows[r] = sorted(rows[r], key=keys.__getitem__)
            x = spread()
        if (current := score(x)) < best or len(edges) > _MAX_CROSSING_EDGES:
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
    left, right = [], []
    for k, node in enumerate(order):
        (right if k % 2 == 0 else left).append(node)
    return left[::-1] + right


@doc_params
def circuit(
    adata: AnnData,
    key: str,
    group: str | None = None,
    *,
    max_nodes: int = 50,
    min_frequency: float = 0.0,
    label: Literal["auto", "feature", "node", "none"] = "auto",
    cmap: str = "RdBu_r",
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """A traced circuit as a layered attribution graph, from the genes up to the target.

    Gene (and other prompt token) nodes sit on the bottom row, transcoder feature and error nodes on one row per
    model layer that holds any (the y-axis names the rows), the target on top. Within a row, nodes are ordered to
    reduce edge crossings (weighted barycentre sweeps) and spread evenly. A node's area grows with its influence on
    the target (the target drawn at full size); its colour and shape give its kind, genes of a shipped marker set
    standing out. Edges run upward from source to target, their width growing with ``|weight|`` and their colour
    giving the signed attribution; an edge that would run through a node of a row it skips is bent around it.

    Parameters
    ----------
    adata
        Annotated data matrix with a circuit from :func:`cellcircuits.tl.trace_circuit`.
    key
        The ``key_added`` of the circuit.
    group
        The group whose circuit is drawn; may be left out when the circuit has one group.
    max_nodes
        Draw this many of the most influential nodes (the target always among them) and the edges among them.
    min_frequency
        Leave out nodes (other than the target) and edges present in the pruned graphs of fewer than this fraction
        of the group's traced cells.
    label
        Node labels: ``"auto"`` names features by their stored ``label`` (shortened), or ``"L2 F123"`` when it is
        empty, and genes by name; ``"feature"`` names features ``"L2 F123"``; ``"node"`` shows every node's id;
        ``"none"`` shows no labels.
    cmap
        Diverging colour map of the edges' attribution, centred on zero.
    ax
        Axes to draw into.
    {plot_output}

    Returns
    -------
    {plot_returns}

    Raises
    ------
    ValueError
        When no node other than the target is left after filtering.
    """
    import matplotlib as mpl
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    if label is None:
        label = "none"
    if label not in ("auto", "feature", "node", "none"):
        msg = f"label must be 'auto', 'feature', 'node' or 'none', got {label!r}"
        raise ValueError(msg)
    if max_nodes < 1:
        msg = f"max_nodes must be at least 1, got {max_nodes}"
        raise ValueError(msg)
    result = circuit_result(adata, key)
    group = resolve_group(result, key, group)
    params = result.get("params", {})
    nodes = circuit_df(adata, key, group, "nodes")
    edges = circuit_df(adata, key, group, "edges")

    is_target = (nodes["kind"] == "target").to_numpy()
    frequent = nodes["frequency"].fillna(1.0).to_numpy(dtype=float) >= min_frequency
    targets = nodes[is_target]
    others = nodes[~is_target & frequent].head(max(max_nodes - len(targets), 0))
    if others.empty:
        msg = (
            f"no node of group {group!r} of circuit {key!r} is left to draw besides the target "
            f"(min_frequency={min_frequency}, max_nodes={max_nodes})"
        )
        raise ValueError(msg)
    nodes = pd.concat([targets, others]).reset_index(drop=True)
    ids = nodes["node"].astype(str).tolist()
    keep = set(ids)
    weight = edges["weight"].to_numpy(dtype=float)
    edges = edges[
        edges["source"].astype(str).isin(keep)
        & edges["target"].astype(str).isin(keep)
        & (edges["frequency"].fillna(1.0).to_numpy(dtype=float) >= min_frequency)
        & np.isfinite(weight)
        & (weight != 0)
    ]

    # rows: genes and tokens, then one per layer holding features or errors, then the target
    kind = nodes["kind"].astype(str).to_numpy()
    layer = nodes["layer"].to_numpy(dtype=int)
    is_input = np.isin(kind, ["gene", "token"])
    layers = sorted(set(layer[~is_input & (kind != "target")].tolist()))
    row_names = (["genes"] if is_input.any() else []) + [f"layer {li}" for li in layers]
    row_names += ["target"] if (kind == "target").any() else []
    row_index = {name: i for i, name in enumerate(row_names)}

    def row(i: int) -> int:
        if is_input[i]:
            return 0
        if kind[i] == "target":
            return row_index["target"]
        return row_index[f"layer {layer[i]}"]

    row_of = {n: row(i) for i, n in enumerate(ids)}
    rows = [_middle_out([n for n in ids if row_of[n] == r]) for r in range(len(row_names))]
    source, target = edges["source"].astype(str).tolist(), edges["target"].astype(str).tolist()
    strength = edges["weight"].abs().to_numpy(dtype=float)
    x_of, width = _layout(rows, list(zip(source, target, strength, strict=True)), row_of)
    xy = np.array([(x_of[n], row_of[n]) for n in ids], dtype=float).reshape(-1, 2)

    plot = Plotter(ax=ax, figsize=figsize, dpi=dpi, show=show, save=save, return_fig=return_fig)
    fig, (axis,) = plot.subplots(
        figsize=(float(np.clip(0.8 * width + 3.0, 6.0, 24.0)), float(np.clip(1.25 * len(row_names) + 1.6, 3.5, 16.0)))
    )

    # edges, strongest drawn last
    top = float(strength.max()) if len(strength) else 1.0
    norm = mpl.colors.Normalize(-top, top)
    order = np.argsort(strength, kind="stable")
    pos = dict(zip(ids, map(tuple, xy), strict=True))
    segments = [_edge_path(pos[source[e]], pos[target[e]], rows, x_of, width) for e in order]
    lines = LineCollection(
        segments, cmap=cmap, norm=norm, linewidths=0.5 + 3.5 * strength[order] / top, alpha=0.8, zorder=1,
        label="edges", capstyle="round",
    )  # fmt: skip
    lines.set_array(edges["weight"].to_numpy(dtype=float)[order])
    axis.add_collection(lines)

    # nodes, one scatter per category (its label names the category)
    influence = nodes["influence"].to_numpy(dtype=float)
    finite = influence[(kind != "target") & np.isfinite(influence) & (influence > 0)]
    ref = float(finite.max()) if len(finite) else 1.0
    area = np.where(kind == "target", 420.0, 25.0 + 375.0 * np.clip(np.nan_to_num(influence / ref), 0.0, 1.0))
    marker = _truthy(nodes["is_marker"]) if "is_marker" in nodes else np.zeros(len(nodes), bool)
    category = np.array([_category(nodes.iloc[i], marker[i]) for i in range(len(nodes))])
    handles = []
    for cat, (colour, shape, name) in _STYLE.items():
        sel = category == cat
        if sel.any():
            axis.scatter(
                xy[sel, 0], xy[sel, 1], s=area[sel], c=colour, marker=shape, edgecolors="0.25", linewidths=0.6,
                zorder=3, label=name,
            )  # fmt: skip
            handles.append(
                Line2D([], [], linestyle="", marker=shape, markersize=7, markerfacecolor=colour,
                       markeredgecolor="0.25", label=name)
            )  # fmt: skip

    # labels: genes below their node, the target above, features and errors just below theirs
    for i, node in nodes.iterrows():
        text = _node_text(node, label)
        if not text:
            continue
        radius = np.sqrt(area[i]) / 2
        above = kind[i] == "target"
        axis.annotate(
            text, xy[i], xytext=(0, radius + 2 if above else -radius - 2), textcoords="offset points",
            ha="center", va="bottom" if above else "top", zorder=4, color="0.1",
            fontsize=8 if is_input[i] or above else 6.2, fontweight="bold" if above else "normal",
            bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.7},
        )  # fmt: skip

    drawn = np.concatenate([*segments, xy])
    axis.set_xlim(min(0.0, drawn[:, 0].min() - 0.2), max(width, drawn[:, 0].max() + 0.2))
    axis.set_ylim(-0.6, len(row_names) - 0.35)
    axis.set_yticks(range(len(row_names)), row_names)
    axis.set_xticks([])
    for side in ("top", "right", "bottom"):
        axis.spines[side].set_visible(False)
    groupby, target_name = str(params.get("groupby", "") or ""), _target_name(nodes, params)
    title = f"circuit of {target_name}"
    if target_name != group:
        title += f" in {groupby + ': ' if groupby else ''}{group}"
    if "cells" in result:
        cells = pd.DataFrame(result["cells"])
        title += f" ({int((cells['group'].astype(str) == group).sum())} cells)"
    axis.set_title(title, fontsize=10)
    axis.legend(handles=handles, loc="upper left", fontsize=7, frameon=False, borderaxespad=0.2)
    fig.colorbar(lines, ax=axis, shrink=0.5, pad=0.01, label="attribution")
    return plot.finish()


@doc_params
def circuit_genes(
    adata: AnnData,
    key: str,
    group: str | None = None,
    *,
    n_genes: int = 20,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """The genes of a traced circuit ranked by their influence on the target, as a bar chart.

    Bars of genes in a shipped marker set are coloured apart and annotated with the names of those sets.

    Parameters
    ----------
    adata
        Annotated data matrix with a circuit from :func:`cellcircuits.tl.trace_circuit`.
    key
        The ``key_added`` of the circuit.
    group
        The group whose genes are shown; may be left out when the circuit has one group.
    n_genes
        Genes shown, most influential first.
    ax
        Axes to draw into.
    {plot_output}

    Returns
    -------
    {plot_returns}

    Raises
    ------
    ValueError
        When the group's circuit holds no gene node.
    """
    from matplotlib.patches import Patch

    result = circuit_result(adata, key)
    group = resolve_group(result, key, group)
    nodes = circuit_df(adata, key, group, "nodes")
    genes = nodes[nodes["kind"] == "gene"].copy()
    if genes.empty:
        msg = f"the circuit {key!r} of group {group!r} holds no gene node"
        raise ValueError(msg)
    genes["name"] = [_name(genes.loc[i]) for i in genes.index]
    genes["is_marker"] = _truthy(genes["is_marker"]) if "is_marker" in genes else False
    if "marker_sets" not in genes:
        genes["marker_sets"] = ""
    genes["marker_sets"] = genes["marker_sets"].fillna("").astype(str)
    table = (
        genes.groupby("name", sort=False)
        .agg(influence=("influence", "sum"), is_marker=("is_marker", "any"), marker_sets=("marker_sets", "first"))
        .sort_values("influence", ascending=False, kind="stable")
        .head(n_genes)
    )
    plot = Plotter(ax=ax, figsize=figsize, dpi=dpi, show=show, save=save, return_fig=return_fig)
    _, (axis,) = plot.subplots(figsize=(5.6, 0.27 * len(table) + 1.3))
    colours = np.where(table["is_marker"], _STYLE["marker"][0], _STYLE["gene"][0])
    axis.barh(range(len(table)), table["influence"], color=colours, edgecolor="0.3", linewidth=0.4)
    axis.set_yticks(range(len(table)), table.index, fontsize=8)
    axis.invert_yaxis()
    top = float(table["influence"].max()) if len(table) else 1.0
    for k, (value, sets) in enumerate(zip(table["influence"], table["marker_sets"], strict=True)):
        if sets:
            axis.annotate(
                _shorten(sets.replace(";", ", "), 40), (value, k), xytext=(3, 0), textcoords="offset points",
                va="center", fontsize=6, color="0.3",
            )  # fmt: skip
    axis.set_xlim(0, top * 1.45 if table["marker_sets"].astype(bool).any() else top * 1.05)
    axis.set_xlabel("influence on the target")
    params = result.get("params", {})
    axis.set_title(f"genes driving {_target_name(nodes, params)} ({group})", fontsize=10)
    present = [(True, "known marker"), (False, "other")]
    axis.legend(
        handles=[Patch(facecolor=_STYLE["marker" if m else "gene"][0], edgecolor="0.3", label=name)
                 for m, name in present if (table["is_marker"] == m).any()],
        loc="lower right", fontsize=7, frameon=False,
    )  # fmt: skip
    return plot.finish()
