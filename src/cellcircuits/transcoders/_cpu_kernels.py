"""CPU kernels compiled by numba: the top-k search's (:mod:`._select`), the sparse gradients' layout and transpose.

They release the GIL, and those that take a range ``lo:hi`` of rows let threads share one block
(:func:`._cpu.in_parts`). numba is imported with this module, which its callers import on first use
(:func:`._cpu.cpu_kernels`).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, boundscheck=False)
def pack_candidates(
    pre: np.ndarray,
    floor: np.ndarray,
    block: np.ndarray,
    columns: np.ndarray,
    counts: np.ndarray,
    wanted: np.ndarray,
    gathered: np.ndarray,
    lo: int,
    hi: int,
) -> int:
    """Each row's entries at or above its ``floor``, packed to the left of ``block`` in column order.

    Rows ``lo:hi`` of the ``(rows, n)`` ``pre``: ``counts[r]`` gets the number of entries ``pre[r, j] >= floor[r]``,
    and the first ``cap = block.shape[1]`` of them (in column order) go to ``block[r]`` with their columns in
    ``columns[r]``; the rest of ``block[r]`` is filled with ``-inf``. Gives the largest count, which may exceed
    ``cap`` (then those rows are cut short, and the caller packs again into a wider block). ``gathered[r]`` gets
    the row's entries at the columns ``wanted``, read while the row is at hand.
    """
    n = pre.shape[1]
    cap = block.shape[1]
    positions = np.empty(n + 1, dtype=np.int64)
    most = 0
    for r in range(lo, hi):
        row = pre[r]
        for t in range(len(wanted)):
            gathered[r, t] = row[wanted[t]]
        f = floor[r]
        c = 0
        for j in range(n):  # without a branch: every column is written, and the count moves on for candidates
            positions[c] = j
            c += row[j] >= f
        counts[r] = c
        most = max(most, c)
        m = min(c, cap)
        for t in range(m):
            columns[r, t] = positions[t]
            block[r, t] = row[positions[t]]
        for t in range(m, cap):
            block[r, t] = -np.inf
    return most


@njit(cache=True, nogil=True, boundscheck=False)
def pick_largest(
    block: np.ndarray,
    columns: np.ndarray,
    counts: np.ndarray,
    kth: np.ndarray,
    values: np.ndarray,
    indices: np.ndarray,
    lo: int,
    hi: int,
) -> int:
    """The ``k = values.shape[1]`` packed entries of each row at or above its ``kth`` largest, in column order.

    Rows ``lo:hi``: entries above ``kth[r]`` are all taken, and entries equal to it (ties) from the left until
    ``k`` are taken; their values go to ``values[r]`` and their columns to ``indices[r]``. Gives 0.
    """
    k = values.shape[1]
    for r in range(lo, hi):
        t_ = kth[r]
        c = counts[r]
        above = 0
        for t in range(c):
            above += block[r, t] > t_
        ties = k - above
        o = 0
        for t in range(c):
            v = block[r, t]
            if o < k and (v > t_ or (v == t_ and ties > 0)):
                if v == t_:
                    ties -= 1
                values[r, o] = v
                indices[r, o] = columns[r, t]
                o += 1
    return 0


@njit(cache=True, nogil=True, boundscheck=False)
def transposed_layout(indices: np.ndarray, crow: np.ndarray, order: np.ndarray, row_of: np.ndarray) -> bool:
    """The ``(n, rows)`` transpose of the ``(rows, k)`` column ``indices``, by a counting sort.

    Fills the transpose's row pointers ``crow`` (``n + 1``), and the flat positions ``order`` of the entries in
    column order (rows ascending within a column, as a stable sort gives them) with each one's row ``row_of``. Gives
    False, with the outputs unfinished, when an index is outside ``0 .. n - 1``.
    """
    rows, k = indices.shape
    n = len(crow) - 1
    crow[:] = 0
    for r in range(rows):
        for j in range(k):
            c = indices[r, j]
            if c < 0 or c >= n:
                return False
            crow[c + 1] += 1
    for c in range(n):
        crow[c + 1] += crow[c]
    fill = crow[:-1].copy()
    for r in range(rows):
        for j in range(k):
            c = indices[r, j]
            p = fill[c]
            fill[c] = p + 1
            order[p] = r * k + j
            row_of[p] = r
    return True


@njit(cache=True, nogil=True, boundscheck=False)
def count_since_fired(since: np.ndarray, columns: np.ndarray, values: np.ndarray, rows: int) -> bool:
    """Add ``rows`` to every feature's ``since`` count, then zero it for the ``columns`` with a non-zero value.

    The dead-feature counts' update for a batch's sparse activations (``columns`` and ``values`` of its entries).
    Gives False, with the counts unchanged, when a column is outside ``0 .. len(since) - 1``.
    """
    n = len(since)
    for i in range(len(columns)):
        if columns[i] < 0 or columns[i] >= n:
            return False
    for f in range(n):
        since[f] += rows
    for i in range(len(columns)):
        if values[i] != 0:
            since[columns[i]] = 0
    return True


#: Side of the square tiles :func:`transpose_rows` copies: 16 float32 entries are one 64-byte cache line.
TILE = 16


@njit(cache=True, nogil=True, boundscheck=False)
def transpose_rows(a: np.ndarray, out: np.ndarray, lo: int, hi: int) -> int:
    """Rows ``lo:hi`` of the ``(n, m)`` ``a`` into the columns ``lo:hi`` of the ``(m, n)`` ``out`` (``a.T``), by tiles.

    Each tile reads and writes whole cache lines, where an element-by-element transposing copy of a large matrix
    misses the cache on nearly every write. Gives 0.
    """
    m = a.shape[1]
    for i0 in range(lo, hi, TILE):
        i1 = min(i0 + TILE, hi)
        for j0 in range(0, m, TILE):
            for j in range(j0, min(j0 + TILE, m)):
                for i in range(i0, i1):
                    out[j, i] = a[i, j]
    return 0
