"""How well a feature's label predicts where the feature fires: a detection score on held-out cells, without an LLM."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse
from tqdm.auto import tqdm

from .._keys import INTERPRET, SentenceSettings, interpret_result
from ..models._hooks import one_at_a_time
from ..models._spelling import identifying_offsets
from ..pp._sentences import check_writable, gene_names
from ..transcoders._features import cell_and_gene_features
from ._cells import cell_prompts, check_cells
from ._circuits import select_cells
from ._enrichment import as_net, membership

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ..models._load import C2SModel
    from ..models._tokens import TokenizedPrompt
    from ..transcoders._transcoder_set import TranscoderSet
    from ._enrichment import NetLike

ROW_BUDGET = 2**28
"""Bytes of per-occurrence activations (float64) held at once; cells are read in chunks that fit."""


# the score
def detection_auroc(active: np.ndarray, occurrences: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Per feature, the AUROC of gene-set membership (the score) for telling active gene occurrences (the truth).

    The score is binary, so with ties counted half the AUROC is ``(1 + TPR - FPR) / 2``: TPR the fraction of the
    feature's active occurrences that are of genes in its set, FPR the fraction of its inactive occurrences that are.

    Parameters
    ----------
    active
        ``(n_features, n_genes)`` per gene, the number of its occurrences at which the feature is active.
    occurrences
        ``(n_genes,)`` occurrences of each gene.
    members
        ``(n_features, n_genes)`` whether the gene is in the feature's label set.

    Returns
    -------
    ``(n_features,)`` AUROCs; NaN for a feature with no active or no inactive occurrence.
    """
    members = members.astype(np.float64)
    positives = active.sum(1)
    negatives = occurrences.sum() - positives
    true_pos = (active * members).sum(1)
    false_pos = ((occurrences[None, :] - active) * members).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = 0.5 * (1.0 + true_pos / positives - false_pos / negatives)
    return np.where((positives > 0) & (negatives > 0), score, np.nan)


def shuffled_detection_auroc(
    active: np.ndarray, occurrences: np.ndarray, members: np.ndarray, n_shuffles: int, rng: np.random.Generator
) -> np.ndarray:
    """:func:`detection_auroc` with the genes of every set permuted, averaged over ``n_shuffles`` permutations.

    A permutation keeps each set's size and gives it random genes; its expected AUROC is 0.5. NaN for no
    permutation.
    """
    if n_shuffles < 1:
        return np.full(active.shape[0], np.nan)
    total = np.zeros(active.shape[0])
    for _ in range(n_shuffles):
        total += detection_auroc(active, occurrences, members[:, rng.permutation(members.shape[1])])
    return total / n_shuffles


def label_sets(sets: sparse.csr_matrix, term_row: dict[str, int], terms: Sequence[str]) -> np.ndarray:
    """``(len(terms), n_genes)`` membership of each term (no gene for a term holding none of the genes)."""
    out = np.zeros((len(terms), sets.shape[1]), dtype=bool)
    for j, term in enumerate(terms):
        if term in term_row:
            out[j] = sets[term_row[term]].toarray().ravel() > 0
    return out


def count_active(values: np.ndarray, gene_of: np.ndarray, n_genes: int) -> np.ndarray:
    """``(n_genes, n_columns)`` per gene, the number of its occurrences (rows of ``values``) with a value above 0."""
    indicator = sparse.csr_matrix(
        (np.ones(len(gene_of)), (gene_of, np.arange(len(gene_of)))), shape=(n_genes, len(gene_of))
    )
    return np.asarray(indicator @ (values > 0).astype(np.float64))


