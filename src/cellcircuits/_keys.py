"""Where results live in AnnData: every key the tools write, the lookups the plots read, and h5ad-safe params.

This module owns the AnnData key schema: tools, getters, plots, the report and the command line spell keys through
the functions here and never by hand. Light on purpose (numpy and pandas only), so reading results does not import
torch.

========================================  =======================================================================
Key                                       Written by
========================================  =======================================================================
``.obs[key_added]``                       :func:`~cellcircuits.tl.predict_cell_types` (``"c2s_cell_type"``)
``.obsm[f"{key_added}_proba"]``           the same, with ``f"{key_added}_logprob"``
``.obs[key_added]``                       :func:`~cellcircuits.tl.generate_cell_types`
                                          (``"c2s_generated_cell_type"``)
``.obsm[f"X_{key}_L{l}"]``                :func:`~cellcircuits.tl.transcode` (``"transcoder"``), per model layer
``.varm[f"{key}_L{l}_in"]``, ``_out``     the same: feature-gene input and output maps
``.uns[f"{key}_L{l}_{side}_enrichment"]`` :func:`~cellcircuits.tl.feature_enrichment`
``.uns["interpret_features"]``            :func:`~cellcircuits.tl.interpret_features`; detection columns by
                                          :func:`~cellcircuits.tl.score_feature_labels`
``.uns["rank_features_groups"]``          :func:`~cellcircuits.tl.rank_features_groups`
``.uns["circuits"][key]``                 :func:`~cellcircuits.tl.trace_circuit`; ``["validation"]`` by
                                          :func:`~cellcircuits.tl.validate_circuit`
``.uns["circuits"][key]["gene_validation"]`` :func:`~cellcircuits.tl.validate_circuit_genes` (gene knockouts)
``.uns["circuits"][key]["gene_ranking"]`` :func:`~cellcircuits.tl.rank_circuit_genes`
``.uns["transcoder_quality"]``            ``cellcircuits run``
========================================  =======================================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Mapping

    import pandas as pd
    from anndata import AnnData
    from scipy import sparse

#: ``.uns`` key holding every traced circuit, by its key.
CIRCUITS = "circuits"
#: Default ``key_added`` of the tools.
PREDICTION = "c2s_cell_type"
GENERATION = "c2s_generated_cell_type"
TRANSCODE = "transcoder"
INTERPRET = "interpret_features"
RANK_FEATURES = "rank_features_groups"
TRANSCODER_QUALITY = "transcoder_quality"


# names
def prediction_obsm(key: str, kind: Literal["proba", "logprob"]) -> str:
    """``.obsm`` key of the per-label probabilities or log-likelihoods of a prediction."""
    return f"{key}_{kind}"


def features_obsm(key: str, layer: int) -> str:
    """``.obsm`` key of the cells x features activations of one model layer."""
    return f"X_{key}_L{int(layer)}"


def gene_map_varm(key: str, layer: int, side: Literal["in", "out"]) -> str:
    """``.varm`` key of one model layer's feature-gene map (``side``: input or output)."""
    return f"{key}_L{int(layer)}_{side}"


def enrichment_uns(key: str, layer: int, side: Literal["in", "out"]) -> str:
    """``.uns`` key of the gene-set enrichment of one model layer's features."""
    return f"{gene_map_varm(key, layer, side)}_enrichment"


def embedding_obsm(basis: str) -> str:
    """``.obsm`` key of an embedding, as scanpy names it (``"umap"``: ``"X_umap"``)."""
    return f"X_{basis}"


# lookups with clear errors
def feature_matrix(adata: AnnData, key: str, layer: int) -> np.ndarray | sparse.spmatrix:
    """The cells x features activations :func:`cellcircuits.tl.transcode` wrote for a layer; clear error if absent."""
    obsm_key = features_obsm(key, layer)
    if obsm_key not in adata.obsm:
        msg = f".obsm[{obsm_key!r}] not found; run cellcircuits.tl.transcode(adata, model, transcoders) first."
        raise KeyError(msg)
    return adata.obsm[obsm_key]


