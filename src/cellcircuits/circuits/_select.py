"""Which features get attribution rows: influence on the target, estimated from the rows so far, kept on the device.

Circuit tracing gives rows to the features of most influence on the target, a batch at a time; each batch's rows make
the estimate better for the next. :class:`InfluenceTracker` updates that estimate as each batch arrives, in torch, on
the device the rows are computed on: only what the new rows change is propagated, instead of recomputing influence
from every row after every batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ._targets import FeatureTarget

if TYPE_CHECKING:
    from ._replacement import ReplacementModel

#: flows below this are treated as zero (influence is a share of the target, between 0 and 1)
TINY = 1e-15
#: Default number of features given attribution rows per prompt: on the shipped ``pbmc68k-genes`` model and its
#: transcoders, the smallest size of ``benchmarks/circuits.py --curve`` whose median completeness reaches 0.90.
DEFAULT_FEATURE_NODES = 1024
#: Default most targets per backward pass when a graph is built.
DEFAULT_BATCH_SIZE = 128
#: The influence estimate is updated after every ``1 / SELECTION_ROUNDS`` of the features (circuit-tracer updates it
#: after every 4 batches of 256 rows, about 7 times for its 7,500 feature nodes) ...
SELECTION_ROUNDS = 8
#: ... and after at most ``MIN_ROUND_SIZE`` features in small graphs.
MIN_ROUND_SIZE = 32


def round_size(max_feature_nodes: int, batch_size: int) -> int:
    """Features selected between two updates of the influence estimate: an eighth of the graph, 32 to ``batch_size``."""
    return max(1, min(batch_size, max(MIN_ROUND_SIZE, -(-max_feature_nodes // SELECTION_ROUNDS))))


def influence_from_rows(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Influence of every node on the target, from scratch, given the target's row and the selected features' rows.

    Parameters
    ----------
    rows
        ``(1 + S, n_nodes)`` attribution rows: the target's first, then one per selected feature.
    cols
        ``(S,)`` node index of each selected feature (the column of row ``k + 1``).

    Returns
    -------
    ``(n_nodes,)`` influence: the target's absolute, row-normalised attribution flowing to each node, directly and
    through the selected features (columns without a row are leaves).
    """
    A = rows.abs().double()
    R = A / A.sum(1, keepdim=True).clamp_min(1e-30)
    C = R[:, cols]
    reach = torch.zeros(R.shape[0], dtype=R.dtype, device=R.device)
    frontier = torch.zeros_like(reach)
    frontier[0] = 1.0
    for _ in range(R.shape[0]):  # a DAG: the frontier dies out within its depth
        step = frontier @ C
        if not bool((step > TINY).any()):
            break
        frontier = torch.cat([frontier.new_zeros(1), step])
        reach += frontier
    reach[0] = 1.0
    return reach @ R


def parse_bytes(size: int | str | None) -> int | None:
    """A memory size in bytes from an int or a string such as ``"4GB"``, ``"512MiB"`` (``None`` passes through).

    Parameters
    ----------
    size
        Bytes, or a number with a unit (B, KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB: powers of 1024).

    Returns
    -------
    The size in bytes.

    Raises
    ------
    ValueError
        For a malformed size or one below 1 byte.
    """
    if size is None:
        return None
    if isinstance(size, str):
        units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
        units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
        text = size.strip().lower().replace(" ", "")
        number = text.rstrip("kmgtib")
        unit = text[len(number) :] or "b"
        try:
            value = float(number) * units[unit]
        except (KeyError, ValueError):
            msg = f"memory size {size!r} is not a number of bytes or a size such as '4GB' or '512MiB'"
            raise ValueError(msg) from None
    else:
        value = float(size)
    if not value >= 1:
        msg = f"memory size must be at least 1 byte, got {size!r}"
        raise ValueError(msg)
    return int(value)


