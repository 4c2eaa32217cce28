"""Top-k selection: the ``k`` largest pre-activations of each row, with their columns in ascending order.

A TopK transcoder chooses its active features by this search at every training step and every forward pass. On the
CPU it is a few times faster than ``torch.topk``, whose full selection over each row the search avoids; off the CPU
it is ``torch.topk``.
"""

from __future__ import annotations

import numpy as np
import torch

from ._cpu import cpu_kernels, in_parts


def topk_indices(pre: torch.Tensor, k: int) -> torch.Tensor:
    """``(..., k)`` indices of the ``k`` largest entries of each row of ``pre``, ascending within each row.

    :func:`sparse_topk`'s indices.
    """
    return sparse_topk(pre, k)[1]


def sparse_topk_and_columns(
    pre: torch.Tensor, k: int, columns: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sparse_topk` of the 2-d ``pre``, and its ``columns`` (``pre.index_select(1, columns)``).

    The CPU search reads those columns while it has each row at hand, instead of a second pass over ``pre``.
    """
    with torch.no_grad():
        pre = pre.detach()
        if _searchable(pre, k):
            found = _search(pre.contiguous(), k, columns)
            if found is not None:
                return found
        return *_topk_ascending(pre, k), pre.index_select(1, columns)


def sparse_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(..., k)`` values and indices of the ``k`` largest entries of each row of ``pre``; indices ascending by row.

    The same selection as ``pre.topk(k)`` (up to the order and the choice among tied values), found faster on CPU:
    the row's ``n`` entries are split into ``2k`` strided groups, and the ``k``-th largest group maximum is a floor
    that at least ``k`` entries reach. One pass over the row (a numba kernel; a large block's rows are shared among
    torch's CPU threads) packs the entries at or above it, a few times ``k`` in practice, in column order; the ``k``
    largest of those are the row's. Ties at a row's ``k``-th value are broken by column (the leftmost are kept).
    Falls back to ``torch.topk`` for dtypes NumPy lacks (bfloat16), when ``n`` is not a multiple of ``2k`` of at
    least ``4k``, for blocks with NaNs and without numba. Without gradient.

    Off the CPU it is ``torch.topk``, a sort of the ``k`` indices and a gather of their values: three kernels there,
    where a search would wait for the device.
    """
    with torch.no_grad():
        pre = pre.detach()
        flat = pre.reshape(-1, pre.shape[-1])
        found = _search(flat.contiguous(), k) if _searchable(flat, k) else None
        if found is None:
            return _topk_ascending(pre, k)
        shape = (*pre.shape[:-1], k)
        return found[0].view(shape), found[1].view(shape)


def _searchable(flat: torch.Tensor, k: int) -> bool:
    """Whether the CPU search takes the 2-d ``flat``: a float dtype NumPy has, ``n`` a multiple of ``2k``, >= ``4k``."""
    rows, n = flat.shape
    dtype_ok = flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64)
    return dtype_ok and rows > 0 and n % (2 * k) == 0 and n >= 4 * k


def _search(
    flat: torch.Tensor, k: int, wanted: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`sparse_topk` of the contiguous ``(rows, n)`` CPU block ``flat``, and its columns ``wanted``.

    The third tensor holds the ``(rows, len(wanted))`` entries of ``flat`` at the columns ``wanted`` (no columns
    without it). ``None`` when a row holds a NaN, or without numba.
    """
    kernels = cpu_kernels()
    if kernels is None:
        return None
    rows, n = flat.shape
    n_groups = 2 * k
    group_max = flat.view(rows, n // n_groups, n_groups).amax(1).numpy()  # a NaN anywhere in a row shows here
    if np.isnan(group_max).any():
        return None
    floor = np.partition(group_max, n_groups - k, axis=-1)[:, n_groups - k]  # the k-th largest group maximum
    pre = flat.numpy()
    counts = np.empty(rows, dtype=np.int64)
    wanted_ = np.empty(0, dtype=np.int64) if wanted is None else wanted.to(torch.long).contiguous().numpy()
    if len(wanted_) and not (0 <= wanted_.min() and wanted_.max() < n):  # the kernel does not check its reads
        msg = f"columns must lie in 0 .. {n - 1}"
        raise IndexError(msg)
    gathered = np.empty((rows, len(wanted_)), dtype=pre.dtype)
    cap = 4 * k
    while True:
        block = np.empty((rows, cap), dtype=pre.dtype)
        columns = np.empty((rows, cap), dtype=np.int64)
        args = (pre, floor, block, columns, counts, wanted_, gathered)
        most = max(in_parts(kernels.pack_candidates, rows, n, *args))
        if most <= cap:
            break
        cap = most  # a row had more candidates than the block held: pack again, into a block wide enough
    if counts.min() < k:  # the floor makes this impossible; pick_largest relies on it
        return None
    kth = np.partition(block[:, :most], most - k, axis=-1)[:, most - k]  # candidates are never NaN
    values = np.empty((rows, k), dtype=pre.dtype)
    indices = np.empty((rows, k), dtype=np.int64)
    kernels.pick_largest(block, columns, counts, kth, values, indices, 0, rows)
    return torch.from_numpy(values), torch.from_numpy(indices), torch.from_numpy(gathered)


def _topk_ascending(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    indices = _ascending(pre.topk(k, dim=-1, sorted=False).indices)
    return pre.gather(-1, indices), indices


def _ascending(indices: torch.Tensor) -> torch.Tensor:
    """``indices`` sorted along the last dimension; on the CPU by NumPy, several times faster there for short rows."""
    if indices.device.type == "cpu":
        return torch.from_numpy(np.sort(indices.numpy(), axis=-1))
    return indices.sort(-1).values
