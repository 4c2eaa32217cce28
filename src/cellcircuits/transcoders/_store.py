"""A sharded on-disk store of MLP input/output activations, read back in shuffled mini-batches.

Layout of a store directory::

    manifest.json                      model, layers, positions rule, dtype, counts, list of shards
    shard_00000.safetensors            tensors  L{layer}_in, L{layer}_out (rows x d_model), cell, position
    shard_00001.safetensors            ...

A shard holds the rows of whole cells, and the manifest (replaced atomically after each shard is written) records how
many cells are done, so collection resumes after an interruption without duplicating or losing rows. Shards are checked
against the manifest (present, readable safetensors, the recorded tensors and row counts) whenever collection opens an
existing store: a damaged store is refused, and collecting again with ``repair=True`` keeps the intact shards before the
first damaged one and collects the rest again. Readers hold a
few shards in memory at a time, never the whole store, and a process of rank ``r`` in a ``world_size`` group reads
shards ``r, r + world_size, ...``, so the same store feeds ``torch.distributed`` training without a rewrite.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..models._files import give_umask_mode

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

FORMAT = "cellcircuits.activation_store/1"
MANIFEST = "manifest.json"
#: What to do about a damaged store, ending every error that reports one.
REPAIR_HINT = (
    "repair it by collecting again with the same arguments and collect_activations(..., repair=True) "
    "(cc.tl.collect_activations or cellcircuits.transcoders.collect_activations), which keeps the intact shards "
    "and collects the rest again"
)


@dataclass
class StoreManifest:
    """What a store holds; written as ``manifest.json``."""

    model_name: str
    """Model the activations come from."""
    architecture: str
    """Its architecture tag."""
    layers: list[int]
    """Layers whose MLP input and output are stored."""
    d_model: int
    """Width of the stored vectors."""
    positions: str
    """Which token positions are stored: ``"genes+answer"`` or ``"all"``."""
    dtype: str
    """Storage dtype, e.g. ``"float32"``."""
    n_cells_total: int
    """Cells the collection is meant to cover."""
    hook_in: dict[str, str] = field(default_factory=dict)
    """Per layer, the hook point of the MLP input (``module:side``)."""
    hook_out: dict[str, str] = field(default_factory=dict)
    """Per layer, the hook point of the MLP output."""
    n_cells_done: int = 0
    """Cells whose rows are in written shards (cells are processed in order)."""
    n_rows: int = 0
    """Rows over all shards."""
    shards: list[dict] = field(default_factory=list)
    """Per shard: ``file``, ``n_rows``, ``first_cell``, ``n_cells``."""
    fingerprint: str = ""
    """Identifies the prompts collected (so a resume cannot mix two inputs)."""
    format: str = FORMAT

    @property
    def complete(self) -> bool:
        """Whether every cell has been collected."""
        return self.n_cells_done >= self.n_cells_total

    def write(self, directory: Path) -> None:
        """Write the manifest atomically (a reader never sees a half-written file)."""
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, directory / MANIFEST)

    @classmethod
    def read(cls, directory: Path) -> StoreManifest:
        """Read and check ``manifest.json``."""
        path = directory / MANIFEST
        if not path.is_file():
            msg = f"{directory} is not an activation store (no {MANIFEST})."
            raise FileNotFoundError(msg)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            msg = f"{path} is not valid JSON: {err}"
            raise ValueError(msg) from err
        if data.get("format") != FORMAT:
            msg = f"{path}: unknown store format {data.get('format')!r} (expected {FORMAT!r})"
            raise ValueError(msg)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            msg = f"{path}: unknown keys {sorted(unknown)}"
            raise ValueError(msg)
        return cls(**data)


def tensor_names(layer: int) -> tuple[str, str]:
    """Names of a layer's input and output tensors in a shard."""
    return f"L{layer}_in", f"L{layer}_out"


