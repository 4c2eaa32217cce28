"""Which cells, which sentences, which prompts: the inputs every tool builds from an AnnData and a model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import pandas as pd

from .._compat import warn_at_caller
from .._keys import SentenceSettings
from ..models._tokens import tokenize_prompts
from ..pp._prompts import split_sentence
from ..pp._sentences import sentences_from_adata

if TYPE_CHECKING:
    import numpy as np
    from anndata import AnnData

    from ..models._load import C2SModel
    from ..models._tokens import TokenizedPrompt


def sentences_for(
    adata: AnnData, model: C2SModel, settings: SentenceSettings, cells: np.ndarray | None = None
) -> list[str]:
    """Stored sentences when present, else built now (cut to the model's ``n_genes``) without storing them."""
    if settings.sentence_key in adata.obs.columns:
        stored = adata.obs[settings.sentence_key]
        stored = stored if cells is None else stored.iloc[cells]
        sentences = stored.fillna("").astype(str).tolist()
        warn_short_sentences(adata, settings.sentence_key, sentences, int(model.prompt.n_genes))
        return sentences
    return sentences_from_adata(
        adata,
        n_genes=model.prompt.n_genes,
        layer=settings.layer,
        use_raw=settings.use_raw,
        gene_symbols=settings.gene_symbols,
        random_state=settings.random_state,
        cells=cells,
    )


def warn_short_sentences(adata: AnnData, sentence_key: str, sentences: list[str], n_genes: int) -> None:
    """Warn when stored sentences were cut to fewer genes than the model's prompts hold.

    :func:`cellcircuits.pp.cell_sentences` records its ``n_genes``; a column without that record warns when its
    longest sentence is shorter than ``n_genes`` (a cell may express fewer genes, but all of them rarely do).
    """
    params = adata.uns.get(sentence_key, {})
    params = params.get("params", {}) if isinstance(params, Mapping) else {}
    kept = int(params.get("n_genes", -1)) if isinstance(params, Mapping) else -1
    longest = max((len(split_sentence(s)) for s in sentences), default=0)
    if 0 < kept < n_genes:
        what = f"were cut to {kept} genes (cellcircuits.pp.cell_sentences(n_genes={kept}))"
    elif kept < 0 and not params and 0 < longest < n_genes:
        what = f"hold at most {longest} genes"
    else:
        return
    msg = (
        f"The sentences in .obs[{sentence_key!r}] {what}, but the model reads {n_genes} genes per cell, and its "
        f"prompts say so: rebuild them with cellcircuits.pp.cell_sentences(adata, n_genes={n_genes}) or more (or "
        "n_genes=None) to give the model the genes it was trained to read."
    )
    warn_at_caller(msg)


def check_cells(adata: AnnData, batch_size: int) -> None:
    """Refuse a non-positive ``batch_size`` or an AnnData without cells."""
    if batch_size < 1:
        msg = f"batch_size must be positive, got {batch_size!r}"
        raise ValueError(msg)
    if adata.n_obs == 0:
        msg = "adata has no cells."
        raise ValueError(msg)


def check_unique_obs_names(adata: AnnData, tool: str) -> None:
    """Refuse duplicate ``obs_names`` for a tool that keys per-cell results by obs name."""
    duplicated = adata.obs_names.duplicated()
    if duplicated.any():
        examples = list(pd.unique(adata.obs_names[duplicated].astype(str)))
        msg = (
            f"{tool} stores its per-cell results by obs name, but adata.obs_names holds {len(examples)} duplicated "
            f"name(s), e.g. {examples[:5]}; make them unique first with adata.obs_names_make_unique()."
        )
        raise ValueError(msg)


def cell_prompts(
    adata: AnnData, model: C2SModel, settings: SentenceSettings | None = None, cells: np.ndarray | None = None
) -> list[TokenizedPrompt]:
    """Tokenized prompts of the cells (all, or the ``cells`` rows), with the positions of each gene's tokens."""
    settings = settings if settings is not None else SentenceSettings()
    if adata.n_obs == 0:
        msg = "adata has no cells."
        raise ValueError(msg)
    sentences = sentences_for(adata, model, settings, cells)
    return tokenize_prompts(model.tokenizer, model.build_prompts(sentences, settings.organism))


def prompt_token_ids(
    adata: AnnData, model: C2SModel, settings: SentenceSettings, cells: np.ndarray | None = None
) -> list[list[int]]:
    """Token ids of the cells' prompts (all, or the ``cells`` rows), for tools that need no gene positions."""
    sentences = sentences_for(adata, model, settings, cells)
    prompts = model.build_prompts(sentences, settings.organism)
    return [list(ids) for ids in model.tokenizer([p.text for p in prompts])["input_ids"]]
