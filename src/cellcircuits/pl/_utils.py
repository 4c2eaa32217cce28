"""What every plot shares: making or reusing axes, and showing, saving or returning the figure."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..get._rank_features import top_input_genes

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def new_axes(
    ax: Axes | None, figsize: tuple[float, float] | None, dpi: int, n: int = 1, ncols: int = 4
) -> tuple[Figure, list[Axes]]:
    """``n`` axes in a new figure, or the given ``ax`` (only when ``n == 1``)."""
    import matplotlib.pyplot as plt

    if ax is not None:
        if n != 1:
            msg = f"ax can hold one panel, but this plot has {n}; leave ax=None"
            raise ValueError(msg)
        return ax.figure, [ax]
    ncols = min(n, ncols)
    nrows = int(np.ceil(n / ncols))
    size = figsize or (4.2 * ncols, 3.6 * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, dpi=dpi, squeeze=False, layout="constrained")
    flat = list(axes.ravel())
    for extra in flat[n:]:
        extra.set_visible(False)
    return fig, flat[:n]


def finish(
    fig: Figure, axes: list[Axes], *, show: bool | None, save: str | Path | None, return_fig: bool
) -> Figure | Axes | list[Axes] | None:
    """Save (any format matplotlib knows, from the suffix), then return the figure, the axes or nothing."""
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(save, bbox_inches="tight")
    if return_fig:
        return fig
    if show is False:
        return axes[0] if len(axes) == 1 else axes
    if show:
        plt.show()
    return None


def feature_label(adata: AnnData, key: str, layer: int, feature: int, n_genes: int = 3) -> str:
    """``"L3 F12: GENE1, GENE2, GENE3"`` from the feature's input map, when present and not all zero."""
    label = f"L{layer} F{feature}"
    top = top_input_genes(adata, key, layer, np.array([feature]), n_genes)
    if top is not None and np.any(np.asarray(adata.varm[f"{key}_L{layer}_in"])[:, feature] > 0):
        label += ": " + ", ".join(top[0])
    return label
