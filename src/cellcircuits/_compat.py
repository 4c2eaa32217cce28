"""Old spellings of arguments, kept working for one release with a warning; a typed view of SciPy's sparse check."""

from __future__ import annotations

import functools
import sys
import warnings
from typing import TYPE_CHECKING, ParamSpec, TypeGuard, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

    from scipy import sparse

P = ParamSpec("P")
R = TypeVar("R")

#: The release that drops the old spellings.
REMOVED_IN = "0.3"


def model_layers_renamed(func: Callable[P, R]) -> Callable[P, R]:
    """Accept the old ``layer=`` (a model layer) of a function whose model layers are now ``layers=``.

    ``layer`` means an AnnData layer across the package, as in scanpy; a function decorated here has no AnnData layer,
    so a ``layer=`` passed to it is the old name of ``layers=``: it is forwarded with a :class:`FutureWarning`.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if "layer" in kwargs:
            if "layers" in kwargs:
                msg = f"{func.__name__}() got both layer= and layers=; pass the model layer(s) as layers= alone."
                raise TypeError(msg)
            warnings.warn(
                f"{func.__name__}(layer=...) is deprecated and will be removed in cellcircuits {REMOVED_IN}: model "
                "layers are chosen with layers=; layer= names an AnnData layer, as in scanpy.",
                FutureWarning,
                stacklevel=2,
            )
            kwargs["layers"] = kwargs.pop("layer")
        return func(*args, **kwargs)

    return wrapper


def is_sparse(x: object) -> TypeGuard[sparse.sparray | sparse.spmatrix]:
    """:func:`scipy.sparse.issparse`, in a form type checkers narrow on (SciPy is read as untyped)."""
    from scipy.sparse import issparse

    return issparse(x)


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn, attributing the warning to the first frame outside this package (the user's call).

    Tools reach their warnings through decorators and layers of the package, so a fixed ``stacklevel`` would point
    into the package for some call paths.
    """
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("cellcircuits."):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
