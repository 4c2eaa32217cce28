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


def pool_rows(acts: torch.Tensor, pool: Pool) -> torch.Tensor:
    """Pool ``(n_tokens, n_features)`` activations over tokens (zeros when there are none)."""
    if acts.shape[0] == 0:
        return acts.new_zeros(acts.shape[1])
    if pool == "max":
        return acts.amax(0)
    if pool == "mean":
        return acts.mean(0)
    if pool == "sum":
        return acts.sum(0)
    msg = f"pool must be 'max', 'mean' or 'sum', got {pool!r}"
    raise ValueError(msg)


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
            for row, p in enumerate(batch):
                cell = start + row
                pos = np.concatenate(p.gene_positions) if p.gene_positions else np.zeros(0, dtype=np.int64)
                if len(pos):
                    pos_all = torch.as_tensor(pos, device=device, dtype=torch.long)
                    scale_sum += float(norm_scale(adapter, rec[norm_point][0][row, pos_all]).sum())
                    scale_n += len(pos)
                read = p.gene_positions
                if skip_tokens is not None:
                    read = [g[min(int(s), len(g) - 1) :] for g, s in zip(read, skip_tokens[cell], strict=True)]
                    pos = np.concatenate(read) if read else pos
                pos_t = torch.as_tensor(pos, device=device, dtype=torch.long)
                rows = gene_index[cell]
                keep = rows >= 0
                gene_cells[rows[keep]] += 1
                lengths = torch.as_tensor([len(g) for g in read], dtype=torch.long, device=device)
                owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
                keep_t = torch.as_tensor(keep, device=device)
                for layer in layers:
                    tc = transcoders[layer]
                    x = rec[adapter.mlp_in(layer)][0][row, pos_t].to(tc.W_enc.dtype)
                    acts = tc.encode(x) if len(pos) else x.new_zeros(0, n_feat[layer])
                    pooled[layer][cell] = pool_rows(acts, pool).float().cpu().numpy()
                    if keep.any():
                        # each gene's activation is the mean over the tokens that spell it
                        per_gene = acts.new_zeros(len(lengths), n_feat[layer]).index_add_(0, owner, acts)
                        per_gene /= lengths.clamp(min=1)[:, None]
                        # a gene occurs once per sentence, so its rows are distinct and += adds each once
                        gene_sum[layer][rows[keep]] += per_gene[keep_t].double().cpu().numpy()
            bar.update(len(batch))
    out = {layer: CellFeatures(pooled[layer], gene_sum[layer], gene_cells) for layer in layers}
    return out, scale_sum / max(scale_n, 1)


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
