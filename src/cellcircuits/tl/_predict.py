"""Cell-type prediction by the model's log-likelihood of each label."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy.special import softmax

from .._keys import PREDICTION, SentenceSettings, prediction_obsm
from ..models._distributed import gather_rows, is_distributed, my_shard
from ..models._hooks import one_at_a_time
from ..models._scoring import score_continuations
from ..models._tokens import label_token_ids
from ..pp._sentences import check_writable
from ._cells import check_cells, prompt_token_ids

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ..models._load import C2SModel


#: Default token budget of a prediction batch (prompts, padding and appended label tokens).
MAX_BATCH_TOKENS = 16384


def candidate_labels(
    adata: AnnData, model: C2SModel, labels: Sequence[str] | None, batch_size: int | None
) -> list[str]:
    """Candidate labels (default the model's), after checking them, ``batch_size`` and that there are cells."""
    labels = list(model.labels or []) if labels is None else [str(label) for label in labels]
    if not labels:
        msg = "No candidate labels: the model records none, so pass labels=[...]."
        raise ValueError(msg)
    if len(set(labels)) != len(labels):
        msg = f"labels contain duplicates: {labels}"
        raise ValueError(msg)
    check_cells(adata, 1 if batch_size is None else batch_size)
    return labels


@one_at_a_time
def predict_cell_types(
    adata: AnnData,
    model: C2SModel,
    labels: Sequence[str] | None = None,
    *,
    sentence_key: str = "cell_sentence",
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    random_state: int = 0,
    organism: str | None = None,
    batch_size: int | None = None,
    max_batch_tokens: int | None = MAX_BATCH_TOKENS,
    padding_side: Literal["left", "right"] = "left",
    key_added: str = PREDICTION,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Predict cell types with a C2S model by scoring every candidate label.

    Each cell's prompt (the model's template, its cell sentence cut to the model's ``n_genes``) is followed by each
    candidate label; the label's log-likelihood (summed over its tokens, plus the end-of-sequence token when the
    model was trained with it) is its score, and a softmax over the candidates gives per-label probabilities.
    Each cell's prompt and all candidate labels run in one forward pass (the labels' tokens attend to the prompt
    and to their own tokens only), in batches of prompts of similar length up to ``max_batch_tokens`` tokens.

    Under ``torch.distributed`` (``torchrun --nproc_per_node N``, or a process group the caller initialised) every
    rank scores a contiguous share of the cells and rank 0 gathers the log-likelihoods and stores the results;
    every rank must call it with the same ``adata`` and arguments. On the other ranks ``adata`` is left unchanged
    and the call returns ``None`` (also with ``copy=True``).

    A softmax over a closed list has no "other" class: every cell gets one of the candidates, however poorly it
    fits, and the probabilities say only how the candidates compare. Cell2Sentence itself predicts by generating
    free text; :func:`cellcircuits.tl.generate_cell_types` does so, and :func:`cellcircuits.tl.generated_labels`
    turns its answers into a candidate list. The answers are scored in the format of the model's prompt settings
    (for C2S, ``" " + label + "."`` and the end-of-answer token, which tells a label from a longer label it
    begins).

    Parameters
    ----------
    adata
        Annotated data matrix. Duplicate ``obs_names`` are accepted (anndata warns about them): every result is
        stored by the cell's position, not its name.
    model
        A loaded model (:func:`cellcircuits.models.load`).
    labels
        Candidate labels; default the labels recorded with the model.
    sentence_key
        Column of ``.obs`` with cell sentences (:func:`cellcircuits.pp.cell_sentences`). When absent, sentences are
        built from ``layer``/``use_raw`` without being stored.
    layer, use_raw, gene_symbols, random_state
        How to build sentences when ``sentence_key`` is absent, as in :func:`cellcircuits.pp.cell_sentences`.
    organism
        Organism named in the prompts (C2S models trained on human and mouse cells read it); default the model's
        ``prompt.organism``.
    batch_size
        Most cells per forward pass (``None``: as many as ``max_batch_tokens`` allows).
    max_batch_tokens
        Most tokens per forward pass, padding and label tokens included (``None``: batches of ``batch_size``
        cells). Lower it when memory runs out; raise it on a large GPU.
    padding_side
        Pad prompts on the left or the right (scores are the same either way).
    key_added
        Key under which results are stored.
    progress
        Show a progress bar.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True`` (on rank 0; other ranks of a process group return
    ``None``). Sets the following fields:

    ``.obs[key_added]`` : :class:`pandas.Categorical`
        The most likely label of each cell.
    ``.obsm[f"{key_added}_proba"]`` : :class:`numpy.ndarray` (n_obs x n_labels)
        Probability of each label (softmax of the log-likelihoods over the candidates), columns in the order of
        ``.uns[key_added]['params']['labels']``; :func:`cellcircuits.get.cell_type_probabilities` returns it as a
        labelled DataFrame.
    ``.obsm[f"{key_added}_logprob"]`` : :class:`numpy.ndarray` (n_obs x n_labels)
        Log-likelihood of each label's continuation.
    ``.uns[key_added]['params']`` : :class:`dict`
        Model name, labels and settings.

    Raises
    ------
    ValueError
        Before any work: no candidate labels or duplicates, ``batch_size`` or ``max_batch_tokens`` below 1, no
        cells, an AnnData the results cannot be written to, more ranks than cells.
    """
    settings = SentenceSettings(sentence_key, layer, use_raw, gene_symbols, random_state, organism)
    labels = candidate_labels(adata, model, labels, batch_size)
    check_writable(adata, copy, "predict_cell_types")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        msg = f"max_batch_tokens must be positive, got {max_batch_tokens!r}"
        raise ValueError(msg)
    if batch_size is None and max_batch_tokens is None:
        msg = "pass batch_size or max_batch_tokens (or both)"
        raise ValueError(msg)
    n_obs = adata.n_obs
    share = my_shard(n_obs)  # more ranks than cells fail here, before any work
    cells = np.arange(share.start, share.stop) if is_distributed() else None
    prompt_ids = prompt_token_ids(adata, model, settings, cells)
    tok = model.tokenizer
    part = score_continuations(
        model.model,
        prompt_ids,
        label_token_ids(tok, model.prompt, labels),
        pad_token_id=tok.pad_token_id,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        padding_side=padding_side,
        progress=progress,
        desc="predicting cell types",
    )
    logprob = gather_rows(part, n_obs)
    if logprob is None:  # not rank 0: rank 0 stores the results
        return None
    proba = softmax(logprob, axis=1)
    adata = adata.copy() if copy else adata
    adata.obs[key_added] = pd.Categorical(np.asarray(labels, dtype=object)[proba.argmax(1)], categories=labels)
    # plain arrays: labels such as "CD4+/CD25 T Reg" would become h5 dataset names as DataFrame columns
    adata.obsm[prediction_obsm(key_added, "proba")] = proba
    adata.obsm[prediction_obsm(key_added, "logprob")] = logprob
    adata.uns[key_added] = {
        "params": {
            "model": model.name,
            "labels": labels,
            "n_genes": int(model.prompt.n_genes),
            "sentence_key": sentence_key if sentence_key in adata.obs.columns else "",
            "organism": organism if organism is not None else model.prompt.organism,
            "answer_prefix": model.prompt.answer_prefix,
            "answer_suffix": model.prompt.answer_suffix,
            "append_eos": bool(model.prompt.append_eos),
            "eos_token": model.prompt.eos_token or "",
            "answer_tokenization": model.prompt.answer_tokenization,
        }
    }
    return adata if copy else None
