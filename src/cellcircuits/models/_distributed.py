"""Data parallelism over ``torch.distributed`` ranks: which cells a rank takes, and gathering results on rank 0.

Every tool that runs a model over many cells can run under ``torchrun --nproc_per_node N`` (or inside a process
group the caller initialised): each rank takes a contiguous share of the cells, and rank 0 gathers the results in
cell order. Without an initialised process group everything runs in one process and these helpers are identities.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """The rank of this process (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def collective_device() -> torch.device:
    """Where tensors for a collective call live: this rank's CUDA device under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard_bounds(n: int, ranks: int | None = None) -> np.ndarray:
    """Boundaries of contiguous, near-equal shares of ``n`` items: rank ``r`` takes ``bounds[r]:bounds[r + 1]``.

    Parameters
    ----------
    n
        Number of items.
    ranks
        Number of shares (default: :func:`world_size`).

    Returns
    -------
    ``(ranks + 1,)`` boundaries, first 0 and last ``n``.

    Raises
    ------
    ValueError
        When there are more ranks than items (a rank would have nothing to do).
    """
    ranks = world_size() if ranks is None else int(ranks)
    if ranks > n:
        msg = f"{ranks} ranks for {n} cells: every rank needs at least one cell; run fewer processes"
        raise ValueError(msg)
    return np.linspace(0, n, ranks + 1).round().astype(np.int64)


def my_shard(n: int) -> slice:
    """The contiguous share of ``n`` items this rank takes (all of them without a process group)."""
    bounds = shard_bounds(n)
    r = rank()
    return slice(int(bounds[r]), int(bounds[r + 1]))


def gather_rows(part: torch.Tensor | np.ndarray, n: int) -> np.ndarray | None:
    """Concatenate every rank's rows, in rank order, on rank 0.

    Parameters
    ----------
    part
        This rank's rows (its :func:`my_shard` of ``n`` items), any trailing shape, the same on every rank.
    n
        Total number of rows.

    Returns
    -------
    On rank 0 the ``(n, ...)`` array; on other ranks ``None``. Without a process group, ``part`` itself.
    """
    array = part.detach().cpu().numpy() if isinstance(part, torch.Tensor) else np.asarray(part)
    if not is_distributed():
        return array
    bounds = shard_bounds(n)
    width = int(np.diff(bounds).max())
    device = collective_device()
    padded = torch.zeros((width, *array.shape[1:]), dtype=torch.from_numpy(array[:0]).dtype, device=device)
    padded[: len(array)] = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    pieces = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(pieces, padded)
    if rank() != 0:
        return None
    return np.concatenate([p[: bounds[r + 1] - bounds[r]].cpu().numpy() for r, p in enumerate(pieces)])


def all_gather_bytes(payload: bytes) -> list[bytes]:
    """Every rank's ``payload``, in rank order, on every rank (``[payload]`` without a process group).

    Parameters
    ----------
    payload
        This rank's bytes (e.g. :func:`frames_to_bytes` of its result tables).

    Returns
    -------
    One ``bytes`` per rank.
    """
    if not is_distributed():
        return [payload]
    device = collective_device()
    length = torch.tensor([len(payload)], dtype=torch.long, device=device)
    lengths = [torch.empty_like(length) for _ in range(world_size())]
    dist.all_gather(lengths, length)
    width = max(int(n.item()) for n in lengths)
    buffer = torch.zeros(width, dtype=torch.uint8, device=device)
    buffer[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if payload else 0
    pieces = [torch.empty_like(buffer) for _ in range(world_size())]
    dist.all_gather(pieces, buffer)
    return [bytes(p[: int(n.item())].cpu().numpy().tobytes()) for p, n in zip(pieces, lengths, strict=True)]


def frames_to_bytes(frames: list[pd.DataFrame]) -> bytes:
    """Data frames as the bytes of an ``.npz`` archive (numbers exact, text as unicode; no pickle).

    Parameters
    ----------
    frames
        Frames with numeric, boolean or text columns (their index is dropped).

    Returns
    -------
    The archive's bytes; :func:`frames_from_bytes` reads them back.
    """
    arrays: dict[str, np.ndarray] = {"n_frames": np.array(len(frames))}
    for i, frame in enumerate(frames):
        arrays[f"{i}/columns"] = np.array([str(c) for c in frame.columns], dtype=str)
        for j, column in enumerate(frame.columns):
            values = frame[column].to_numpy()
            arrays[f"{i}/{j}"] = values.astype(str) if values.dtype == object else values
    out = io.BytesIO()
    np.savez(out, allow_pickle=False, **arrays)
    return out.getvalue()


def frames_from_bytes(payload: bytes) -> list[pd.DataFrame]:
    """The frames :func:`frames_to_bytes` wrote (text columns as Python strings).

    Parameters
    ----------
    payload
        The archive's bytes.

    Returns
    -------
    The frames, in order.
    """
    with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        frames = []
        for i in range(int(archive["n_frames"])):
            columns = archive[f"{i}/columns"].tolist()
            data = {}
            for j, column in enumerate(columns):
                values = archive[f"{i}/{j}"]
                data[column] = values.astype(object) if values.dtype.kind == "U" else values
            frames.append(pd.DataFrame(data, columns=columns))
    return frames
