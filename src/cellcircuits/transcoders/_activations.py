"""Collecting MLP input/output activations of a C2S model into an :class:`ActivationStore`."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..models._distributed import collective_device, is_distributed, rank, shard_bounds, world_size
from ..models._hooks import input_tensor, one_at_a_time, output_tensor
from ..models._scoring import pad
from ..models._tokens import label_token_ids
from ._store import MANIFEST, ActivationStore, StoreManifest, StoreWriter, tensor_names

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from ..models._adapter import HookPoint, ModelAdapter
    from ..models._load import C2SModel
    from ..models._tokens import TokenizedPrompt

Positions = Literal["genes+answer", "all"]


def kept_positions(prompt: TokenizedPrompt, positions: Positions, n_answer_tokens: int = 0) -> np.ndarray:
    """Token positions whose activations are kept.

    ``"genes+answer"``: the tokens that spell genes, the answer region (the closing text between the sentence and
    the answer, e.g. "... these genes is:", up to the last prompt token where the answer starts) and the
    ``n_answer_tokens`` answer tokens appended after the prompt. Only the template's opening text, the same for
    every cell, is left out. ``"all"``: every token, appended ones included.
    """
    n = len(prompt.input_ids)
    if positions == "all":
        return np.arange(n + n_answer_tokens)
    if positions != "genes+answer":
        msg = f"positions must be 'genes+answer' or 'all', got {positions!r}"
        raise ValueError(msg)
    genes = np.concatenate(prompt.gene_positions) if prompt.gene_positions else np.zeros(0, dtype=np.int64)
    # the closing tokens read the sentence through attention: they are where the answer forms
    region_start = int(genes[-1]) + 1 if len(genes) else prompt.answer_position
    region = np.arange(region_start, prompt.answer_position + 1)
    return np.concatenate([genes, region, np.arange(n, n + n_answer_tokens)]).astype(np.int64)


def prompts_fingerprint(
    prompts: Sequence[TokenizedPrompt], model_name: str, answers: Sequence[Sequence[int]] | None = None
) -> str:
    """A hash of the model name, every prompt's token ids and the answer tokens appended to them."""
    h = hashlib.blake2b(model_name.encode(), digest_size=16)
    for i, p in enumerate(prompts):
        h.update(np.asarray(p.input_ids, dtype=np.int64).tobytes())
        h.update(b"|")
        if answers is not None:
            h.update(np.asarray(answers[i], dtype=np.int64).tobytes())
        h.update(b";")
    return h.hexdigest()


def _hook_name(point: tuple[str, str]) -> str:
    return f"{point[0]}:{point[1]}"


@contextmanager
def kept_rows_hooks(model: C2SModel, points: dict[str, HookPoint], dtype: torch.dtype) -> Iterator[KeptRows]:
    """Hooks that keep, during each forward pass, only the kept rows of every point, converted on the device.

    Set ``where`` of the yielded :class:`KeptRows` (batch rows and token positions) before each pass; after it,
    ``rows[name]`` holds that point's ``(kept rows, d_model)`` tensor in ``dtype``. Gathering in the hook frees
    each layer's full activations at once, and one copy per point leaves the device per batch.
    """
    kept = KeptRows()
    handles = []
    try:
        for name, point in points.items():
            module = model.model.get_submodule(point.module)

            def hook(_m: torch.nn.Module, args: tuple, kwargs: dict, output: object, _n: str = name) -> None:
                side = points[_n].side
                t = input_tensor(args, kwargs) if side == "input" else output_tensor(output)
                kept.rows[_n] = t.detach()[kept.where].to(dtype)
                if len(kept.rows) == len(points):
                    raise AllRecorded  # the layers above the last recorded point need not run

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield kept
    finally:
        for h in handles:
            h.remove()


class AllRecorded(Exception):
    """Raised by the last hook of a pass to skip the rest of the forward pass."""


class KeptRows:
    """Where the rows to keep are in a batch, and the rows each hook kept."""

    def __init__(self) -> None:
        self.where: tuple[torch.Tensor, torch.Tensor] = (torch.zeros(0, dtype=torch.long),) * 2
        self.rows: dict[str, torch.Tensor] = {}


def recorded_layers(adapter: ModelAdapter, layers: Sequence[int] | None) -> list[int]:
    """The model layers to record, sorted and without repeats (every layer when ``None``)."""
    return list(range(adapter.n_layers)) if layers is None else sorted({adapter.check_layer(i) for i in layers})