def gene_map(adata: AnnData, key: str, layer: int, side: Literal["in", "out"]) -> np.ndarray:
    """A layer's genes x features map from :func:`cellcircuits.tl.transcode`, as float64; clear error if absent."""
    varm_key = gene_map_varm(key, layer, side)
    if varm_key not in adata.varm:
        msg = f".varm[{varm_key!r}] not found; run cellcircuits.tl.transcode(adata, model, transcoders) first."
        raise KeyError(msg)
    return np.asarray(adata.varm[varm_key], dtype=np.float64)


def enrichment_result(adata: AnnData, key: str) -> dict:
    """The result :func:`cellcircuits.tl.feature_enrichment` stored under ``key``, with a clear error when absent."""
    if key not in adata.uns or "results" not in adata.uns[key]:
        msg = f"No enrichment under .uns[{key!r}]; run cellcircuits.tl.feature_enrichment first."
        raise KeyError(msg)
    return adata.uns[key]


def transcode_result(adata: AnnData, key: str) -> dict:
    """What :func:`cellcircuits.tl.transcode` stored under ``key`` (params, provenance); clear error if absent."""
    if key not in adata.uns or "params" not in adata.uns[key]:
        msg = f".uns[{key!r}] not found; run cellcircuits.tl.transcode(adata, model, transcoders) first."
        raise KeyError(msg)
    return adata.uns[key]


def interpret_result(adata: AnnData, key: str) -> dict:
    """What :func:`cellcircuits.tl.interpret_features` stored under ``key``; clear error if absent."""
    if key not in adata.uns or "features" not in adata.uns[key] or "summary" not in adata.uns[key]:
        msg = f".uns[{key!r}] not found; run cellcircuits.tl.interpret_features(adata) first."
        raise KeyError(msg)
    return adata.uns[key]


def generated_answers(adata: AnnData, key: str) -> pd.Series:
    """The answers :func:`cellcircuits.tl.generate_cell_types` stored in ``.obs[key]``; clear error if absent."""
    if key not in adata.obs.columns:
        msg = f".obs[{key!r}] not found; run cellcircuits.tl.generate_cell_types(adata, model) first."
        raise KeyError(msg)
    return adata.obs[key]


def circuit_keys(adata: AnnData) -> list[str]:
    """Keys of the circuits stored in ``adata``, sorted."""
    store = adata.uns.get(CIRCUITS, {})
    return sorted(store) if hasattr(store, "keys") else []


def circuit_result(adata: AnnData, key: str) -> dict:
    """The circuit :func:`cellcircuits.tl.trace_circuit` stored under ``key``, with a clear error when absent."""
    store = adata.uns.get(CIRCUITS, {})
    if key not in store or "nodes" not in store[key]:
        have = circuit_keys(adata)
        msg = f"No circuit under .uns[{CIRCUITS!r}][{key!r}]; run cellcircuits.tl.trace_circuit first."
        if have:
            msg += f" Stored circuits: {have}."
        raise KeyError(msg)
    return store[key]


def circuit_genes(adata: AnnData, key: str) -> pd.DataFrame:
    """The per-cell gene table of the circuit ``key`` (every gene of each traced sentence); clear error if absent."""
    result = circuit_result(adata, key)
    if "genes" not in result:
        msg = f"The circuit under .uns[{CIRCUITS!r}][{key!r}] has no per-cell gene table; trace it again."
        raise KeyError(msg)
    return result["genes"]


#: Entries of a stored circuit written by later tools.
GENE_VALIDATION = "gene_validation"
GENE_RANKING = "gene_ranking"


def gene_validation(adata: AnnData, key: str) -> dict:
    """What :func:`cellcircuits.tl.validate_circuit_genes` stored for the circuit ``key``; clear error if absent."""
    result = circuit_result(adata, key)
    if GENE_VALIDATION not in result:
        msg = f"No gene knockouts for the circuit {key!r}; run cellcircuits.tl.validate_circuit_genes first."
        raise KeyError(msg)
    return result[GENE_VALIDATION]


