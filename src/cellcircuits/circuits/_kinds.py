"""The kinds of node of an attribution graph: one vocabulary of codes and names for every circuits module."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence


class NodeKind(IntEnum):
    """Kind of a node of an attribution graph (the codes of a ``kinds`` array).

    Graph math takes the integer codes; node tables (:class:`~cellcircuits.circuits.Nodes`,
    :class:`~cellcircuits.circuits.Graph`) spell a kind by its :attr:`tag`, its lower-case name. :meth:`codes`
    turns either spelling into codes.
    """

    TOKEN = 0
    """An input embedding: outputs only."""
    FEATURE = 1
    """A transcoder feature: inputs and outputs."""
    ERROR = 2
    """A reconstruction error: outputs only."""
    TARGET = 3
    """A quantity being explained (a logit): inputs only."""

    @property
    def tag(self) -> str:
        """The kind's name in node tables: ``"token"``, ``"feature"``, ``"error"`` or ``"target"``."""
        return self.name.lower()

    @classmethod
    def codes(
        cls,
        kinds: np.ndarray | Sequence[int] | Sequence[str],
        aliases: Mapping[str, NodeKind | str] | None = None,
    ) -> np.ndarray:
        """Node kinds, given by code or by name, as an array of codes.

        Parameters
        ----------
        kinds
            :class:`NodeKind` codes (integers ``0..3``), or names (:attr:`tag`, any case); a torch tensor is read
            on the CPU.
        aliases
            Further names and the kind each stands for, e.g. ``NodeKind.codes(table["kind"], aliases={"gene":
            "token"})`` for a table that calls a token spelling a gene a ``"gene"``.

        Returns
        -------
        ``int8`` codes, shaped like ``kinds``.

        Raises
        ------
        ValueError
            For an unknown name, or values that are neither names nor codes ``0..3``.
        """
        if hasattr(kinds, "detach"):
            kinds = kinds.detach().cpu().numpy()
        arr = np.asarray(kinds)
        if arr.dtype.kind in "OUS":
            names = {kind.tag: kind.value for kind in cls}
            for alias, kind in (aliases or {}).items():
                if not isinstance(kind, NodeKind) and str(kind).lower() not in names:
                    msg = f"alias {alias!r} stands for unknown node kind {kind!r}; expected one of {sorted(names)}"
                    raise ValueError(msg)
                names[str(alias).lower()] = kind.value if isinstance(kind, NodeKind) else names[str(kind).lower()]
            lowered = [str(x).lower() for x in arr.reshape(-1)]
            unknown = sorted(set(lowered) - names.keys())
            if unknown:
                msg = f"unknown node kinds {unknown}; expected {sorted(names)}"
                raise ValueError(msg)
            return np.array([names[x] for x in lowered], dtype=np.int8).reshape(arr.shape)
        codes = arr.astype(np.int64)
        if arr.dtype.kind not in "iu" or (codes < 0).any() or (codes > max(cls)).any():
            msg = f"kinds must be NodeKind codes 0..{max(cls)} or kind names, got {arr.dtype} values"
            raise ValueError(msg)
        return codes.astype(np.int8)
