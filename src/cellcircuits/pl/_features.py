"""Plots of transcoder features: on an embedding, by group, and by gene."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._compat import is_sparse, model_layers_renamed
from .._docs import doc_params
from .._keys import embedding_obsm, feature_matrix, gene_map
from ..get._rank_features import ranking
from ._plotter import Plotter
from ._utils import feature_label

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.collections import PathCollection
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage


def _column(X: np.ndarray | sparse.spmatrix, j: int) -> np.ndarray:
    col = X[:, j]
    return np.asarray(col.toarray() if is_sparse(col) else col).ravel()


@model_layers_renamed
@doc_params
def feature_embedding(
    adata: AnnData,
    features: int | Sequence[int],
    *,
    layers: int,
    key: str = "transcoder",
    basis: str = "umap",
    cmap: str = "viridis",
    size: float | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Cells on an embedding, coloured by transcoder feature activations (like ``sc.pl.embedding``).

    Parameters
    ----------
    adata
        Annotated data matrix with features from :func:`cellcircuits.tl.transcode`.
    features
        Feature index or indices; one panel each.
    layers
        Model layer whose features are plotted.
    key
        The ``key_added`` of :func:`cellcircuits.tl.transcode`.
    basis
        Embedding in ``.obsm[f"X_{basis}"]`` (first two dimensions).
    cmap
        Colour map of the activation.
    size
        Point size; default scales with the number of cells.
    ax
        Axes to draw into (one feature only).
    {plot_output}

    Returns
    -------
    {plot_returns}
    """
    X = feature_matrix(adata, key, layers)
    emb_key = embedding_obsm(basis)
    if emb_key not in adata.obsm:
        msg = f".obsm[{emb_key!r}] not found; compute it (e.g. sc.tl.umap) or pass basis=<a key of .obsm without X_>."
        raise KeyError(msg)
    features = [int(f) for f in features] if isinstance(features, Iterable) else [int(features)]
    bad = [f for f in features if not 0 <= f < X.shape[1]]
    if bad:
        msg = f"features {bad} out of range; layer {layers} has {X.shape[1]} features"
        raise IndexError(msg)
    coords = np.asarray(adata.obsm[emb_key])[:, :2]
    plot = Plotter(ax=ax, figsize=figsize, dpi=dpi, show=show, save=save, return_fig=return_fig)
    fig, axes = plot.subplots(len(features))
    size = size if size is not None else min(30.0, 12000 / max(adata.n_obs, 1))
    for axis, f in zip(axes, features, strict=True):
        values = _column(X, f)
        order = np.argsort(values, kind="stable")  # active cells drawn on top
        points = axis.scatter(
            coords[order, 0], coords[order, 1], c=values[order], cmap=cmap, s=size, linewidths=0, rasterized=True
        )
        axis.set_title(feature_label(adata, key, layers, f), fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_xlabel(f"{basis.upper()}1")
        axis.set_ylabel(f"{basis.upper()}2")
        fig.colorbar(points, ax=axis, shrink=0.7, label="activation")
    return plot.finish()


@doc_params
def rank_features_groups(
    adata: AnnData,
    *,
    key: str = "rank_features_groups",
    n_features: int = 3,
    groups: Sequence[str] | None = None,
    kind: Literal["dotplot", "heatmap"] = "dotplot",
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """The top features of each group, across all groups: a dot plot or a heatmap of features x groups.

    Dot colour (or heatmap cell) is the feature's mean activation in the group, scaled to the feature's maximum over
    groups; dot size is the fraction of the group's cells in which the feature is active.

    Parameters
    ----------
    adata
        Annotated data matrix with a ranking from :func:`cellcircuits.tl.rank_features_groups`.
    key
        The ranking's ``key_added``.
    n_features
        Top features taken from each group.
    groups
        Groups to show; default all ranked groups.
    kind
        ``"dotplot"`` or ``"heatmap"``.
    ax
        Axes to draw into.
    {plot_output}

    Returns
    -------
    {plot_returns}
    """
    result = ranking(adata, key)
    if kind not in ("dotplot", "heatmap"):
        msg = f"kind must be 'dotplot' or 'heatmap', got {kind!r}"
        raise ValueError(msg)
    params = result["params"]
    ranked = list(result["names"].dtype.names)
    groups = ranked if groups is None else list(groups)
    unknown = sorted(set(groups) - set(ranked))
    if unknown:
        msg = f"groups {unknown} were not ranked; ranked groups are {ranked}"
        raise KeyError(msg)
    X = feature_matrix(adata, params["key"], params["layer"])
    X = X.toarray() if is_sparse(X) else np.asarray(X)
    features = list(dict.fromkeys(int(f) for g in groups for f in result["names"][g][:n_features]))
    labels = adata.obs[params["groupby"]].astype(str).to_numpy()
    mean = pd.DataFrame({g: X[labels == g][:, features].mean(0) for g in groups}, index=features)
    frac = pd.DataFrame({g: (X[labels == g][:, features] > 0).mean(0) for g in groups}, index=features)
    scaled = mean.div(mean.max(axis=1).replace(0, 1), axis=0)
    plot = Plotter(ax=ax, figsize=figsize, dpi=dpi, show=show, save=save, return_fig=return_fig)
    fig, (axis,) = plot.subplots(figsize=(1.0 + 0.55 * len(groups) + 2.6, 1.2 + 0.32 * len(features)))
    names = [feature_label(adata, params["key"], params["layer"], f, n_genes=2) for f in features]
    image: AxesImage | PathCollection
    if kind == "heatmap":
        image = axis.imshow(scaled.to_numpy(), aspect="auto", cmap="Reds", vmin=0, vmax=1)
    else:
        yy, xx = np.meshgrid(np.arange(len(features)), np.arange(len(groups)), indexing="ij")
        image = axis.scatter(
            xx.ravel(), yy.ravel(), s=frac.to_numpy().ravel() * 220 + 2, c=scaled.to_numpy().ravel(),
            cmap="Reds", vmin=0, vmax=1, edgecolors="0.4", linewidths=0.4,
        )  # fmt: skip
        axis.set_xlim(-0.6, len(groups) - 0.4)
        axis.set_ylim(len(features) - 0.5, -0.5)
    axis.set_xticks(range(len(groups)), groups, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(range(len(features)), names, fontsize=8)
    axis.set_title(f"top features per {params['groupby']} ({params['method']}, layer {params['layer']})", fontsize=9)
    fig.colorbar(image, ax=axis, shrink=0.6, label="mean activation\n(scaled per feature)")
    return plot.finish_panel()


@model_layers_renamed
@doc_params
def feature_genes(
    adata: AnnData,
    feature: int,
    *,
    layers: int,
    key: str = "transcoder",
    n_genes: int = 10,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | list[Axes] | None:
    """A feature's top input genes (what it reads) and top output genes (what it writes), as bar charts.

    Parameters
    ----------
    adata
        Annotated data matrix with maps from :func:`cellcircuits.tl.transcode`.
    feature
        Feature index.
    layers
        Model layer whose feature is plotted.
    key
        The ``key_added`` of :func:`cellcircuits.tl.transcode`.
    n_genes
        Genes per panel.
    ax
        Not supported (the plot has two panels); must be ``None``.
    {plot_output}

    Returns
    -------
    {plot_returns}
    """
    maps = [gene_map(adata, key, layers, side) for side in ("in", "out")]
    if not 0 <= feature < maps[0].shape[1]:
        msg = f"feature {feature} out of range; layer {layers} has {maps[0].shape[1]} features"
        raise IndexError(msg)
    plot = Plotter(ax=ax, figsize=figsize, dpi=dpi, show=show, save=save, return_fig=return_fig)
    fig, axes = plot.subplots(2, ncols=2, figsize=(8.4, 0.3 * n_genes + 1.4))
    titles = ("input: mean activation on the gene", "output: direct effect on the gene's logit")
    colours = ("#4C72B0", "#C44E52")
    for axis, values, title, colour in zip(axes, maps, titles, colours, strict=True):
        column = values[:, feature]
        top = np.argsort(-column, kind="stable")[:n_genes]
        axis.barh(range(len(top)), column[top], color=colour)
        axis.set_yticks(range(len(top)), adata.var_names[top], fontsize=8)
        axis.invert_yaxis()
        axis.set_title(title, fontsize=9)
        axis.axvline(0, color="0.3", linewidth=0.6)
    fig.suptitle(f"layer {layers}, feature {feature}", fontsize=10)
    return plot.finish_panels()
