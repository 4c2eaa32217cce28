"""Circuits named across cells: a cell's graph with nodes named by gene or prompt role, and aggregation per group.

Node names (``"gene:LYZ"``, ``"L2.F123@LYZ"``, ``"err L1@answer"``, ``"token:template"``, ``"target:<label>"``)
identify a node across cells, whose prompts put the same gene at different positions; aggregation averages a group's
cells.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from ._kinds import NodeKind
from ._paths import greedy_paths

if TYPE_CHECKING:
    from ..models._tokens import TokenizedPrompt
    from ._graph import Graph


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


def cell_gene_table(graph: Graph, prompt: TokenizedPrompt) -> pd.DataFrame:
    """Every gene of a cell's sentence, pruned or not, with its tokens' summed values in the whole graph.

    Columns: ``gene``, ``rank`` (position in the sentence, 0 first), ``n_tokens``, ``influence`` and signed
    ``attribution`` (the effect of :func:`~cellcircuits.circuits._graph.total_effect`).
    """
    tokens = graph.tokens
    positions = tokens["position"].to_numpy()
    influence = np.zeros(max(len(prompt.input_ids), int(positions.max(initial=-1)) + 1))
    effect = np.zeros_like(influence)
    np.add.at(influence, positions, tokens["influence"].to_numpy())
    np.add.at(effect, positions, tokens["effect"].to_numpy())
    return pd.DataFrame(
        {
            "gene": np.asarray(prompt.genes, dtype=object),
            "rank": np.arange(len(prompt.genes), dtype=np.int64),
            "n_tokens": np.asarray([len(p) for p in prompt.gene_positions], dtype=np.int64),
            "influence": np.asarray([influence[p].sum() for p in prompt.gene_positions], dtype=np.float64),
            "attribution": np.asarray([effect[p].sum() for p in prompt.gene_positions], dtype=np.float64),
        }
    )


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
        for rank, path in enumerate(
            greedy_paths(A, NodeKind.codes(n["kind"].to_numpy(), aliases={"gene": "token"}), target, k=k)
        ):
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