def gene_ranking(adata: AnnData, key: str, key_added: str = GENE_RANKING) -> dict:
    """What :func:`cellcircuits.tl.rank_circuit_genes` stored for circuit ``key`` under ``key_added``, or an error."""
    result = circuit_result(adata, key)
    if key_added not in result or "table" not in result[key_added]:
        msg = (
            f"No gene ranking under .uns[{CIRCUITS!r}][{key!r}][{key_added!r}]; run "
            f"cellcircuits.tl.rank_circuit_genes first (key_added={key_added!r})."
        )
        raise KeyError(msg)
    return result[key_added]


def store_circuit(adata: AnnData, key: str, result: dict) -> None:
    """Put a circuit under ``.uns["circuits"][key]``, keeping the other stored circuits."""
    circuits = dict(adata.uns.get(CIRCUITS, {}))
    circuits[key] = result
    adata.uns[CIRCUITS] = circuits


# h5ad-safe params
def h5ad_safe(value: Any) -> Any:
    """``value`` with ``None`` (which .h5ad cannot hold) written as ``""``, recursively through dicts."""
    if isinstance(value, dict):
        return {str(k): h5ad_safe(v) for k, v in value.items()}
    return "" if value is None else value


_OPTIONAL_BOOL = {True: 1, False: 0, None: -1}


def encode_optional_bool(value: bool | None) -> int:
    """``True``/``False``/``None`` as ``1``/``0``/``-1`` (an .h5ad attribute cannot hold ``None``)."""
    return _OPTIONAL_BOOL[value]


def decode_optional_bool(value: Any) -> bool | None:
    """Inverse of :func:`encode_optional_bool`; also accepts a stored ``bool`` or ``None``."""
    if value is None or isinstance(value, bool | np.bool_):
        return None if value is None else bool(value)
    return {1: True, 0: False}.get(int(value))


@dataclass(frozen=True)
class SentenceSettings:
    """How a tool got its cells' sentences and built their prompts.

    Sentences are read from ``.obs[sentence_key]`` when present, else built from these settings.
    """

    sentence_key: str = "cell_sentence"
    """Column of ``.obs`` with cell sentences, used when present."""
    layer: str | None = None
    """AnnData layer ranked when sentences are built (``None``: ``.raw`` when present, else ``.X``)."""
    use_raw: bool | None = None
    """Rank ``.raw`` (``None``: when present)."""
    gene_symbols: str | None = None
    """Column of ``.var`` with gene symbols (``None``: ``var_names``)."""
    random_state: int = 0
    """Seed of the random order of equally expressed genes."""
    organism: str | None = None
    """Organism named in the prompts (``None``: the model's ``prompt.organism``)."""

    def __post_init__(self) -> None:
        if self.layer is not None and not isinstance(self.layer, str):
            msg = f"layer={self.layer!r} names an AnnData layer (a string); model layers are chosen with layers=[...]."
            raise TypeError(msg)

    def to_params(self) -> dict[str, Any]:
        """h5ad-safe form, stored in a tool's ``params`` so a later tool rebuilds the same sentences."""
        out = h5ad_safe(asdict(self))
        out["use_raw"] = encode_optional_bool(self.use_raw)
        out["random_state"] = int(self.random_state)
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, Any], random_state: int | None = None) -> SentenceSettings:
        """Read the settings :meth:`to_params` stored; ``random_state`` for params stored without one."""
        seed = params.get("random_state", random_state if random_state is not None else 0)
        return cls(
            sentence_key=str(params.get("sentence_key", "cell_sentence")),
            layer=str(params.get("layer", "")) or None,
            use_raw=decode_optional_bool(params.get("use_raw", -1)),
            gene_symbols=str(params.get("gene_symbols", "")) or None,
            random_state=int(seed),
            organism=str(params.get("organism", "")) or None,
        )
