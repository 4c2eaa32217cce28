"""How well transcoders stand in for the MLPs: reconstruction, sparsity, language-model loss and predictions."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..models._hooks import record
from ..models._scoring import pad, position_ids, score_continuations
from ..models._tokens import label_token_ids
from ..transcoders._splice import splice
from ._cells import cell_prompts
from ._predict import candidate_labels

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ..models._load import C2SModel
    from ..models._tokens import TokenizedPrompt
    from ..transcoders._transcoder_set import TranscoderSet

#: A feature active on more than this fraction of the evaluated tokens counts as dense.
DENSE_THRESHOLD = 0.5


class _Moments:
    """Streaming sums for the pooled FVU of one layer: squared error, and the spread of ``y`` (Chan's merge)."""

    def __init__(self) -> None:
        self.sq_err = 0.0
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2 = 0.0

    def add(self, y: torch.Tensor, y_hat: torch.Tensor) -> None:
        y, y_hat = y.double(), y_hat.double()
        self.sq_err += float((y - y_hat).pow(2).sum())
        n_b = y.shape[0]
        if n_b == 0:
            return
        mean_b = y.mean(0).cpu().numpy()
        m2_b = float((y - y.mean(0)).pow(2).sum())
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.m2 += m2_b + float(delta @ delta) * self.n * n_b / n
        self.mean = self.mean + delta * n_b / n
        self.n = n


class _FeatureStats:
    """Per-feature firing counts and the total of active features over the evaluated tokens."""

    def __init__(self, n_features: int) -> None:
        self.fired = np.zeros(n_features, dtype=np.int64)
        self.n_tokens = 0

    def add(self, features: torch.Tensor) -> None:
        active = features != 0
        self.fired += active.sum(0).cpu().numpy()
        self.n_tokens += features.shape[0]


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else float("nan")


def _cells(adata: AnnData, n_cells: int | None, random_state: int) -> np.ndarray:
    """Indices of the evaluated cells, ascending; a reproducible random subset when ``n_cells`` is set."""
    if n_cells is None:
        return np.arange(adata.n_obs)
    if isinstance(n_cells, bool) or int(n_cells) < 1:
        msg = f"n_cells must be a positive integer or None, got {n_cells!r}"
        raise ValueError(msg)
    if n_cells >= adata.n_obs:
        return np.arange(adata.n_obs)
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(adata.n_obs, size=int(n_cells), replace=False))


def _positions(prompt: TokenizedPrompt) -> tuple[np.ndarray, np.ndarray]:
    """Gene-token positions (the next-token targets) and those plus the answer position (where MLPs are read)."""
    genes = np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in prompt.gene_positions] or [[]]))
    genes = genes.astype(np.int64)
    read = np.union1d(genes, [prompt.answer_position]).astype(np.int64)
    # a first token has nothing before it to be predicted from
    return genes[genes > 0], read