# activations per gene occurrence
def occurrence_activity(
    model: C2SModel,
    transcoders: TranscoderSet,
    prompts: Sequence[TokenizedPrompt],
    gene_row: Sequence[np.ndarray],
    skip: Sequence[np.ndarray] | None,
    features: dict[int, np.ndarray],
    n_genes: int,
    *,
    batch_size: int,
    progress: bool,
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Per layer ``(n_genes, n_features)`` counts of occurrences where each feature of ``features[layer]`` is active.

    :func:`cellcircuits.transcoders._features.cell_and_gene_features` averages a gene's activations over the tokens
    it reads and sums them per table row; given one row per gene occurrence (a chunk of cells at a time), its sum
    is each occurrence's mean activation, which is above 0 where the feature is active at some read token.
    """
    counts = {layer: np.zeros((n_genes, len(f))) for layer, f in features.items()}
    occurrences = np.zeros(n_genes)
    layers = sorted(features)
    width = sum(transcoders[i].cfg.n_features for i in layers) * 8
    per_cell = max((len(p.genes) for p in prompts), default=1) * width
    chunk = max(1, ROW_BUDGET // max(per_cell, 1))
    chunk = max(batch_size, chunk - chunk % batch_size)
    with tqdm(total=len(prompts), desc="scoring feature labels", disable=not progress, unit="cell") as bar:
        for start in range(0, len(prompts), chunk):
            part = range(start, min(start + chunk, len(prompts)))
            sizes = [len(gene_row[c]) for c in part]
            first = np.concatenate([[0], np.cumsum(sizes)])
            # each occurrence of a known gene its own row; the others (-1) are not read into the table
            own = [np.where(gene_row[c] >= 0, first[j] + np.arange(sizes[j]), -1) for j, c in enumerate(part)]
            gene_of = np.full(int(first[-1]), -1, dtype=np.int64)
            for j, c in enumerate(part):
                gene_of[own[j][own[j] >= 0]] = gene_row[c][gene_row[c] >= 0]
            found, _ = cell_and_gene_features(
                model, transcoders, [prompts[c] for c in part], own, int(first[-1]), layers=layers,
                skip_tokens=None if skip is None else [skip[c] for c in part], batch_size=batch_size, progress=False,
            )  # fmt: skip
            known = gene_of >= 0
            occurrences += np.bincount(gene_of[known], minlength=n_genes)
            for layer, f in features.items():
                counts[layer] += count_active(found[layer].gene_sum[known][:, f], gene_of[known], n_genes)
            bar.update(len(part))
    return counts, occurrences


# inputs
def _check_options(gene_tokens: str, n_shuffles: int, batch_size: int) -> None:
    if gene_tokens not in ("identifying", "all"):
        msg = f"gene_tokens must be 'identifying' or 'all', got {gene_tokens!r}"
        raise ValueError(msg)
    if n_shuffles < 0:
        msg = f"n_shuffles must be at least 0, got {n_shuffles}"
        raise ValueError(msg)
    if batch_size < 1:
        msg = f"batch_size must be positive, got {batch_size!r}"
        raise ValueError(msg)


def _labelled(result: dict, layers: Sequence[int] | int | None) -> tuple[pd.DataFrame, list[int]]:
    """The interpret table, and the chosen layers, checked against those interpreted."""
    table = pd.DataFrame(result["features"]).copy()
    done = [int(i) for i in np.atleast_1d(result["params"]["layers"])]
    chosen = done if layers is None else [int(i) for i in np.atleast_1d(layers)]
    missing = [i for i in chosen if i not in done]
    if missing:
        msg = f"layer(s) {missing} were not interpreted; interpreted layers are {done}"
        raise ValueError(msg)
    return table, chosen


def _check_net(adata: AnnData, result: dict, net_df: pd.DataFrame, label: str, terms: Sequence[str]) -> None:
    """Refuse gene sets other than those the labels were found with."""
    for key in pd.DataFrame(result["summary"]).get("enrichment_key", []):
        stored = adata.uns.get(str(key), {}).get("params", {}).get("net")
        if stored is not None and str(stored) != label:
            msg = (
                f"the labels were found with the gene sets {stored!r} (.uns[{key!r}]), but net gives {label!r}; "
                "pass the net given to interpret_features"
            )
            raise ValueError(msg)
    unknown = sorted(set(terms) - set(net_df["source"]))
    if unknown:
        msg = f"{len(unknown)} label terms are not in the gene sets given (e.g. {unknown[:3]}); pass the same net"
        raise ValueError(msg)


@one_at_a_time
def score_feature_labels(
    adata: AnnData,
    model: C2SModel,
    transcoders: TranscoderSet,
    *,
    cells: AnnData | Sequence | np.ndarray | None = None,
    interpret_key: str = INTERPRET,
    net: NetLike = None,
    layers: int | Sequence[int] | None = None,
    gene_tokens: Literal["identifying", "all"] = "identifying",
    n_shuffles: int = 100,
    sentence_key: str = "cell_sentence",
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    random_state: int = 0,
    organism: str | None = None,
    batch_size: int = 16,
    key_added: str | None = None,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Score each feature label by how well its gene set predicts where the feature fires, on held-out cells.

    The detection score of automated interpretability without a language model: for every feature
    :func:`cellcircuits.tl.interpret_features` labelled with a significant gene set, the model runs on ``cells``
    and the feature is read at every occurrence of a gene of the collection in their sentences; the truth is
    whether it is active there (above 0 at one of the gene's read tokens), the score whether the gene is in the
    label's set. Set membership is binary, so the AUROC (ties counted half) is ``(1 + TPR - FPR) / 2``: TPR the
    fraction of the active occurrences that are of set genes, FPR the fraction of the inactive ones that are.
    This asks what a label claims, where the feature fires, independent of how strongly it fires (so features of
    any scale compare); 0.5 means the label says nothing about where it fires, 1 that it fires on exactly the
    set's genes. ``detection_auroc_shuffled`` scores each feature against random sets of its set's size (the
    set's genes permuted): it sits near 0.5.

    The labels came from the cells the gene maps were computed on; score them on other cells (``cells``), or the
    score is in-sample.

    Parameters
    ----------
    adata
        Annotated data matrix holding the labels (``.uns[interpret_key]``).
    model
        The C2S model.
    transcoders
        The transcoders the labelled features belong to.
    cells
        The held-out cells: a boolean mask, obs names or integer rows of ``adata``, or another AnnData (with the
        same kind of genes). Default every cell of ``adata``, with a warning: those are usually the cells the labels
        came from.
    interpret_key
        Where :func:`cellcircuits.tl.interpret_features` stored its result.
    net
        The gene sets the labels were found with (as given to ``interpret_features``; default the shipped
        collections). Genes of the collection are the occurrences scored.
    layers
        Interpreted layers to score; default all.
    gene_tokens
        Which of a gene's tokens are read, as in :func:`cellcircuits.tl.transcode`: ``"identifying"`` (from the
        first token no other gene shares, so a feature firing on a shared name prefix counts as inactive) or
        ``"all"``.
    n_shuffles
        Random sets averaged for ``detection_auroc_shuffled`` (0: none, the column is NaN).
    sentence_key, layer, use_raw, gene_symbols, random_state
        Cell sentences of ``cells``, as in :func:`cellcircuits.tl.transcode`; ``random_state`` also seeds the
        random sets.
    organism
        Organism named in the prompts; default the model's ``prompt.organism``.
    batch_size
        Cells per forward pass.
    key_added
        Key in ``.uns`` for the scored result: the ``interpret_features`` result with the detection columns added.
        Default ``interpret_key``, updated in place.
    progress
        Show a progress bar.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets, in ``.uns[key_added]`` (a copy of
    ``.uns[interpret_key]`` with these fields):

    ``["features"]``
        Columns ``detection_auroc``, ``detection_auroc_shuffled``, ``detection_n_positive`` (occurrences where the
        feature is active) and ``detection_n_negative``; NaN for features not scored (no significant set, or a layer
        not chosen) and AUROCs NaN for a feature never (or always) active on the cells.
    ``["summary"]``
        Per layer ``median_detection_auroc``, ``median_detection_auroc_shuffled`` and ``n_detection_scored``
        (labelled features with an AUROC).
    ``["detection"]`` : :class:`dict`
        The settings: ``gene_tokens``, ``n_cells``, ``n_occurrences``, ``n_genes``, ``net``, ``layers``,
        ``n_shuffles``, ``random_state`` and ``cells`` (``"adata"``, ``"subset"`` or ``"other AnnData"``).

    Raises
    ------
    KeyError
        When ``interpret_features`` has not run under ``interpret_key``, or ``cells`` names cells not in ``adata``.
    ValueError
        For gene sets other than the labels', layers not interpreted or without a transcoder, no cells, or a bad
        ``gene_tokens``, ``n_shuffles`` or ``batch_size``.

    Examples
    --------
    >>> train = adata[adata.obs["split"] == "train"].copy()  # doctest: +SKIP
    >>> cc.tl.transcode(train, model, tset, gene_tokens="identifying")  # doctest: +SKIP
    >>> cc.tl.interpret_features(train)  # doctest: +SKIP
    >>> test = adata[adata.obs["split"] == "test"]  # doctest: +SKIP
    >>> cc.tl.score_feature_labels(train, model, tset, cells=test)  # doctest: +SKIP
    >>> train.uns["interpret_features"]["summary"][["layer", "median_detection_auroc"]]  # doctest: +SKIP
    """
    from anndata import AnnData

    _check_options(gene_tokens, n_shuffles, batch_size)
    result = interpret_result(adata, interpret_key)
    table, chosen = _labelled(result, layers)
    scored = table["layer"].isin(chosen).to_numpy() & table["enriched"].to_numpy(dtype=bool)
    net_df, net_label = as_net(net)
    _check_net(adata, result, net_df, net_label, table.loc[scored, "best_term"].astype(str).unique().tolist())
    transcoders.check_model(model)
    uncovered = [i for i in chosen if i not in transcoders]
    if uncovered:
        msg = f"no transcoder for layers {uncovered}; the set covers layers {transcoders.layers}"
        raise ValueError(msg)
    check_writable(adata, copy, "score_feature_labels")
    if cells is None:
        warnings.warn(
            "score_feature_labels scores every cell of adata, usually the cells the labels came from (in-sample); "
            "pass held-out cells with cells=",
            stacklevel=2,
        )
    data = cells if isinstance(cells, AnnData) else adata
    rows = None if cells is None or isinstance(cells, AnnData) else select_cells(adata, None, None, cells, 1, 0)[0]
    check_cells(data, batch_size)

    symbols = gene_names(data.var, gene_symbols)
    universe = np.asarray(pd.unique(symbols[pd.Index(symbols).isin(net_df["target"].unique())]), dtype=str)
    row_of = {g: i for i, g in enumerate(universe)}
    settings = SentenceSettings(sentence_key, layer, use_raw, gene_symbols, random_state, organism)
    prompts = cell_prompts(data, model, settings, cells=rows)
    gene_row = [np.array([row_of.get(g, -1) for g in p.genes], dtype=np.int64) for p in prompts]
    skip = None
    if gene_tokens == "identifying":
        outside = sorted({g for p in prompts for g in p.genes} - set(symbols))
        offset = identifying_offsets(model.tokenizer, [*symbols, *outside])
        skip = [np.array([offset[g] for g in p.genes], dtype=np.int64) for p in prompts]
    features = {i: table.loc[scored & (table["layer"] == i).to_numpy(), "feature"].to_numpy(np.int64) for i in chosen}
    features = {i: f for i, f in features.items() if len(f)}
    counts: dict[int, np.ndarray] = {}
    occurrences = np.zeros(len(universe))
    if features:
        counts, occurrences = occurrence_activity(
            model, transcoders, prompts, gene_row, skip, features, len(universe), batch_size=batch_size,
            progress=progress,
        )  # fmt: skip

    sets, terms = membership(net_df, universe)
    term_row = {t: j for j, t in enumerate(terms)}
    rng = np.random.default_rng(random_state)
    columns = {c: np.full(len(table), np.nan) for c in ("auroc", "auroc_shuffled", "n_positive", "n_negative")}
    for i in features:
        at = np.flatnonzero(scored & (table["layer"] == i).to_numpy())
        members = label_sets(sets, term_row, table["best_term"].to_numpy()[at])
        active = counts[i].T
        columns["auroc"][at] = detection_auroc(active, occurrences, members)
        columns["auroc_shuffled"][at] = shuffled_detection_auroc(active, occurrences, members, n_shuffles, rng)
        columns["n_positive"][at] = active.sum(1)
        columns["n_negative"][at] = occurrences.sum() - active.sum(1)

    adata = adata.copy() if copy else adata
    store = dict(adata.uns[interpret_key])
    adata.uns[key_added or interpret_key] = store
    for name, values in columns.items():
        table[f"detection_{name}"] = values
    store["features"] = table
    store["summary"] = detection_summary(pd.DataFrame(store["summary"]), table, chosen)
    store["detection"] = {
        "gene_tokens": gene_tokens,
        "n_cells": len(prompts),
        "n_occurrences": int(occurrences.sum()),
        "n_genes": len(universe),
        "net": net_label,
        "layers": np.asarray(chosen, dtype=np.int64),
        "n_shuffles": int(n_shuffles),
        "random_state": int(random_state),
        "cells": "adata" if cells is None else "other AnnData" if isinstance(cells, AnnData) else "subset",
    }
    return adata if copy else None


def detection_summary(summary: pd.DataFrame, table: pd.DataFrame, layers: Sequence[int]) -> pd.DataFrame:
    """The interpret summary with each scored layer's median detection AUROC (and shuffled), and how many scored.

    Columns of an earlier scoring are replaced: layers not in ``layers`` get NaN, as their rows of ``table`` do.
    """
    summary = summary.copy()
    for column in ("median_detection_auroc", "median_detection_auroc_shuffled", "n_detection_scored"):
        summary[column] = np.nan
    for i in layers:
        t = table[(table["layer"] == i) & table["detection_auroc"].notna()]
        at = summary["layer"] == i
        for column in ("detection_auroc", "detection_auroc_shuffled"):
            values = t[column].dropna()
            summary.loc[at, f"median_{column}"] = values.median() if len(values) else np.nan
        summary.loc[at, "n_detection_scored"] = len(t)
    return summary