def shard_problem(directory: Path, manifest: StoreManifest, index: int) -> str | None:
    """What is wrong with one shard against its manifest entry, or ``None`` when it matches.

    Reads only the shard's header: the file must exist, be readable safetensors covering the whole file, hold each
    layer's input and output and the ``cell`` and ``position`` index, every one with the recorded number of rows
    (and ``d_model`` columns for the activations), and start at the cell where the shards before it end.
    """
    info = manifest.shards[index]
    name = info["file"]
    path = directory / name
    if not path.is_file():
        return f"{name} is missing"
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        return f"{name} cannot be read as safetensors ({err})"
    activations = [n for layer in manifest.layers for n in tensor_names(layer)]
    missing = sorted(set([*activations, "cell", "position"]) - set(shapes))
    if missing:
        return f"{name} lacks the tensors {missing}"
    rows = {k: shapes[k][0] if shapes[k] else 0 for k in [*activations, "cell", "position"]}
    wrong = {k: n for k, n in rows.items() if n != info["n_rows"]}
    if wrong:
        return f"{name} does not hold the {info['n_rows']} rows the manifest records ({wrong})"
    narrow = {k: shapes[k] for k in activations if shapes[k][1:] != [manifest.d_model]}
    if narrow:
        return f"{name} holds activations of shapes {narrow}, not (rows, {manifest.d_model})"
    first = sum(s["n_cells"] for s in manifest.shards[:index])
    if info["first_cell"] != first:
        return f"{name} starts at cell {info['first_cell']}, but the shards before it end at cell {first}"
    return None


def intact_shards(directory: Path, manifest: StoreManifest) -> tuple[int, list[str]]:
    """How many leading shards are intact, and every problem of the store (empty when it matches its manifest)."""
    found = [shard_problem(directory, manifest, i) for i in range(len(manifest.shards))]
    problems = [p for p in found if p is not None]
    good = next((i for i, p in enumerate(found) if p is not None), len(found))
    rows = sum(s["n_rows"] for s in manifest.shards)
    cells = sum(s["n_cells"] for s in manifest.shards)
    if (rows, cells) != (manifest.n_rows, manifest.n_cells_done):
        problems.append(
            f"the manifest records {manifest.n_rows} rows of {manifest.n_cells_done} cells, its shards "
            f"{rows} rows of {cells} cells"
        )
    return good, problems


