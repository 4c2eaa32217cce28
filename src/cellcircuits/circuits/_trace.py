"""Tracing cell-type calls over many prompts: one attribution graph per prompt, named by genes, aggregated per group.

Works on tokenized prompts alone (circuit-tracer's ``attribute(prompt, model)`` habit);
:func:`cellcircuits.tl.trace_circuit` is the AnnData adapter that picks cells, builds their prompts and stores the
tables.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch

from .._compat import warn_at_caller
from ..models._distributed import all_gather_bytes, frames_from_bytes, frames_to_bytes, is_distributed, my_shard
from ..models._hooks import one_at_a_time
from ..models._tokens import label_token_ids
from ._aggregate import aggregate, cell_gene_table, cell_graph_tables, top_paths
from ._graph import attribution_graph
from ._replacement import ReplacementModel
from ._select import AUTO, DEFAULT_BATCH_SIZE, DEFAULT_FEATURE_NODES, check_graph_size
from ._targets import LogitTarget, label_target

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from ..models._load import C2SModel
    from ..models._tokens import TokenizedPrompt
    from ..transcoders._transcoder_set import TranscoderSet
    from ._graph import Graph
    from ._targets import LabelTarget

TargetMode = Literal["distinguishing", "first_token"]


def as_target_mode(mode: str) -> TargetMode:
    """``mode`` (e.g. read back from a stored circuit's parameters) as a :data:`TargetMode`; unknown ones are refused.

    Raises
    ------
    ValueError
        For a mode other than ``"distinguishing"`` and ``"first_token"``, as :func:`label_target` does.
    """
    if mode == "distinguishing":
        return "distinguishing"
    if mode == "first_token":
        return "first_token"
    msg = f"mode must be 'distinguishing' or 'first_token', got {mode!r}"
    raise ValueError(msg)


#: Columns of the aggregated node and edge tables, in order.
NODE_COLUMNS = ["group", "node", "kind", "layer", "feature", "gene", "role", "influence", "attribution", "activation"]
EDGE_COLUMNS = ["group", "source", "target", "weight", "frequency", "via", "via_share"]


class CircuitTables(NamedTuple):
    """A circuit traced over many prompts: per-group node, edge and path tables and a per-prompt table."""

    nodes: pd.DataFrame
    """One row per group and node (``NODE_COLUMNS`` and ``frequency``), most influential first within a group."""
    edges: pd.DataFrame
    """One row per group and edge (``EDGE_COLUMNS``), strongest first within a group."""
    paths: pd.DataFrame
    """Per group, the strongest source-to-target paths (``group``, ``rank``, ``path``, ``score``, ``sign``,
    ``n_edges``)."""
    cells: pd.DataFrame
    """Per prompt: ``group``, ``label``, ``target_value`` and the graph's ``*_score`` columns."""
    uncovered_layers: list[int]
    """Model layers without a transcoder: their MLPs entered the graphs as error nodes."""
    genes: pd.DataFrame
    """Per prompt and gene of its sentence, pruned or not: ``cell`` (the prompt's index), ``group``, ``gene``,
    ``rank`` (position in the sentence, 0 first), ``n_tokens``, ``influence`` and ``attribution`` (signed) in the
    whole graph (:func:`~cellcircuits.circuits._aggregate.cell_gene_table`)."""


def label_index(model: C2SModel, label: str) -> int:
    """Position of ``label`` among the model's labels; a clear error listing them when it is not one."""
    labels = list(model.prompt.labels or [])
    if label not in labels:
        msg = f"target {label!r} is not a label the model knows; its labels are {labels}"
        raise ValueError(msg)
    return labels.index(label)


def check_thresholds(node_threshold: float, edge_threshold: float) -> None:
    """Refuse pruning thresholds outside ``(0, 1]``."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < value <= 1:
            msg = f"{name} must be in (0, 1] (a fraction of the influence to keep), got {value!r}"
            raise ValueError(msg)


def uncovered_layers(model: C2SModel, transcoders: TranscoderSet, *, warn: bool = True) -> list[int]:
    """Model layers without a transcoder, after checking the set fits the model; a warning names them."""
    adapter = model.adapter
    transcoders.check_model(model)
    uncovered = [m for m in range(adapter.n_layers) if m not in transcoders]
    if uncovered and warn:
        warn_at_caller(
            f"no transcoder for layer(s) {uncovered}: their MLP outputs are frozen and enter the graph as error nodes"
        )
    return uncovered


def check_context(model: C2SModel, lengths: Sequence[int]) -> None:
    """Refuse prompts longer than the model's context (``max_position_embeddings``), naming the longest."""
    context = getattr(model.model.config, "max_position_embeddings", None)
    longest = max(lengths, default=0)
    if context is not None and longest > int(context):
        msg = (
            f"a prompt of {longest} tokens (with the answer tokens teacher-forced before the traced one) is longer "
            f"than the model's context of {context} tokens; use fewer genes per sentence"
        )
        raise ValueError(msg)


def gather_cell_tables(
    tables: list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]], cell_rows: list[dict]
) -> tuple[list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]], list[dict]]:
    """Every rank's per-cell tables and cell rows, in rank order (ranks hold contiguous shares of the cells)."""
    frames = [frame for triple in tables for frame in triple] + [pd.DataFrame(cell_rows)]
    all_tables: list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]] = []
    all_rows: list[dict] = []
    for payload in all_gather_bytes(frames_to_bytes(frames)):
        got = frames_from_bytes(payload)
        all_tables += [(got[i], got[i + 1], got[i + 2]) for i in range(0, len(got) - 1, 3)]
        all_rows += got[-1].to_dict("records")
    return all_tables, all_rows


