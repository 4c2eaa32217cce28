"""The keyword arguments every plot shares: making or reusing its axes, then saving, showing or returning it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


@dataclass
class Plotter:
    """A plot's shared keyword arguments: make (or reuse) its axes, then save, show or return its figure.

    Every function of :mod:`cellcircuits.pl` takes these arguments under the same names and defaults, and hands them
    to one ``Plotter``; it asks for its axes with :meth:`subplots` once its inputs are checked and ends with
    :meth:`finish`.

    Parameters
    ----------
    ax
        Axes to draw into (a one-panel plot only); default a new figure.
    figsize, dpi
        Size and resolution of a new figure; ``figsize=None`` takes the plot's own default size.
    show
        Show the figure; ``False`` returns the axes.
    save
        Write the figure to this path (format from the suffix, e.g. ``.png``, ``.pdf``, ``.svg``).
    return_fig
        Return the figure.
    """

    ax: Axes | None = None
    figsize: tuple[float, float] | None = None
    dpi: int = 100
    show: bool | None = None
    save: str | Path | None = None
    return_fig: bool = False
    fig: Figure | None = field(default=None, init=False, repr=False)
    """The figure drawn into, set by :meth:`subplots`."""
    axes: list[Axes] = field(default_factory=list, init=False, repr=False)
    """The panels drawn into, set by :meth:`subplots`."""

    def subplots(
        self, n: int = 1, *, ncols: int = 4, figsize: tuple[float, float] | None = None
    ) -> tuple[Figure, list[Axes]]:
        """``n`` axes in a new figure (in rows of ``ncols``), or the given ``ax`` when ``n == 1``.

        The new figure's size is the caller's ``figsize``, else this plot's default ``figsize``, else 4.2 x 3.6
        inches a panel; unused cells of the grid are hidden. The figure of a given ``ax`` is the one it is drawn in
        (for an ``ax`` of a subfigure, the figure that holds the subfigure).
        """
        import matplotlib.pyplot as plt
        from matplotlib.figure import Figure

        if self.ax is not None:
            if n != 1:
                msg = f"ax can hold one panel, but this plot has {n}; leave ax=None"
                raise ValueError(msg)
            parent = self.ax.figure
            fig = parent if isinstance(parent, Figure) else parent.figure
            self.fig, self.axes = fig, [self.ax]
            return fig, self.axes
        ncols = min(n, ncols)
        nrows = int(np.ceil(n / ncols))
        size = self.figsize or figsize or (4.2 * ncols, 3.6 * nrows)
        fig, grid = plt.subplots(nrows, ncols, figsize=size, dpi=self.dpi, squeeze=False, layout="constrained")
        flat = list(grid.ravel())
        for extra in flat[n:]:
            extra.set_visible(False)
        self.fig, self.axes = fig, flat[:n]
        return fig, self.axes

    def finish(self) -> Figure | Axes | list[Axes] | None:
        """Save (any format matplotlib knows, from the suffix), then return the figure, the axes or nothing.

        The axes come back alone for a plot of one panel, as a list for one of several.
        """
        returned = self._save_and_show()
        if returned == "figure":
            return self.fig
        if returned == "axes":
            return self.axes[0] if len(self.axes) == 1 else self.axes
        return None

    def finish_panel(self) -> Figure | Axes | None:
        """:meth:`finish` of a plot of one panel: the figure, its axes or nothing."""
        returned = self._save_and_show()
        if returned == "figure":
            return self.fig
        return self.axes[0] if returned == "axes" else None

    def finish_panels(self) -> Figure | list[Axes] | None:
        """:meth:`finish` of a plot of several panels: the figure, the list of its axes or nothing."""
        returned = self._save_and_show()
        if returned == "figure":
            return self.fig
        return self.axes if returned == "axes" else None

    def _save_and_show(self) -> Literal["figure", "axes"] | None:
        """Save, then show the figure unless it or the axes are to be returned; which of them is, if any."""
        import matplotlib.pyplot as plt

        if self.fig is None:
            msg = "Plotter.finish() before Plotter.subplots(): there is no figure yet"
            raise RuntimeError(msg)
        if self.save is not None:
            self.fig.savefig(self.save, bbox_inches="tight")
        if self.return_fig:
            return "figure"
        if self.show is False:
            return "axes"
        if self.show:
            plt.show()
        return None
