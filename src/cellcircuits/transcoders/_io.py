"""Saving and loading transcoder sets (the layout on disk: :mod:`cellcircuits.transcoders._format`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ._format import CONFIG_FILE, SET_FILE, WEIGHTS_FILE, layer_dir, read_config, read_set_meta, read_tensors
from ._transcoder import Transcoder
from ._transcoder_set import TranscoderSet

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._config import TranscoderConfig


#: Transcoder sets shipped inside the package, by the name of the shipped model they were trained on.
SHIPPED_TRANSCODERS: dict[str, str] = {"pbmc68k-genes": "pbmc68k-genes"}


def shipped_transcoders_path(name: str) -> Path | None:
    """Directory of the transcoder set shipped for the shipped model ``name``, or ``None`` when none ships."""
    if name not in SHIPPED_TRANSCODERS:
        return None
    path = Path(str(resources.files("cellcircuits.transcoders") / "_data" / SHIPPED_TRANSCODERS[name]))
    return path if path.is_dir() else None


def save_transcoders(transcoders: TranscoderSet, directory: str | Path) -> None:
    """Write a transcoder set to ``directory``, one ``layer_{L}`` folder per layer (see :meth:`TranscoderSet.save`).

    Parameters
    ----------
    transcoders
        The set to save; its modules are not changed.
    directory
        Destination folder, created when missing; files already there are overwritten.
    """
    transcoders.save(directory)


def _build(cfg: TranscoderConfig, tensors: Mapping[str, torch.Tensor]) -> Transcoder:
    tc = Transcoder(cfg)
    with torch.no_grad():
        for name, t in tensors.items():
            if name == "threshold":
                assert tc.log_threshold is not None  # read_tensors admits a threshold for jumprelu alone
                tc.log_threshold.copy_(t.log())
            else:
                getattr(tc, name).copy_(t)
    return tc


def load_transcoders(
    directory: str | Path,
    *,
    n_layers: int | None = None,
    d_model: int | None = None,
    device: torch.device | str | None = None,
) -> TranscoderSet:
    """Load a transcoder set written by :meth:`TranscoderSet.save`.

    Parameters
    ----------
    directory
        Folder holding ``transcoder_set.json`` and one ``layer_{L}`` folder per layer, or the name of a shipped
        model whose transcoders ship with the package (``"pbmc68k-genes"``; :data:`SHIPPED_TRANSCODERS`). A folder
        of that name in the working directory wins over the shipped set.
    n_layers
        Number of layers of the model the transcoders will be used with; a mismatch is an error.
    d_model
        Residual width of that model; a mismatch is an error.
    device
        Device to move the transcoders to.

    Returns
    -------
    The transcoder set, with scales of 1 (the files hold folded weights) and no dead-feature history.
    """
    shipped = shipped_transcoders_path(str(directory))
    directory = Path(directory)
    if not directory.is_dir() and shipped is not None:
        directory = shipped
    if not directory.is_dir():
        have = sorted(n for n in SHIPPED_TRANSCODERS if shipped_transcoders_path(n) is not None)
        msg = f"{directory} is not a directory (transcoders ship for the models {have})"
        raise FileNotFoundError(msg)
    meta = read_set_meta(directory / SET_FILE)
    transcoders = {}
    for layer in meta["layers"]:
        folder = layer_dir(directory, layer)
        cfg = read_config(folder / CONFIG_FILE)
        transcoders[layer] = _build(cfg, read_tensors(folder / WEIGHTS_FILE, cfg))
    try:
        tset = TranscoderSet(
            transcoders,
            n_layers_model=meta["n_layers_model"],
            model_name=meta["model_name"],
            architecture=meta["architecture"],
            d_model=meta["d_model"],
        )
    except ValueError as err:
        msg = f"{directory}: {err}"
        raise ValueError(msg) from err
    tset.check_compatible(n_layers=n_layers, d_model=d_model)
    return tset.to(device) if device is not None else tset
