"""Plots of traced circuits: the layered attribution graph and the genes that drive the target."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._docs import doc_params
from .._keys import circuit_result
from ..get._circuit import circuit_df, resolve_group
from ._circuit_layout import CircuitLayout, circuit_layout
from ._plotter import Plotter

if TYPE_CHECKING:
    from pathlib import Path

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

# node categories in drawing order: colour, marker, legend name
_STYLE = {
    "marker": ("#D55E00", "o", "marker gene"),
    "gene": ("#A6A6A6", "o", "gene"),
    "token": ("#E6E6E6", "o", "prompt token"),
    "feature": ("#4C72B0", "o", "feature"),
    "error": ("#7F7F7F", "s", "error"),
    "target": ("#222222", "D", "target"),
}


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
    label_mode = _check_circuit_options(label, max_nodes)
    result = circuit_result(adata, key)
    group = resolve_group(result, key, group)
    nodes, edges = _circuit_graph(adata, key, group, max_nodes=max_nodes, min_frequency=min_frequency)
    layout = circuit_layout(nodes, edges)
    plot = Plotter(ax=ax, figsize=figsize, dpi=dpi, show=show, save=save, return_fig=return_fig)
    fig, (axis,) = plot.subplots(figsize=_circuit_size(layout))
    lines, segments = _draw_edges(axis, edges, layout, cmap)
    area = _node_areas(nodes)
    handles = _draw_nodes(axis, nodes, layout.xy, area)
    _draw_labels(axis, nodes, layout.xy, area, label_mode)
    _draw_frame(axis, layout, segments)
    axis.set_title(_circuit_title(result, nodes, group), fontsize=10)
    axis.legend(handles=handles, loc="upper left", fontsize=7, frameon=False, borderaxespad=0.2)
    fig.colorbar(lines, ax=axis, shrink=0.5, pad=0.01, label="attribution")
    return plot.finish_panel()


# filtering: which nodes and edges are drawn
def _check_circuit_options(label: str | None, max_nodes: int) -> str:
    """``label`` (``None`` read as ``"none"``), checked with ``max_nodes``."""
    if label is None:
        label = "none"
    if label not in ("auto", "feature", "node", "none"):
        msg = f"label must be 'auto', 'feature', 'node' or 'none', got {label!r}"
        raise ValueError(msg)
    if max_nodes < 1:
        msg = f"max_nodes must be at least 1, got {max_nodes}"
        raise ValueError(msg)
    return label


def _circuit_graph(
    adata: AnnData, key: str, group: str, *, max_nodes: int, min_frequency: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The nodes drawn (the target, then the most influential frequent others) and the nonzero edges among them."""
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
    keep = set(nodes["node"].astype(str).tolist())
    weight = edges["weight"].to_numpy(dtype=float)
    edges = edges[
        edges["source"].astype(str).isin(keep)
        & edges["target"].astype(str).isin(keep)
        & (edges["frequency"].fillna(1.0).to_numpy(dtype=float) >= min_frequency)
        & np.isfinite(weight)
        & (weight != 0)
    ]
    return nodes, edges


# drawing
def _circuit_size(layout: CircuitLayout) -> tuple[float, float]:
    """Default figure size: wide enough for the widest row, tall enough for the rows."""
    return (
        float(np.clip(0.8 * layout.width + 3.0, 6.0, 24.0)),
        float(np.clip(1.25 * len(layout.row_names) + 1.6, 3.5, 16.0)),
    )


def _draw_edges(
    axis: Axes, edges: pd.DataFrame, layout: CircuitLayout, cmap: str
) -> tuple[LineCollection, list[np.ndarray]]:
    """The edges, strongest drawn last, coloured by signed weight on a scale centred on zero; and their paths."""
    import matplotlib as mpl
    from matplotlib.collections import LineCollection

    source, target = edges["source"].astype(str).tolist(), edges["target"].astype(str).tolist()
    strength = edges["weight"].abs().to_numpy(dtype=float)
    top = float(strength.max()) if len(strength) else 1.0
    norm = mpl.colors.Normalize(-top, top)
    order = np.argsort(strength, kind="stable")
    segments = [layout.edge_path(source[e], target[e]) for e in order]
    lines = LineCollection(
        segments, cmap=cmap, norm=norm, linewidths=0.5 + 3.5 * strength[order] / top, alpha=0.8, zorder=1,
        label="edges", capstyle="round",
    )  # fmt: skip
    lines.set_array(edges["weight"].to_numpy(dtype=float)[order])
    axis.add_collection(lines)
    return lines, segments


def _node_areas(nodes: pd.DataFrame) -> np.ndarray:
    """Marker areas: growing with influence on the target (relative to the most influential node), the target full."""
    kind = nodes["kind"].astype(str).to_numpy()
    influence = nodes["influence"].to_numpy(dtype=float)
    finite = influence[(kind != "target") & np.isfinite(influence) & (influence > 0)]
    ref = float(finite.max()) if len(finite) else 1.0
    return np.where(kind == "target", 420.0, 25.0 + 375.0 * np.clip(np.nan_to_num(influence / ref), 0.0, 1.0))


def _draw_nodes(axis: Axes, nodes: pd.DataFrame, xy: np.ndarray, area: np.ndarray) -> list[Line2D]:
    """The nodes, one scatter per category (its label names the category); legend handles of the categories."""
    from matplotlib.lines import Line2D

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
    return handles


def _draw_labels(axis: Axes, nodes: pd.DataFrame, xy: np.ndarray, area: np.ndarray, label: str) -> None:
    """Node labels: genes below their node, the target above, features and errors just below theirs."""
    kind = nodes["kind"].astype(str).to_numpy()
    is_input = np.isin(kind, ["gene", "token"])
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


def _draw_frame(axis: Axes, layout: CircuitLayout, segments: list[np.ndarray]) -> None:
    """Limits around everything drawn, the rows named on the y-axis, no x-axis."""
    drawn = np.concatenate([*segments, layout.xy])
    axis.set_xlim(min(0.0, drawn[:, 0].min() - 0.2), max(layout.width, drawn[:, 0].max() + 0.2))
    axis.set_ylim(-0.6, len(layout.row_names) - 0.35)
    axis.set_yticks(range(len(layout.row_names)), layout.row_names)
    axis.set_xticks([])
    for side in ("top", "right", "bottom"):
        axis.spines[side].set_visible(False)


def _circuit_title(result: dict, nodes: pd.DataFrame, group: str) -> str:
    """``"circuit of <target> in <groupby>: <group> (<n> cells)"``, the group left out when it is the target."""
    params = result.get("params", {})
    groupby, target_name = str(params.get("groupby", "") or ""), _target_name(nodes, params)
    title = f"circuit of {target_name}"
    if target_name != group:
        title += f" in {groupby + ': ' if groupby else ''}{group}"
    if "cells" in result:
        cells = pd.DataFrame(result["cells"])
        title += f" ({int((cells['group'].astype(str) == group).sum())} cells)"
    return title


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
    return plot.finish_panel()
