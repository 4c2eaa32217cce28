"""Transcoder features of cells and genes: pooled per cell, averaged per gene, and their direct effect on logits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models._adapter import HookPoint
from ..models._hooks import one_at_a_time, record
from ..models._scoring import pad

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..models._adapter import ModelAdapter
    from ..models._load import C2SModel
    from ..models._tokens import TokenizedPrompt
    from ._transcoder_set import TranscoderSet

Pool = Literal["max", "mean", "sum"]


class CellFeatures(NamedTuple):
    """Feature activations of one layer, per cell and per gene."""

    pooled: np.ndarray
    """``(n_cells, n_features)`` activations pooled over each cell's read gene tokens."""
    gene_sum: np.ndarray
    """``(n_genes, n_features)`` per gene, the sum over cells of its mean activation on the gene's read tokens."""
    gene_cells: np.ndarray
    """``(n_genes,)`` number of cells whose prompt contains the gene."""


@one_at_a_time
@torch.no_grad()
def cell_and_gene_features(
    model: C2SModel,
    transcoders: TranscoderSet,
    prompts: Sequence[TokenizedPrompt],
    gene_index: Sequence[np.ndarray],
    n_genes: int,
    *,
    layers: Sequence[int],
    pool: Pool = "max",
    skip_tokens: Sequence[np.ndarray] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[int, CellFeatures], float]:
    """Run the model with hooks and encode each cell's gene tokens with the transcoders.

    Parameters
    ----------
    model
        The C2S model.
    transcoders
        Transcoders covering ``layers``.
    prompts
        Tokenized prompts, one per cell.
    gene_index
        Per prompt, the row (in ``0..n_genes-1``) of each of its genes, or -1 for a gene outside the table.
    n_genes
        Rows of the per-gene tables.
    layers
        Layers to encode.
    pool
        How to pool a cell's gene-token activations.
    skip_tokens
        Per prompt, how many leading tokens of each gene are not read (see
        :func:`cellcircuits.models.identifying_offsets`); a gene keeps at least its last token. Default: every token
        of every gene is read.
    batch_size
        Prompts per forward pass.
    progress
        Show a progress bar.

    Returns
    -------
    Per layer the pooled and per-gene activations, and the mean scale (std or RMS) of the final norm's input over
    the gene tokens, which freezes the final norm for direct logit effects.
    """
    adapter = model.adapter
    n_feat = {layer: transcoders[layer].cfg.n_features for layer in layers}
    pooled = {layer: np.zeros((len(prompts), n_feat[layer]), dtype=np.float32) for layer in layers}
    gene_sum = {layer: np.zeros((n_genes, n_feat[layer]), dtype=np.float64) for layer in layers}
    gene_cells = np.zeros(n_genes, dtype=np.int64)
    points = [adapter.mlp_in(layer) for layer in layers]
    norm_point = HookPoint(adapter.spec.final_norm, "input")
    scale_sum, scale_n = 0.0, 0
    device = model.device
    with tqdm(total=len(prompts), desc="transcoding cells", disable=not progress, unit="cell") as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            ids, mask = pad([p.input_ids for p in batch], model.tokenizer.pad_token_id, "right")
            with record(model.model, [*points, norm_point]) as rec:
                # the transformer without its unembedding: batch x tokens x vocabulary logits are not needed
                model.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))
            spans = _batch_spans(batch, prompts_from=start, gene_index=gene_index, skip_tokens=skip_tokens)
            if len(spans.all_rows):
                at = (spans.all_rows.to(device), spans.all_positions.to(device))
                scale_sum += float(norm_scale(adapter, rec[norm_point][0][at]).sum())
                scale_n += len(spans.all_rows)
            np.add.at(gene_cells, spans.gene_rows, 1)
            read = (spans.rows.to(device), spans.positions.to(device))
            owner = spans.owner.to(device)
            kept = torch.as_tensor(spans.kept, device=device)
            lengths = spans.lengths.to(device).clamp(min=1)[:, None]
            for layer in layers:
                tc = transcoders[layer]
                x = rec[adapter.mlp_in(layer)][0][read].to(tc.W_enc.dtype)
                acts = tc.encode(x).float() if len(x) else x.new_zeros(0, n_feat[layer], dtype=torch.float32)
                pooled[layer][start : start + len(batch)] = pool_cells(acts, read[0], len(batch), pool).cpu().numpy()
                if len(spans.gene_rows):
                    # each gene's activation is the mean over the tokens that spell it; a gene occurs once per
                    # sentence, but may occur in several sentences of the batch: sum those per table row first
                    per_gene = acts.new_zeros(len(lengths), n_feat[layer]).index_add_(0, owner, acts) / lengths
                    table_rows, slot = np.unique(spans.gene_rows, return_inverse=True)
                    summed = torch.zeros(len(table_rows), n_feat[layer], dtype=torch.float64, device=device)
                    summed.index_add_(0, torch.as_tensor(slot, device=device), per_gene[kept].double())
                    gene_sum[layer][table_rows] += summed.cpu().numpy()
            bar.update(len(batch))
    out = {layer: CellFeatures(pooled[layer], gene_sum[layer], gene_cells) for layer in layers}
    return out, scale_sum / max(scale_n, 1)


