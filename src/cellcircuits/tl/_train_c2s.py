"""Training a small Cell2Sentence-style model on an AnnData's cells and labels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .._keys import SentenceSettings
from ..models._gene_vocab import check_gene_vocab
from ..models._train import train_c2s as _train_c2s
from ..pp._sentences import sentence_gene_names, sentences_from_adata

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from anndata import AnnData

    from ..models._load import C2SModel


def train_c2s(
    adata: AnnData,
    label_key: str,
    *,
    n_genes: int = 100,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    organism: str = "Homo sapiens",
    answer_suffix: str = ".",
    n_layers: int = 4,
    d_model: int = 128,
    n_heads: int = 4,
    d_mlp: int | None = None,
    vocab_size: int = 512,
    gene_tokens: bool = False,
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    dropout: float = 0.1,
    answer_weight: float = 10.0,
    resample_ties: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    output_dir: str | Path | None = None,
    progress: bool = True,
) -> C2SModel:
    """Train a small Cell2Sentence-style GPT-NeoX model and its tokenizer from scratch on annotated cells.

    The cells' sentences (:func:`cellcircuits.pp.cell_sentences`, cut to ``n_genes``) and their labels in
    ``.obs[label_key]`` train :func:`cellcircuits.models.train_c2s`: the full C2S text, prompt, answer
    (``" " + label + answer_suffix``) and end-of-sequence token, by next-token prediction with the label tokens
    weighted by ``answer_weight``. With ``gene_tokens=True`` every gene of the ranked matrix (``.raw``'s genes when
    the sentences come from it) is one token of the tokenizer, so each gene of a prompt is one position.

    Parameters
    ----------
    adata
        Training cells (subset it to the training split first); it is only read.
    label_key
        Column of ``.obs`` with the cell-type labels to learn.
    n_genes
        Genes per cell sentence; recorded with the model and used for every prompt built for it.
    layer, use_raw, gene_symbols
        Which values and names to rank, as in :func:`cellcircuits.pp.cell_sentences`.
    organism
        Organism named in the prompt.
    answer_suffix
        Text after the label in the answer: ``"."`` as in Cell2Sentence (the shipped model was trained with ``""``).
    n_layers, d_model, n_heads, d_mlp
        Model shape; ``d_mlp`` defaults to ``4 * d_model``.
    vocab_size
        Size of the BPE vocabulary.
    gene_tokens
        Make every gene a sentence can hold a single token on top of the BPE vocabulary
        (:func:`cellcircuits.models.train_tokenizer` with ``gene_vocab``); ``False``: genes are spelled by the BPE
        alone, in several tokens each.
    epochs, batch_size, lr, weight_decay, dropout
        Optimisation (AdamW, linear warm-up then cosine decay); ``dropout`` applies to the residual branches.
    answer_weight
        Weight of the label tokens in the loss relative to the sentence tokens.
    resample_ties
        Redraw the random order of equally expressed genes every epoch (C2S breaks ties at random), which
        teaches the model that the order within ties carries no information.
    seed
        Seeds the weights, batches and tie-breaks; training on CPU is deterministic for a seed.
    device
        Training device; default CUDA when available, else CPU.
    output_dir
        Save the trained model there (safetensors, tokenizer, ``cellcircuits.json``).
    progress
        Show a progress bar with the loss.

    Returns
    -------
    The trained model, ready for :func:`cellcircuits.tl.predict_cell_types`.

    Raises
    ------
    KeyError
        When ``label_key`` is not a column of ``.obs``.
    ValueError
        When labels are missing or there are fewer than two, or (``gene_tokens``) a gene symbol cannot be one word of
        a cell sentence.
    """
    settings = SentenceSettings(layer=layer, use_raw=use_raw, gene_symbols=gene_symbols, random_state=seed)
    if label_key not in adata.obs.columns:
        msg = f"label_key {label_key!r} is not a column of adata.obs; columns are {list(adata.obs.columns)}."
        raise KeyError(msg)
    y = adata.obs[label_key]
    if y.isna().any():
        msg = f"adata.obs[{label_key!r}] has {int(y.isna().sum())} missing labels; drop those cells first."
        raise ValueError(msg)
    classes = list(y.cat.categories) if isinstance(y.dtype, pd.CategoricalDtype) else sorted(set(map(str, y)))
    classes = [str(c) for c in classes if (y.astype(str) == str(c)).any()]
    if len(classes) < 2:
        msg = f"adata.obs[{label_key!r}] has fewer than two labels; nothing to learn."
        raise ValueError(msg)

    gene_vocab = None
    if gene_tokens:
        genes = sentence_gene_names(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
        gene_vocab = check_gene_vocab(genes.tolist())

    def sentences(epoch: int) -> list[str]:
        return sentences_from_adata(
            adata,
            n_genes=n_genes,
            layer=settings.layer,
            use_raw=settings.use_raw,
            gene_symbols=settings.gene_symbols,
            random_state=seed + epoch if resample_ties else seed,
        )

    return _train_c2s(
        sentences if resample_ties else sentences(0), y.astype(str).tolist(), classes=classes, n_genes=n_genes,
        organism=organism, answer_suffix=answer_suffix, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
        d_mlp=d_mlp, vocab_size=vocab_size, gene_vocab=gene_vocab,
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, dropout=dropout,
        answer_weight=answer_weight, seed=seed, device=device, output_dir=output_dir,
        metadata={"label_key": label_key}, progress=progress,
    )  # fmt: skip