def check_prompts(
    prompts: Sequence[TokenizedPrompt], answers: Sequence[Sequence[int]] | None, doing: str
) -> np.ndarray:
    """Refuse no prompts, answers of another length and more ranks than prompts; the ranks' shares of the prompts.

    Parameters
    ----------
    prompts
        The prompts to run.
    answers
        Answer tokens appended per prompt, or ``None``.
    doing
        What the prompts are for, in the message (``"collect activations from"``).

    Returns
    -------
    The boundaries of each rank's contiguous share of the prompts.
    """
    if not prompts:
        msg = f"no prompts to {doing}"
        raise ValueError(msg)
    if answers is not None and len(answers) != len(prompts):
        msg = f"answers has {len(answers)} entries for {len(prompts)} prompts"
        raise ValueError(msg)
    return shard_bounds(len(prompts))  # more ranks than prompts fail here, before any work


@one_at_a_time
@torch.no_grad()
def collect_activations(
    model: C2SModel,
    prompts: Sequence[TokenizedPrompt],
    directory: str | Path,
    *,
    layers: Sequence[int] | None = None,
    positions: Positions = "genes+answer",
    answers: Sequence[Sequence[int]] | None = None,
    batch_size: int = 16,
    shard_rows: int = 65536,
    dtype: torch.dtype = torch.float16,
    repair: bool = False,
    progress: bool = True,
) -> ActivationStore:
    """Run the model on prompts and store each chosen layer's MLP input and output at the kept positions.

    Under ``torch.distributed`` (``torchrun --nproc_per_node N``, or a process group the caller initialised) every
    rank collects a contiguous share of the prompts into its own sub-store, ``directory/ranks/<r>-of-<N>/`` (resumed
    and repaired on its own), and rank 0 then writes ``directory/manifest.json`` listing every rank's shards in
    cell order, so the result is one ordinary store. Every rank must call it with the same arguments and a
    ``directory`` all of them can reach; each returns the store.

    Parameters
    ----------
    model
        The C2S model.
    prompts
        Tokenized prompts (:func:`cellcircuits.models.tokenize_prompts`), one per cell.
    directory
        Store directory. If it holds an unfinished store of the same prompts, layers and positions, collection
        resumes after the last complete shard; a complete one is returned as it is. Its shards are first checked
        against the manifest (present, readable, the recorded tensors and row counts): a damaged store is refused
        with a ValueError unless ``repair`` is set.
    layers
        Layers to record; default all. The layers above the highest one do not run.
    positions
        ``"genes+answer"``: the tokens spelling genes, the answer region (the closing text after the sentence up to
        the last prompt token) and the answer tokens; ``"all"``: every token (see :func:`kept_positions`).
    answers
        Per prompt, answer token ids appended after it (e.g. a candidate label's tokens, see
        :func:`cellcircuits.models.label_token_ids`). Labels span several tokens and most share their first ones, so
        the tokens that tell cell types apart come after the prompt; recording them lets transcoders cover them.
    batch_size
        Prompts per forward pass.
    shard_rows
        Rows per shard file.
    dtype
        Storage dtype (float16 halves disk use; training reads rows back as float32).
    repair
        Mend a damaged store in ``directory``: keep its intact shards before the first damaged one (missing,
        unreadable, or not holding the tensors and rows its manifest records) and collect the rest again, with the
        same arguments as the first collection. An intact store is left as it is.
    progress
        Show a progress bar.

    Returns
    -------
    The store, opened for reading.

    Raises
    ------
    ValueError
        Before any work: no prompts, ``answers`` of another length, unknown ``positions``, more ranks than prompts,
        or a directory holding a store of other activations or a damaged one (without ``repair``).
    """
    adapter = model.adapter
    layers = recorded_layers(adapter, layers)
    bounds = check_prompts(prompts, answers, "collect activations from")
    manifest = StoreManifest(
        model_name=model.name,
        architecture=adapter.spec.name,
        layers=layers,
        d_model=adapter.d_model,
        positions=positions,
        dtype=str(dtype).removeprefix("torch."),
        n_cells_total=len(prompts),
        hook_in={str(i): _hook_name(adapter.mlp_in(i)) for i in layers},
        hook_out={str(i): _hook_name(adapter.mlp_out(i)) for i in layers},
        fingerprint=prompts_fingerprint(prompts, model.name, answers),
    )
    appended = [list(a) for a in answers] if answers is not None else [[] for _ in prompts]
    kept = [kept_positions(p, positions, len(a)) for p, a in zip(prompts, appended, strict=True)]
    if not is_distributed():
        writer = StoreWriter(directory, manifest, shard_rows=shard_rows, repair=repair)
        run_collection(model, prompts, appended, kept, writer, batch_size, dtype, progress=progress)
        return ActivationStore(directory)
    directory = Path(directory)
    if (directory / MANIFEST).is_file():  # a finished distributed (or single-process) collection
        done = StoreWriter(directory, manifest, shard_rows=shard_rows, repair=repair)
        if done.manifest.complete:
            return ActivationStore(directory)
    r, world = rank(), world_size()
    lo, hi = int(bounds[r]), int(bounds[r + 1])
    part = replace(manifest, n_cells_total=hi - lo, fingerprint=f"{manifest.fingerprint}:{lo}-{hi}")
    try:
        writer = StoreWriter(directory / rank_directory(r, world), part, shard_rows=shard_rows, repair=repair)
    except (ValueError, OSError):
        failed_ranks(failed=True)  # the other ranks stop too, instead of waiting for this one
        raise
    failed = failed_ranks(failed=False)
    if failed:
        msg = (
            f"rank(s) {failed} could not open their part of the activation store in {directory} (see their error); "
            "no rank collected anything"
        )
        raise ValueError(msg)
    run_collection(model, prompts[lo:hi], appended[lo:hi], kept[lo:hi], writer, batch_size, dtype, lo, progress)
    dist.barrier()
    if r == 0:
        merge_rank_stores(directory, manifest, bounds)
    dist.barrier()
    return ActivationStore(directory)


