"""Cell types in the model's own words: free-text answers by greedy decoding, and the label list they give."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .._keys import GENERATION, SentenceSettings, generated_answers
from ..models._generate import check_generation, generate_answers
from ..models._hooks import one_at_a_time
from ..models._tokens import end_of_answer_id
from ..pp._sentences import check_writable
from ._cells import check_cells, prompt_token_ids

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models._load import C2SModel


@one_at_a_time
def generate_cell_types(
    adata: AnnData,
    model: C2SModel,
    *,
    organism: str | None = None,
    max_new_tokens: int = 32,
    sentence_key: str = "cell_sentence",
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    random_state: int = 0,
    batch_size: int = 8,
    key_added: str = GENERATION,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Let a C2S model name each cell's type in free text, as Cell2Sentence itself predicts.

    Each cell's prompt (the model's template, its cell sentence cut to the model's ``n_genes``) is continued by
    greedy decoding until the model's end-of-answer token (:func:`cellcircuits.models.generate_answers`); the
    answer, without the ``answer_prefix`` and the trailing ``answer_suffix`` (``"."``), is the cell's type.

    :func:`cellcircuits.tl.predict_cell_types` instead scores a closed list of candidate labels and takes a softmax
    over them; that softmax has no "other" class, so every cell gets one of the candidates however poorly it fits.
    Generation shows what the model says unprompted, candidates or not, and its answers (for the public C2S
    checkpoints, CELLxGENE Cell Ontology names such as ``"classical monocyte"``) give the label vocabulary:
    :func:`cellcircuits.tl.generated_labels` turns them into a list for
    ``predict_cell_types(adata, model, labels=...)``, and for circuit tracing (which reads the model's labels) into
    ``model.prompt.labels``.

    Parameters
    ----------
    adata
        Annotated data matrix. Duplicate ``obs_names`` are accepted: answers are stored by the cell's position.
    model
        A loaded model (:func:`cellcircuits.models.load`).
    organism
        Organism named in the prompts (``None``: the model's, ``model.prompt.organism``).
    max_new_tokens
        Most tokens generated per cell; an answer that reaches it without the end-of-answer token is kept as
        generated, with a warning.
    sentence_key
        Column of ``.obs`` with cell sentences (:func:`cellcircuits.pp.cell_sentences`). When absent, sentences are
        built from ``layer``/``use_raw`` without being stored.
    layer, use_raw, gene_symbols, random_state
        How to build sentences when ``sentence_key`` is absent, as in :func:`cellcircuits.pp.cell_sentences`.
    batch_size
        Cells per call of the model's ``generate`` (left-padded; the answers do not depend on it).
    key_added
        Key under which results are stored.
    progress
        Show a progress bar.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets the following fields:

    ``.obs[key_added]`` : :class:`pandas.Categorical`
        The model's answer for each cell (``""`` when it answered nothing).
    ``.uns[key_added]['params']`` : :class:`dict`
        Model name, ``max_new_tokens``, the organism named in the prompts, ``n_genes`` and how the sentences were
        made (``sentences``).

    Raises
    ------
    ValueError
        For ``max_new_tokens`` or ``batch_size`` below 1, an AnnData without cells, a tokenizer without the
        end-of-answer token, or, when sentences are built, gene names that are not usable symbols. Nothing is
        written to ``adata`` when an error is raised.
    """
    check_generation(max_new_tokens, batch_size)
    check_cells(adata, batch_size)
    end_of_answer_id(model.tokenizer, model.prompt)  # a tokenizer without the terminator fails before any work
    check_writable(adata, copy, "generate_cell_types")
    settings = SentenceSettings(sentence_key, layer, use_raw, gene_symbols, random_state, organism)
    prompt_ids = prompt_token_ids(adata, model, settings)
    answers = generate_answers(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        desc="generating cell types",
    )
    adata = adata.copy() if copy else adata
    adata.obs[key_added] = pd.Categorical(answers)
    adata.uns[key_added] = {
        "params": {
            "model": model.name,
            "max_new_tokens": int(max_new_tokens),
            "organism": str(model.prompt.organism if organism is None else organism),
            "n_genes": int(model.prompt.n_genes),
            "sentence_key": sentence_key if sentence_key in adata.obs.columns else "",
            "sentences": settings.to_params(),
        }
    }
    return adata if copy else None


def generated_labels(adata: AnnData, key: str = GENERATION, *, min_cells: int = 1) -> list[str]:
    """The distinct answers :func:`generate_cell_types` stored, as a label list.

    Parameters
    ----------
    adata
        Annotated data matrix with answers in ``.obs[key]``.
    key
        The ``key_added`` of :func:`generate_cell_types`.
    min_cells
        Keep the answers given for at least this many cells.

    Returns
    -------
    The answers, most frequent first (ties in alphabetical order), without empty answers. Pass them to
    ``cellcircuits.tl.predict_cell_types(adata, model, labels=...)`` to score every cell against the model's own
    vocabulary, or set ``model.prompt.labels = labels`` for the tools that read the model's labels (circuit
    tracing, and prediction without ``labels=``).

    Raises
    ------
    KeyError
        When ``.obs[key]`` does not exist.
    ValueError
        For ``min_cells`` below 1.
    """
    if int(min_cells) < 1:
        msg = f"min_cells must be at least 1, got {min_cells!r}"
        raise ValueError(msg)
    answers = generated_answers(adata, key).dropna().astype(str).str.strip()
    counts = answers[answers != ""].value_counts()
    counts = counts[counts >= int(min_cells)]
    return sorted(counts.index, key=lambda label: (-int(counts[label]), label))
