"""Circuits of cell-type calls: per-cell attribution graphs named by genes, aggregated per group of cells."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._keys import SentenceSettings, store_circuit
from ..circuits._select import AUTO, DEFAULT_BATCH_SIZE, DEFAULT_FEATURE_NODES, check_graph_size
from ..circuits._trace import NODE_COLUMNS, check_n_jobs, check_thresholds, label_index, trace_prompts
from ..models._hooks import one_at_a_time
from ..pp._sentences import check_writable
from ._cells import cell_prompts, check_cells, check_unique_obs_names

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ..circuits._trace import TargetMode
    from ..models._load import C2SModel
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
    picked: list[np.ndarray] = []
    group_of: list[str] = []
    for g in chosen:
        members = np.flatnonzero((labels.astype(str) == g).to_numpy() & labels.notna().to_numpy())
        if len(members) == 0:
            msg = f"group {g!r} has no cells in .obs[{groupby!r}]; groups are {sorted(present.unique())}"
            raise ValueError(msg)
        pick = np.sort(rng.permutation(members)[:n_cells])
        picked.append(pick)
        group_of += [g] * len(pick)
    return np.concatenate(picked), np.asarray(group_of, dtype=object)


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


@one_at_a_time
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
    target_mode: TargetMode = "distinguishing",
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_feature_nodes: int = DEFAULT_FEATURE_NODES,
    n_paths: int = 10,
    batch_size: int = DEFAULT_BATCH_SIZE,
    memory_budget: int | str | None = AUTO,
    n_jobs: int | None = None,
    sentence_key: str = "cell_sentence",
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    random_state: int = 0,
    organism: str | None = None,
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

    Many cells: run the same script under ``torchrun --nproc_per_node N`` (each process on its own device). Every
    rank traces a contiguous share of the selected cells and every rank stores the tables of all of them, equal to
    a one-process run; write files from rank 0 only (``torch.distributed.get_rank() == 0``).

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
        Features per cell given full attribution rows, chosen by estimated influence. The default (1024) is the
        smallest size at which the shipped model's graphs reach a median completeness of 0.90; fewer nodes trace
        faster and leave more of the MLP outputs to the error nodes (``completeness_score`` in ``cells``).
    n_paths
        Strongest source-to-target paths kept per group (greedy search over the aggregated graph).
    batch_size
        Most targets per backward pass; memory grows with it. Features are also selected in rounds of at most
        ``batch_size`` (an eighth of ``max_feature_nodes``, at least 32), the influence estimate updated after each.
    memory_budget
        Bytes of attribution rows per cell kept on the model's device (an int, or a size such as ``"8GB"``); rows
        past it are kept in host memory. ``"auto"``: on a GPU, up to half its free memory when a cell's rows are
        allocated; ``None``: all on the device. Rows that fit neither there nor in the host's available memory are
        refused with a MemoryError (lower ``max_feature_nodes`` or ``n_genes``).
    n_jobs
        Cells whose graphs are built at once, each in a thread sharing torch's CPU threads (``None``: 1); see
        :func:`cellcircuits.circuits.trace_prompts`. Faster on a CPU, same tables; memory grows with it.
    sentence_key, layer, use_raw, gene_symbols, random_state
        Cell sentences, as in :func:`cellcircuits.tl.transcode`; ``random_state`` also seeds the cell sampling.
    organism
        Organism named in the prompts (C2S models trained on human and mouse cells read it); default the model's
        ``prompt.organism``.
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
    ``genes`` : :class:`pandas.DataFrame`
        Per traced cell and every gene of its sentence, kept by pruning or not: ``obs_name``, ``group``, ``gene``,
        ``rank`` (position in the sentence, 0 first), ``n_tokens``, ``influence`` and signed ``attribution`` in the
        cell's whole graph (what :func:`cellcircuits.tl.rank_circuit_genes` ranks).
    ``params`` : :class:`dict`
        The settings, the model, ``n_layers`` and ``uncovered_layers``.

    Raises
    ------
    ValueError
        For a target label the model does not know, a group without cells, thresholds outside ``(0, 1]``,
        ``max_feature_nodes`` or ``n_jobs`` below 1, a malformed ``memory_budget``, a prompt longer than the model's
        context,
        transcoders made for another model, duplicate ``obs_names`` (the traced cells are stored by obs name, and
        :func:`cellcircuits.tl.validate_circuit` finds them by it), or, when sentences are built, gene names that
        are not usable symbols (see :func:`cellcircuits.pp.cell_sentences`). Nothing is written to ``adata`` when
        an error is raised.
    KeyError
        For a ``groupby`` column or ``cells`` not in ``adata``.
    """
    check_thresholds(node_threshold, edge_threshold)
    check_graph_size(max_feature_nodes, memory_budget)
    check_n_jobs(n_jobs)
    adapter = model.adapter
    transcoders.check_model(model)
    check_cells(adata, batch_size)
    check_unique_obs_names(adata, "trace_circuit")
    check_writable(adata, copy, "trace_circuit")
    if target is not None:
        label_index(model, target)
    rows, group_of = select_cells(adata, groupby, groups, cells, n_cells, random_state)
    cell_labels = np.full(len(rows), target, dtype=object) if target is not None else group_of
    for label in pd.unique(cell_labels):
        label_index(model, str(label))
    sentences = SentenceSettings(sentence_key, layer, use_raw, gene_symbols, random_state, organism)
    prompts = cell_prompts(adata, model, sentences, cells=rows)
    traced = trace_prompts(
        model, transcoders, prompts, [str(label) for label in cell_labels], group_of.astype(str),
        target_mode=target_mode, node_threshold=node_threshold, edge_threshold=edge_threshold,
        max_feature_nodes=max_feature_nodes, n_paths=n_paths, batch_size=batch_size, memory_budget=memory_budget,
        n_jobs=n_jobs, progress=progress,
    )  # fmt: skip
    nodes = annotate(traced.nodes, adata, interpret_key)[
        [*NODE_COLUMNS, "frequency", "label", "is_marker", "marker_sets"]
    ]
    cell_table = traced.cells
    obs_names = adata.obs_names[rows].astype(str).to_numpy()
    cell_table.insert(0, "obs_name", obs_names)
    genes = traced.genes.copy()
    genes.insert(0, "obs_name", obs_names[genes.pop("cell").to_numpy()])

    adata = adata.copy() if copy else adata
    key = key_added or (target if target is not None else (groupby or "circuit"))
    store_circuit(
        adata,
        key,
        {
            "nodes": nodes,
            "edges": traced.edges,
            "paths": traced.paths,
            "cells": cell_table,
            "genes": genes,
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
                "uncovered_layers": np.asarray(traced.uncovered_layers, dtype=np.int64),
                "random_state": int(random_state),
                # how the cells' sentences were made, so validate_circuit rebuilds the same prompts
                "sentences": sentences.to_params(),
            },
        },
    )
    return adata if copy else None
