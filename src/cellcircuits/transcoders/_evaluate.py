"""How well transcoders stand in for the MLPs: reconstruction, sparsity, language-model loss and predictions.

Works on tokenized prompts; :func:`cellcircuits.tl.evaluate_transcoders` is the AnnData adapter.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..models._hooks import one_at_a_time, record
from ..models._scoring import ContinuationBlock, maskable_attention, pad, position_ids, score_batch
from ..models._tokens import label_token_ids
from ._splice import splice

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..models._load import C2SModel
    from ..models._tokens import TokenizedPrompt
    from ._transcoder_set import TranscoderSet

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


def _positions(prompt: TokenizedPrompt) -> tuple[np.ndarray, np.ndarray]:
    """Gene-token positions (the next-token targets) and those plus the answer position (where MLPs are read)."""
    parts = [np.asarray(p, dtype=np.int64) for p in prompt.gene_positions]
    genes = np.unique(np.concatenate(parts or [np.zeros(0, dtype=np.int64)]))
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


@one_at_a_time
def evaluate(
    model: C2SModel,
    transcoders: TranscoderSet,
    prompts: Sequence[TokenizedPrompt],
    labels: Sequence[str],
    *,
    truth: Sequence[str | None] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Measure how faithfully each transcoder replaces its MLP, alone and all together, on tokenized prompts.

    See :func:`cellcircuits.tl.evaluate_transcoders` for the variants and the columns of the result.

    Parameters
    ----------
    model
        A loaded model (:func:`cellcircuits.models.load`).
    transcoders
        Transcoders made for ``model``.
    prompts
        Tokenized prompts (:func:`cellcircuits.models.tokenize_prompts`).
    labels
        Candidate labels scored for prediction.
    truth
        Per prompt, its true label (``None`` when unknown); when given, prediction accuracies are reported.
    batch_size
        Prompts per forward pass.
    progress
        Show a progress bar.

    Returns
    -------
    One row per covered layer and a last row ``"all"``; ``DataFrame.attrs`` holds the model name, the labels and
    token counts.
    """
    labels = list(labels)
    adapter = model.adapter
    transcoders.check_model(model)
    covered = transcoders.layers
    tok = model.tokenizer
    n = len(prompts)
    positions = [_positions(p) for p in prompts]
    label_ids = label_token_ids(tok, model.prompt, labels)

    # variants of the model: (kind, layers); "spliced"/"zero" replace the MLPs of those layers
    groups: list[tuple[int | str, list[int]]] = [(layer_, [layer_]) for layer_ in covered] + [("all", covered)]
    variants: list[tuple[str, tuple[int | str, list[int]] | None]] = [("original", None)]
    variants += [(kind, g) for g in groups for kind in ("spliced", "zero")]

    def context(kind: str, group: tuple[int | str, list[int]] | None) -> AbstractContextManager[object]:
        if kind == "original":
            return nullcontext()
        assert group is not None  # every variant but the original names its layers
        mode: Literal["transcoder", "zero"] = "transcoder" if kind == "spliced" else "zero"
        return splice(model, transcoders, mode=mode, layers=group[1])

    moments = {layer_: _Moments() for layer_ in covered}
    feats = {layer_: _FeatureStats(tc.cfg.n_features) for layer_, tc in transcoders.items()}
    ce = {v: [0.0, 0] for v in range(len(variants))}
    points = [p for layer_ in covered for p in (adapter.mlp_in(layer_), adapter.mlp_out(layer_))]
    device = model.device
    # the original and the spliced variants score the labels in the same pass as their cross-entropy
    block = ContinuationBlock.build(label_ids)
    scores = {v: np.zeros((n, len(labels))) for v, (kind, _) in enumerate(variants) if kind != "zero"}
    prompt_ids = [list(p.input_ids) for p in prompts]
    bar = tqdm(total=n * len(variants), desc="evaluating transcoders", disable=not progress, unit="cell")
    with bar, torch.no_grad(), maskable_attention(model.model):
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
                with context(kind, group), record(model.model, points if kind == "original" else []) as rec:
                    if kind == "zero":
                        logits = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                    else:
                        logp, full = score_batch(
                            model.model, [prompt_ids[i] for i in batch], block, tok.pad_token_id, "right", device,
                            prompt_logits=True,
                        )  # fmt: skip
                        scores[v][start : start + len(batch)] = logp.double().cpu().numpy()
                        assert full is not None  # asked for
                        logits = full
                if kind == "original":
                    for layer_, tc in transcoders.items():
                        x = rec[adapter.mlp_in(layer_)][0][rows_r, cols_r]
                        y = rec[adapter.mlp_out(layer_)][0][rows_r, cols_r]
                        out = tc(x.to(tc.W_enc.device))
                        moments[layer_].add(y, out.output.to(y.device))
                        feats[layer_].add(out.features)
                s, c = _token_ce(logits, ids, rows_t, cols_t)
                ce[v][0] += s
                ce[v][1] += c
                bar.update(len(batch))
    preds = {
        None if group is None else group[0]: np.asarray(labels, dtype=object)[scores[v].argmax(1)]
        for v, (kind, group) in enumerate(variants)
        if kind != "zero"
    }

    def mean_ce(kind: str, group: tuple[int | str, list[int]] | None) -> float:
        s, c = ce[variants.index((kind, group))]
        return _ratio(s, c)

    if truth is not None:
        known = np.asarray([t is not None for t in truth])
        true = np.asarray([str(t) for t in truth], dtype=object)

        def accuracy(pred: np.ndarray) -> float:
            return float(np.mean(pred[known] == true[known])) if known.any() else float("nan")

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
        if truth is not None:
            row["accuracy_original"] = accuracy(preds[None])
            row["accuracy_spliced"] = accuracy(preds[name])
        row["agreement"] = float(np.mean(preds[name] == preds[None]))
        rows.append(row)
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype(object)
    df.attrs = {
        "model": model.name,
        "labels": labels,
        "n_tokens": int(feats[covered[0]].n_tokens),
        "n_sentence_tokens": int(ce[0][1]),
    }
    return df
