"""Transcoder features of cells and genes, stored in AnnData."""

from __future__ import annotations

import hashlib
import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import sparse

from .._keys import TRANSCODE, SentenceSettings, features_obsm, gene_map_varm, h5ad_safe
from ..models._hooks import one_at_a_time
from ..models._spelling import distinguishing_tokens, identifying_offsets, unspellable_genes
from ..pp._sentences import check_writable, gene_names
from ..transcoders._features import cell_and_gene_features, gene_logit_effects
from ._cells import cell_prompts, check_cells

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ..models._load import C2SModel
    from ..transcoders._transcoder_set import TranscoderSet


def content_hash(transcoders: TranscoderSet, layers: Sequence[int]) -> str:
    """A hash of the weights of the chosen transcoders (to tell results of different sets apart)."""
    h = hashlib.blake2b(digest_size=16)
    for layer in layers:
        for name, tensor in sorted(transcoders[layer].state_dict().items()):
            if name == "tokens_since_fired":  # training state, not part of what the transcoder computes
                continue
            h.update(f"{layer}.{name}".encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def report_genes(unseen: Sequence[str] | np.ndarray, unspellable: Sequence[str], n_genes: int) -> None:
    """Warn, with a count and examples, about genes whose input maps are 0 or whose spelling the model lacks."""
    if len(unseen):
        examples = ", ".join(list(unseen)[:5])
        warnings.warn(
            f"{len(unseen)} of {n_genes} genes never appear in a cell sentence (e.g. {examples}); their input maps "
            "are 0 and they are listed in .uns[key_added]['unseen_genes']",
            stacklevel=3,
        )
    if len(unspellable):
        examples = ", ".join(list(unspellable)[:5])
        warnings.warn(
            f"{len(unspellable)} of {n_genes} genes hold the tokenizer's unknown token (e.g. {examples}); the model "
            "cannot tell them apart. They are listed in .uns[key_added]['unspellable_genes']",
            stacklevel=3,
        )


@one_at_a_time
def transcode(
    adata: AnnData,
    model: C2SModel,
    transcoders: TranscoderSet,
    *,
    layers: Sequence[int] | None = None,
    pool: Literal["max", "mean", "sum"] = "max",
    gene_tokens: Literal["all", "identifying"] = "all",
    sentence_key: str = "cell_sentence",
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    random_state: int = 0,
    organism: str | None = None,
    batch_size: int = 16,
    key_added: str = TRANSCODE,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Put transcoder features into AnnData: per cell, per gene as input, and per gene as output.

    The model runs on every cell's prompt with hooks (no retraining); each chosen layer's transcoder encodes the
    MLP input at the tokens that spell genes.

    Parameters
    ----------
    adata
        Annotated data matrix. Duplicate ``obs_names`` are accepted (anndata warns about them): every result is
        stored by the cell's position, not its name.
    model
        The C2S model the transcoders were trained on.
    transcoders
        The transcoders (:func:`cellcircuits.tl.train_transcoders` or :func:`cellcircuits.load_transcoders`).
    layers
        Model layers to transcode; default every layer the set covers.
    pool
        How a cell's activations are pooled over its gene tokens: ``"max"``, ``"mean"`` or ``"sum"``.
    gene_tokens
        Which of a gene's tokens are read, for the pooled activations and the input map. ``"all"``: every token that
        spells the gene. ``"identifying"``: from the first token whose prefix no other gene shares (genes of
        ``var_names`` and the sentences) to the end of the gene, the tokens the output map uses. The model reads
        causally: at ``" F"`` of ``" F" "OS"`` it has seen only what every F-gene shares, and at ``" HLA"`` what every
        HLA gene shares, so a feature firing there reads the gene's name prefix (a letter, or a family such as MHC);
        from the identifying token on the model can represent the gene itself. Comparing the two tells family- and
        spelling-level features from gene-level ones.
    sentence_key, layer, use_raw, gene_symbols, random_state
        Cell sentences: ``.obs[sentence_key]`` when present, else built from this AnnData ``layer``/``.raw`` as in
        :func:`cellcircuits.pp.cell_sentences`. ``layer`` is an AnnData layer; model layers are ``layers``.
    organism
        Organism named in the prompts (C2S models trained on human and mouse cells read it); default the model's
        ``prompt.organism``.
    batch_size
        Cells per forward pass.
    key_added
        Prefix of the keys written.
    progress
        Show a progress bar.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets the following fields, for each layer ``L``:

    ``.obsm[f"X_{key_added}_L{L}"]`` : :class:`scipy.sparse.csr_matrix` (n_obs x n_features)
        Feature activations pooled over the cell's gene tokens (those ``gene_tokens`` reads).
    ``.varm[f"{key_added}_L{L}_in"]`` : :class:`numpy.ndarray` (n_vars x n_features)
        Input map: the mean activation of each feature on the gene's tokens (those ``gene_tokens`` reads), averaged
        over the cells whose prompt contains the gene (a gene spans several tokens; their activations are averaged
        first). 0 for genes the model never saw; they are listed in ``.uns[key_added]['unseen_genes']``.
    ``.varm[f"{key_added}_L{L}_out"]`` : :class:`numpy.ndarray` (n_vars x n_features)
        Output map: the direct effect of each feature's decoder vector on the logits of the tokens that name the
        gene, through the final layer norm with its scale frozen at its mean over the gene tokens. Many genes share
        their first tokens (" HLA", " RPL", " CD"), which do not tell them apart, so the effects are averaged over
        the gene's tokens from the first one whose prefix no other gene shares to the end of the gene (the last token
        for a gene whose spelling prefixes another's); see
        :func:`cellcircuits.models.distinguishing_tokens`.
    ``.uns[key_added]`` : :class:`dict`
        ``params``, each layer's transcoder config, a ``content_hash`` of the transcoder weights, the package
        ``version``, ``unseen_genes``, ``unspellable_genes`` (spelled with the tokenizer's unknown token), and the
        number and examples of sentence genes outside ``var_names``. Unseen and unspellable genes are also reported
        in a warning, with their count and examples.
    """
    from .._version import __version__

    settings = SentenceSettings(sentence_key, layer, use_raw, gene_symbols, random_state, organism)
    adapter = model.adapter
    transcoders.check_model(model)
    layers = transcoders.layers if layers is None else sorted({adapter.check_layer(int(i)) for i in layers})
    missing = [i for i in layers if i not in transcoders]
    if missing:
        msg = f"no transcoder for layers {missing}; the set covers layers {transcoders.layers}"
        raise ValueError(msg)
    if pool not in ("max", "mean", "sum"):
        msg = f"pool must be 'max', 'mean' or 'sum', got {pool!r}"
        raise ValueError(msg)
    if gene_tokens not in ("identifying", "all"):
        msg = f"gene_tokens must be 'identifying' or 'all', got {gene_tokens!r}"
        raise ValueError(msg)
    check_cells(adata, batch_size)
    check_writable(adata, copy, "transcode")

    symbols = gene_names(adata.var, gene_symbols)
    row_of = {g: i for i, g in enumerate(symbols)}
    prompts = cell_prompts(adata, model, settings)
    gene_index = [np.array([row_of.get(g, -1) for g in p.genes], dtype=np.int64) for p in prompts]
    outside = sorted({g for p in prompts for g in p.genes if g not in row_of})
    skip = None
    if gene_tokens == "identifying":
        offset = identifying_offsets(model.tokenizer, [*symbols, *outside])
        skip = [np.array([offset[g] for g in p.genes], dtype=np.int64) for p in prompts]
    features, scale = cell_and_gene_features(
        model, transcoders, prompts, gene_index, len(symbols), layers=layers, pool=pool, skip_tokens=skip,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    tokens = distinguishing_tokens(model.tokenizer, list(symbols))

    adata = adata.copy() if copy else adata
    for i in layers:
        f = features[i]
        adata.obsm[features_obsm(key_added, i)] = sparse.csr_matrix(f.pooled)
        seen = f.gene_cells > 0
        mean_in = np.zeros_like(f.gene_sum, dtype=np.float32)
        mean_in[seen] = f.gene_sum[seen] / f.gene_cells[seen, None]
        adata.varm[gene_map_varm(key_added, i, "in")] = mean_in
        W_dec = transcoders[i].W_dec.detach()
        adata.varm[gene_map_varm(key_added, i, "out")] = gene_logit_effects(adapter, W_dec, tokens, scale).astype(
            np.float32
        )
    unseen = symbols[features[layers[0]].gene_cells == 0] if layers else np.array([])
    unspellable = unspellable_genes(model.tokenizer, list(symbols))
    report_genes(unseen, unspellable, len(symbols))
    adata.uns[key_added] = {
        "params": {
            "model": model.name,
            "architecture": adapter.spec.name,
            "layers": np.asarray(layers, dtype=np.int64),
            "pool": pool,
            "positions": "gene tokens",
            "gene_tokens": gene_tokens,
            "sentence_key": sentence_key if sentence_key in adata.obs.columns else "",
            "n_genes": int(model.prompt.n_genes),
            "organism": organism if organism is not None else model.prompt.organism,
            "final_norm_scale": float(scale),
        },
        "transcoders": {str(i): h5ad_safe(transcoders[i].cfg.to_dict()) for i in layers},
        "content_hash": content_hash(transcoders, layers),
        "version": __version__,
        "unseen_genes": np.asarray(unseen, dtype=str),
        "unspellable_genes": np.asarray(unspellable, dtype=str),
        "n_genes_outside_var": len(outside),
        "genes_outside_var_examples": np.asarray(outside[:20], dtype=str),
    }
    return adata if copy else None