class StoreWriter:
    """Appends the rows of whole cells to a store, one shard at a time.

    Parameters
    ----------
    directory
        The store directory (created if needed).
    manifest
        Description of the store; when the directory already holds a store with the same fingerprint, layers and
        positions, writing resumes after its last complete shard.
    shard_rows
        Rows per shard (a shard closes at the first cell boundary past this many rows).
    repair
        When the existing shards disagree with the manifest (a shard missing, unreadable, or not holding the
        recorded tensors and rows), keep the intact shards before the first damaged one and resume from there.
        Without it a damaged store is refused with a ValueError that says so.
    """

    def __init__(
        self, directory: str | Path, manifest: StoreManifest, shard_rows: int = 65536, *, repair: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_rows = int(shard_rows)
        if (self.directory / MANIFEST).is_file():
            existing = StoreManifest.read(self.directory)
            same = (existing.fingerprint, existing.layers, existing.positions, existing.d_model, existing.dtype) == (
                manifest.fingerprint,
                manifest.layers,
                manifest.positions,
                manifest.d_model,
                manifest.dtype,
            )
            if not same:
                msg = (
                    f"{self.directory} already holds a store of other activations (prompts, layers, positions or "
                    "dtype differ); pass an empty directory."
                )
                raise ValueError(msg)
            manifest = existing
            good, problems = intact_shards(self.directory, manifest)
            if problems and not repair:
                msg = (
                    f"the activation store in {self.directory} is damaged: {'; '.join(problems)}. Its first "
                    f"{good} intact shard(s) can be kept: {REPAIR_HINT}."
                )
                raise ValueError(msg)
            if problems:
                kept = manifest.shards[:good]
                manifest.shards = kept
                manifest.n_rows = sum(s["n_rows"] for s in kept)
                manifest.n_cells_done = sum(s["n_cells"] for s in kept)
                manifest.write(self.directory)  # before the damaged files go, so a crash between leaves strays
            # a shard file may exist without its manifest entry if writing stopped between the two steps
            listed = {s["file"] for s in manifest.shards}
            for stray in self.directory.glob("shard_*.safetensors"):
                if stray.name not in listed:
                    stray.unlink()
        self.manifest = manifest
        self._buffer: dict[str, list[torch.Tensor]] = {}
        self._buffer_rows = 0
        self._buffer_cells = 0

    @property
    def next_cell(self) -> int:
        """Index of the first cell not yet in a written shard (or in the buffer)."""
        return self.manifest.n_cells_done + self._buffer_cells

    def add_cell(self, tensors: dict[str, torch.Tensor]) -> None:
        """Buffer the rows of the next cell (every tensor has the same number of rows)."""
        for name, t in tensors.items():
            self._buffer.setdefault(name, []).append(t)
        self._buffer_rows += len(next(iter(tensors.values())))
        self._buffer_cells += 1
        if self._buffer_rows >= self.shard_rows:
            self.flush()

    def add_cells(self, tensors: dict[str, torch.Tensor], n_rows: Sequence[int]) -> None:
        """Buffer the rows of several consecutive cells at once, split at cell boundaries into shards.

        Parameters
        ----------
        tensors
            Tensors whose rows are the cells' rows one cell after the other (``sum(n_rows)`` rows each).
        n_rows
            Rows of each cell, in order.
        """
        ends = np.cumsum(np.asarray(n_rows, dtype=np.int64))
        start, first = 0, 0
        while first < len(ends):
            # the shard closes at the first cell boundary at or past shard_rows, as with add_cell
            room = self.shard_rows - self._buffer_rows
            last = int(np.searchsorted(ends - start, room, side="left"))
            last = min(last, len(ends) - 1) if last >= first else first
            stop = int(ends[last])
            for name, t in tensors.items():
                self._buffer.setdefault(name, []).append(t[start:stop])
            self._buffer_rows += stop - start
            self._buffer_cells += last - first + 1
            if self._buffer_rows >= self.shard_rows:
                self.flush()
            start, first = stop, last + 1

    def flush(self) -> None:
        """Write the buffered cells as a shard, then record it in the manifest."""
        if self._buffer_cells == 0:
            return
        m = self.manifest
        name = f"shard_{len(m.shards):05d}.safetensors"
        tensors = {k: torch.cat(v).contiguous() for k, v in self._buffer.items()}
        tmp = self.directory / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "first_cell": str(m.n_cells_done)})
        give_umask_mode(tmp)  # safetensors writes 0600
        os.replace(tmp, self.directory / name)
        m.shards.append(
            {"file": name, "n_rows": self._buffer_rows, "first_cell": m.n_cells_done, "n_cells": self._buffer_cells}
        )
        m.n_rows += self._buffer_rows
        m.n_cells_done += self._buffer_cells
        m.write(self.directory)
        self._buffer, self._buffer_rows, self._buffer_cells = {}, 0, 0


