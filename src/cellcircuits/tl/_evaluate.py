"""How well transcoders stand in for the MLPs: reconstruction, sparsity, language-model loss and predictions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._keys import SentenceSettings
from ..models._hooks import one_at_a_time
from ..transcoders._evaluate import evaluate
from ._cells import cell_prompts
from ._predict import candidate_labels

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pandas as pd
    from anndata import AnnData

    from ..models._load import C2SModel
    from ..transcoders._transcoder_set import TranscoderSet


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


@one_at_a_time
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
    organism: str | None = None,
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
    organism
        Organism named in the prompts (C2S models trained on human and mouse cells read it); default the model's
        ``prompt.organism``.
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
    settings = SentenceSettings(sentence_key, layer, use_raw, gene_symbols, random_state, organism)
    transcoders.check_model(model)
    cells = _cells(adata, n_cells, random_state)
    prompts = cell_prompts(adata, model, settings, cells)
    truth = None
    if label_key is not None:
        known = adata.obs[label_key].iloc[cells]
        truth = [str(t) if ok else None for t, ok in zip(known, known.notna(), strict=True)]
    df = evaluate(model, transcoders, prompts, labels, truth=truth, batch_size=batch_size, progress=progress)
    df.attrs = {
        "model": df.attrs["model"],
        "labels": df.attrs["labels"],
        "cells": adata.obs_names[cells].tolist(),
        "n_tokens": df.attrs["n_tokens"],
        "n_sentence_tokens": df.attrs["n_sentence_tokens"],
    }
    return df
