"""Collecting MLP input/output activations of a C2S model into an :class:`ActivationStore`."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models._hooks import one_at_a_time, record
from ..models._scoring import pad
from ..models._tokens import label_token_ids
from ._store import ActivationStore, StoreManifest, StoreWriter, tensor_names

if TYPE_CHECKING:
    from collections.abc import Sequence

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
        Layers to record; default all.
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
    """
    adapter = model.adapter
    layers = list(range(adapter.n_layers)) if layers is None else sorted({adapter.check_layer(i) for i in layers})
    if not prompts:
        msg = "no prompts to collect activations from"
        raise ValueError(msg)
    if answers is not None and len(answers) != len(prompts):
        msg = f"answers has {len(answers)} entries for {len(prompts)} prompts"
        raise ValueError(msg)
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
    writer = StoreWriter(directory, manifest, shard_rows=shard_rows, repair=repair)
    points = {i: (adapter.mlp_in(i), adapter.mlp_out(i)) for i in layers}
    device = model.device
    pad_id = model.tokenizer.pad_token_id
    start = writer.next_cell
    with tqdm(total=len(prompts), initial=start, desc="collecting activations", disable=not progress) as bar:
        for b in range(start, len(prompts), batch_size):
            batch = prompts[b : b + batch_size]
            # right padding: real tokens keep positions 0..n-1 and a causal model never sees the pads
            ids, mask = pad(
                [p.input_ids + a for p, a in zip(batch, appended[b : b + batch_size], strict=True)], pad_id, "right"
            )
            with record(model.model, [pt for pair in points.values() for pt in pair]) as store:
                # the transformer without its unembedding: batch x tokens x vocabulary logits are not needed
                model.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))
            for row in range(len(batch)):
                pos = torch.from_numpy(kept[b + row]).to(device)
                cell: dict[str, torch.Tensor] = {}
                for layer, (p_in, p_out) in points.items():
                    n_in, n_out = tensor_names(layer)
                    cell[n_in] = store[p_in][0][row, pos].to("cpu", dtype)
                    cell[n_out] = store[p_out][0][row, pos].to("cpu", dtype)
                cell["cell"] = torch.full((len(pos),), b + row, dtype=torch.int32)
                cell["position"] = pos.to("cpu", torch.int32)
                writer.add_cell(cell)
            bar.update(len(batch))
    writer.flush()
    return ActivationStore(directory)


def rotating_answers(model: C2SModel, n_cells: int) -> list[list[int]] | None:
    """Per cell, the tokens of one of the model's labels, in rotation, so each label's tokens are represented."""
    if not model.labels:
        return None
    ids = label_token_ids(model.tokenizer, model.prompt, model.labels)
    return [ids[i % len(ids)] for i in range(n_cells)]
