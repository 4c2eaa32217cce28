"""Training checkpoints: tensors in safetensors files, everything else in JSON, never pickle.

Layout of a checkpoint directory::

    checkpoint.json                   format, settings, step, the files below and the JSON state
    state-00000100.safetensors        transcoders, optimizer moments, global RNG state (written by rank 0)
    rank0-00000100.safetensors        this rank's data state (shuffle buffer, generator); its JSON in the metadata
    rank1-00000100.safetensors        ...

``checkpoint.json`` is replaced atomically after every file it names is written, so a run killed at any moment
leaves the last complete checkpoint in place and loses at most one interval of steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..models._distributed import is_distributed, rank, world_size

FORMAT = "cellcircuits.train_checkpoint/1"
INDEX = "checkpoint.json"


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


def read_index(directory: str | Path | None) -> dict[str, Any] | None:
    """The checkpoint index in ``directory``, or ``None`` when there is none (no directory, or nothing saved yet).

    Parameters
    ----------
    directory
        Checkpoint directory.

    Returns
    -------
    The parsed ``checkpoint.json``.

    Raises
    ------
    ValueError
        For a file of another format.
    """
    if directory is None or not (Path(directory) / INDEX).is_file():
        return None
    index = json.loads((Path(directory) / INDEX).read_text())
    if index.get("format") != FORMAT:
        msg = f"{Path(directory) / INDEX} is not a cellcircuits training checkpoint ({index.get('format')!r})"
        raise ValueError(msg)
    return index


def check_settings(directory: str | Path, index: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint written with other settings, naming each that differs.

    Parameters
    ----------
    directory
        Checkpoint directory (for the message).
    index
        Its index (:func:`read_index`).
    settings
        This run's settings, JSON values.

    Raises
    ------
    ValueError
        When any setting differs.
    """
    saved = index["settings"]
    # through JSON, so tuples and lists compare alike
    now = json.loads(json.dumps(settings))
    differ = [
        f"{key}: {saved.get(key, '(absent)')!r} in the checkpoint, {now.get(key, '(absent)')!r} now"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]
    if differ:
        msg = (
            f"the checkpoint in {directory} was written by a run with other settings; resume with the same "
            f"settings or pass another checkpoint_dir. Differences: {'; '.join(differ)}"
        )
        raise ValueError(msg)


def save_checkpoint(
    directory: str | Path,
    settings: dict[str, Any],
    step: int,
    shared: tuple[dict[str, torch.Tensor], dict[str, Any]],
    own: tuple[dict[str, torch.Tensor], dict[str, Any]],
) -> None:
    """Write a checkpoint: rank 0 its ``shared`` state, every rank its ``own``, then rank 0 the index.

    Parameters
    ----------
    directory
        Checkpoint directory (made when missing).
    settings
        The run's settings, checked on resume.
    step
        Steps done.
    shared
        Tensors and JSON state that are the same on every rank (transcoders, optimizer).
    own
        This rank's tensors and JSON state (its data order and buffer).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    r, world = rank(), world_size()
    own_name = f"rank{r}-{step:08d}.safetensors"
    _atomic_tensors(directory / own_name, own[0], {"format": FORMAT, "state": json.dumps(own[1])})
    _barrier()
    if r == 0:
        old = read_index(directory)
        shared_name = f"state-{step:08d}.safetensors"
        _atomic_tensors(directory / shared_name, shared[0], {"format": FORMAT})
        index = {
            "format": FORMAT,
            "settings": settings,
            "step": step,
            "world_size": world,
            "shared": shared_name,
            "ranks": [f"rank{i}-{step:08d}.safetensors" for i in range(world)],
            "state": shared[1],
        }
        _atomic_json(directory / INDEX, index)  # the commit point
        if old is not None and old["step"] != step:
            for name in [old["shared"], *old["ranks"]]:
                (directory / name).unlink(missing_ok=True)
    _barrier()


def load_checkpoint(
    directory: str | Path, index: dict[str, Any]
) -> tuple[tuple[dict[str, torch.Tensor], dict[str, Any]], tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """The shared state and this rank's own state of the checkpoint ``index`` names.

    Parameters
    ----------
    directory
        Checkpoint directory.
    index
        Its index (:func:`read_index`), already checked against this run's settings.

    Returns
    -------
    ``(shared tensors, shared JSON)`` and ``(own tensors, own JSON)``.
    """
    from safetensors import safe_open

    directory = Path(directory)
    shared = load_file(str(directory / index["shared"]))
    own_path = directory / index["ranks"][rank()]
    with safe_open(str(own_path), framework="pt") as f:
        meta = f.metadata() or {}
    return (shared, index["state"]), (load_file(str(own_path)), json.loads(meta.get("state", "{}")))
