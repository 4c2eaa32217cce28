"""Circuits of cell-type calls: per-cell attribution graphs named by genes, aggregated per group of cells."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from ..circuits._graph import attribution_graph
from ..circuits._replacement import ReplacementModel
from ..circuits._targets import LogitTarget, label_target
from ..models._tokens import label_token_ids
from ._cells import cell_prompts, check_cells

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ..circuits._graph import Graph
    from ..models._load import C2SModel
    from ..models._tokens import TokenizedPrompt
    from ..transcoders._transcoder_set import TranscoderSet

MARKER_COLLECTIONS = ("markers_immune", "markers_heart")


# cells and targets
def select_cells(
    adata: AnnData,
    groupby: str | None,
    groups: Sequence[str] | None,
    cells: Sequence | np.ndarray | None,
    n_cells: int,
    random_state: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the cells to trace and the group of each, checked before any work."""
    if groupby is not None and groupby not in adata.obs.columns:
        msg = f"groupby {groupby!r} is not a column of .obs; columns are {list(adata.obs.columns)}"
        raise KeyError(msg)
    labels = adata.obs[groupby].astype("object") if groupby is not None else pd.Series("all", index=adata.obs_names)
    if cells is not None:
        rows = _cell_rows(adata, cells)
        return rows, labels.iloc[rows].astype(str).to_numpy()
    if n_cells < 1:
        msg = f"n_cells must be at least 1, got {n_cells}"
        raise ValueError(msg)
    present = labels.dropna().astype(str)
    chosen = list(pd.unique(present)) if groups is None else [str(g) for g in groups]
    rng = np.random.default_rng(random_state)
    rows, group_of = [], []
    for g in chosen:
        members = np.flatnonzero((labels.astype(str) == g).to_numpy() & labels.notna().to_numpy())
        if len(members) == 0:
            msg = f"group {g!r} has no cells in .obs[{groupby!r}]; groups are {sorted(present.unique())}"
            raise ValueError(msg)
        pick = np.sort(rng.permutation(members)[:n_cells])
        rows.append(pick)
        group_of += [g] * len(pick)
    return np.concatenate(rows), np.asarray(group_of, dtype=object)


def _cell_rows(adata: AnnData, cells: Sequence | np.ndarray) -> np.ndarray:
    cells = np.asarray(cells)
    if cells.dtype == bool:
        if cells.shape != (adata.n_obs,):
            msg = f"a boolean cells mask needs {adata.n_obs} entries, got {cells.shape}"
            raise ValueError(msg)
        rows = np.flatnonzero(cells)
    elif np.issubdtype(cells.dtype, np.integer):
        bad = cells[(cells < 0) | (cells >= adata.n_obs)]
        if len(bad):
            msg = f"cells {bad[:5].tolist()} are outside the {adata.n_obs} cells of adata"
            raise IndexError(msg)
        rows = cells.astype(np.int64)
    else:
        index = adata.obs_names.get_indexer(cells.astype(str))
        if (index < 0).any():
            missing = cells[index < 0][:5].tolist()
            msg = f"cells {missing} are not in adata.obs_names"
            raise KeyError(msg)
        rows = index.astype(np.int64)
    if len(rows) == 0:
        msg = "cells selects no cell"
        raise ValueError(msg)
    return rows


def label_index(model: C2SModel, label: str) -> int:
    """Position of ``label`` among the model's labels; a clear error listing them when it is not one."""
    labels = list(model.prompt.labels or [])
    if label not in labels:
        msg = f"target {label!r} is not a label the model knows; its labels are {labels}"
        raise ValueError(msg)
    return labels.index(label)


