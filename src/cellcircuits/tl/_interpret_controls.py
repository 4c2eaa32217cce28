"""What the interpretation summary ranks features by and measures them against.

Their use in the traced circuits, and the enrichment of the same gene maps with their gene labels shuffled (the
null an enrichment count must beat).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
import pandas as pd

from .._keys import circuit_keys, circuit_result, features_obsm, gene_map, gene_map_varm
from ._enrichment import as_net, feature_enrichment

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ._enrichment import NetLike


# circuit use
def chosen_circuits(adata: AnnData, circuits: str | Sequence[str] | None) -> list[str]:
    """The keys of ``.uns["circuits"]`` to sum feature influence over (default all stored), each checked to exist."""
    keys = circuit_keys(adata) if circuits is None else [circuits] if isinstance(circuits, str) else list(circuits)
    for key in keys:
        circuit_result(adata, key)  # a clear KeyError for a circuit that is not stored
    return [str(k) for k in keys]


def circuit_influence(adata: AnnData, keys: Sequence[str]) -> pd.Series | None:
    """Per ``(layer, feature)``, the summed ``influence`` of its feature nodes over every group of the circuits.

    A feature holds one node per position it fires at (``"L2.F7@LYZ"``, ``"L2.F7@answer"``); each node's influence
    is its mean over the group's traced cells. ``None`` when no circuit is given.
    """
    if not keys:
        return None
    parts = []
    for key in keys:
        nodes = pd.DataFrame(circuit_result(adata, key)["nodes"])
        parts.append(nodes.loc[nodes["kind"] == "feature", ["layer", "feature", "influence"]])
    used = pd.concat(parts, ignore_index=True)
    used = used.astype({"layer": np.int64, "feature": np.int64, "influence": np.float64})
    return used.groupby(["layer", "feature"])["influence"].sum()


def layer_influence(influence: pd.Series | None, layer: int, n_features: int) -> np.ndarray:
    """``(n_features,)`` summed circuit influence of a layer's features: 0 outside the circuits, NaN without any."""
    out = np.full(n_features, np.nan if influence is None else 0.0)
    if influence is not None and layer in influence.index.get_level_values("layer"):
        of_layer = influence.xs(layer, level="layer")
        inside = of_layer.index.to_numpy()
        keep = (inside >= 0) & (inside < n_features)
        out[inside[keep]] = of_layer.to_numpy()[keep]
    return out


# shuffled gene labels
def shuffled_map_adata(adata: AnnData, key: str, layer: int, side: Literal["in", "out"], random_state: int) -> AnnData:
    """An AnnData holding one gene map whose rows are permuted among the genes the model saw, and what enrichment reads.

    Permuting the rows gives every gene another gene's values: the maps keep their distributions, and the genes
    the enrichment tests lose any link to them. Genes the model never saw keep their (zero) rows, so the tested
    universe stays the same.
    """
    from anndata import AnnData

    maps = gene_map(adata, key, layer, side)
    unseen = set(np.asarray(adata.uns.get(key, {}).get("unseen_genes", []), dtype=str))
    seen = np.flatnonzero(~pd.Index(np.asarray(adata.var_names, dtype=str)).isin(list(unseen)))
    rng = np.random.default_rng([int(random_state), int(layer)])
    rows = np.arange(adata.n_vars)
    rows[seen] = seen[rng.permutation(len(seen))]
    obs = pd.DataFrame(index=pd.RangeIndex(adata.n_obs).astype(str))  # obs names are not read; may repeat
    shuffled = AnnData(obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))
    shuffled.varm[gene_map_varm(key, layer, side)] = maps[rows]
    obsm_key = features_obsm(key, layer)
    if obsm_key in adata.obsm:
        shuffled.obsm[obsm_key] = adata.obsm[obsm_key]
    shuffled.uns[key] = {"unseen_genes": np.asarray(sorted(unseen), dtype=str)}
    return shuffled


def shuffled_enrichment(adata: AnnData, enrichment_key: str, net: NetLike, random_state: int) -> pd.DataFrame:
    """The ``best`` table of the enrichment under ``enrichment_key`` re-run on its map with shuffled gene labels.

    The same features, method, genes per feature and set sizes as the stored run; ``net`` is the gene-set
    collection (a warning says so when the stored run names another).
    """
    stored = adata.uns[enrichment_key]
    params = stored["params"]
    tested = np.asarray(stored["best"]["feature"], dtype=np.int64)
    if len(tested) == 0:
        return pd.DataFrame(stored["best"]).copy()
    key, layer = str(params["key"]), int(params["layer"])
    side = cast('Literal["in", "out"]', str(params["side"]))
    net_df, label = as_net(net)
    if str(params.get("net", label)) != label:
        warnings.warn(
            f".uns[{enrichment_key!r}] was run with the gene sets {params['net']!r}; its shuffled-label control uses "
            f"{label!r}, the net given to interpret_features",
            stacklevel=3,
        )
    shuffled = shuffled_map_adata(adata, key, layer, side, random_state)
    feature_enrichment(
        shuffled, net_df, layers=layer, side=side, method=str(params["method"]),  # type: ignore[arg-type]
        n_top_genes=int(params["n_top_genes"]), features=tested.tolist(),
        key=key, min_size=int(params.get("min_size", 5)), max_size=int(params.get("max_size", 500)),
        key_added="shuffled", progress=False,
    )  # fmt: skip
    return shuffled.uns["shuffled"]["best"]


# the summary
def fraction(rows: pd.DataFrame, column: str) -> float:
    """Mean of a boolean column over ``rows``; NaN for no rows or an absent column."""
    return float(rows[column].astype(float).mean()) if len(rows) and column in rows else np.nan


def enriched_fractions(table: pd.DataFrame, n_top: int) -> dict[str, float | int]:
    """The fractions enriched of three sets of a layer's features, each with its shuffled-label control.

    The sets: the ``n_top`` most active live features, every live feature, and the ``n_top`` features of most
    circuit influence; also how many features the circuits use.
    """
    live = table[table["live"]]
    influence = table["circuit_influence"] if "circuit_influence" in table else pd.Series(np.nan, index=table.index)
    used = table[influence > 0]
    subsets = {
        f"top{n_top}": live.nlargest(n_top, "mean_activation"),
        "live": live,
        f"top{n_top}_circuit": used.nlargest(n_top, "circuit_influence") if len(used) else used,
    }
    out: dict[str, float | int] = {}
    for name, rows in subsets.items():
        out[f"fraction_enriched_{name}"] = fraction(rows, "enriched")
        out[f"fraction_enriched_{name}_shuffled"] = fraction(rows, "enriched_shuffled")
    out["n_circuit_features"] = len(used)
    return out
