"""Gene knockouts in the real model: delete a gene from a prompt, or mask its tokens' embeddings, and re-read a target.

Works on tokenized prompts and label targets alone; :func:`cellcircuits.tl.validate_circuit_genes` is the AnnData
adapter that rebuilds the traced cells' prompts, picks the genes and compares the effects with the circuit's scores.

Every target is a label's logit difference read at the last token of ``prompt + teacher-forced prefix``, before any
final logit softcap, as :func:`cellcircuits.circuits.label_target` defines it and tracing attributes it: it is read
from the final norm's output times the unembedding rows, so a model with a final softcap (Gemma-2) gives the value
the circuit was traced to.

- **deletion**: the gene leaves the cell sentence (later genes move up one place) and the prompt is rebuilt with the
  model's template and tokenized again; no gene enters at the end, so the sentence is one gene shorter.
- **masking**: token positions are kept, and the embedding of each of the gene's tokens (what enters the residual
  stream: the embedding module's output) is replaced by the *neutral embedding*, the mean embedding over the whole
  vocabulary (:func:`neutral_embedding`): a fixed input that stands for no gene in particular, the same for every
  gene and cell. Its norm is far below a token's (0.017 against a median of 0.23 on the shipped model), and the
  pre-attention norm of a pre-norm model rescales it (up to the norm's epsilon), so attention at a masked position
  reads the direction of the average token. Other baselines (a zero vector, a padding token) would give other
  masking effects; the gradient x input below uses the same baseline, so the two stay comparable.
- **gradient x input**: ``d target / d embedding`` at the gene's tokens, dotted with ``embedding - neutral`` and summed
  over the tokens: the first-order (linear) estimate of the masking effect.

Effects are ``target(original) - target(knocked out)``: a gene that supports the label has a positive effect, as its
signed attribution in the circuit is.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

from ..models._adapter import HookPoint
from ..models._hooks import model_lock, one_at_a_time, output_tensor, record
from ..models._scoring import pad, position_ids, token_batches

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from torch import nn

    from ..models._load import C2SModel
    from ..models._tokens import TokenizedPrompt
    from ._targets import LabelTarget

Padding = Literal["left", "right"]


# the pieces
@torch.no_grad()
def neutral_embedding(model: C2SModel, chunk: int = 8192) -> torch.Tensor:
    """``(d_model,)`` float32 mean of the embedding module's output over every token of the vocabulary.

    The embedding module is run on the ids (in chunks), so an embedding that scales its output (Gemma-2 multiplies
    by ``sqrt(d_model)``) is averaged as it enters the residual stream.
    """
    embed = model.adapter.embed
    n = int(embed.weight.shape[0])
    device = embed.weight.device
    total = torch.zeros(embed.weight.shape[1], dtype=torch.float64, device=device)
    for start in range(0, n, chunk):
        ids = torch.arange(start, min(start + chunk, n), device=device)
        total += embed(ids).double().sum(0)
    return (total / n).float()


def readout(model: C2SModel, targets: Sequence[LabelTarget]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, d)`` weights and ``(K,)`` constants: target ``k`` is ``weight[k] · final_norm_output + const[k]``.

    ``weight`` is the label token's unembedding row minus the mean row of its competitors (the plain row without
    competitors), ``const`` the same for the unembedding's bias.
    """
    unembed = model.adapter.unembed
    W = unembed.weight.detach().float()
    b = unembed.bias.detach().float() if unembed.bias is not None else None
    weights, consts = [], []
    for t in targets:
        comp = list(t.competitors)
        w, c = W[t.token], (b[t.token] if b is not None else W.new_zeros(()))
        if comp:
            w = w - W[comp].mean(0)
            c = c - (b[comp].mean() if b is not None else 0.0)
        weights.append(w)
        consts.append(c)
    return torch.stack(weights), torch.stack(consts)


