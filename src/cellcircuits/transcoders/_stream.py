"""Training transcoders straight from a model's forward passes, through a bounded shuffle buffer.

Nothing is written to disk: the model runs on a few cells at a time, the MLP inputs and outputs at the kept positions
(:func:`kept_positions`) of every chosen layer go into a buffer of at most ``buffer_rows`` rows, and each batch is
drawn at random from the buffer, which is refilled from the next cells whenever it falls below half full. Cells are
visited in a new random order each epoch, for as many epochs as the run needs, so memory stays bounded however many
cells there are, and rows of many cells are mixed in every batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..models._distributed import my_shard, rank
from ..models._hooks import record
from ..models._scoring import pad
from ._activations import Positions, check_prompts, kept_positions, prompts_fingerprint, recorded_layers
from ._config import TranscoderConfig
from ._loop import TrainingLoop, resolve_matmul_dtype, run_training, steps_for
from ._store import tensor_names
from ._training import (
    WARMUP_STEPS,
    check_checkpointing,
    check_training,
    finish,
    make_transcoders,
    resume_index,
    run_settings,
)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from ..models._load import C2SModel
    from ..models._tokens import TokenizedPrompt
    from ._transcoder_set import TranscoderSet


class ActivationStream:
    """A bounded shuffle buffer of a model's MLP activations on cells, refilled by forward passes as it drains.

    Under an initialised ``torch.distributed`` group each rank streams its own contiguous share of the cells
    (:func:`cellcircuits.models.my_shard`).

    Parameters
    ----------
    model
        The C2S model.
    prompts
        Tokenized prompts, one per cell.
    layers
        Layers whose MLP input and output are recorded; default all.
    positions
        Token positions kept (see :func:`kept_positions`).
    answers
        Per prompt, answer token ids appended after it (as in :func:`collect_activations`).
    buffer_rows
        Rows the buffer holds at most (per layer, for input and output each); it is refilled when below half full.
        Cells with fewer rows in all get a smaller buffer: twice their rows, or twice the batch size when larger.
    cells_per_pass
        Cells per forward pass.
    seed
        Seeds the order of cells (a new one each epoch) and the draws of rows.
    dtype
        Dtype the buffer holds rows in (batches are given as float32).

    Raises
    ------
    ValueError
        Before any forward pass: no prompts, more ranks than cells, answers of another length, or a buffer too small
        for one cell's rows.
    """

    def __init__(
        self,
        model: C2SModel,
        prompts: Sequence[TokenizedPrompt],
        *,
        layers: Sequence[int] | None = None,
        positions: Positions = "genes+answer",
        answers: Sequence[Sequence[int]] | None = None,
        buffer_rows: int = 16384,
        cells_per_pass: int = 8,
        seed: int = 0,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        adapter = model.adapter
        check_prompts(prompts, answers, "stream activations from")
        for name, value in (("buffer_rows", buffer_rows), ("cells_per_pass", cells_per_pass)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{name} must be a positive integer, got {value!r}"
                raise ValueError(msg)
        self.model, self.prompts, self.positions = model, prompts, positions
        self.layers = recorded_layers(adapter, layers)
        self.answers = answers
        self.cells = np.arange(len(prompts))[my_shard(len(prompts))]
        self.rows_per_cell = np.array([len(self._kept(int(i))) for i in self.cells], dtype=np.int64)
        if int(self.rows_per_cell.max()) > buffer_rows // 2:
            msg = (
                f"buffer_rows={buffer_rows} is too small: a cell gives up to {int(self.rows_per_cell.max())} rows and "
                "the buffer must hold at least twice that"
            )
            raise ValueError(msg)
        self.buffer_rows, self.cells_per_pass, self.seed, self.dtype = buffer_rows, cells_per_pass, seed, dtype
        # few cells need no more room than two passes over them
        self.capacity = min(buffer_rows, 2 * int(self.rows_per_cell.sum()))
        self.names = [n for layer in self.layers for n in tensor_names(layer)]
        self.points = {layer: (adapter.mlp_in(layer), adapter.mlp_out(layer)) for layer in self.layers}
        self.d_model = adapter.d_model
        self.buffer: dict[str, torch.Tensor] = {}  # allocated by the first refill
        self.n = 0  # rows held
        self.epoch, self.cursor = 0, 0  # the next cell is order(epoch)[cursor]
        self.peak_rows = 0
        self.generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + rank())
        self._order = self._epoch_order(0)

    def reserve(self, batch_size: int) -> None:
        """Make room for batches of ``batch_size`` rows (at most half of ``buffer_rows``), before the first refill.

        Parameters
        ----------
        batch_size
            Rows per batch.

        Raises
        ------
        ValueError
            When ``batch_size`` exceeds half of ``buffer_rows``.
        """
        if batch_size > self.buffer_rows // 2:
            msg = f"batch_size={batch_size} must be at most half of the stream's buffer_rows={self.buffer_rows}"
            raise ValueError(msg)
        if not self.buffer:
            self.capacity = max(self.capacity, min(self.buffer_rows, 2 * batch_size))

    @property
    def nbytes(self) -> int:
        """Bytes of the buffer's tensors."""
        return sum(t.numel() * t.element_size() for t in self.buffer.values())

    def fingerprint(self) -> str:
        """A hash of the model name, the prompts and their answers (identifies the cells in checkpoints)."""
        return prompts_fingerprint(self.prompts, self.model.name, self.answers)

    def _kept(self, cell: int) -> np.ndarray:
        n_answer = 0 if self.answers is None else len(self.answers[cell])
        return kept_positions(self.prompts[cell], self.positions, n_answer)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, rank()]).permutation(len(self.cells))

    def _next_cells(self) -> list[int]:
        """Positions in ``self.cells`` of the next cells that fit in the buffer, at most ``cells_per_pass``."""
        chosen: list[int] = []
        room = self.capacity - self.n
        while len(chosen) < self.cells_per_pass:
            local = int(self._order[self.cursor])
            rows = int(self.rows_per_cell[local])
            if rows > room:
                break
            chosen.append(local)
            room -= rows
            self.cursor += 1
            if self.cursor == len(self.cells):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        return chosen

    @torch.no_grad()
    def refill(self) -> None:
        """Run the model on the next cells until the buffer has no room for the next one."""
        if not self.buffer:
            self.buffer = {n: torch.empty(self.capacity, self.d_model, dtype=self.dtype) for n in self.names}
        pad_id = self.model.tokenizer.pad_token_id
        device = self.model.device
        while chosen := self._next_cells():
            cells = [int(self.cells[i]) for i in chosen]
            appended = [list(self.answers[c]) if self.answers is not None else [] for c in cells]
            ids, mask = pad(
                [list(self.prompts[c].input_ids) + a for c, a in zip(cells, appended, strict=True)], pad_id, "right"
            )
            with record(self.model.model, [pt for pair in self.points.values() for pt in pair]) as seen:
                self.model.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))
            for row, cell in enumerate(cells):
                pos = torch.from_numpy(self._kept(cell)).to(device)
                end = self.n + len(pos)
                for layer, (p_in, p_out) in self.points.items():
                    n_in, n_out = tensor_names(layer)
                    self.buffer[n_in][self.n : end] = seen[p_in][0][row, pos].to("cpu", self.dtype)
                    self.buffer[n_out][self.n : end] = seen[p_out][0][row, pos].to("cpu", self.dtype)
                self.n = end
            self.peak_rows = max(self.peak_rows, self.n)

    def sample(self, n_rows: int) -> dict[str, torch.Tensor]:
        """Up to ``n_rows`` rows of the buffer (filled first when empty) as float32, leaving them in it."""
        if self.n == 0:
            self.refill()
        return {k: v[: min(n_rows, self.n)].float() for k, v in self.buffer.items()}

    def take(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Draw ``batch_size`` rows at random and remove them from the buffer (refilled first when below half full).

        Parameters
        ----------
        batch_size
            Rows to draw; at most half of ``buffer_rows``.

        Returns
        -------
        ``{"L{layer}_in": (batch_size, d_model), "L{layer}_out": ...}`` float32.
        """
        if not self.buffer:
            self.reserve(batch_size)
        elif batch_size > self.capacity // 2:
            msg = f"batch_size={batch_size} must be at most half of the buffer's {self.capacity} rows"
            raise ValueError(msg)
        if self.n < max(batch_size, self.capacity // 2):
            self.refill()
        n = self.n
        idx = torch.randperm(n, generator=self.generator)[:batch_size]
        batch = {k: v[idx].float() for k, v in self.buffer.items()}
        # the rows past n - batch_size that were not drawn fill the holes the drawn ones left below it
        taken_tail = torch.zeros(batch_size, dtype=torch.bool)
        tail_hits = idx[idx >= n - batch_size] - (n - batch_size)
        taken_tail[tail_hits] = True
        holes = idx[idx < n - batch_size].sort().values
        movers = torch.arange(n - batch_size, n)[~taken_tail]
        for v in self.buffer.values():
            v[holes] = v[movers]
        self.n = n - batch_size
        return batch

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The rows held and the generator as tensors; counts and the position in the cells as JSON."""
        tensors = {f"buffer.{k}": v[: self.n] for k, v in self.buffer.items()}
        tensors["generator"] = self.generator.get_state()
        meta = {"n": self.n, "epoch": self.epoch, "cursor": self.cursor, "peak_rows": self.peak_rows}
        return tensors, {**meta, "capacity": self.capacity}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore a :meth:`state`."""
        self.n, self.epoch, self.cursor = int(meta["n"]), int(meta["epoch"]), int(meta["cursor"])
        self.peak_rows, self.capacity = int(meta["peak_rows"]), int(meta["capacity"])
        self.buffer = {n: torch.empty(self.capacity, self.d_model, dtype=self.dtype) for n in self.names}
        for k, v in self.buffer.items():
            v[: self.n] = tensors[f"buffer.{k}"]
        self.generator.set_state(tensors["generator"])
        self._order = self._epoch_order(self.epoch)


class _StreamBatches:
    """An :class:`ActivationStream` as a batch source of fixed-size batches."""

    def __init__(self, stream: ActivationStream, batch_size: int) -> None:
        self.stream, self.batch_size = stream, batch_size

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.stream.take(self.batch_size)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.stream.state()

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.stream.load_state(tensors, meta)


def train_on_stream(
    stream: ActivationStream,
    config: TranscoderConfig,
    *,
    n_tokens: int = 4_000_000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    warmup_steps: int = WARMUP_STEPS,
    seed: int = 0,
    device: str | torch.device = "cpu",
    matmul_dtype: str | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    progress: bool = True,
) -> TranscoderSet:
    """Train one transcoder per streamed layer from the model's forward passes, all layers from the same batches.

    The optimisation is :func:`train_on_store`'s (Adam, warm-up and decay, dead features, auxiliary loss). Under an
    initialised ``torch.distributed`` group (e.g. ``torchrun``) each rank streams its own cells, the transcoders are
    wrapped in ``DistributedDataParallel`` (gradients averaged over ranks) and rank 0 writes the checkpoints; every
    rank returns the same transcoders.

    Parameters
    ----------
    stream
        The activations (:class:`ActivationStream`).
    config
        Settings shared by every layer's transcoder (sizes, layer and hook names are filled in per layer).
    n_tokens
        Training rows seen per transcoder, over all ranks; the cells are passed over as often as needed.
    batch_size
        Rows per step and rank: at most half the stream's ``buffer_rows``.
    lr
        Adam learning rate.
    warmup_steps
        Warm-up steps.
    seed
        Seeds initialisation (the stream's own seed orders cells and rows).
    device
        Where to train.
    matmul_dtype
        Dtype of the dense encoder product that chooses each TopK transcoder's features: ``"bfloat16"`` or
        ``"float32"``; default bfloat16 on a GPU that runs it, float32 elsewhere. Activations, gradients and the
        (master) weights stay in the transcoders' dtype.
    checkpoint_dir
        Save transcoders, optimizer, RNG and each rank's buffer and position in the cells here every
        ``checkpoint_every`` steps, and resume from the checkpoint found there: the resumed run gives the weights an
        uninterrupted one does. One of a run with other settings (sizes, layers, lr, cells, buffer...) is refused
        before any forward pass.
    checkpoint_every
        Steps between checkpoints.
    progress
        Show a progress bar with loss, FVU and L0.

    Returns
    -------
    The trained transcoders, with normalisation scales folded into the weights.

    Raises
    ------
    ValueError
        Before any work, for bad training settings, a batch larger than half the buffer, or a checkpoint of other
        settings.
    """
    check_training(n_tokens, batch_size, lr, warmup_steps)
    matmul_dtype = resolve_matmul_dtype(matmul_dtype, device)
    check_checkpointing(checkpoint_every)
    stream.reserve(batch_size)
    settings = run_settings(
        config,
        stream.layers,
        n_tokens,
        batch_size,
        lr,
        warmup_steps,
        seed,
        data=f"stream {stream.fingerprint()} {stream.positions}",
        buffer_rows=stream.buffer_rows,
        cells_per_pass=stream.cells_per_pass,
        stream_seed=stream.seed,
        buffer_dtype=str(stream.dtype),
        matmul_dtype=matmul_dtype,
        n_cells=len(stream.prompts),
    )
    resume = resume_index(checkpoint_dir, settings)
    model = stream.model
    torch.manual_seed(seed)
    hooks = {layer: (":".join(p_in), ":".join(p_out)) for layer, (p_in, p_out) in stream.points.items()}
    tcs = make_transcoders(config, hooks, stream.d_model, model.name, model.adapter.spec.name, device)
    if resume is None:
        sample = stream.sample(16384)
        for layer, tc in tcs.items():
            n_in, n_out = tensor_names(layer)
            tc.set_scales_from(sample[n_in].to(device), sample[n_out].to(device))
        del sample
    loop = TrainingLoop(
        tcs, lr=lr, total_steps=steps_for(n_tokens, batch_size), warmup_steps=warmup_steps, matmul_dtype=matmul_dtype
    )
    for tc in tcs.values():
        tc.train()
    run_training(
        loop,
        _StreamBatches(stream, batch_size),
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        settings=settings,
        resume=resume,
        progress=progress,
    )
    return finish(tcs, model.adapter.n_layers, model.name, model.adapter.spec.name)