class _Spans(NamedTuple):
    """Where a batch's genes are read: flat token coordinates, and which cell and gene each token belongs to."""

    rows: torch.Tensor  # batch row (cell) of each read token
    positions: torch.Tensor  # its position
    owner: torch.Tensor  # its gene, numbered across the batch
    lengths: torch.Tensor  # tokens read per gene of the batch
    kept: np.ndarray  # per gene of the batch: in the gene table
    gene_rows: np.ndarray  # the table rows of the kept genes
    all_rows: torch.Tensor  # every gene token (none skipped): batch row
    all_positions: torch.Tensor  # ... and position


def _batch_spans(
    batch: Sequence[TokenizedPrompt],
    *,
    prompts_from: int,
    gene_index: Sequence[np.ndarray],
    skip_tokens: Sequence[np.ndarray] | None,
) -> _Spans:
    """The read tokens of a batch of prompts (the first is prompt ``prompts_from``), for one gather per layer."""
    rows: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    all_rows: list[np.ndarray] = []
    all_positions: list[np.ndarray] = []
    gene_rows: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    lengths: list[int] = []
    for row, p in enumerate(batch):
        cell = prompts_from + row
        read = list(p.gene_positions)
        if skip_tokens is not None:  # a gene keeps at least its last token
            read = [g[min(int(s), len(g) - 1) :] for g, s in zip(read, skip_tokens[cell], strict=True)]
        if read:
            every, read_flat = np.concatenate(p.gene_positions), np.concatenate(read)
            all_rows.append(np.full(len(every), row))
            all_positions.append(every)
            rows.append(np.full(len(read_flat), row))
            positions.append(read_flat)
            lengths.extend(len(g) for g in read)
        index = np.asarray(gene_index[cell])
        kept.append(index >= 0)
        gene_rows.append(index[index >= 0])

    def flat(parts: list) -> torch.Tensor:
        return torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0), dtype=torch.long)

    length_t = torch.as_tensor(lengths, dtype=torch.long)
    return _Spans(
        rows=flat(rows),
        positions=flat(positions),
        owner=torch.repeat_interleave(torch.arange(len(lengths)), length_t),
        lengths=length_t,
        kept=np.concatenate(kept) if kept else np.zeros(0, dtype=bool),
        gene_rows=np.concatenate(gene_rows).astype(np.int64) if gene_rows else np.zeros(0, dtype=np.int64),
        all_rows=flat(all_rows),
        all_positions=flat(all_positions),
    )


