"""cellcircuits: transcoders and circuit tracing for Cell2Sentence-style single-cell foundation models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

# Submodules load on first access, so `import cellcircuits` stays light (no torch until a model is needed).
_SUBMODULES = ("circuits", "ds", "get", "models", "pl", "pp", "tl", "transcoders")
# Classes and functions offered at the top level, each resolved from the submodule that defines it.
_ATTRIBUTES = {"Transcoder": "transcoders", "TranscoderSet": "transcoders", "load_transcoders": "transcoders"}

if TYPE_CHECKING:
    from . import circuits, ds, get, models, pl, pp, tl, transcoders  # noqa: F401
    from .transcoders import Transcoder, TranscoderSet, load_transcoders  # noqa: F401

__all__ = [*_SUBMODULES, *_ATTRIBUTES, "__version__"]


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(f".{_ATTRIBUTES[name]}", __name__), name)
        globals()[name] = value
        return value
    msg = f"module 'cellcircuits' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
