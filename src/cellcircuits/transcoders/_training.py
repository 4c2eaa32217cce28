"""Training transcoders on stored activations."""

from __future__ import annotations

import math
from dataclasses import replace
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

import torch

from .._compat import warn_at_caller
from ..models._distributed import is_distributed
from ..models._distributed import rank as dist_rank
from ..models._distributed import world_size as dist_world_size
from ._checkpoint import check_settings, read_index
from ._config import TranscoderConfig
from ._loop import TrainingLoop, resolve_matmul_dtype, run_training, steps_for
from ._store import tensor_names
from ._transcoder import Transcoder
from ._transcoder_set import TranscoderSet

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path

    from ._store import ActivationStore, StoreManifest


#: Learning-rate warm-up steps of every training run unless given.
WARMUP_STEPS = 50


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


class StoreBatches:
    """The store's shuffled batches, epoch after epoch, with a cursor to checkpoint (a :class:`BatchSource`).

    Under an initialised ``torch.distributed`` group every rank reads the same global batches of
    ``batch_size * world_size`` rows and takes its own contiguous part, so the run sees the batches a single process
    with ``batch_size * world_size`` rows would. Without one, ``rank`` and ``world_size`` pick round-robin shards.

    Parameters
    ----------
    store
        The activations.
    layers
        Layers to read.
    batch_size
        Rows per batch of this rank.
    seed
        Seed of the shuffle.
    rank, world_size
        Round-robin shards of the store this process reads (without a process group).
    """

    def __init__(
        self, store: ActivationStore, layers: Sequence[int], batch_size: int, seed: int, rank: int, world_size: int
    ) -> None:
        self.store, self.layers, self.seed = store, list(layers), seed
        self.slice = slice(0, batch_size)
        self.read_size, self.rank, self.world_size = batch_size, rank, world_size
        if is_distributed():
            r = dist_rank()
            self.read_size, self.rank, self.world_size = batch_size * dist_world_size(), 0, 1
            self.slice = slice(r * batch_size, (r + 1) * batch_size)
        self.epoch, self.index = 0, 0
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None

    def _open(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.store.iter_batches(
            self.read_size,
            self.layers,
            seed=self.seed,
            epoch=self.epoch,
            drop_last=True,
            rank=self.rank,
            world_size=self.world_size,
        )

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch (a new epoch begins when one ends)."""
        for _ in range(2):
            if self._batches is None:
                self._batches = self._open()
                for _ in range(self.index):  # resuming inside an epoch
                    next(self._batches)
            batch = next(self._batches, None)
            if batch is not None:
                self.index += 1
                if self.slice != slice(0, self.read_size):
                    batch = {k: v[self.slice] for k, v in batch.items()}
                return batch
            if self.index == 0:
                break
            self.epoch, self.index, self._batches = self.epoch + 1, 0, None
        msg = (
            f"rank {self.rank} of {self.world_size} has no full batch of {self.read_size} rows in "
            f"{self.store.directory}"
        )
        raise ValueError(msg)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The cursor: epoch and batches read in it."""
        return {}, {"epoch": self.epoch, "index": self.index}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore a :meth:`state`."""
        self.epoch, self.index, self._batches = int(meta["epoch"]), int(meta["index"]), None


def train_on_store(
    store: ActivationStore,
    config: TranscoderConfig,
    *,
    layers: Sequence[int] | None = None,
    n_layers_model: int,
    n_tokens: int = 4_000_000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    warmup_steps: int = WARMUP_STEPS,
    seed: int = 0,
    device: str | torch.device = "cpu",
    matmul_dtype: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
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
        Training rows seen per transcoder (over all ranks); the store is passed over as often as needed.
    batch_size
        Rows per step (per rank under ``torch.distributed``).
    lr
        Adam learning rate (warm-up, then constant, then a linear decay over the last 20% of steps).
    warmup_steps
        Warm-up steps.
    seed
        Seeds initialisation and the order of rows; on CPU, training is deterministic for a seed and a thread count.
    device
        Where to train.
    matmul_dtype
        Dtype of the dense encoder product that chooses each TopK transcoder's features: ``"bfloat16"`` or
        ``"float32"``; default bfloat16 on a GPU that runs it, float32 elsewhere. Activations, gradients and the
        (master) weights stay in the transcoders' dtype.
    rank, world_size
        Without a process group: this process reads only its own shards of the store (round robin) and nothing
        is synchronised. Under an initialised ``torch.distributed`` group (e.g. ``torchrun``) they are ignored:
        the transcoders are wrapped in ``DistributedDataParallel``, every rank takes its part of each global batch
        of ``batch_size * world_size`` rows (the batches one process with that batch size reads), gradients are
        averaged and rank 0 writes the checkpoints.
    checkpoint_dir
        Save the transcoders, optimizer, RNG and read position here every ``checkpoint_every`` steps, and resume
        from the checkpoint found there (one of a run with other settings is refused before any work). A resumed
        run gives the weights an uninterrupted one does.
    checkpoint_every
        Steps between checkpoints.
    progress
        Show a progress bar with loss, FVU and L0 (means over layers).

    Returns
    -------
    The trained transcoders, with normalisation scales folded into the weights.

    Raises
    ------
    ValueError
        Before any work, for ``n_tokens`` or ``batch_size`` below 1, ``lr`` not positive, negative
        ``warmup_steps``, a store without rows, or a checkpoint of other settings.

    Warns
    -----
    UserWarning
        When the store is unfinished (it holds fewer cells than its manifest's total), with both counts.
    """
    check_training(n_tokens, batch_size, lr, warmup_steps)
    matmul_dtype = resolve_matmul_dtype(matmul_dtype, device)
    check_checkpointing(checkpoint_every)
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
    layers = store.layers if layers is None else list(layers)
    settings = run_settings(
        config, layers, n_tokens, batch_size, lr, warmup_steps, seed, data=store_data(m), matmul_dtype=matmul_dtype
    )
    resume = resume_index(checkpoint_dir, settings)
    batch_size = min(batch_size, store.n_rows // dist_world_size())  # a small store still yields full batches
    torch.manual_seed(seed)
    hooks = {layer: (m.hook_in.get(str(layer), ""), m.hook_out.get(str(layer), "")) for layer in layers}
    tcs = make_transcoders(config, hooks, m.d_model, m.model_name, m.architecture, device)
    if resume is None:
        sample = store.sample(min(16384, store.n_rows), layers, seed=seed)
        for layer, tc in tcs.items():
            n_in, n_out = tensor_names(layer)
            tc.set_scales_from(sample[n_in].to(device), sample[n_out].to(device))
    loop = TrainingLoop(
        tcs, lr=lr, total_steps=steps_for(n_tokens, batch_size), warmup_steps=warmup_steps, matmul_dtype=matmul_dtype
    )
    source = StoreBatches(store, layers, batch_size, seed, rank, world_size)
    for tc in tcs.values():
        tc.train()
    run_training(
        loop,
        source,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        settings=settings,
        resume=resume,
        progress=progress,
    )
    return finish(tcs, n_layers_model, m.model_name, m.architecture)


def store_data(manifest: StoreManifest | None, fingerprint: str = "", positions: str = "") -> str:
    """What identifies a store's rows in checkpoint settings: its prompts' fingerprint and positions rule.

    Parameters
    ----------
    manifest
        The store's manifest; without it, ``fingerprint`` (:func:`prompts_fingerprint`) and ``positions`` of a
        store still to be collected.
    fingerprint, positions
        Used without a manifest.

    Returns
    -------
    A string recorded in the checkpoint's settings.
    """
    if manifest is not None:
        fingerprint, positions = manifest.fingerprint, manifest.positions
    return f"store {fingerprint} {positions}"


def check_checkpointing(checkpoint_every: int) -> None:
    """Refuse a checkpoint interval below one step.

    Parameters
    ----------
    checkpoint_every
        Steps between checkpoints.

    Raises
    ------
    ValueError
        When it is not an integer >= 1.
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, Integral) or checkpoint_every < 1:
        msg = f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}"
        raise ValueError(msg)


def run_settings(
    config: TranscoderConfig,
    layers: Sequence[int],
    n_tokens: float,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    seed: int,
    data: str,
    **extra: Any,
) -> dict[str, Any]:
    """The settings a checkpoint records and a resumed run must share, as JSON values.

    Parameters
    ----------
    config
        Transcoder settings (the per-layer fields are left out).
    layers
        Layers trained.
    n_tokens, batch_size, lr, warmup_steps, seed
        Training settings.
    data
        What identifies the training rows (a store's fingerprint, the prompts' hash).
    **extra
        Further settings of the data source.

    Returns
    -------
    A dict of JSON values.
    """
    cfg = {
        k: v
        for k, v in config.to_dict().items()
        if k not in ("d_in", "d_out", "layer", "hook_in", "hook_out", "model_name", "architecture")
    }
    return {
        **cfg,
        "layers": [int(i) for i in layers],
        "n_tokens": float(n_tokens),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "warmup_steps": int(warmup_steps),
        "seed": int(seed),
        "world_size": dist_world_size(),
        "data": data,
        **extra,
    }


def resume_index(checkpoint_dir: str | Path | None, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint to resume from in ``checkpoint_dir`` (``None`` when there is none), checked against settings.

    Parameters
    ----------
    checkpoint_dir
        Checkpoint directory, or ``None``.
    settings
        This run's settings (:func:`run_settings`).

    Returns
    -------
    The checkpoint's index, or ``None``.

    Raises
    ------
    ValueError
        For a checkpoint of other settings.
    """
    index = read_index(checkpoint_dir)
    if index is not None and checkpoint_dir is not None:
        check_settings(checkpoint_dir, index, settings)
    return index


def make_transcoders(
    config: TranscoderConfig,
    hooks: dict[int, tuple[str, str]],
    d_model: int,
    model_name: str,
    architecture: str,
    device: str | torch.device,
) -> dict[int, Transcoder]:
    """One fresh transcoder per layer (drawn from torch's global generator).

    Parameters
    ----------
    config
        Shared settings.
    hooks
        Per layer, the input and output hook names.
    d_model
        Model width.
    model_name, architecture
        Provenance recorded in each config.
    device
        Where the parameters live.

    Returns
    -------
    Transcoders by layer.
    """
    tcs: dict[int, Transcoder] = {}
    for layer, (hook_in, hook_out) in hooks.items():
        cfg = replace(
            config,
            d_in=d_model,
            d_out=d_model,
            layer=layer,
            model_name=model_name,
            architecture=architecture,
            hook_in=hook_in,
            hook_out=hook_out,
        )
        tcs[layer] = Transcoder(cfg, device=device)
    return tcs


def finish(tcs: dict[int, Transcoder], n_layers_model: int, model_name: str, architecture: str) -> TranscoderSet:
    """Fold scales into the trained transcoders and gather them in a set.

    Parameters
    ----------
    tcs
        Trained transcoders by layer.
    n_layers_model
        Layer count of the model.
    model_name, architecture
        Provenance.

    Returns
    -------
    The set.
    """
    for tc in tcs.values():
        tc.eval()
        tc.fold_scales()
    return TranscoderSet(tcs, n_layers_model=n_layers_model, model_name=model_name, architecture=architecture)