def pool_cells(acts: torch.Tensor, cell: torch.Tensor, n_cells: int, pool: Pool) -> torch.Tensor:
    """Pool ``(n_tokens, n_features)`` activations into ``(n_cells, n_features)`` by each token's ``cell``.

    A cell without tokens pools to zeros.
    """
    out = acts.new_zeros(n_cells, acts.shape[1])
    if pool == "max":
        index = cell[:, None].expand(-1, acts.shape[1])
        return out.scatter_reduce_(0, index, acts, "amax", include_self=False)
    if pool not in ("mean", "sum"):
        msg = f"pool must be 'max', 'mean' or 'sum', got {pool!r}"
        raise ValueError(msg)
    out.index_add_(0, cell, acts)
    if pool == "mean":
        out /= torch.bincount(cell, minlength=n_cells).clamp(min=1)[:, None].to(out.dtype)
    return out


def norm_scale(adapter: ModelAdapter, x: torch.Tensor) -> torch.Tensor:
    """Per row, the scale the final norm divides by: the std (LayerNorm) or the root mean square (RMSNorm)."""
    norm = adapter.final_norm
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5)))
    x = x.float()
    if isinstance(norm, torch.nn.LayerNorm):
        return (x.var(-1, unbiased=False) + eps).sqrt()
    return (x.pow(2).mean(-1) + eps).sqrt()


def gene_logit_effects(
    adapter: ModelAdapter, W_dec: torch.Tensor, gene_tokens: Sequence[Sequence[int]], scale: float
) -> np.ndarray:
    """Per gene, the mean direct logit effect of each feature on the tokens that tell the gene apart.

    A mean rather than a sum, so genes with long spellings (``RP11-489E7.4``) do not rank high for their length.

    Parameters
    ----------
    adapter
        The model's adapter.
    W_dec
        ``(n_features, d_model)`` decoder vectors.
    gene_tokens
        Per gene, its distinguishing tokens (:func:`cellcircuits.models.distinguishing_tokens`).
    scale
        The frozen scale of the final norm's input.

    Returns
    -------
    ``(n_genes, n_features)`` effects.
    """
    vocab = sorted({t for ids in gene_tokens for t in ids})
    column = {t: i for i, t in enumerate(vocab)}
    per_token = direct_logit_effects(adapter, W_dec, vocab, scale)  # (n_tokens, n_features)
    return np.stack([per_token[[column[t] for t in ids]].mean(0) for ids in gene_tokens])


@torch.no_grad()
def direct_logit_effects(adapter: ModelAdapter, W_dec: torch.Tensor, tokens: Sequence[int], scale: float) -> np.ndarray:
    """Direct effect of each feature's decoder vector on the logits of ``tokens``, through a frozen final norm.

    With the final norm's scale frozen at ``scale``, adding a decoder vector ``v`` to the residual stream moves the
    logits by ``W_U (g * c(v) / scale)``, where ``g`` is the norm's gain and ``c`` centres ``v`` for a LayerNorm
    (an RMSNorm does not centre).

    Parameters
    ----------
    adapter
        The model's adapter (final norm and unembedding).
    W_dec
        ``(n_features, d_model)`` decoder vectors.
    tokens
        Token ids whose logits are read.
    scale
        The frozen scale of the final norm's input.

    Returns
    -------
    ``(len(tokens), n_features)`` logit changes.
    """
    norm = adapter.final_norm
    v = W_dec.float()
    if isinstance(norm, torch.nn.LayerNorm):
        v = v - v.mean(-1, keepdim=True)
    weight = norm.weight  # a norm without a learned gain holds None
    gain = weight.float() if isinstance(weight, torch.Tensor) else torch.ones(v.shape[-1])
    if adapter.spec.name == "gemma2":
        gain = 1.0 + gain  # Gemma-2's RMSNorm scales by (1 + weight)
    W_U = adapter.unembed.weight.float()[list(tokens)]  # (n_tokens, d_model)
    return ((v * gain / scale) @ W_U.T.to(v.device)).T.cpu().numpy()
