"""Training transcoders on stored activations."""

from __future__ import annotations

import math
from dataclasses import replace
from numbers import Integral, Real
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .._compat import warn_at_caller
from ._config import TranscoderConfig
from ._store import tensor_names
from ._transcoder import Transcoder
from ._transcoder_set import TranscoderSet

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._store import ActivationStore


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float = 0.2) -> float:
    """Learning-rate multiplier: linear warm-up, constant, then linear decay to 0 over the last ``decay_fraction``."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if step < decay_start:
        return 1.0
    return max(0.0, (total - step) / max(1, total - decay_start))


def check_training(n_tokens: int, batch_size: int, lr: float, warmup_steps: int = 0) -> None:
    """Refuse training settings that would train nothing or diverge, before any work.

    Parameters
    ----------
    n_tokens
        Training rows per transcoder: at least 1 (a float such as ``1e6`` is accepted).
    batch_size
        Rows per step: a positive integer.
    lr
        Learning rate: a positive finite number.
    warmup_steps
        Warm-up steps: a non-negative integer.

    Raises
    ------
    ValueError
        Naming the first setting out of range and its value.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, Real) or not 1 <= n_tokens < math.inf:
        msg = f"n_tokens must be a positive number of training rows, got {n_tokens!r}"
        raise ValueError(msg)
    for name, value, least in (("batch_size", batch_size, 1), ("warmup_steps", warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
            msg = f"{name} must be an integer >= {least}, got {value!r}"
            raise ValueError(msg)
    if isinstance(lr, bool) or not isinstance(lr, Real) or not 0 < lr < math.inf:
        msg = f"lr must be a positive finite number, got {lr!r}"
        raise ValueError(msg)


def train_on_store(
    store: ActivationStore,
    config: TranscoderConfig,
    *,
    layers: Sequence[int] | None = None,
    n_layers_model: int,
    n_tokens: int = 4_000_000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    warmup_steps: int = 50,
    seed: int = 0,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> TranscoderSet:
    """Train one transcoder per layer on a store's activations, all layers from the same batches.

    Parameters
    ----------
    store
        Activations (:func:`collect_activations`).
    config
        Settings shared by every layer's transcoder (``d_in``, ``d_out``, ``layer`` and hook names are filled in
        per layer from the store).
    layers
        Layers to train; default every layer in the store.
    n_layers_model
        Layer count of the model (recorded in the set).
    n_tokens
        Training rows seen per transcoder; the store is passed over as often as needed.
    batch_size
        Rows per step.
    lr
        Adam learning rate (warm-up, then constant, then a linear decay over the last 20% of steps).
    warmup_steps
        Warm-up steps.
    seed
        Seeds initialisation and the order of rows; on CPU, training is deterministic for a seed and a thread count.
    device
        Where to train.
    rank, world_size
        For data-parallel training with ``torch.distributed``: this process reads only its own shards of the store
        (round robin). Wrapping the transcoders in ``DistributedDataParallel`` is the remaining step; the batches,
        scales and seeds here are already per rank.
    progress
        Show a progress bar with loss, FVU and L0 (means over layers).

    Returns
    -------
    The trained transcoders, with normalisation scales folded into the weights.

    Raises
    ------
    ValueError
        Before any work, for ``n_tokens`` or ``batch_size`` below 1, ``lr`` not positive, negative
        ``warmup_steps``, or a store without rows.

    Warns
    -----
    UserWarning
        When the store is unfinished (it holds fewer cells than its manifest's total), with both counts.
    """
    check_training(n_tokens, batch_size, lr, warmup_steps)
    m = store.manifest
    if store.n_rows == 0:
        msg = f"the store in {store.directory} holds no rows"
        raise ValueError(msg)
    if store.n_cells < m.n_cells_total:
        warn_at_caller(
            f"the activation store in {store.directory} is unfinished: the store holds {store.n_cells} of "
            f"{m.n_cells_total} cells ({store.n_rows} rows); training on those. Collect it again with the same "
            "arguments to finish it."
        )
    batch_size = min(batch_size, store.n_rows)  # a small store still yields full batches
    layers = store.layers if layers is None else list(layers)
    torch.manual_seed(seed)
    tcs: dict[int, Transcoder] = {}
    for layer in layers:
        cfg = replace(
            config,
            d_in=m.d_model,
            d_out=m.d_model,
            layer=layer,
            model_name=m.model_name,
            architecture=m.architecture,
            hook_in=m.hook_in.get(str(layer), ""),
            hook_out=m.hook_out.get(str(layer), ""),
        )
        tcs[layer] = Transcoder(cfg, device=device)
    sample = store.sample(min(16384, store.n_rows), layers, seed=seed)
    for layer, tc in tcs.items():
        n_in, n_out = tensor_names(layer)
        tc.set_scales_from(sample[n_in].to(device), sample[n_out].to(device))
    params = [p for tc in tcs.values() for p in tc.parameters()]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    total_steps = max(1, math.ceil(n_tokens / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup_steps))
    step, epoch = 0, 0
    for tc in tcs.values():
        tc.train()
    with tqdm(total=total_steps, desc="training transcoders", disable=not progress) as bar:
        while step < total_steps:
            batches = store.iter_batches(
                batch_size, layers, seed=seed, epoch=epoch, drop_last=True, rank=rank, world_size=world_size
            )
            yielded = False
            for batch in batches:
                yielded = True
                losses = []
                for layer, tc in tcs.items():
                    n_in, n_out = tensor_names(layer)
                    losses.append(tc.loss(batch[n_in].to(device), batch[n_out].to(device)))
                total = torch.stack([out.total for out in losses]).sum()
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                sched.step()
                for tc, out in zip(tcs.values(), losses, strict=True):
                    tc.update_dead(out.features)
                step += 1
                bar.update(1)
                if step % 10 == 0 or step == total_steps:
                    bar.set_postfix(
                        loss=f"{float(total.detach()) / len(tcs):.3f}",
                        fvu=f"{np.mean([float(o.fvu) for o in losses]):.3f}",
                        l0=f"{np.mean([float(o.l0) for o in losses]):.1f}",
                    )
                if step >= total_steps:
                    break
            if not yielded:
                msg = f"rank {rank} of {world_size} has no full batch of {batch_size} rows in {store.directory}"
                raise ValueError(msg)
            epoch += 1
    for tc in tcs.values():
        tc.eval()
        tc.fold_scales()
    return TranscoderSet(tcs, n_layers_model=n_layers_model, model_name=m.model_name, architecture=m.architecture)