class ActivationStore:
    """Read access to a store written by :class:`StoreWriter`.

    Parameters
    ----------
    directory
        The store directory.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = StoreManifest.read(self.directory)

    def __repr__(self) -> str:
        m = self.manifest
        state = "complete" if m.complete else f"{m.n_cells_done}/{m.n_cells_total} cells"
        return (
            f"ActivationStore({str(self.directory)!r}, model={m.model_name!r}, layers={m.layers}, "
            f"rows={m.n_rows}, shards={len(m.shards)}, positions={m.positions!r}, {state})"
        )

    def verify(self) -> list[str]:
        """Check every shard against the manifest, reading only their headers.

        Returns
        -------
        One line per problem (a shard missing, unreadable, lacking a tensor or holding other row counts than
        recorded, or totals that disagree with the shards); empty when the store is intact. Collecting again with
        ``repair=True`` mends a damaged store.
        """
        return intact_shards(self.directory, self.manifest)[1]

    @property
    def n_cells(self) -> int:
        """Cells whose rows the shards hold (fewer than ``manifest.n_cells_total`` in an unfinished store)."""
        return min(self.manifest.n_cells_done, sum(s["n_cells"] for s in self.manifest.shards))

    @property
    def layers(self) -> list[int]:
        """Stored layers."""
        return list(self.manifest.layers)

    @property
    def n_rows(self) -> int:
        """Stored rows (token positions) over all cells."""
        return self.manifest.n_rows

    def load_shard(self, index: int) -> dict[str, torch.Tensor]:
        """All tensors of one shard; a damaged file gives a clear error."""
        info = self.manifest.shards[index]
        path = self.directory / info["file"]
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            msg = f"{path} cannot be read as safetensors ({err}); the store is damaged: {REPAIR_HINT}."
            raise ValueError(msg) from err
        if any(len(t) != info["n_rows"] for t in tensors.values()):
            msg = f"{path} does not hold the {info['n_rows']} rows the manifest records; {REPAIR_HINT}."
            raise ValueError(msg)
        return tensors

    def shard_indices(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Shards read by process ``rank`` of ``world_size`` (round robin)."""
        if not 0 <= rank < world_size:
            msg = f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            raise ValueError(msg)
        return list(range(rank, len(self.manifest.shards), world_size))

    def iter_batches(
        self,
        batch_size: int,
        layers: Sequence[int] | None = None,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        buffer_shards: int = 4,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float32,
        drop_last: bool = False,
        with_index: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield mini-batches ``{"L{l}_in": (b, d), "L{l}_out": (b, d), ...}``, one pass over this rank's shards.

        Shards are visited in a random order (per ``seed`` and ``epoch``) and ``buffer_shards`` of them at a time are
        pooled and their rows shuffled, so memory holds at most ``buffer_shards`` shards.

        Parameters
        ----------
        batch_size
            Rows per batch.
        layers
            Layers to read; default all stored layers.
        shuffle
            Shuffle shards and rows; without it rows come in stored order.
        seed, epoch
            Fix the shuffle; a new ``epoch`` gives a new order.
        buffer_shards
            Shards pooled before shuffling (more mixes better, costs memory).
        rank, world_size
            This process's part of the store for distributed training.
        dtype
            Dtype of the yielded tensors.
        drop_last
            Drop a final incomplete batch.
        with_index
            Also yield ``cell`` and ``position`` (int32): each row's cell and token position.
        """
        layers = self.layers if layers is None else list(layers)
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            msg = f"layers {missing} are not in the store (it has {self.layers})"
            raise ValueError(msg)
        names = [n for layer in layers for n in tensor_names(layer)]
        index = ["cell", "position"] if with_index else []
        rng = np.random.default_rng([seed, epoch, rank])
        shards = self.shard_indices(rank, world_size)
        if shuffle:
            shards = [shards[i] for i in rng.permutation(len(shards))]
        carry: dict[str, torch.Tensor] | None = None
        for start in range(0, len(shards), buffer_shards):
            loaded = [self.load_shard(i) for i in shards[start : start + buffer_shards]]
            pool = {n: torch.cat([s[n] for s in loaded]) for n in names + index}
            if carry is not None:
                pool = {n: torch.cat([carry[n], pool[n]]) for n in pool}
            n = len(pool[names[0]])
            order = torch.from_numpy(rng.permutation(n)) if shuffle else torch.arange(n)
            full = n - n % batch_size
            for b in range(0, full, batch_size):
                idx = order[b : b + batch_size]
                yield {k: pool[k][idx].to(dtype) if k in names else pool[k][idx] for k in pool}
            # rows left over join the next pool, so every row is used once per pass
            carry = {k: v[order[full:]] for k, v in pool.items()} if full < n else None
        if carry is not None and not drop_last:
            yield {k: v.to(dtype) if k in names else v for k, v in carry.items()}

    def sample(self, n_rows: int, layers: Sequence[int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """About ``n_rows`` rows drawn from the first shards in shuffled order (e.g. to set normalisation scales)."""
        batches = self.iter_batches(min(n_rows, max(self.n_rows, 1)), layers, seed=seed, buffer_shards=1)
        return next(batches)
