"""Checks of the command line's arguments, each made before the work it guards.

Numbers are checked by argparse (``type=``), the data right after it is read, the model and transcoders right after
they are loaded. Every refusal is a :class:`CliError`: one line, ``error: ...``, naming the argument, exit status 2.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ._pipeline import groups_of

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from anndata import AnnData


class CliError(Exception):
    """A problem with the arguments: printed as ``error: ...`` and exit status 2."""


class LoadError(Exception):
    """A model or transcoders that cannot be loaded: printed as ``error: ...`` and exit status 1."""


def one_line(text: object) -> str:
    """``text`` with every run of white space (newlines included) made one space."""
    return " ".join(str(text).split())


def listing(items: Iterable[object], most: int = 12) -> str:
    """Up to ``most`` items, quoted, and how many there are in all when there are more."""
    items = [str(i) for i in items]
    shown = ", ".join(repr(i) for i in items[:most])
    return f"[{shown}, ... ({len(items)} in all)]" if len(items) > most else f"[{shown}]"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``error: <argument> ...``, with exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line and exit with status 2 (no usage text)."""
        message = re.sub(r"^argument (\S+?): must ", r"\1 must ", message)
        self.exit(2, f"error: {one_line(message)}\n")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        msg = f"must be an integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = _int(text)
    if value < 1:
        msg = f"must be at least 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def layer_number(text: str) -> int:
    """An argparse type: a model layer, 0 or more (a negative one is refused, not counted from the end)."""
    value = _int(text)
    if value < 0:
        msg = f"must be a layer number, 0 or more (layers are not counted from the end), got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` torch cannot put a tensor on (``cuda`` without CUDA, a misspelling)."""
    if device is None:
        return
    import torch

    try:
        torch.empty(0, device=torch.device(device))
    except (RuntimeError, AssertionError, ValueError) as err:
        msg = f"--device {device!r} cannot be used here: {one_line(err)}"
        raise CliError(msg) from None


def read_adata(path: str | Path, flag: str = "--adata") -> AnnData:
    """The AnnData in the .h5ad file at ``path``; a missing or unreadable file is a :class:`CliError`."""
    import anndata as ad

    file = Path(path)
    if not file.is_file():
        msg = f"{flag}: no such file: {file}"
        raise CliError(msg)
    try:
        return ad.read_h5ad(file)
    except Exception as err:  # whatever a damaged or foreign file makes the reader raise; not KeyboardInterrupt
        msg = f"{flag} {file} cannot be read as .h5ad ({type(err).__name__}: {one_line(err)})"
        raise CliError(msg) from None


def check_obs_column(adata: AnnData, column: str | None, flag: str) -> None:
    """Refuse a ``column`` (given as ``flag``) that is not in ``.obs``."""
    if column is not None and column not in adata.obs.columns:
        msg = f"{flag} {column!r} is not a column of .obs ({listing(adata.obs.columns)})"
        raise CliError(msg)


def check_sentence_source(adata: AnnData, layer: str | None, gene_symbols: str | None) -> None:
    """Refuse a ``--layer`` not in ``.layers`` and a ``--gene-symbols`` column not in ``.var``."""
    if layer is not None and layer not in adata.layers:
        msg = f"--layer {layer!r} is not a layer of the data (.layers: {listing(adata.layers.keys())})"
        raise CliError(msg)
    if gene_symbols is not None and gene_symbols not in adata.var.columns:
        msg = f"--gene-symbols {gene_symbols!r} is not a column of .var ({listing(adata.var.columns)})"
        raise CliError(msg)


def check_groups_in_data(adata: AnnData, groupby: str | None, groups: Sequence[str] | None) -> None:
    """Refuse ``--groups`` without ``--groupby``, and a group with no cells in ``.obs[groupby]``."""
    if groups is None:
        return
    if groupby is None:
        msg = "--groups needs --groupby, the .obs column the groups are values of"
        raise CliError(msg)
    present = groups_of(adata, groupby)
    for g in groups:
        if g not in present:
            msg = f"--groups {g!r} is not a group of .obs[{groupby!r}] (groups: {listing(present)})"
            raise CliError(msg)


def check_labels(names: Iterable[str], labels: Sequence[str], flag: str) -> None:
    """Refuse a name (given as ``flag``) that is not a cell-type label the model knows."""
    for name in names:
        if name not in labels:
            msg = f"{flag} {name!r} is not a label the model knows (labels: {listing(labels)})"
            raise CliError(msg)


def check_traceable(
    adata: AnnData, groupby: str, groups: Sequence[str] | None, labels: Sequence[str], *, some: bool
) -> None:
    """Refuse groups the model has no label for.

    Of groups given in ``--groups``, any; of the default (every group of the data), any when ``some`` is false, or
    all of them when it is true (a run traces the labelled ones and skips the rest).
    """
    if groups is not None:
        check_labels(groups, labels, "--groups")
        return
    present = groups_of(adata, groupby)
    unknown = [g for g in present if g not in labels]
    if unknown and (not some or len(unknown) == len(present)):
        which = "none of its groups is" if some else f"its groups {listing(unknown)} are not"
        msg = (
            f"--groupby {groupby!r}: {which} a label the model knows (labels: {listing(labels)}); "
            "name labelled groups with --groups" + ("" if some else ", or trace one label with --target")
        )
        raise CliError(msg)


def check_layers(layers: Sequence[int] | None, n_layers: int, available: Sequence[int] | None = None) -> None:
    """Refuse ``--layers`` beyond the model's ``n_layers``, or (``available``) without a transcoder."""
    for layer in layers or ():
        if layer >= n_layers:
            msg = f"--layers {layer} is beyond the model's {n_layers} layers (0 to {n_layers - 1})"
            raise CliError(msg)
        if available is not None and layer not in available:
            msg = f"--layers {layer} has no transcoder in --transcoders (layers {list(available)})"
            raise CliError(msg)
