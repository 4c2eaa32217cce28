"""Which cells, which sentences, which prompts: the inputs every tool builds from an AnnData and a model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..models._tokens import tokenize_prompts
from ..pp._sentences import sentences_from_adata

if TYPE_CHECKING:
    import numpy as np
    from anndata import AnnData

    from ..models._load import C2SModel
    from ..models._tokens import TokenizedPrompt


def check_data_layer(layer: object) -> None:
    """Refuse a model layer number passed where an AnnData layer name belongs."""
    if layer is not None and not isinstance(layer, str):
        msg = f"layer={layer!r} names an AnnData layer (a string); model layers are chosen with layers=[...]."
        raise TypeError(msg)


def sentences_for(
    adata: AnnData,
    model: C2SModel,
    sentence_key: str,
    layer: str | None,
    use_raw: bool | None,
    gene_symbols: str | None,
    random_state: int,
    cells: np.ndarray | None = None,
) -> list[str]:
    """Stored sentences when present, else built now (cut to the model's ``n_genes``) without storing them."""
    if sentence_key in adata.obs.columns:
        stored = adata.obs[sentence_key] if cells is None else adata.obs[sentence_key].iloc[cells]
        return stored.fillna("").astype(str).tolist()
    return sentences_from_adata(
        adata,
        n_genes=model.prompt.n_genes,
        layer=layer,
        use_raw=use_raw,
        gene_symbols=gene_symbols,
        random_state=random_state,
        cells=cells,
    )


def check_cells(adata: AnnData, batch_size: int) -> None:
    """Refuse a non-positive ``batch_size`` or an AnnData without cells."""
    if batch_size < 1:
        msg = f"batch_size must be positive, got {batch_size!r}"
        raise ValueError(msg)
    if adata.n_obs == 0:
        msg = "adata has no cells."
        raise ValueError(msg)


def cell_prompts(
    adata: AnnData,
    model: C2SModel,
    *,
    sentence_key: str = "cell_sentence",
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    random_state: int = 0,
    cells: np.ndarray | None = None,
) -> list[TokenizedPrompt]:
    """Tokenized prompts of the cells (all, or the ``cells`` rows), with the positions of each gene's tokens."""
    check_data_layer(layer)
    if adata.n_obs == 0:
        msg = "adata has no cells."
        raise ValueError(msg)
    sentences = sentences_for(adata, model, sentence_key, layer, use_raw, gene_symbols, random_state, cells)
    return tokenize_prompts(model.tokenizer, model.build_prompts(sentences))