def position_roles(prompt: TokenizedPrompt, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position, the gene it spells (``""`` if none) and its role: gene, template, answer or label prefix."""
    gene = np.full(n_positions, "", dtype=object)
    role = np.full(n_positions, "template", dtype=object)
    for g, pos in zip(prompt.genes, prompt.gene_positions, strict=True):
        gene[pos] = g
        role[pos] = "gene"
    role[prompt.answer_position] = "answer"
    role[prompt.answer_position + 1 :] = "label"
    return gene, role


def node_names(
    kind: np.ndarray, layer: np.ndarray, feature: np.ndarray, gene: np.ndarray, role: np.ndarray, label: str
) -> np.ndarray:
    """Names that identify a node across cells: a gene, a feature at a gene or role, an error at a gene or role."""
    where = np.where(gene != "", gene, role)
    names = []
    for k, lay, f, w, g in zip(kind, layer, feature, where, gene, strict=True):
        if k == "target":
            names.append(f"target:{label}")
        elif k == "token":
            names.append(f"gene:{g}" if g else f"token:{w}")
        elif k == "feature":
            names.append(f"L{lay}.F{f}@{w}")
        else:
            names.append(f"err L{lay}@{w}")
    return np.asarray(names, dtype=object)


def merge_nodes(table: pd.DataFrame, *, activation: str, **extra: tuple[str, str]) -> pd.DataFrame:
    """Rows of one node name merged into one: description kept, influence and attribution summed.

    Activations are combined by ``activation`` (``"max"`` over a cell's positions, ``"mean"`` over cells); ``extra``
    adds named aggregations.
    """
    described = {c: (c, "first") for c in ("kind", "layer", "feature", "gene", "role")}
    return table.groupby("node", sort=False).agg(
        **described,
        influence=("influence", "sum"),
        attribution=("attribution", "sum"),
        activation=("activation", activation),
        **extra,
    )


# one cell
def cell_graph_tables(
    graph: Graph, prompt: TokenizedPrompt, label: str, n_positions: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A cell's pruned graph with nodes named across cells; nodes of one name (a gene's tokens) are merged."""
    nodes = graph.nodes
    gene_at, role_at = position_roles(prompt, n_positions)
    pos = nodes["position"].to_numpy()
    gene, role = gene_at[pos], role_at[pos]
    kind = nodes["kind"].to_numpy(dtype=object)
    role = np.where(kind == "target", "target", role)
    gene = np.where(kind == "target", "", gene)
    names = node_names(kind, nodes["layer"].to_numpy(), nodes["feature"].to_numpy(), gene, role, label)
    shown_kind = np.where((kind == "token") & (gene != ""), "gene", kind)
    table = pd.DataFrame(
        {
            "node": names,
            "kind": shown_kind,
            "layer": np.where(kind == "token", -1, nodes["layer"].to_numpy()),
            "feature": nodes["feature"].to_numpy(),
            "gene": gene,
            "role": role,
            "influence": nodes["influence"].to_numpy(),
            "attribution": nodes["effect"].to_numpy(),
            "activation": nodes["activation"].to_numpy(),
        }
    )
    merged = merge_nodes(table, activation="max")
    edges = graph.edges
    e = pd.DataFrame(
        {
            "source": names[edges["source"].to_numpy()],
            "target": names[edges["target"].to_numpy()],
            "weight": edges["weight"].to_numpy(),
            "via": edges["via"].to_numpy(),
            "abs": np.abs(edges["weight"].to_numpy()),
        }
    )
    e = e[e["source"] != e["target"]]
    # the via of a merged edge is that of its largest part
    e = e.sort_values("abs", ascending=False)
    merged_edges = e.groupby(["source", "target"], sort=False).agg(weight=("weight", "sum"), via=("via", "first"))
    return merged.reset_index(), merged_edges.reset_index()


# many cells
def aggregate(tables: list[tuple[pd.DataFrame, pd.DataFrame]], groups: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per group: mean over its cells (absent counts as 0), the fraction of cells holding each node or edge."""
    node_parts, edge_parts = [], []
    for g in pd.unique(groups):
        members = [tables[i] for i in np.flatnonzero(groups == g)]
        n = len(members)
        nodes = pd.concat([t[0] for t in members], ignore_index=True)
        agg = merge_nodes(nodes, activation="mean", frequency=("influence", "size"))
        agg[["influence", "attribution"]] /= n
        agg["frequency"] = agg["frequency"] / n
        node_parts.append(agg.reset_index().assign(group=g))
        edges = pd.concat([t[1] for t in members], ignore_index=True)
        edges["abs"] = edges["weight"].abs()
        by_via = edges.groupby(["source", "target", "via"], sort=False)["abs"].sum().reset_index()
        by_via = by_via.sort_values("abs", ascending=False)
        via = by_via.groupby(["source", "target"], sort=False).agg(via=("via", "first"), top=("abs", "first"))
        total = by_via.groupby(["source", "target"], sort=False)["abs"].sum()
        e = edges.groupby(["source", "target"], sort=False).agg(weight=("weight", "sum"), frequency=("weight", "size"))
        e["weight"] /= n
        e["frequency"] /= n
        e = e.join(via)
        e["via_share"] = e.pop("top") / total.reindex(e.index).clip(lower=1e-30)
        edge_parts.append(e.reset_index().assign(group=g))
    nodes = pd.concat(node_parts, ignore_index=True)
    edges = pd.concat(edge_parts, ignore_index=True)
    nodes = nodes.sort_values(["group", "influence"], ascending=[True, False], kind="stable", ignore_index=True)
    edges = edges.assign(_abs=-edges["weight"].abs()).sort_values(["group", "_abs"], kind="stable")
    return nodes, edges.drop(columns="_abs").reset_index(drop=True)


def top_paths(nodes: pd.DataFrame, edges: pd.DataFrame, k: int) -> pd.DataFrame:
    """Per group, the ``k`` strongest source-to-target paths of its aggregated graph (greedy search)."""
    from scipy import sparse

    from ..circuits._prune import greedy_paths

    kind_of = {"gene": "token", "token": "token", "feature": "feature", "error": "error", "target": "target"}
    rows = []
    for g, n in nodes.groupby("group", sort=False):
        e = edges[edges["group"] == g]
        index = {name: i for i, name in enumerate(n["node"])}
        A = sparse.csr_array(
            (e["weight"].to_numpy(), (e["target"].map(index).to_numpy(), e["source"].map(index).to_numpy())),
            shape=(len(n), len(n)),
        )
        target = int(np.flatnonzero(n["kind"].to_numpy() == "target")[0])
        names = n["node"].to_numpy()
        for rank, path in enumerate(greedy_paths(A, n["kind"].map(kind_of).to_numpy(), target, k=k)):
            rows.append(
                {
                    "group": g,
                    "rank": rank,
                    "path": " -> ".join(names[path.nodes]),
                    "score": path.score,
                    "sign": path.sign,
                    "n_edges": len(path.nodes) - 1,
                }
            )
    return pd.DataFrame(rows, columns=["group", "rank", "path", "score", "sign", "n_edges"])


def annotate(nodes: pd.DataFrame, adata: AnnData, interpret_key: str) -> pd.DataFrame:
    """Add feature labels (from :func:`cellcircuits.tl.interpret_features` when present) and marker flags."""
    from .. import ds

    labels: dict[tuple[int, int], str] = {}
    if interpret_key in adata.uns and "features" in adata.uns[interpret_key]:
        f = pd.DataFrame(adata.uns[interpret_key]["features"])
        labels = dict(zip(zip(f["layer"].astype(int), f["feature"].astype(int), strict=True), f["label"], strict=True))
    nodes["label"] = [
        str(labels.get((int(lay), int(feat)), "")) if k == "feature" else ""
        for k, lay, feat in zip(nodes["kind"], nodes["layer"], nodes["feature"], strict=True)
    ]
    sets_of: dict[str, list[str]] = {}
    for collection in MARKER_COLLECTIONS:
        for name, genes in ds.gene_sets(collection).items():
            for g in genes:
                sets_of.setdefault(g, []).append(name)
    nodes["marker_sets"] = [";".join(sets_of.get(g, [])) if g else "" for g in nodes["gene"]]
    nodes["is_marker"] = (nodes["marker_sets"] != "") & (nodes["kind"] == "gene")
    return nodes


def trace_circuit(
    adata: AnnData,
    model: C2SModel,
    transcoders: TranscoderSet,
    target: str | None = None,
    *,
    groupby: str | None = None,
    groups: Sequence[str] | None = None,
    cells: Sequence | np.ndarray | None = None,
    n_cells: int = 20,
    target_mode: Literal["distinguishing", "first_token"] = "distinguishing",
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_feature_nodes: int = 128,
    n_paths: int = 10,
    batch_size: int = 32,
    sentence_key: str = "cell_sentence",
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    random_state: int = 0,
    interpret_key: str = "interpret_features",
    key_added: str | None = None,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Trace the circuit by which the model calls cells a cell type.

    For each selected cell, every MLP is replaced by its transcoder plus an error term, attention patterns and layer
    norm scales are frozen, and the target (the label's logit difference at the token where it parts from the
    other labels) is attributed exactly to gene tokens, transcoder features at each position and error nodes. The
    graph keeps the features of most influence, is pruned by cumulative influence, and its nodes are named by the
    gene (or prompt role) at their position, so cells can be compared: per group, attributions are averaged over
    cells (a node absent from a cell counts 0) and each node's frequency is the fraction of cells holding it.

    Parameters
    ----------
    adata
        Annotated data matrix.
    model
        The C2S model.
    transcoders
        Transcoders of the model's MLPs; layers without one enter the graph as error nodes (with a warning).
    target
        The cell-type label traced; ``None`` traces each group to its own name (the groups must be labels).
    groupby
        Column of ``.obs`` with the groups (e.g. cell types); circuits are aggregated per group.
    groups
        Groups traced; default all.
    cells
        Cells to trace instead of sampling per group: obs names, integer rows or a boolean mask.
    n_cells
        Cells sampled per group.
    target_mode
        ``"distinguishing"``: the logit difference at the first token where the label parts from the others (shared
        prefix teacher-forced); ``"first_token"``: the plain logit of the label's first token.
    node_threshold, edge_threshold
        Fractions of influence kept by pruning, in ``(0, 1]``.
    max_feature_nodes
        Features per cell given full attribution rows, chosen by estimated influence.
    n_paths
        Strongest source-to-target paths kept per group (greedy search over the aggregated graph).
    batch_size
        Targets per backward pass.
    sentence_key, layer, use_raw, gene_symbols, random_state
        Cell sentences, as in :func:`cellcircuits.tl.transcode`; ``random_state`` also seeds the cell sampling.
    interpret_key
        Where :func:`cellcircuits.tl.interpret_features` stored its table; feature nodes take its labels.
    key_added
        Key in ``.uns["circuits"]``; default the target label, or ``groupby`` when tracing each group's own label.
    progress
        Show a progress bar.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets ``.uns["circuits"][key_added]``, a dict of:

    ``nodes`` : :class:`pandas.DataFrame`
        One row per group and node: ``group``, ``node`` (``"gene:LYZ"``, ``"L2.F123@LYZ"``, ``"err L1@answer"``,
        ``"token:template"``, ``"target:<label>"``), ``kind`` (gene, token, feature, error, target), ``layer``,
        ``feature``, ``gene``, ``role`` (gene, template, answer, label, target), ``influence`` (on the target),
        ``attribution`` (signed part of the target flowing from the node), ``activation``, ``frequency``,
        ``label`` (the feature's automatic label), ``is_marker`` and ``marker_sets`` (shipped marker sets
        holding the gene).
    ``edges`` : :class:`pandas.DataFrame`
        ``group``, ``source``, ``target``, ``weight`` (mean direct attribution), ``frequency``, ``via`` (the
        attention head of the first hop, ``"residual"`` or ``"skip"``) and ``via_share``.
    ``paths`` : :class:`pandas.DataFrame`
        Per group, the ``n_paths`` strongest paths from a gene, token or error node to the target: ``rank``,
        ``path`` (node names joined by ``" -> "``), ``score`` (product of the normalised absolute edge weights:
        the path's share of the target's influence), ``sign`` and ``n_edges``.
    ``cells`` : :class:`pandas.DataFrame`
        Per traced cell: ``obs_name``, ``group``, ``label``, ``target_value`` and the graph's ``replacement_score``
        and ``completeness_score`` (whole graph, and ``*_pruned``).
    ``params`` : :class:`dict`
        The settings, the model, ``n_layers`` and ``uncovered_layers``.

    Raises
    ------
    ValueError
        For a target label the model does not know, a group without cells, thresholds outside ``(0, 1]``, or
        transcoders made for another model.
    KeyError
        For a ``groupby`` column or ``cells`` not in ``adata``.
    """
    from tqdm.auto import tqdm

    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < value <= 1:
            msg = f"{name} must be in (0, 1] (a fraction of the influence to keep), got {value!r}"
            raise ValueError(msg)
    adapter = model.adapter
    transcoders.check_compatible(n_layers=adapter.n_layers, d_model=adapter.d_model)
    check_cells(adata, batch_size)
    if target is not None:
        label_index(model, target)
    rows, group_of = select_cells(adata, groupby, groups, cells, n_cells, random_state)
    cell_labels = np.full(len(rows), target, dtype=object) if target is not None else group_of
    for label in pd.unique(cell_labels):
        label_index(model, str(label))
    uncovered = [m for m in range(adapter.n_layers) if m not in transcoders]
    if uncovered:
        warnings.warn(
            f"no transcoder for layer(s) {uncovered}: their MLP outputs are frozen and enter the graph as error nodes",
            stacklevel=2,
        )

    all_label_ids = label_token_ids(model.tokenizer, model.prompt, model.prompt.labels)
    prompts = cell_prompts(
        adata, model, sentence_key=sentence_key, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols,
        random_state=random_state, cells=rows,
    )  # fmt: skip
    tables, cell_rows = [], []
    for prompt, row, label in tqdm(
        list(zip(prompts, rows, cell_labels, strict=True)), desc="trace", disable=not progress
    ):
        lt = label_target(all_label_ids, label_index(model, str(label)), target_mode)
        ids = list(prompt.input_ids) + lt.prefix
        rm = ReplacementModel.record(model, transcoders, ids)
        graph = attribution_graph(
            rm, LogitTarget(len(ids) - 1, lt.token, lt.competitors), max_feature_nodes=max_feature_nodes,
            batch_size=batch_size, node_threshold=node_threshold, edge_threshold=edge_threshold,
        )  # fmt: skip
        tables.append(cell_graph_tables(graph, prompt, str(label), len(ids)))
        cell_rows.append(
            {
                "obs_name": str(adata.obs_names[row]),
                "label": str(label),
                "target_value": graph.target_value,
                **{f"{k}_score": v for k, v in graph.scores.items()},
            }
        )
    nodes, edges = aggregate(tables, group_of.astype(str))
    nodes = annotate(nodes, adata, interpret_key)
    columns = ["group", "node", "kind", "layer", "feature", "gene", "role", "influence", "attribution", "activation"]
    nodes = nodes[[*columns, "frequency", "label", "is_marker", "marker_sets"]]
    edges = edges[["group", "source", "target", "weight", "frequency", "via", "via_share"]]
    paths = top_paths(nodes, edges, n_paths)
    cell_table = pd.DataFrame(cell_rows)
    cell_table.insert(1, "group", group_of.astype(str))
    nodes.loc[nodes["kind"] == "target", "layer"] = adapter.n_layers

    adata = adata.copy() if copy else adata
    key = key_added or (target if target is not None else (groupby or "circuit"))
    circuits = dict(adata.uns.get("circuits", {}))
    circuits[key] = {
        "nodes": nodes.reset_index(drop=True),
        "edges": edges,
        "paths": paths,
        "cells": cell_table,
        "params": {
            "target": target or "",
            "target_mode": target_mode,
            "groupby": groupby or "",
            "groups": np.asarray(pd.unique(group_of.astype(str)), dtype=str),
            "n_cells": int(n_cells),
            "node_threshold": float(node_threshold),
            "edge_threshold": float(edge_threshold),
            "max_feature_nodes": int(max_feature_nodes),
            "model": model.name,
            "n_layers": int(adapter.n_layers),
            "uncovered_layers": np.asarray(uncovered, dtype=np.int64),
            "random_state": int(random_state),
            # how the cells' sentences were made, so validate_circuit rebuilds the same prompts
            "sentences": {
                "sentence_key": sentence_key,
                "layer": layer or "",
                "use_raw": {True: 1, False: 0, None: -1}[use_raw],
                "gene_symbols": gene_symbols or "",
            },
        },
    }
    adata.uns["circuits"] = circuits
    return adata if copy else None
