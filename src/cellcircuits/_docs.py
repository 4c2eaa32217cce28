"""Parameter descriptions shared by several public functions, filled into their docstrings.

A docstring names a shared text by an indented placeholder (``    {plot_output}``); each text's first line carries no
indentation and its other lines the docstring's, so the filled docstring reads as if written out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

F = TypeVar("F", bound="Callable")

_SHARED = {
    "plot_output": """\
figsize, dpi
        Size and resolution of a new figure.
    show
        Show the figure; ``False`` returns the axes.
    save
        Write the figure to this path (format from the suffix, e.g. ``.png``, ``.pdf``, ``.svg``).
    return_fig
        Return the figure.""",
    "plot_returns": "The figure with ``return_fig``, the axes with ``show=False``, else ``None``.",
}


def doc_params(func: F) -> F:
    """Fill ``{plot_output}`` and the other shared descriptions into ``func``'s docstring."""
    doc = func.__doc__ or ""
    for name, text in _SHARED.items():  # not str.format: docstrings hold literal braces such as X_{basis}
        doc = doc.replace("{" + name + "}", text)
    func.__doc__ = doc
    return func