@contextmanager
def edited_embedding(hf: nn.Module, embed: nn.Module, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While the block runs, the embedding module's output ``e`` is replaced by ``edit(e)`` (a plain forward hook)."""

    def hook(_module: nn.Module, _args: tuple, output: object) -> torch.Tensor:
        return edit(output_tensor(output))

    lock = model_lock(hf)
    lock.acquire()  # no other thread runs the model with this hook, nor hooks it meanwhile
    handle = embed.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        lock.release()


def _padded_positions(
    rows: Sequence[int], positions: Sequence[np.ndarray], lengths: Sequence[int], width: int, side: Padding
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch rows and padded columns of the given positions of each row's prompt."""
    r, c = [], []
    for k, (pos, n) in enumerate(zip(positions, lengths, strict=True)):
        offset = width - n if side == "left" else 0
        r.append(np.full(len(pos), rows[k], dtype=np.int64))
        c.append(np.asarray(pos, dtype=np.int64) + offset)
    return torch.as_tensor(np.concatenate(r)), torch.as_tensor(np.concatenate(c))


def _forward_last(
    model: C2SModel, ids: torch.Tensor, mask: torch.Tensor, side: Padding, *, grad: bool = False
) -> torch.Tensor:
    """``(B, d)`` final norm output at each row's last real token."""
    hf, adapter = model.model, model.adapter
    point = HookPoint(adapter.spec.final_norm, "output")
    # left padding puts every row's last token in the last column: the unembedding need only run there
    keeps = side == "left" and "logits_to_keep" in inspect.signature(hf.forward).parameters
    keep = {"logits_to_keep": 1} if keeps else {}
    with record(hf, [point], detach=not grad) as rec:
        hf(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False, **keep)
    normed = rec[point][0]
    last = torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device) if side == "left" else mask.sum(1) - 1
    return normed[torch.arange(ids.shape[0], device=ids.device), last].float()


def _check_inputs(inputs: Sequence[Sequence[int]], targets: Sequence[LabelTarget], batch_size: int) -> None:
    if len(inputs) != len(targets):
        msg = f"{len(inputs)} inputs for {len(targets)} targets"
        raise ValueError(msg)
    if any(len(x) == 0 for x in inputs):
        msg = "every input needs at least one token"
        raise ValueError(msg)
    if batch_size < 1:
        msg = f"batch_size must be positive, got {batch_size!r}"
        raise ValueError(msg)


# target values and gradients, batched
@one_at_a_time
@torch.no_grad()
def target_values(
    model: C2SModel,
    inputs: Sequence[Sequence[int]],
    targets: Sequence[LabelTarget],
    *,
    masked: Sequence[np.ndarray] | None = None,
    neutral: torch.Tensor | None = None,
    batch_size: int = 32,
    padding_side: Padding = "left",
    progress: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Each input's target, read at its last token, with some token embeddings optionally masked.

    Parameters
    ----------
    model
        The C2S model.
    inputs
        Token ids: a prompt and its target's teacher-forced prefix.
    targets
        Per input, the label target read at its last token (``prefix`` is not appended here).
    masked
        Per input, positions whose embedding is replaced by ``neutral`` (empty: none).
    neutral
        ``(d_model,)`` embedding put at masked positions; default :func:`neutral_embedding`.
    batch_size
        Inputs per forward pass (sorted by length, padded; position ids count real tokens only).
    padding_side
        Pad on the left or the right; both give the same values.
    progress
        Called with the number of inputs each batch finished.

    Returns
    -------
    ``(n_inputs,)`` float64 target values.
    """
    _check_inputs(inputs, targets, batch_size)
    if masked is not None and len(masked) != len(inputs):
        msg = f"{len(masked)} masked position sets for {len(inputs)} inputs"
        raise ValueError(msg)
    device = model.device
    weight, const = (t.to(device) for t in readout(model, targets))
    if masked is not None and neutral is None:
        neutral = neutral_embedding(model)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    lengths = [len(x) for x in inputs]
    out = np.zeros(len(inputs), dtype=np.float64)
    for idx in token_batches(lengths, batch_size=batch_size, max_batch_tokens=None):
        ids, mask = pad([inputs[i] for i in idx], pad_id, padding_side)
        ids, mask = ids.to(device), mask.to(device)
        if masked is None or not any(len(masked[i]) for i in idx):
            normed = _forward_last(model, ids, mask, padding_side)
        else:
            assert neutral is not None
            rows, cols = _padded_positions(
                range(len(idx)), [masked[i] for i in idx], [lengths[i] for i in idx], ids.shape[1], padding_side
            )

            def edit(
                e: torch.Tensor, r: torch.Tensor = rows, c: torch.Tensor = cols, fill: torch.Tensor = neutral
            ) -> torch.Tensor:
                e = e.clone()
                e[r.to(e.device), c.to(e.device)] = fill.to(device=e.device, dtype=e.dtype)
                return e

            with edited_embedding(model.model, model.adapter.embed, edit):
                normed = _forward_last(model, ids, mask, padding_side)
        out[idx] = ((normed * weight[idx]).sum(-1) + const[idx]).double().cpu().numpy()
        if progress is not None:
            progress(len(idx))
    return out


@one_at_a_time
def gradient_x_input(
    model: C2SModel,
    inputs: Sequence[Sequence[int]],
    targets: Sequence[LabelTarget],
    gene_positions: Sequence[Sequence[np.ndarray]],
    *,
    neutral: torch.Tensor | None = None,
    batch_size: int = 32,
    padding_side: Padding = "left",
) -> list[np.ndarray]:
    """Per input and gene: ``sum over the gene's tokens of d target / d e · (e - neutral)``, ``e`` its embedding.

    The first-order estimate of the masking effect (replacing those embeddings by ``neutral``): the target is
    linearised around the real input, attention and norms included (unlike a frozen-attention attribution).
    Gradients are taken with :func:`torch.autograd.grad`, so the model's parameters get no ``.grad``.

    Parameters
    ----------
    model
        The C2S model.
    inputs
        Token ids: a prompt and its target's teacher-forced prefix.
    targets
        Per input, the label target read at its last token.
    gene_positions
        Per input, the positions of each gene's tokens.
    neutral
        ``(d_model,)`` baseline embedding; default :func:`neutral_embedding`.
    batch_size
        Inputs per forward and backward pass.
    padding_side
        Pad on the left or the right.

    Returns
    -------
    Per input, a float64 array with one value per gene.
    """
    _check_inputs(inputs, targets, batch_size)
    if len(gene_positions) != len(inputs):
        msg = f"{len(gene_positions)} gene position lists for {len(inputs)} inputs"
        raise ValueError(msg)
    device = model.device
    weight, const = (t.to(device) for t in readout(model, targets))
    neutral = (neutral if neutral is not None else neutral_embedding(model)).to(device)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    lengths = [len(x) for x in inputs]
    out: list[np.ndarray] = [np.zeros(0)] * len(inputs)
    for idx in token_batches(lengths, batch_size=batch_size, max_batch_tokens=None):
        ids, mask = pad([inputs[i] for i in idx], pad_id, padding_side)
        ids, mask = ids.to(device), mask.to(device)
        leaf: dict[str, torch.Tensor] = {}

        def edit(e: torch.Tensor, _leaf: dict = leaf) -> torch.Tensor:
            _leaf["e"] = e.detach().requires_grad_(True)
            return _leaf["e"]

        with torch.enable_grad(), edited_embedding(model.model, model.adapter.embed, edit):
            normed = _forward_last(model, ids, mask, padding_side, grad=True)
            value = (normed * weight[idx]).sum(-1) + const[idx]
            (grad,) = torch.autograd.grad(value.sum(), leaf["e"])  # rows are independent: each gets its own
        e = leaf["e"].detach().float()
        contrib = (grad.float() * (e - neutral.float())).sum(-1)  # (B, width)
        for k, i in enumerate(idx):
            offset = ids.shape[1] - lengths[i] if padding_side == "left" else 0
            row = contrib[k].double().cpu().numpy()
            out[i] = np.asarray([row[np.asarray(p, dtype=np.int64) + offset].sum() for p in gene_positions[i]])
    return out


# knockouts of genes of prompts
def check_rebuilds(model: C2SModel, prompts: Sequence[TokenizedPrompt], organism: str | None = None) -> None:
    """Refuse prompts whose own genes do not rebuild their token ids (another template, organism or tokenizer)."""
    texts = [p.text for p in model.build_prompts([" ".join(p.genes) for p in prompts], organism)]
    rebuilt = model.tokenizer(texts)["input_ids"] if texts else []
    for i, (ids, p) in enumerate(zip(rebuilt, prompts, strict=True)):
        if list(ids) != list(p.input_ids):
            msg = (
                f"prompt {i}: its genes do not rebuild its token ids with this model's template and organism "
                f"({organism or model.prompt.organism!r}); pass the organism the prompt was built with"
            )
            raise ValueError(msg)


def deletion_inputs(
    model: C2SModel, prompt: TokenizedPrompt, genes: Sequence[int], organism: str | None = None, *, check: bool = True
) -> list[list[int]]:
    """Token ids of the prompt rebuilt without each of ``genes`` (indices into ``prompt.genes``).

    Raises
    ------
    ValueError
        With ``check``, when the prompt's own genes do not rebuild its token ids (:func:`check_rebuilds`).
    """
    if check:
        check_rebuilds(model, [prompt], organism)
    sentences = [" ".join(g for k, g in enumerate(prompt.genes) if k != j) for j in genes]
    texts = [p.text for p in model.build_prompts(sentences, organism)]
    return [list(ids) for ids in model.tokenizer(texts)["input_ids"]] if texts else []


#: Columns of :func:`knockout_genes`'s table.
KNOCKOUT_COLUMNS = ["prompt", "gene_index", "target_value", "deletion", "masking", "gradient_x_input"]


def knockout_genes(
    model: C2SModel,
    prompts: Sequence[TokenizedPrompt],
    targets: Sequence[LabelTarget],
    genes: Sequence[Sequence[int] | np.ndarray],
    *,
    organism: str | None = None,
    batch_size: int = 32,
    padding_side: Padding = "left",
    progress: bool = True,
) -> pd.DataFrame:
    """Delete and mask each chosen gene of each prompt in the real model; the change of the prompt's target.

    Parameters
    ----------
    model
        The C2S model.
    prompts
        Tokenized prompts (:func:`cellcircuits.models.tokenize_prompts`), built with ``organism``.
    targets
        Per prompt, its label target; the target's prefix is teacher-forced after every variant of the prompt.
    genes
        Per prompt, the indices (into ``prompt.genes``) of the genes knocked out, one at a time, in this order.
    organism
        Organism the prompts name (``None``: the model's), so deleted variants are rebuilt the same way.
    batch_size
        Prompts per forward pass: the original, deleted and masked variants of several prompts run together, a
        chunk of prompts (about ``8 * batch_size`` variants) at a time.
    padding_side
        Pad on the left or the right; both give the same values.
    progress
        Show a progress bar over the variants run.

    Returns
    -------
    One row per prompt and knocked-out gene (``KNOCKOUT_COLUMNS``): ``prompt`` (its index), ``gene_index``,
    ``target_value`` (the unedited prompt's), ``deletion`` and ``masking`` (``target_value`` minus the target with
    the gene deleted or masked) and ``gradient_x_input`` (the first-order estimate of ``masking``).

    Raises
    ------
    ValueError
        Before any forward pass: lists of other lengths than ``prompts``, a gene index outside its prompt or given
        twice, a prompt whose genes do not rebuild it, or a ``batch_size`` below 1.
    """
    from tqdm.auto import tqdm

    if len(targets) != len(prompts) or len(genes) != len(prompts):
        msg = f"{len(prompts)} prompts, {len(targets)} targets and {len(genes)} gene lists: one of each per prompt"
        raise ValueError(msg)
    if batch_size < 1:
        msg = f"batch_size must be positive, got {batch_size!r}"
        raise ValueError(msg)
    chosen = [np.asarray(g, dtype=np.int64).reshape(-1) for g in genes]
    for i, (p, g) in enumerate(zip(prompts, chosen, strict=True)):
        if len(g) and (g.min() < 0 or g.max() >= len(p.genes) or len(set(g.tolist())) != len(g)):
            msg = f"prompt {i}: gene indices must be distinct and in 0..{len(p.genes) - 1}, got {g.tolist()}"
            raise ValueError(msg)
    check_rebuilds(model, prompts, organism)
    neutral = neutral_embedding(model)
    n_runs = [1 + 2 * len(g) for g in chosen]
    chunks: list[list[int]] = [[]]
    for i, n in enumerate(n_runs):  # chunks of about 8 batches: the variants of all prompts are never held at once
        if chunks[-1] and sum(n_runs[j] for j in chunks[-1]) + n > 8 * batch_size:
            chunks.append([])
        chunks[-1].append(i)
    parts = []
    bar = tqdm(total=sum(n_runs) + len(prompts), desc="knockout", disable=not progress, unit="prompt")
    with bar:
        for chunk in chunks:
            parts += _knockout_chunk(
                model, [prompts[i] for i in chunk], [targets[i] for i in chunk], [chosen[i] for i in chunk],
                organism, neutral, batch_size, padding_side, bar.update,
            )  # fmt: skip
    for i, part in zip([i for c in chunks for i in c], parts, strict=True):
        part.insert(0, "prompt", np.full(len(part), i, dtype=np.int64))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=KNOCKOUT_COLUMNS)


def _knockout_chunk(
    model: C2SModel,
    prompts: list[TokenizedPrompt],
    targets: list[LabelTarget],
    chosen: list[np.ndarray],
    organism: str | None,
    neutral: torch.Tensor,
    batch_size: int,
    padding_side: Padding,
    update: Callable[[int], object],
) -> list[pd.DataFrame]:
    """The knockout table of each prompt of a chunk (without the ``prompt`` column)."""
    originals = [list(p.input_ids) + list(t.prefix) for p, t in zip(prompts, targets, strict=True)]
    # one list of runs: each original, its deletions, its maskings
    inputs: list[list[int]] = []
    masked: list[np.ndarray] = []
    run_targets: list[LabelTarget] = []
    none = np.zeros(0, dtype=np.int64)
    for p, t, g, o in zip(prompts, targets, chosen, originals, strict=True):
        deleted = [ids + list(t.prefix) for ids in deletion_inputs(model, p, g.tolist(), organism, check=False)]
        inputs += [o, *deleted, *([o] * len(g))]
        masked += [none] * (1 + len(g)) + [np.asarray(p.gene_positions[j], dtype=np.int64) for j in g]
        run_targets += [t] * (1 + 2 * len(g))
    values = target_values(
        model, inputs, run_targets, masked=masked, neutral=neutral, batch_size=batch_size,
        padding_side=padding_side, progress=update,
    )  # fmt: skip
    positions = [[p.gene_positions[j] for j in g] for p, g in zip(prompts, chosen, strict=True)]
    grads = gradient_x_input(
        model, originals, targets, positions, neutral=neutral, batch_size=batch_size, padding_side=padding_side
    )
    update(len(prompts))
    parts, start = [], 0
    for g, grad in zip(chosen, grads, strict=True):
        n = len(g)
        base = values[start]
        parts.append(
            pd.DataFrame(
                {
                    "gene_index": g,
                    "target_value": np.full(n, base),
                    "deletion": base - values[start + 1 : start + 1 + n],
                    "masking": base - values[start + 1 + n : start + 1 + 2 * n],
                    "gradient_x_input": grad,
                }
            )
        )
        start += 1 + 2 * n
    return parts
