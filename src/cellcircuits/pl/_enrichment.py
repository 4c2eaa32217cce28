"""Plot of gene-set enrichment: terms x features."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._docs import doc_params
from .._keys import enrichment_result
from ._plotter import Plotter
from ._utils import feature_label

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@doc_params
def enrichment(
    adata: AnnData,
    key: str,
    *,
    features: Sequence[int] | None = None,
    n_features: int = 10,
    n_terms: int = 12,
    fdr_threshold: float = 0.05,
    cmap: str = "Reds",
    max_label: int = 50,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Dot plot of enriched terms (rows) by features (columns).

    A dot's colour is the ``-log10`` FDR of the term for the feature, its size the enrichment score (odds ratio,
    ULM t-value or NES, whichever the method gave); pairs with FDR at or above ``fdr_threshold`` are left empty.

    Parameters
    ----------
    adata
        Annotated data matrix with a result of :func:`cellcircuits.tl.feature_enrichment`.
    key
        The ``key_added`` of that result (e.g. ``"transcoder_L2_in_enrichment"``).
    features
        Features shown; default the ``n_features`` whose best term has the lowest FDR.
    n_features
        Features shown when ``features`` is not given.
    n_terms
        Terms shown: those most often significant among the features, then by lowest FDR.
    fdr_threshold
        Significance cut.
    cmap
        Colour map of ``-log10`` FDR.
    max_label
        Term names longer than this are shortened.
    ax
        Axes to draw into.
    {plot_output}

    Returns
    -------
    {plot_returns}

    Raises
    ------
    ValueError
        When no term passes ``fdr_threshold`` for the features shown.
    """
    import matplotlib.pyplot as plt

    result = enrichment_result(adata, key)
    params = result["params"]
    res = pd.DataFrame(result["results"])
    sig = res[res["fdr"] < fdr_threshold]
    if features is None:
        best = pd.DataFrame(result["best"]).sort_values(["fdr", "pval"])
        features = best.loc[best["fdr"] < fdr_threshold, "feature"].head(n_features).tolist()
    features = [int(f) for f in features]
    sig = sig[sig["feature"].isin(features)]
    if sig.empty:
        msg = f"no term has FDR < {fdr_threshold} for the features shown; nothing to plot"
        raise ValueError(msg)
    counts = (
        sig.groupby("term")
        .agg(n=("feature", "size"), fdr=("fdr", "min"))
        .sort_values(["n", "fdr"], ascending=[False, True])
    )
    terms = counts.index[:n_terms].tolist()
    sig = sig[sig["term"].isin(terms)]
    features = [f for f in features if f in set(sig["feature"])]

    plot = Plotter(ax=ax, figsize=figsize, dpi=dpi, show=show, save=save, return_fig=return_fig)
    fig, (axis,) = plot.subplots(
        figsize=(1.2 + 0.55 * len(features) + 0.09 * max_label, max(3.2, 1.6 + 0.35 * len(terms)))
    )
    x = sig["feature"].map({f: i for i, f in enumerate(features)}).to_numpy()
    y = sig["term"].map({t: i for i, t in enumerate(terms)}).to_numpy()
    color = -np.log10(np.clip(sig["fdr"].to_numpy(), 1e-300, None))
    score = sig["score"].to_numpy(dtype=float)
    size = 30 + 170 * (np.abs(score) / max(np.abs(score).max(), 1e-12))
    points = axis.scatter(x, y, s=size, c=color, cmap=cmap, edgecolors="0.3", linewidths=0.5)
    axis.set_xticks(range(len(features)))
    layer = params["layer"]
    axis.set_xticklabels(
        [feature_label(adata, params["key"], layer, f, n_genes=2) for f in features], rotation=60, ha="right"
    )
    axis.set_yticks(range(len(terms)))
    axis.set_yticklabels([_shorten(t, max_label) for t in terms])
    axis.set_xlim(-0.6, len(features) - 0.4)
    axis.set_ylim(len(terms) - 0.4, -0.6)
    axis.grid(True, color="0.92", zorder=0)
    axis.set_axisbelow(True)
    axis.set_title(f"Layer {layer} features, {params['side']} map, {params['method']}")
    fig.colorbar(points, ax=axis, label="-log10 FDR", shrink=0.5, anchor=(0.0, 1.0))
    # a legend for dot size in score units
    handles = [
        plt.scatter([], [], s=30 + 170 * q, color="0.6", edgecolors="0.3", linewidths=0.5) for q in (0.25, 0.5, 1.0)
    ]
    top = np.abs(score).max()
    axis.legend(
        handles, [f"{q * top:.3g}" for q in (0.25, 0.5, 1.0)], title="score", loc="lower left",
        bbox_to_anchor=(1.02, 0.0), frameon=False, labelspacing=1.2,
    )  # fmt: skip
    return plot.finish()