def check_n_jobs(n_jobs: int | None) -> int:
    """``n_jobs`` as a number of jobs (``None``: 1); a ValueError below 1."""
    jobs = 1 if n_jobs is None else int(n_jobs)
    if jobs < 1:
        msg = f"n_jobs must be at least 1, got {n_jobs}"
        raise ValueError(msg)
    return jobs


@contextmanager
def _threads_per_job(jobs: int) -> Iterator[None]:
    """Divide torch's CPU threads among ``jobs`` concurrent jobs while the block runs."""
    if jobs <= 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // jobs))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@one_at_a_time
def trace_prompts(
    model: C2SModel,
    transcoders: TranscoderSet,
    prompts: Sequence[TokenizedPrompt],
    labels: Sequence[str],
    groups: Sequence[str] | np.ndarray | None = None,
    *,
    target_mode: TargetMode = "distinguishing",
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_feature_nodes: int = DEFAULT_FEATURE_NODES,
    n_paths: int = 10,
    batch_size: int = DEFAULT_BATCH_SIZE,
    memory_budget: int | str | None = AUTO,
    n_jobs: int | None = None,
    progress: bool = True,
) -> CircuitTables:
    """Trace each prompt's call of its label and aggregate the graphs per group.

    For each prompt, every MLP is replaced by its transcoder plus an error term, attention patterns and layer norm
    scales are frozen, and the target (the label's logit difference at the token where it parts from the other
    labels, :func:`cellcircuits.circuits.label_target`) is attributed exactly to gene tokens, transcoder features and
    error nodes (:func:`cellcircuits.circuits.attribution_graph`). Nodes are named by the gene or prompt role at their
    position, so prompts can be compared; per group, attributions are averaged over its prompts (a node absent from a
    prompt counts 0) and each node's frequency is the fraction of prompts holding it.

    Under ``torchrun`` (an initialised ``torch.distributed`` process group), each rank traces a contiguous share of
    the prompts and every rank returns the tables of all of them, equal to a one-process run.

    Parameters
    ----------
    model
        The C2S model (:func:`cellcircuits.models.load`).
    transcoders
        Transcoders of the model's MLPs; layers without one enter the graph as error nodes (with a warning).
    prompts
        Tokenized prompts (:func:`cellcircuits.models.tokenize_prompts`).
    labels
        Per prompt, the model label traced.
    groups
        Per prompt, the group it is aggregated in; default one group, ``"all"``.
    target_mode
        ``"distinguishing"`` or ``"first_token"`` (see :func:`cellcircuits.circuits.label_target`).
    node_threshold, edge_threshold
        Fractions of influence kept by pruning, in ``(0, 1]``.
    max_feature_nodes
        Features per prompt given full attribution rows, chosen by estimated influence.
    n_paths
        Strongest source-to-target paths kept per group.
    batch_size
        Most targets per backward pass; memory grows with it. Features are also selected in rounds of at most
        ``batch_size`` (an eighth of ``max_feature_nodes``, at least 32), the influence estimate updated after each.
    memory_budget
        Bytes of attribution rows per prompt kept on the model's device (an int, or a size such as ``"8GB"``); rows
        past it are kept in host memory. ``"auto"``: on a GPU, up to half its free memory when the prompt's rows are
        allocated; ``None``: all on the device. Rows that fit neither there nor in the host's available memory are
        refused with a MemoryError before they are allocated.
    n_jobs
        Prompts whose graphs are built at once, each in its own thread (``None``: 1). The model runs one prompt at a
        time; the graphs' products then share the CPU threads torch had (``torch.get_num_threads`` is divided
        among the jobs for the call and restored after). On a CPU this uses the cores better than one graph's small
        products can (2 jobs on 2 cores: 1.1-1.2x the prompts per second here); memory grows with the jobs. The
        tables are the same for any ``n_jobs`` (up to float rounding).
    progress
        Show a progress bar (per prompt, on each rank).

    Returns
    -------
    The aggregated :class:`CircuitTables`.

    Raises
    ------
    ValueError
        Before any work: thresholds outside ``(0, 1]``, ``max_feature_nodes`` below 1, a malformed memory budget,
        labels or groups of another length than the prompts, a label the model does not know, a prompt (with the
        label's teacher-forced prefix) longer than the model's context, more ranks than prompts, or ``n_jobs``
        below 1.
    """
    from tqdm.auto import tqdm

    check_thresholds(node_threshold, edge_threshold)
    if len(labels) != len(prompts):
        msg = f"labels has {len(labels)} entries for {len(prompts)} prompts"
        raise ValueError(msg)
    group_of = np.asarray(["all"] * len(prompts) if groups is None else [str(g) for g in groups], dtype=object)
    if len(group_of) != len(prompts):
        msg = f"groups has {len(group_of)} entries for {len(prompts)} prompts"
        raise ValueError(msg)
    if len(prompts) == 0:
        msg = "no prompt to trace"
        raise ValueError(msg)
    budget = check_graph_size(max_feature_nodes, memory_budget)
    n_jobs = check_n_jobs(n_jobs)
    all_label_ids = label_token_ids(model.tokenizer, model.prompt, model.prompt.labels or [])
    targets = [label_target(all_label_ids, label_index(model, str(label)), target_mode) for label in labels]
    check_context(model, [len(p.input_ids) + len(t.prefix) for p, t in zip(prompts, targets, strict=True)])
    share = my_shard(len(prompts))  # more ranks than prompts is refused here
    uncovered = uncovered_layers(model, transcoders)

    tables, cell_rows = [], []
    mine = list(zip(prompts[share], labels[share], targets[share], strict=True))

    def build(rm: ReplacementModel, lt: LabelTarget, n_ids: int) -> Graph:
        target = LogitTarget(n_ids - 1, lt.token, lt.competitors)
        return attribution_graph(
            rm, target, max_feature_nodes=max_feature_nodes, batch_size=batch_size, node_threshold=node_threshold,
            edge_threshold=edge_threshold, memory_budget=budget,
        )  # fmt: skip

    def finish(prompt: TokenizedPrompt, label: str, n_ids: int, graph: Graph) -> None:
        tables.append((*cell_graph_tables(graph, prompt, str(label), n_ids), cell_gene_table(graph, prompt)))
        cell_rows.append(
            {
                "label": str(label),
                "target_value": graph.target_value,
                **{f"{k}_score": v for k, v in graph.scores.items()},
            }
        )

    jobs = min(n_jobs, max(len(mine), 1))
    with tqdm(total=len(mine), desc="trace", disable=not progress, unit="cell") as bar, _threads_per_job(jobs):
        # the model records each prompt here, in turn (it runs one prompt at a time); graphs are built by the jobs,
        # at most ``jobs`` at once, and finished in prompt order
        pool = ThreadPoolExecutor(jobs) if jobs > 1 else None
        pending: deque[tuple[TokenizedPrompt, str, int, Future[Graph]]] = deque()

        def finish_until(left: int) -> None:
            while len(pending) > left:
                p, lab, n, future = pending.popleft()
                finish(p, lab, n, future.result())
                bar.update(1)

        try:
            for prompt, label, lt in mine:
                ids = list(prompt.input_ids) + lt.prefix
                rm = ReplacementModel.record(model, transcoders, ids)
                if pool is None:  # one job: the graph is built here, in this thread
                    future: Future[Graph] = Future()
                    future.set_result(build(rm, lt, len(ids)))
                else:
                    future = pool.submit(build, rm, lt, len(ids))
                pending.append((prompt, label, len(ids), future))
                finish_until(jobs - 1)
            finish_until(0)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    if is_distributed():
        tables, cell_rows = gather_cell_tables(tables, cell_rows)
    genes = pd.concat([t[2].assign(cell=i, group=group_of[i]) for i, t in enumerate(tables)], ignore_index=True)[
        ["cell", "group", "gene", "rank", "n_tokens", "influence", "attribution"]
    ]
    nodes, edges = aggregate([t[:2] for t in tables], group_of.astype(str))
    nodes = nodes[[*NODE_COLUMNS, "frequency"]].copy()
    edges = edges[EDGE_COLUMNS]
    paths = top_paths(nodes, edges, n_paths)
    nodes.loc[nodes["kind"] == "target", "layer"] = model.adapter.n_layers
    cells = pd.DataFrame(cell_rows)
    cells.insert(0, "group", group_of.astype(str))
    return CircuitTables(nodes.reset_index(drop=True), edges, paths, cells, uncovered, genes)