def failed_ranks(*, failed: bool) -> list[int]:
    """Every rank says whether it failed; all of them learn which ranks did (a collective call).

    Parameters
    ----------
    failed
        Whether this rank failed.

    Returns
    -------
    The ranks that failed, in order.
    """
    flags = torch.zeros(world_size(), dtype=torch.int32, device=collective_device())
    flags[rank()] = int(failed)
    dist.all_reduce(flags)
    return [int(i) for i in torch.nonzero(flags).flatten().tolist()]


def rank_directory(r: int, world: int) -> str:
    """Sub-store of rank ``r`` of ``world``, relative to the store directory."""
    return f"ranks/{r}-of-{world}"


def merge_rank_stores(directory: Path, manifest: StoreManifest, bounds: np.ndarray) -> None:
    """Write ``directory``'s manifest listing every rank's shards (in their sub-stores) in cell order."""
    world = len(bounds) - 1
    manifest = replace(manifest, shards=[], n_rows=0, n_cells_done=0)
    for r in range(world):
        sub = rank_directory(r, world)
        part = StoreManifest.read(directory / sub)
        for info in part.shards:
            shard = {**info, "file": f"{sub}/{info['file']}", "first_cell": info["first_cell"] + int(bounds[r])}
            manifest.shards.append(shard)
        manifest.n_rows += part.n_rows
        manifest.n_cells_done += part.n_cells_done
    manifest.write(directory)


def run_collection(
    model: C2SModel,
    prompts: Sequence[TokenizedPrompt],
    appended: Sequence[list[int]],
    kept: Sequence[np.ndarray],
    writer: StoreWriter,
    batch_size: int,
    dtype: torch.dtype,
    first_cell: int = 0,
    progress: bool = True,
) -> None:
    """Collect ``prompts`` (cells ``first_cell, first_cell + 1, ...``) from ``writer.next_cell`` on, then flush."""
    adapter = model.adapter
    points: dict[str, HookPoint] = {}
    for layer in writer.manifest.layers:
        n_in, n_out = tensor_names(layer)
        points[n_in], points[n_out] = adapter.mlp_in(layer), adapter.mlp_out(layer)
    device = model.device
    pad_id = model.tokenizer.pad_token_id
    start = writer.next_cell
    bar = tqdm(total=len(prompts), initial=start, desc="collecting activations", disable=not progress)
    with bar, kept_rows_hooks(model, points, dtype) as hooks:
        for b in range(start, len(prompts), batch_size):
            batch = range(b, min(b + batch_size, len(prompts)))
            # right padding: real tokens keep positions 0..n-1 and a causal model never sees the pads
            ids, mask = pad([prompts[i].input_ids + appended[i] for i in batch], pad_id, "right")
            where = [kept[i] for i in batch]
            counts = [len(w) for w in where]
            pos = torch.from_numpy(np.concatenate(where))
            rows = torch.repeat_interleave(torch.arange(len(batch)), torch.as_tensor(counts))
            hooks.where = (rows.to(device), pos.to(device))
            hooks.rows = {}
            try:
                # the transformer without its unembedding: batch x tokens x vocabulary logits are not needed
                model.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except AllRecorded:
                pass
            stacked = torch.stack([hooks.rows[name] for name in points]).cpu()  # one copy off the device
            tensors = dict(zip(points, stacked.unbind(0), strict=True))
            cells = torch.arange(first_cell + b, first_cell + batch.stop, dtype=torch.int32)
            tensors["cell"] = torch.repeat_interleave(cells, torch.as_tensor(counts))
            tensors["position"] = pos.to(torch.int32)
            writer.add_cells(tensors, counts)
            bar.update(len(batch))
    writer.flush()


def rotating_answers(model: C2SModel, n_cells: int) -> list[list[int]] | None:
    """Per cell, the tokens of one of the model's labels, in rotation, so each label's tokens are represented."""
    if not model.labels:
        return None
    ids = label_token_ids(model.tokenizer, model.prompt, model.labels)
    return [ids[i % len(ids)] for i in range(n_cells)]
