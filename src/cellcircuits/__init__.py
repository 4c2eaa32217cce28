"""cellcircuits: transcoders and circuit tracing for Cell2Sentence-style single-cell foundation models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Submodules load on first access, so `import cellcircuits` stays light (no torch until a model is needed).
_SUBMODULES = ("ds", "get", "models", "pl", "pp", "tl")

if TYPE_CHECKING:
    from . import ds, get, models, pl, pp, tl  # noqa: F401

__all__ = [*_SUBMODULES, "__version__"]


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    msg = f"module 'cellcircuits' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