def _token_ce(logits: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy of the tokens at ``(rows, cols)`` given the logits one position earlier."""
    if len(rows) == 0:
        return 0.0, 0
    logp = torch.log_softmax(logits[rows, cols - 1].double(), -1)
    return float(-logp.gather(-1, ids[rows, cols][:, None]).sum()), len(rows)


def evaluate_transcoders(
    adata: AnnData,
    model: C2SModel,
    transcoders: TranscoderSet,
    *,
    labels: Sequence[str] | None = None,
    label_key: str | None = None,
    sentence_key: str = "cell_sentence",
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    n_cells: int | None = None,
    batch_size: int = 16,
    random_state: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Measure how faithfully each transcoder replaces its MLP, alone and all together.

    Each cell's prompt (as in :func:`cellcircuits.tl.predict_cell_types`) runs through the original model, which
    gives the MLP inputs and outputs of every covered layer, and again with MLPs spliced out
    (:func:`cellcircuits.transcoders.splice`): one layer at a time and all covered layers at once, each replaced by
    its transcoder and, for reference, by zeros. Reconstruction and sparsity are read at the gene tokens and the
    answer position (the last prompt token); the language-model loss is the next-token cross-entropy of the gene
    tokens of the cell sentence, each predicted from the text before it. All metrics pool the tokens of all cells.

    Parameters
    ----------
    adata
        Annotated data matrix; it is only read.
    model
        A loaded model (:func:`cellcircuits.models.load`).
    transcoders
        Transcoders made for ``model``.
    labels
        Candidate labels for cell-type prediction; default the labels recorded with the model.
    label_key
        Column of ``.obs`` with each cell's true label; when given, prediction accuracies are reported (cells with a
        missing label are left out of them).
    sentence_key
        Column of ``.obs`` with cell sentences (:func:`cellcircuits.pp.cell_sentences`). When absent, sentences are
        built from ``layer``/``use_raw`` without being stored.
    layer, use_raw, gene_symbols
        How to build sentences when ``sentence_key`` is absent, as in :func:`cellcircuits.pp.cell_sentences`.
    n_cells
        Evaluate this many randomly chosen cells (drawn with ``random_state``); default all.
    batch_size
        Cells per forward pass.
    random_state
        Seed of the cell subsample and of the tie-break when sentences are built.
    progress
        Show a progress bar.

    Returns
    -------
    One row per covered layer and a last row ``"all"`` (every covered layer spliced at once), with the columns:

    ``layer`` : :class:`int` or ``"all"``
        The spliced layer(s).
    ``fvu`` : :class:`float`
        Fraction of the variance of the MLP output left unexplained by the transcoder,
        ``sum ||y - y_hat||² / sum ||y - mean(y)||²`` over the evaluated tokens, with ``y`` and the transcoder's
        input read from the original model; for ``"all"`` numerators and denominators are summed over layers. NaN
        when ``y`` does not vary.
    ``l0`` : :class:`float`
        Mean number of active features per token (for ``"all"``, the mean over layers).
    ``dead_fraction``, ``dense_fraction`` : :class:`float`
        Fraction of features never active on the evaluated tokens, and of those active on more than half of them
        (for ``"all"``, of all features of the set).
    ``ce_loss_original``, ``ce_loss_spliced``, ``ce_loss_zero_ablated`` : :class:`float`
        Mean next-token cross-entropy (nats) of the gene tokens with the original MLPs, with the layer's MLP (or all
        covered ones) replaced by its transcoder, and with it zero-ablated.
    ``loss_recovered`` : :class:`float`
        ``(ce_zero_ablated - ce_spliced) / (ce_zero_ablated - ce_original)``: 1 when splicing costs nothing, 0 when
        it is as bad as removing the MLP; NaN when removing the MLP does not change the loss.
    ``accuracy_original``, ``accuracy_spliced`` : :class:`float`
        Only with ``label_key``: fraction of cells whose predicted label is their true label.
    ``agreement`` : :class:`float`
        Fraction of cells for which the spliced model predicts the same label as the original.

    ``DataFrame.attrs`` holds the model name, the candidate labels, the evaluated obs names and token counts.

    Raises
    ------
    ValueError
        Without candidate labels, with a set made for another model width or depth, or when ``adata`` has no cells.
    KeyError
        When ``label_key`` is not a column of ``.obs``.
    """
    labels = candidate_labels(adata, model, labels, batch_size)
    if label_key is not None and label_key not in adata.obs.columns:
        msg = f"label_key {label_key!r} is not a column of .obs; columns are {list(adata.obs.columns)}"
        raise KeyError(msg)
    adapter = model.adapter
    transcoders.check_compatible(n_layers=adapter.n_layers, d_model=adapter.d_model)
    covered = transcoders.layers

    cells = _cells(adata, n_cells, random_state)
    tok = model.tokenizer
    prompts = cell_prompts(
        adata,
        model,
        sentence_key=sentence_key,
        layer=layer,
        use_raw=use_raw,
        gene_symbols=gene_symbols,
        random_state=random_state,
        cells=cells,
    )
    positions = [_positions(p) for p in prompts]
    label_ids = label_token_ids(tok, model.prompt, labels)

    # variants of the model: (kind, layers); "spliced"/"zero" replace the MLPs of those layers
    groups: list[tuple[int | str, list[int]]] = [(layer_, [layer_]) for layer_ in covered] + [("all", covered)]
    variants = [("original", None)] + [(kind, g) for g in groups for kind in ("spliced", "zero")]

    def context(kind: str, group: tuple[int | str, list[int]] | None) -> object:
        if kind == "original":
            return nullcontext()
        mode = "transcoder" if kind == "spliced" else "zero"
        return splice(model, transcoders, mode=mode, layers=group[1])

    n = len(cells)
    moments = {layer_: _Moments() for layer_ in covered}
    feats = {layer_: _FeatureStats(tc.cfg.n_features) for layer_, tc in transcoders.items()}
    ce = {v: [0.0, 0] for v in range(len(variants))}
    points = [p for layer_ in covered for p in (adapter.mlp_in(layer_), adapter.mlp_out(layer_))]
    device = model.device
    predicted = [("original", None)] + [("spliced", g) for g in groups]
    total = n * (len(variants) + len(predicted))
    with tqdm(total=total, desc="evaluating transcoders", disable=not progress, unit="cell") as bar, torch.no_grad():
        for start in range(0, n, batch_size):
            batch = range(start, min(start + batch_size, n))
            ids, mask = pad([prompts[i].input_ids for i in batch], tok.pad_token_id, "right")
            ids, mask = ids.to(device), mask.to(device)
            pos = position_ids(mask)
            # flat (row, position) indices; right padding keeps each prompt's positions as tokenized
            rows_t = torch.as_tensor(np.concatenate([np.full(len(positions[i][0]), j) for j, i in enumerate(batch)]))
            cols_t = torch.as_tensor(np.concatenate([positions[i][0] for i in batch]))
            rows_r = torch.as_tensor(np.concatenate([np.full(len(positions[i][1]), j) for j, i in enumerate(batch)]))
            cols_r = torch.as_tensor(np.concatenate([positions[i][1] for i in batch]))
            rows_t, cols_t, rows_r, cols_r = (t.long().to(device) for t in (rows_t, cols_t, rows_r, cols_r))
            for v, (kind, group) in enumerate(variants):
                if kind == "original":
                    with record(model.model, points) as rec:
                        logits = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                    for layer_, tc in transcoders.items():
                        x = rec[adapter.mlp_in(layer_)][0][rows_r, cols_r]
                        y = rec[adapter.mlp_out(layer_)][0][rows_r, cols_r]
                        out = tc(x.to(tc.W_enc.device))
                        moments[layer_].add(y, out.output.to(y.device))
                        feats[layer_].add(out.features)
                else:
                    with context(kind, group):
                        logits = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                s, c = _token_ce(logits, ids, rows_t, cols_t)
                ce[v][0] += s
                ce[v][1] += c
                bar.update(len(batch))

        preds = {}
        prompt_ids = [p.input_ids for p in prompts]
        for kind, group in predicted:
            with context(kind, group):
                logprob = score_continuations(
                    model.model,
                    prompt_ids,
                    label_ids,
                    pad_token_id=tok.pad_token_id,
                    batch_size=batch_size,
                    progress=False,
                )
            preds[None if group is None else group[0]] = np.asarray(labels, dtype=object)[logprob.argmax(1)]
            bar.update(n)

    def mean_ce(kind: str, group: tuple[int | str, list[int]] | None) -> float:
        s, c = ce[variants.index((kind, group))]
        return _ratio(s, c)

    if label_key is not None:
        truth = adata.obs[label_key].iloc[cells]
        known = truth.notna().to_numpy()
        truth = truth.astype(str).to_numpy()

        def accuracy(pred: np.ndarray) -> float:
            return float(np.mean(pred[known] == truth[known])) if known.any() else float("nan")

    rows = []
    ce_original = mean_ce("original", None)
    for group in groups:
        name, layers_ = group
        sq_err = sum(moments[layer_].sq_err for layer_ in layers_)
        spread = sum(moments[layer_].m2 for layer_ in layers_)
        fired = np.concatenate([feats[layer_].fired for layer_ in layers_])
        n_tok = feats[layers_[0]].n_tokens
        ce_spliced, ce_zero = mean_ce("spliced", group), mean_ce("zero", group)
        row = {
            "layer": name,
            "fvu": _ratio(sq_err, spread),
            "l0": _ratio(float(fired.sum()), n_tok * len(layers_)),
            "dead_fraction": float(np.mean(fired == 0)),
            "dense_fraction": float(np.mean(fired > DENSE_THRESHOLD * n_tok)),
            "ce_loss_original": ce_original,
            "ce_loss_spliced": ce_spliced,
            "ce_loss_zero_ablated": ce_zero,
            "loss_recovered": _ratio(ce_zero - ce_spliced, ce_zero - ce_original),
        }
        if label_key is not None:
            row["accuracy_original"] = accuracy(preds[None])
            row["accuracy_spliced"] = accuracy(preds[name])
        row["agreement"] = float(np.mean(preds[name] == preds[None]))
        rows.append(row)
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype(object)
    df.attrs = {
        "model": model.name,
        "labels": labels,
        "cells": adata.obs_names[cells].tolist(),
        "n_tokens": int(feats[covered[0]].n_tokens),
        "n_sentence_tokens": int(ce[0][1]),
    }
    return df
