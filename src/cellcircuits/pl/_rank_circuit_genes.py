"""Plot of circuit markers: per group, the genes of most influence with their bootstrap intervals."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._docs import doc_params
from .._keys import GENE_RANKING, gene_ranking
from ..get._rank_circuit_genes import SortBy, rank_circuit_genes_df, ranked_groups
from ._plotter import Plotter

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    import pandas as pd
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

MARKER_COLOUR, GENE_COLOUR, POSITION_COLOUR = "#D55E00", "#4C72B0", "0.45"


def _cells_of(ranking: dict) -> dict[str, int]:
    params = ranking.get("params", {})
    groups, n = params.get("groups"), params.get("n_cells")
    if groups is None or n is None:
        return {}
    return {str(g): int(c) for g, c in zip(np.atleast_1d(groups), np.atleast_1d(n), strict=False)}


def _gene_labels(top: pd.DataFrame, n_de: int) -> list[str]:
    """Gene names, ``*`` after those among the group's ``n_de`` top differentially expressed genes."""
    de = top["de_rank"].to_numpy(dtype=float) <= n_de
    return [f"{gene} *" if d else str(gene) for gene, d in zip(top["gene"], de, strict=True)]


def _panel(axis: Axes, top: pd.DataFrame, title: str, n_de: int, ci: float) -> None:
    """One group: influence dots with their interval, the positional expectation, genes named on the y-axis."""
    y = np.arange(len(top))
    x = top["influence"].to_numpy(dtype=float)
    lo, hi = top["influence_lo"].to_numpy(dtype=float), top["influence_hi"].to_numpy(dtype=float)
    marker = top["is_marker"].to_numpy(dtype=bool)
    axis.errorbar(
        x, y, xerr=np.vstack([x - lo, hi - x]).clip(0), fmt="none", ecolor="0.35", elinewidth=1.0, capsize=2.0,
        zorder=2, label=f"{ci:.0%} bootstrap interval",
    )  # fmt: skip
    axis.scatter(
        top["positional"].to_numpy(dtype=float), y, marker="D", s=22, facecolors="none", edgecolors=POSITION_COLOUR,
        linewidths=0.9, zorder=5, label="expected from position",
    )  # fmt: skip
    axis.scatter(
        x, y, s=40, c=np.where(marker, MARKER_COLOUR, GENE_COLOUR), edgecolors="0.2", linewidths=0.5, zorder=4,
        label="mean influence",
    )  # fmt: skip
    axis.set_yticks(y, _gene_labels(top, n_de), fontsize=9)
    for tick, is_marker in zip(axis.get_yticklabels(), marker, strict=True):
        if is_marker:
            tick.set_fontweight("bold")
            tick.set_color(MARKER_COLOUR)
    axis.set_ylim(len(top) - 0.5, -0.5)
    axis.set_xlim(left=min(0.0, float(np.nanmin(lo, initial=0.0))))
    axis.axvline(0, color="0.7", linewidth=0.6, zorder=1)
    axis.grid(axis="x", color="0.92", linewidth=0.6)
    axis.set_axisbelow(True)
    axis.set_xlabel("mean influence on the target", fontsize=9)
    axis.tick_params(axis="x", labelsize=8)
    axis.set_title(title, fontsize=10)
    for side in ("top", "right"):
        axis.spines[side].set_visible(False)


def _legend_handles(n_de: int, ci: float) -> list[Line2D]:
    from matplotlib.lines import Line2D

    def dot(colour: str, label: str) -> Line2D:
        return Line2D([], [], linestyle="", marker="o", markersize=6, markerfacecolor=colour, markeredgecolor="0.2",
                      markeredgewidth=0.5, label=label)  # fmt: skip

    return [
        dot(MARKER_COLOUR, "marker gene (bold)"),
        dot(GENE_COLOUR, "other gene"),
        Line2D([], [], color="0.35", linewidth=1.0, label=f"{ci:.0%} bootstrap interval"),
        Line2D(
            [],
            [],
            linestyle="",
            marker="D",
            markersize=5,
            markerfacecolor="none",
            markeredgecolor=POSITION_COLOUR,
            label="expected from position",
        ),
        Line2D([], [], linestyle="", marker="$*$", markersize=7, color="0.1", label=f"top-{n_de} DE gene"),
    ]


