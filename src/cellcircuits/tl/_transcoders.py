"""Collecting activations from cells and training transcoders on them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .._keys import SentenceSettings
from ..models._hooks import one_at_a_time
from ..transcoders._activations import collect_activations as _collect
from ..transcoders._activations import prompts_fingerprint, rotating_answers
from ..transcoders._config import TranscoderConfig
from ..transcoders._loop import resolve_matmul_dtype
from ..transcoders._store import ActivationStore
from ..transcoders._stream import ActivationStream, train_on_stream
from ..transcoders._training import (
    WARMUP_STEPS,
    check_training,
    resume_index,
    run_settings,
    store_data,
    train_on_store,
)
from ._cells import cell_prompts

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ..models._load import C2SModel
    from ..transcoders._transcoder_set import TranscoderSet


@one_at_a_time
def collect_activations(
    adata: AnnData,
    model: C2SModel,
    directory: str | Path,
    *,
    layers: Sequence[int] | None = None,
    positions: Literal["genes+answer", "all"] = "genes+answer",
    answer_tokens: bool = True,
    sentence_key: str = "cell_sentence",
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    random_state: int = 0,
    organism: str | None = None,
    batch_size: int = 16,
    shard_rows: int = 65536,
    dtype: str = "float16",
    repair: bool = False,
    progress: bool = True,
) -> ActivationStore:
    """Record a model's MLP inputs and outputs on cells into a sharded on-disk store.

    The store (safetensors shards and a JSON manifest) is read back in shuffled mini-batches without loading it
    whole, and an interrupted collection resumes where it stopped when called again with the same arguments. A
    complete store is returned as it is, after its shards are checked against the manifest; a damaged one is refused
    with a ValueError, and calling again with ``repair=True`` mends it.

    Parameters
    ----------
    adata
        Annotated data matrix; its cells are run through the model.
    model
        The C2S model (:func:`cellcircuits.models.load`).
    directory
        Where the store is written.
    layers
        Model layers whose MLPs are recorded; default all.
    positions
        ``"genes+answer"``: the tokens that spell genes, the closing text after the sentence ("... these genes is:")
        and the answer's tokens, where the cell type is decided; ``"all"``: every token, the template's opening text
        (the same for every cell) included.
    answer_tokens
        Append a label after each prompt and record its tokens: cell ``i`` gets the model's label ``i mod
        n_labels``, so every label's tokens are represented, as they are when labels are scored. Labels span several
        tokens and most share the first ones (" CD"), so this is where cell types are told apart. Ignored when the
        model records no labels.
    sentence_key, layer, use_raw, gene_symbols, random_state
        Cell sentences: ``.obs[sentence_key]`` when present, else built from this AnnData ``layer``/``.raw`` as in
        :func:`cellcircuits.pp.cell_sentences` (cut to the model's ``n_genes``).
    organism
        Organism named in the prompts (C2S models trained on human and mouse cells read it); default the model's
        ``prompt.organism``.
    batch_size
        Cells per forward pass.
    shard_rows
        Rows (token positions) per shard file.
    dtype
        Storage dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
    repair
        Mend a damaged store in ``directory`` (a shard missing, unreadable, or not holding the tensors and rows the
        manifest records): its intact shards before the first damaged one are kept and the rest collected again.
        Pass the same arguments as for the first collection.
    progress
        Show a progress bar.

    Returns
    -------
    The store.
    """
    if dtype not in ("float16", "bfloat16", "float32"):
        msg = f"dtype must be 'float16', 'bfloat16' or 'float32', got {dtype!r}"
        raise ValueError(msg)
    settings = SentenceSettings(sentence_key, layer, use_raw, gene_symbols, random_state, organism)
    prompts = cell_prompts(adata, model, settings)
    return _collect(
        model,
        prompts,
        directory,
        layers=layers,
        positions=positions,
        answers=rotating_answers(model, len(prompts)) if answer_tokens else None,
        batch_size=batch_size,
        shard_rows=shard_rows,
        dtype=getattr(torch, dtype),
        repair=repair,
        progress=progress,
    )


def train_transcoders(
    adata: AnnData,
    model: C2SModel,
    layers: Sequence[int] | None = None,
    *,
    n_features: int = 1024,
    activation: Literal["topk", "relu", "jumprelu"] = "topk",
    k: int = 32,
    l1_coefficient: float = 1e-3,
    l0_coefficient: float = 1e-3,
    skip: bool = False,
    n_tokens: int = 4_000_000,
    batch_size: int = 1024,
    lr: float = 2e-3,
    dead_after_tokens: int = 200_000,
    seed: int = 0,
    store: str | Path | ActivationStore | None = None,
    positions: Literal["genes+answer", "all"] = "genes+answer",
    answer_tokens: bool = True,
    buffer_rows: int = 16384,
    cells_per_pass: int = 8,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    matmul_dtype: Literal["float32", "bfloat16"] | None = None,
    sentence_key: str = "cell_sentence",
    layer: str | None = None,
    use_raw: bool | None = None,
    organism: str | None = None,
    progress: bool = True,
) -> TranscoderSet:
    """Train a transcoder for each chosen MLP of a model, on the model's activations on these cells.

    By default the transcoders train straight from the model's forward passes: a few cells at a time are run, their
    activations at every chosen layer go into a shuffle buffer of ``buffer_rows`` rows, and batches are drawn at
    random from it (rows of many cells mixed), refilled as it drains, cycling over the cells for as many epochs as
    ``n_tokens`` needs, so memory and disk stay bounded however many cells there are. With ``store``, activations
    are written to an on-disk store first (reused when complete, resumed when not) and the transcoders train on
    shuffled mini-batches from it; for small data used again and again. All layers train from the same batches.

    Under ``torchrun --nproc_per_node N`` (or a ``torch.distributed`` group initialised by the caller), each rank
    streams its own share of the cells (each rank reads its part of every global batch of a store), gradients are
    averaged with ``DistributedDataParallel``, rank 0 writes the checkpoints, and every rank returns the same
    transcoders; ``batch_size`` is per rank.

    Parameters
    ----------
    adata
        Cells whose activations train the transcoders.
    model
        The C2S model (:func:`cellcircuits.models.load`).
    layers
        Model layers to train transcoders for; default all MLPs.
    n_features
        Features (hidden units) per transcoder.
    activation
        ``"topk"`` (keep the ``k`` largest), ``"relu"`` (with an L1 penalty weighted by decoder norms) or
        ``"jumprelu"`` (learned thresholds, L0 penalty).
    k
        Active features per token for ``topk``.
    l1_coefficient
        L1 weight for ``relu``.
    l0_coefficient
        L0 weight for ``jumprelu``.
    skip
        Add a linear skip connection from MLP input to output (skip transcoder).
    n_tokens
        Training rows (token positions) seen per transcoder, repeating the store's rows as often as needed. On the
        shipped model (212k rows from 558 cells) 4 million rows give about half the held-out FVU of 1 million.
    batch_size
        Rows per optimisation step.
    lr
        Adam learning rate.
    dead_after_tokens
        A feature that has not fired for this many training rows counts as dead and joins the auxiliary loss.
    seed
        Seed of initialisation and batch order; on CPU, training is deterministic for a seed and a number of threads
        (another thread count sums in another order, and the weights drift apart over a long run).
    store
        Activation store directory to create, resume or reuse (a store of other cells or settings is refused, a
        damaged one too: mend it with :func:`collect_activations` and ``repair=True``), or an opened store to train
        on as it is (an unfinished one with a warning); default a temporary directory.
    positions
        Token positions to train on (see :func:`collect_activations`).
    answer_tokens
        Append a label's tokens after each prompt and train on them too (as in :func:`collect_activations`).
    buffer_rows
        Rows of the streaming shuffle buffer (per layer, for MLP input and output each, held as float16: ``4 *
        buffer_rows * n_layers * d_model`` bytes); it is refilled when below half full, so each batch is drawn from
        at least ``buffer_rows / 2`` rows. At least ``2 * batch_size`` and twice the rows of the longest cell.
    cells_per_pass
        Cells per forward pass while streaming.
    checkpoint_dir
        Save the transcoders, optimizer, RNG and streaming buffer and position here every ``checkpoint_every``
        steps (safetensors and JSON), and resume from the checkpoint found there: an interrupted run called again
        with the same arguments gives the weights an uninterrupted one does (on CPU, with the same thread count),
        losing at most one interval. A checkpoint of other settings or cells is refused before any work.
    checkpoint_every
        Steps between checkpoints.
    matmul_dtype
        Dtype of the dense encoder product that chooses each TopK transcoder's ``k`` features in a training step:
        ``"bfloat16"`` or ``"float32"``; default bfloat16 on a GPU that runs it, float32 on a CPU. The chosen
        features' activations, the gradients and the weights stay float32.
    sentence_key, layer, use_raw
        Cell sentences, as in :func:`collect_activations`. ``layer`` is an AnnData layer, not a model layer.
    organism
        Organism named in the prompts (C2S models trained on human and mouse cells read it); default the model's
        ``prompt.organism``.
    progress
        Show progress bars (with loss, FVU and L0 while training).

    Returns
    -------
    The trained transcoders (save them with ``.save(directory)``).

    Raises
    ------
    ValueError
        Before any work, for ``n_tokens`` or ``batch_size`` below 1, ``lr`` not positive, ``buffer_rows`` too small,
        more ranks than cells, or a checkpoint in ``checkpoint_dir`` of other settings.
    """
    settings = SentenceSettings(sentence_key, layer, use_raw, organism=organism)  # checked before any work
    check_training(n_tokens, batch_size, lr)
    dtype_of_matmuls = resolve_matmul_dtype(matmul_dtype, model.device)
    if layers is not None:
        layers = sorted({model.adapter.check_layer(int(i)) for i in layers})
    config = TranscoderConfig(
        d_in=model.adapter.d_model,
        d_out=model.adapter.d_model,
        n_features=n_features,
        activation=activation,
        k=k,
        l1_coefficient=l1_coefficient,
        l0_coefficient=l0_coefficient,
        skip=skip,
        dead_after_tokens=dead_after_tokens,
        dtype="float32",
    )
    optimisation: dict[str, Any] = {
        "n_tokens": n_tokens,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "device": model.device,
        "checkpoint_dir": checkpoint_dir,
        "checkpoint_every": checkpoint_every,
        "matmul_dtype": dtype_of_matmuls,
        "progress": progress,
    }

    def train(opened: ActivationStore) -> TranscoderSet:
        return train_on_store(opened, config, layers=layers, n_layers_model=model.adapter.n_layers, **optimisation)

    if isinstance(store, ActivationStore):
        return train(store)
    prompts = cell_prompts(adata, model, settings)
    answers = rotating_answers(model, len(prompts)) if answer_tokens else None
    if store is None:
        stream = ActivationStream(
            model,
            prompts,
            layers=layers,
            positions=positions,
            answers=answers,
            buffer_rows=buffer_rows,
            cells_per_pass=cells_per_pass,
            seed=seed,
        )
        return train_on_stream(stream, config, **optimisation)
    if checkpoint_dir is not None:
        # a checkpoint of other settings is refused before the store is collected
        data = store_data(None, prompts_fingerprint(prompts, model.name, answers), positions)
        all_layers = list(range(model.adapter.n_layers)) if layers is None else layers
        settings_now = run_settings(
            config, all_layers, n_tokens, batch_size, lr, WARMUP_STEPS, seed, data=data, matmul_dtype=dtype_of_matmuls
        )
        resume_index(checkpoint_dir, settings_now)
    # a complete store of these cells is reused as is, an unfinished one resumed, one of other cells refused; under
    # torch.distributed every rank collects its share of the cells (a collective call) into the one store
    return train(
        _collect(model, prompts, Path(store), layers=layers, positions=positions, answers=answers, progress=progress)
    )
