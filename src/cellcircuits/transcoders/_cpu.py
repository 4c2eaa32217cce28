"""Running the numba kernels (:mod:`._cpu_kernels`): their import, and their rows shared among threads."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import torch

#: Entries of a block per thread of a kernel: the search's (1024, 1024) block runs in one thread, which was faster
#: than two on a 2-core machine (the hand-off and torch's threads, still spinning after its last op, cost more than
#: the half).
_ENTRIES_PER_THREAD = 1 << 21


def cpu_kernels() -> ModuleType | None:
    """The numba kernels (:mod:`._cpu_kernels`); ``None`` where numba cannot be imported.

    numba is a dependency, but an environment installed without dependencies may lack it (a GPU image, say); the
    callers then take torch's operations instead, with the same results, more slowly.
    """
    try:
        from . import _cpu_kernels
    except ImportError:
        return None
    return _cpu_kernels


#: This process's threads for the kernels' parts: its id, the number of threads, the pool.
_pool: tuple[int, int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _threads(workers: int) -> ThreadPoolExecutor:
    """A pool of at least ``workers`` threads for this process (a new one after a fork: the child lacks the threads)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] < workers:
            # a smaller pool is dropped, not shut down: a search still using it keeps it alive until it is done,
            # and its threads end once it is collected
            _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="cellcircuits-cpu"))
        return _pool[2]


def in_parts(kernel: Callable[..., int], rows: int, n: int, *args: object) -> list[int]:
    """``kernel(*args, lo, hi)`` over ``rows`` of ``n`` entries, split among up to torch's number of CPU threads.

    One part per :data:`_ENTRIES_PER_THREAD` entries; the calling thread runs the first. The kernels release the GIL,
    so the parts run at once.
    """
    parts = max(1, min(torch.get_num_threads(), rows, rows * n // _ENTRIES_PER_THREAD))
    bounds = [rows * i // parts for i in range(parts + 1)]
    if parts == 1:
        return [kernel(*args, 0, rows)]
    pool = _threads(parts - 1)
    futures = [pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    first = kernel(*args, bounds[0], bounds[1])
    return [first, *(f.result() for f in futures)]
