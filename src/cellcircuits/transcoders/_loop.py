"""The optimisation loop every source of training rows feeds: Adam, warm-up and decay, dead features, checkpoints.

A source (:class:`BatchSource`: batches of a store, or the shuffle buffer of :mod:`._stream`) gives one batch per
step; :func:`run_training` steps all layers' transcoders on it, tracks dead features, writes checkpoints at intervals
and resumes from the last one. Under an initialised ``torch.distributed`` group the transcoders are wrapped in
``DistributedDataParallel``: each rank's batch is its part of the global batch, gradients are averaged over ranks,
and dead-feature counts see the global batch.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..models._distributed import is_distributed, rank, world_size
from ._checkpoint import load_checkpoint, save_checkpoint
from ._store import tensor_names

if TYPE_CHECKING:
    from ._transcoder import LossOutput, Transcoder


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float = 0.2) -> float:
    """Learning-rate multiplier: linear warm-up, constant, then linear decay to 0 over the last ``decay_fraction``."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if step < decay_start:
        return 1.0
    return max(0.0, (total - step) / max(1, total - decay_start))


def _adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam, fused where torch has a kernel for the parameters' device and dtype.

    On CPU the fused step is a few times faster than the loop over its element-wise steps, and equal up to float
    rounding.
    """
    fusable = {"cpu", "cuda"}
    if all(p.device.type in fusable and p.dtype in (torch.float32, torch.float64) for p in params):
        try:
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
        except (RuntimeError, TypeError, ValueError):  # an older torch without the fused CPU kernel
            pass
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))


class BatchSource(Protocol):
    """Where training rows come from: one batch per call, and a state to checkpoint and restore."""

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch ``{"L{layer}_in": (rows, d), "L{layer}_out": (rows, d), ...}``."""
        ...

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON values that restore the source to this point."""
        ...

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore a :meth:`state`."""
        ...


class _Stack(nn.Module):
    """All layers' transcoders as one module, whose forward pass is the summed training loss of a batch."""

    def __init__(self, tcs: dict[int, Transcoder]) -> None:
        super().__init__()
        self.layers = list(tcs)
        self.tcs = nn.ModuleList(tcs.values())
        self.by_layer = dict(tcs)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[LossOutput]]:
        losses = []
        for layer, tc in self.by_layer.items():
            n_in, n_out = tensor_names(layer)
            device = tc.W_enc.device
            losses.append(tc.loss(batch[n_in].to(device), batch[n_out].to(device)))
        total = losses[0].total if len(losses) == 1 else torch.stack([out.total for out in losses]).sum()
        return total, losses


MATMUL_DTYPES = ("float32", "bfloat16")


def resolve_matmul_dtype(matmul_dtype: str | None, device: str | torch.device) -> str:
    """``matmul_dtype`` checked before any work; ``None`` gives bfloat16 on a GPU that runs it, float32 elsewhere."""
    device = torch.device(device)
    if matmul_dtype is None:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bfloat16" if cuda_bf16 else "float32"
    if matmul_dtype not in MATMUL_DTYPES:
        msg = f"matmul_dtype must be one of {MATMUL_DTYPES} or None, got {matmul_dtype!r}"
        raise ValueError(msg)
    if matmul_dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        msg = f"matmul_dtype='bfloat16' needs a GPU that runs bfloat16; {torch.cuda.get_device_name(device)} does not"
        raise ValueError(msg)
    return matmul_dtype