def check_graph_size(max_feature_nodes: int, memory_budget: int | str | None) -> int | str | None:
    """Refuse ``max_feature_nodes`` below 1 or a malformed memory budget, before any work.

    Parameters
    ----------
    max_feature_nodes
        Most features given attribution rows.
    memory_budget
        Bytes of rows kept on the device, as :func:`parse_bytes` reads them, or ``"auto"``.

    Returns
    -------
    The budget in bytes (``None``: no budget), or ``"auto"`` (resolved per prompt by :func:`device_budget`).
    """
    if max_feature_nodes < 1:
        msg = f"max_feature_nodes must be a positive integer, got {max_feature_nodes!r}"
        raise ValueError(msg)
    if isinstance(memory_budget, str) and memory_budget.strip().lower() == "auto":
        return AUTO
    return parse_bytes(memory_budget)


#: The memory budget that keeps attribution rows on a GPU up to half its free memory (see :func:`device_budget`).
AUTO = "auto"


def device_budget(memory_budget: int | str | None, device: torch.device, row_bytes: int) -> int | None:
    """Bytes of attribution rows to keep on ``device``; ``"auto"``: half a GPU's free memory, no budget elsewhere.

    The other half of a GPU's free memory is left to the backward passes that compute the rows (their memory grows
    with ``batch_size``); rows past the budget are kept in host memory. ``"auto"`` keeps at least one row
    (``row_bytes``) on the device.
    """
    if memory_budget != AUTO:
        return parse_bytes(memory_budget)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(row_bytes, free // 2)
    return None


def available_memory() -> int | None:
    """Bytes of host memory available to a new allocation (Linux's ``MemAvailable``); ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


class RowStore:
    """Attribution rows kept on the device up to a memory budget, the rest in host memory.

    Each row is kept as its absolute values and its signs, since influence reads only the absolute values: weighted
    sums of rows run as one matrix-vector product over the stored block, with no copy; the signed rows are rebuilt,
    exactly, only where they are read.

    Parameters
    ----------
    capacity
        Rows it will hold.
    n_nodes
        Length of a row.
    dtype
        Row dtype.
    device
        Where rows are computed and first kept.
    budget
        Bytes of rows kept on ``device``; rows past it go to host memory (pinned when the device is a GPU).
        ``None``: all on ``device``; ``"auto"``: :func:`device_budget`'s.

    Raises
    ------
    ValueError
        When the budget cannot hold even one row.
    """

    def __init__(
        self,
        capacity: int,
        n_nodes: int,
        dtype: torch.dtype,
        device: torch.device,
        budget: int | str | None = None,
    ) -> None:
        row_bytes = n_nodes * (torch.empty(0, dtype=dtype).element_size() + 1)  # values and a sign byte
        budget = device_budget(budget, device, row_bytes)
        if budget is not None and budget < row_bytes:
            msg = (
                f"the memory budget of {budget} bytes cannot hold one attribution row ({n_nodes} nodes, "
                f"{row_bytes} bytes); raise it"
            )
            raise ValueError(msg)
        on_device = capacity if budget is None else min(capacity, budget // row_bytes)
        _check_room(capacity, on_device, n_nodes, row_bytes, device)
        self.device = device
        # rows are read only after they are put: no need to fill the blocks
        self.near = torch.empty(on_device, n_nodes, dtype=dtype, device=device)
        self.near_sign = torch.empty(on_device, n_nodes, dtype=torch.bool, device=device)
        pin = device.type == "cuda"
        self.far = torch.empty(capacity - on_device, n_nodes, dtype=dtype, pin_memory=pin)
        self.far_sign = torch.empty(capacity - on_device, n_nodes, dtype=torch.bool, pin_memory=pin)

    @property
    def n_near(self) -> int:
        """Rows kept on the device."""
        return len(self.near)

    def _parts(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        index = index.to(self.device)
        near = index < self.n_near
        return near, index[near], ~near, index[~near] - self.n_near

    def put(self, start: int, rows: torch.Tensor) -> torch.Tensor:
        """Store ``rows`` at ``start, start + 1, ...``; gives their absolute sums ``|rows|.sum(1)`` as float64.

        The sums are taken in the rows' dtype (for float32 rows, a relative error of about ``1e-7``).
        """
        n_near = min(max(self.n_near - start, 0), len(rows))  # rows of a batch may straddle the budget
        sums = torch.empty(len(rows), dtype=torch.float64, device=self.device)
        if n_near:
            stored = self.near[start : start + n_near]
            torch.abs(rows[:n_near], out=stored)
            self.near_sign[start : start + n_near] = torch.signbit(rows[:n_near])
            sums[:n_near] = stored.sum(1)  # in the rows' dtype: a float64 accumulation is many times slower
        if n_near < len(rows):
            lo = start + n_near - self.n_near
            magnitude = rows[n_near:].abs()
            sums[n_near:] = magnitude.sum(1).to(self.device)
            self.far[lo : lo + len(rows) - n_near].copy_(magnitude, non_blocking=True)
            self.far_sign[lo : lo + len(rows) - n_near].copy_(torch.signbit(rows[n_near:]), non_blocking=True)
        return sums

    def abs_columns(self, index: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``|rows[index][:, cols]|``, on the device."""
        near, near_at, far, far_at = self._parts(index)
        out = torch.empty(len(index), len(cols), dtype=self.near.dtype, device=self.device)
        out[near] = self.near[near_at[:, None], cols[None, :]]  # only the entries asked for, not whole rows
        if len(far_at):
            far_cols = cols.cpu()
            out[far] = self.far[far_at.cpu()[:, None], far_cols[None, :]].to(self.device)
        return out

    def weighted_abs_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """``weights @ |rows[:len(weights)]|`` in float64 (``(n_nodes,)``, on the device); host rows on the host."""
        n = len(weights)
        weights = weights.to(self.near.dtype)
        out = (weights[: self.n_near] @ self.near[: min(n, self.n_near)]).double()
        if n > self.n_near:
            far = weights[self.n_near :].cpu() @ self.far[: n - self.n_near]
            out += far.double().to(self.device)
        return out

    @staticmethod
    def _signed(values: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        # the magnitudes take the signs of +-1: a few times faster than torch.where on the bool mask
        sign = negative.to(values.dtype).mul_(-2).add_(1)
        return torch.copysign(values, sign)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` on the device."""
        head = self._signed(self.near[start : min(stop, self.n_near)], self.near_sign[start : min(stop, self.n_near)])
        if stop <= self.n_near:
            return head
        lo, hi = max(0, start - self.n_near), stop - self.n_near
        tail = self._signed(self.far[lo:hi], self.far_sign[lo:hi]).to(self.device)
        return torch.cat([head, tail])

    def fold_columns(self, start: int, stop: int, column: torch.Tensor, n_out: int, chunk: int = 64) -> torch.Tensor:
        """Rows ``start:stop`` with their entries summed by ``column``: ``out[:, column[j]] += row[j]``.

        Computed where each row is kept, ``chunk`` rows at a time, in the rows' dtype; the ``(stop - start, n_out)``
        result is moved to the host as float64.
        """
        parts = []
        for lo in range(start, stop, chunk):
            hi = min(stop, lo + chunk)
            for a, b, near in ((lo, min(hi, self.n_near), True), (max(lo, self.n_near), hi, False)):
                if b <= a:
                    continue
                values, sign, offset = (
                    (self.near, self.near_sign, 0) if near else (self.far, self.far_sign, self.n_near)
                )
                block = self._signed(values[a - offset : b - offset], sign[a - offset : b - offset])
                # summed in the rows' own dtype: a float64 copy of the wide block would cost more than the sums
                out = torch.zeros(len(block), n_out, dtype=block.dtype, device=block.device)
                out.index_add_(1, column.to(block.device), block)
                parts.append(out.double().cpu())
        return torch.cat(parts) if parts else torch.zeros(0, n_out, dtype=torch.float64)


def _check_room(capacity: int, on_device: int, n_nodes: int, row_bytes: int, device: torch.device) -> None:
    """Refuse rows that cannot fit, with what they need, before allocating them (a clear error, not a crash)."""
    what = f"{capacity} attribution rows of {n_nodes} nodes ({row_bytes} bytes each)"
    advice = "lower max_feature_nodes or trace shorter prompts"
    on_host = capacity if device.type == "cpu" else capacity - on_device
    available = available_memory()
    if on_host and available is not None and on_host * row_bytes > available:
        where = "" if device.type == "cpu" else f", of which {on_host} past memory_budget in host memory"
        msg = (
            f"{what}{where} need {_gb(on_host * row_bytes)} of host memory, and {_gb(available)} is available; {advice}"
        )
        raise MemoryError(msg)
    if device.type == "cuda" and on_device:
        free, _ = torch.cuda.mem_get_info(device)
        if on_device * row_bytes > free:
            msg = (
                f"{what}: the {on_device} kept on {device} need {_gb(on_device * row_bytes)}, and {_gb(free)} is free "
                f"there; set memory_budget (e.g. 'auto' or '8GB') to keep the rest in host memory, or {advice}"
            )
            raise MemoryError(msg)


class InfluenceTracker:
    """The influence estimate of :func:`influence_from_rows`, updated incrementally as rows arrive.

    Rows are kept where they come from (the model's device, up to ``memory_budget`` bytes of them, the rest in host
    memory: :class:`RowStore`). Adding a batch seeds the new features with the influence the earlier rows send them,
    then propagates only that change through the rows (``Δ = s (I - C)^-1`` with ``C`` the rows' shares of the
    selected features, a ``(1 + S, S)`` block in the rows' dtype), and adds ``Δ @ |rows|``, one matrix-vector product
    in the rows' dtype, to the float64 estimate.

    Parameters
    ----------
    target_row
        ``(n_nodes,)`` direct attributions of the target.
    capacity
        Most feature rows that will be added.
    memory_budget
        Bytes of rows kept on the device (``None``: all; ``"auto"``: :func:`device_budget`'s).
    dtype
        Dtype the rows (and their shares ``C``) are kept in. Attribution rows are computed in float32, so the
        default loses nothing; the products over rows then round in float32 (relative error about ``1e-6``), float64
        rounds like the from-scratch computation. Float32 also halves ``C``: 256 MB at 8192 selected features.
    """

    def __init__(
        self,
        target_row: torch.Tensor,
        capacity: int,
        memory_budget: int | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        device = target_row.device
        self.dtype = dtype
        self.store = RowStore(capacity + 1, target_row.numel(), self.dtype, device, memory_budget)
        self.norm = torch.zeros(capacity + 1, dtype=torch.float64, device=device)
        self.norm[0] = self.store.put(0, target_row.to(self.dtype)[None])[0].clamp_min(1e-30)
        self.cols = torch.zeros(capacity, dtype=torch.long, device=device)
        self.C = torch.zeros(capacity + 1, capacity, dtype=dtype, device=device)
        self.reach = torch.zeros(capacity + 1, dtype=torch.float64, device=device)
        self.reach[0] = 1.0
        self.influence = self.store.weighted_abs_sum(1.0 / self.norm[:1])
        self.size = 0

    def _shares(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return (self.store.abs_columns(rows, cols).double() / self.norm[rows][:, None]).to(self.C.dtype)

    def add(self, cols: torch.Tensor, rows: torch.Tensor) -> None:
        """Add the attribution rows of newly selected features.

        Parameters
        ----------
        cols
            ``(B,)`` node index of each new feature.
        rows
            ``(B, n_nodes)`` their direct attributions.
        """
        S, B = self.size, len(cols)
        if S + B > len(self.cols):
            msg = f"{S + B} rows exceed the tracker's capacity of {len(self.cols)}"
            raise ValueError(msg)
        device = self.cols.device
        new = torch.arange(S + 1, S + 1 + B, device=device)
        cols = cols.to(device)
        self.norm[new] = self.store.put(S + 1, rows.to(device, self.dtype)).clamp_min(1e-30)
        self.cols[S : S + B] = cols
        self.C[: S + 1 + B, S : S + B] = self._shares(torch.arange(S + 1 + B, device=device), cols)
        if S:
            self.C[S + 1 : S + 1 + B, :S] = self._shares(new, self.cols[:S])
        C = self.C[: S + 1 + B, : S + B]
        delta = torch.zeros(S + 1 + B, dtype=torch.float64, device=device)
        delta[S + 1 :] = self.reach[: S + 1].to(C.dtype) @ C[: S + 1, S:]
        frontier = delta.to(C.dtype)
        for _ in range(S + B + 1):
            step = frontier @ C
            if not bool((step > TINY).any()):
                break
            frontier = torch.cat([frontier.new_zeros(1), step])
            delta += frontier
        self.reach[: S + 1 + B] += delta
        if bool((delta > 0).any()):
            self.influence += self.store.weighted_abs_sum(delta / self.norm[: S + 1 + B])
        self.size = S + B

    def selected(self) -> torch.Tensor:
        """Node indices of the features added so far, in order."""
        return self.cols[: self.size]

    def feature_rows(self) -> torch.Tensor:
        """``(S, n_nodes)`` the added features' attribution rows, on the device."""
        return self.store.rows(1, 1 + self.size)

    def fold(self, column: torch.Tensor, n_out: int) -> np.ndarray:
        """``(1 + S, n_out)`` float64: the target's and the features' rows summed by ``column``, on the host."""
        return self.store.fold_columns(0, 1 + self.size, column, n_out).numpy()


def select_features(
    rm: ReplacementModel,
    target_row: torch.Tensor | np.ndarray,
    *,
    max_feature_nodes: int,
    batch_size: int,
    memory_budget: int | str | None = AUTO,
) -> tuple[np.ndarray, InfluenceTracker]:
    """Pick the features with most influence on the target, computing their attribution rows in batches.

    Starting from the direct attributions, the next round is always the unselected features of highest influence
    estimated through the rows computed so far (the circuit-tracing recipe, so features that act only through others
    are found too). The estimate is updated as each round's rows arrive (:class:`InfluenceTracker`), on the device
    the rows are computed on. A round holds an eighth of ``max_feature_nodes``, at least 32 features and at most
    ``batch_size`` (:func:`round_size`).

    Parameters
    ----------
    rm
        The prompt's replacement model.
    target_row
        ``(n_nodes,)`` the target's direct attributions.
    max_feature_nodes
        Most features selected.
    batch_size
        Most features whose rows one backward pass computes, and most features per round.
    memory_budget
        Bytes of attribution rows kept on the model's device (an int, or a size such as ``"8GB"``); rows past it are
        kept in host memory. ``"auto"``: on a GPU, up to half its free memory; ``None``: all on the device.

    Returns
    -------
    The selected node indices, and the tracker holding their attribution rows (:meth:`InfluenceTracker.feature_rows`).

    Raises
    ------
    ValueError
        For ``max_feature_nodes`` below 1, or a memory budget that cannot hold one row.
    MemoryError
        When the rows cannot fit in the device's free memory and the host's available memory (checked before they
        are allocated).
    """
    budget = check_graph_size(max_feature_nodes, memory_budget)
    nodes = rm.nodes
    row = torch.as_tensor(target_row).to(rm.device)
    eligible = torch.as_tensor(nodes.kind == "feature", device=rm.device)
    # no more rows than features that could be selected
    capacity = max(1, min(max_feature_nodes, int(eligible.sum())))
    tracker = InfluenceTracker(row, capacity, budget)
    while tracker.size < max_feature_nodes:
        score = torch.where(eligible, tracker.influence, torch.full_like(tracker.influence, -1.0))
        score[tracker.selected()] = -1.0
        k = min(round_size(max_feature_nodes, batch_size), max_feature_nodes - tracker.size, len(score))
        best, index = torch.topk(score, k)
        take = index[best > 0].cpu().numpy()
        if len(take) == 0:
            break
        targets = [FeatureTarget(int(nodes.layer[i]), int(nodes.position[i]), int(nodes.feature[i])) for i in take]
        rows = rm.attribute(targets, batch_size=batch_size, on_device=True).matrix
        tracker.add(torch.as_tensor(take, device=rm.device), rows)
    return tracker.selected().cpu().numpy().astype(np.int64), tracker