@doc_params
def rank_circuit_genes(
    adata: AnnData,
    key: str,
    groups: str | Sequence[str] | None = None,
    n_genes: int = 15,
    *,
    sort_by: SortBy = "influence",
    n_de: int | None = None,
    ncols: int = 4,
    key_added: str = GENE_RANKING,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """The circuit markers of each group: its top genes by influence on the target, with bootstrap intervals.

    One panel per group (like ``sc.pl.rank_genes_groups``), from :func:`cellcircuits.tl.rank_circuit_genes`: each
    gene's mean influence over the group's traced cells (a dot) with its bootstrap interval (a bar), and the
    influence its sentence positions alone predict (a hollow diamond; the gap between dot and diamond is the
    gene's ``position_adjusted`` influence). Genes of a shipped marker set are coloured and set in bold; genes among
    the group's ``n_de`` top differentially expressed genes (Wilcoxon, ``de_rank``) carry an asterisk.

    Parameters
    ----------
    adata
        Annotated data matrix with a circuit ranked by :func:`cellcircuits.tl.rank_circuit_genes`.
    key
        The circuit's key in ``.uns["circuits"]``.
    groups
        A group or groups to show; default all ranked groups.
    n_genes
        Genes shown per group, the first by ``sort_by``.
    sort_by
        Order of the genes: ``"influence"``, ``"position_adjusted"``, ``"attribution"`` or ``"knockout"``
        (see :func:`cellcircuits.get.rank_circuit_genes_df`).
    n_de
        A gene is starred when its ``de_rank`` is at most ``n_de``; default ``n_genes``.
    ncols
        Panels per row.
    key_added
        The ``key_added`` of the ranking.
    ax
        Axes to draw into (one group only).
    {plot_output}

    Returns
    -------
    {plot_returns} The axes come as a list when there are several groups.

    Raises
    ------
    KeyError
        When the circuit, its ranking or a group is absent.
    ValueError
        For ``n_genes``, ``n_de`` or ``ncols`` below 1 (``n_de`` below 0), or an unknown ``sort_by``.
    """
    if n_genes < 1 or ncols < 1 or (n_de is not None and n_de < 0):
        msg = f"n_genes and ncols must be at least 1 and n_de at least 0, got {n_genes}, {ncols} and {n_de}"
        raise ValueError(msg)
    ranking = gene_ranking(adata, key, key_added)
    table = rank_circuit_genes_df(adata, key, groups, sort_by=sort_by, key_added=key_added)
    shown = ranked_groups(ranking) if groups is None else [groups] if isinstance(groups, str) else list(groups)
    shown = [str(g) for g in shown]
    n_de = n_genes if n_de is None else int(n_de)
    ci = float(ranking.get("params", {}).get("ci", 0.95))
    cells = _cells_of(ranking)
    longest = max((len(table[table["group"] == g].head(n_genes)) for g in shown), default=1)
    plot = Plotter(ax=ax, figsize=figsize, dpi=dpi, show=show, save=save, return_fig=return_fig)
    columns = min(len(shown), ncols)
    rows = int(np.ceil(len(shown) / columns))
    _, axes = plot.subplots(len(shown), ncols=ncols, figsize=(3.6 * columns, rows * (0.24 * longest + 1.5)))
    for axis, group in zip(axes, shown, strict=True):
        top = table[table["group"] == group].head(n_genes)
        title = f"{group} ({cells[group]} cells)" if group in cells else group
        _panel(axis, top, title, n_de, ci)
    axes[0].legend(handles=_legend_handles(n_de, ci), loc="lower right", fontsize=7, frameon=False)
    return plot.finish()