class TrainingLoop:
    """Adam over every layer's transcoder, stepped on one batch at a time, with a state to checkpoint.

    Parameters
    ----------
    tcs
        Transcoders by layer (their scales already set).
    lr
        Adam learning rate (warm-up, then constant, then a linear decay over the last 20% of steps).
    total_steps
        Steps of the whole run.
    warmup_steps
        Warm-up steps.
    matmul_dtype
        Dtype of the dense encoder product that chooses each TopK transcoder's features (``Transcoder``'s
        ``selection_dtype``); activations, gradients and weights keep the transcoders' dtype.
    """

    def __init__(
        self,
        tcs: dict[int, Transcoder],
        *,
        lr: float,
        total_steps: int,
        warmup_steps: int,
        matmul_dtype: str = "float32",
    ) -> None:
        self.tcs = tcs
        for tc in tcs.values():
            tc.selection_dtype = getattr(torch, matmul_dtype)
        self.stack = _Stack(tcs)
        self.distributed = is_distributed()
        self.module: nn.Module = self.stack
        if self.distributed:
            for tc in tcs.values():  # every rank scales as rank 0 does
                dist.broadcast(tc.input_scale, 0)
                dist.broadcast(tc.output_scale, 0)
            # buffers (dead-feature counts) are kept in step by _update_dead, not broadcast from rank 0
            ddp = nn.parallel.DistributedDataParallel
            newer = "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
            sync: dict[str, Any] = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
            self.module = ddp(self.stack, **sync)
        self.params = [p for tc in tcs.values() for p in tc.parameters()]
        self.opt = _adam(self.params, lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, total_steps, warmup_steps))
        self.total_steps = total_steps
        self.step = 0

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[LossOutput]]:
        """One optimisation step on ``batch``; gives the summed loss and each layer's loss parts."""
        total, losses = self.module(batch)
        for p in self.params:  # the optimizer's zero_grad(set_to_none=True), without its per-call overhead
            p.grad = None
        total.backward()
        self.opt.step()
        self.sched.step()
        self._update_dead(losses)
        self.step += 1
        return total, losses

    @torch.no_grad()
    def _update_dead(self, losses: list[LossOutput]) -> None:
        if not self.distributed:
            for tc, out in zip(self.tcs.values(), losses, strict=True):
                tc.update_dead(out.features)
            return
        # a feature is alive when it fired on any rank's rows; every rank counts the global batch
        fired = []
        for tc, out in zip(self.tcs.values(), losses, strict=True):
            fired.append(tc.fired_mask(out.features).to(torch.int32))
        flat = torch.cat(fired)
        rows = torch.tensor([losses[0].features.shape[0]], dtype=torch.int64, device=flat.device)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        dist.all_reduce(rows)
        for tc, mask in zip(
            self.tcs.values(), flat.split([tc.cfg.n_features for tc in self.tcs.values()]), strict=True
        ):
            tc.tokens_since_fired += int(rows)
            tc.tokens_since_fired.masked_fill_(mask.bool(), 0)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Transcoders, optimizer moments and the global RNG as tensors; step, schedule and groups as JSON."""
        tensors: dict[str, torch.Tensor] = {}
        for layer, tc in self.tcs.items():
            for name, value in tc.state_dict().items():
                tensors[f"tc.{layer}.{name}"] = value
        opt = self.opt.state_dict()
        for i, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"opt.{i}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        tensors["rng.torch"] = torch.get_rng_state()
        sched = {k: v for k, v in self.sched.state_dict().items() if k != "lr_lambdas"}
        return tensors, {"step": self.step, "param_groups": opt["param_groups"], "sched": sched}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore a :meth:`state`."""
        for layer, tc in self.tcs.items():
            prefix = f"tc.{layer}."
            tc.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = value
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        sched = self.sched.state_dict()
        sched.update(meta["sched"])
        self.sched.load_state_dict(sched)
        torch.set_rng_state(tensors["rng.torch"])
        self.step = int(meta["step"])


def run_training(
    loop: TrainingLoop,
    source: BatchSource,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    settings: dict[str, Any] | None = None,
    resume: dict[str, Any] | None = None,
    progress: bool = True,
) -> None:
    """Step ``loop`` on ``source``'s batches until its ``total_steps``, checkpointing every ``checkpoint_every`` steps.

    Parameters
    ----------
    loop
        The optimisation loop.
    source
        The batches.
    checkpoint_dir
        Where checkpoints are written (none without it).
    checkpoint_every
        Steps between checkpoints.
    settings
        The run's settings, recorded in each checkpoint.
    resume
        A checkpoint index (already checked against ``settings``) to restore before the first step.
    progress
        Show a progress bar with loss, FVU and L0 (means over layers).
    """
    if resume is not None and checkpoint_dir is not None:
        (shared, shared_meta), (own, own_meta) = load_checkpoint(checkpoint_dir, resume)
        loop.load_state(shared, shared_meta)
        source.load_state(own, own_meta)
    n = len(loop.tcs)
    quiet = not progress or rank() != 0  # one progress bar, rank 0's
    with tqdm(total=loop.total_steps, initial=loop.step, desc="training transcoders", disable=quiet) as bar:
        while loop.step < loop.total_steps:
            total, losses = loop.train_step(source.next_batch())
            bar.update(1)
            if loop.step % 10 == 0 or loop.step == loop.total_steps:
                bar.set_postfix(
                    loss=f"{float(total.detach()) / n:.3f}",
                    fvu=f"{np.mean([float(o.fvu) for o in losses]):.3f}",
                    l0=f"{np.mean([float(o.l0) for o in losses]):.1f}",
                )
            if checkpoint_dir is not None and loop.step % checkpoint_every == 0 and loop.step < loop.total_steps:
                save_checkpoint(checkpoint_dir, settings or {}, loop.step, loop.state(), source.state())


def steps_for(n_tokens: float, batch_size: int) -> int:
    """Steps that see ``n_tokens`` rows in global batches of ``batch_size`` rows per rank."""
    return max(1, math.ceil(n_tokens / (batch_size * world_size())))
