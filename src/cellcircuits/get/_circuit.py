"""Traced circuits from AnnData: as a graph, as tidy tables, and as files for graph viewers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._keys import circuit_result

if TYPE_CHECKING:
    import networkx as nx
    from anndata import AnnData

_EDGE_INDEX = ("group", "source", "target")
_SUFFIX_FORMATS: dict[str, Literal["json", "graphml"]] = {".json": "json", ".graphml": "graphml"}
_EDGE_COLUMNS = [*_EDGE_INDEX, "weight", "frequency", "via", "via_share"]


def _table(value: Any) -> pd.DataFrame:
    """A stored table as a DataFrame with plain columns (categoricals as their values)."""
    df = value.copy() if isinstance(value, pd.DataFrame) else pd.DataFrame(dict(value))
    for col in df.columns:
        if isinstance(df[col].dtype, pd.CategoricalDtype):
            df[col] = df[col].astype(df[col].cat.categories.dtype)
    return df.reset_index(drop=True)


def circuit_groups(result: dict) -> list[str]:
    """The traced groups: ``params["groups"]`` when stored, else those in the nodes table, in order."""
    groups = result.get("params", {}).get("groups")
    if groups is None or len(np.atleast_1d(groups)) == 0:
        groups = pd.unique(_table(result["nodes"])["group"].astype(str))
    return [str(g) for g in np.atleast_1d(groups)]


def resolve_group(result: dict, key: str, group: str | None) -> str:
    """``group``, checked against the traced groups; the only group when ``None``."""
    groups = circuit_groups(result)
    if group is None:
        if len(groups) != 1:
            msg = f"circuit {key!r} was traced for {len(groups)} groups; pass group= one of {groups}"
            raise ValueError(msg)
        return groups[0]
    if str(group) not in groups:
        msg = f"group {group!r} was not traced in circuit {key!r}; traced groups are {groups}"
        raise KeyError(msg)
    return str(group)


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays, tuples and pandas missing values as plain Python objects."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray | list | tuple | pd.Series | pd.Index):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode()
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _group_rows(df: pd.DataFrame, group: str) -> pd.DataFrame:
    return df[df["group"].astype(str) == group].reset_index(drop=True)


def circuit_df(
    adata: AnnData, key: str, group: str | None = None, kind: Literal["nodes", "edges"] = "nodes"
) -> pd.DataFrame:
    """One group's circuit from :func:`cellcircuits.tl.trace_circuit` as a tidy table, strongest first.

    Parameters
    ----------
    adata
        Annotated data matrix with a circuit in ``.uns["circuits"][key]``.
    key
        The ``key_added`` of the circuit.
    group
        The group whose circuit is returned; may be left out when the circuit has one group.
    kind
        ``"nodes"`` (sorted by ``influence``, highest first) or ``"edges"`` (sorted by ``|weight|``, strongest
        first).

    Returns
    -------
    A copy of the group's rows of the nodes or edges table with a fresh index; columns as stored (see
    :func:`cellcircuits.tl.trace_circuit`).
    """
    if kind not in ("nodes", "edges"):
        msg = f"kind must be 'nodes' or 'edges', got {kind!r}"
        raise ValueError(msg)
    result = circuit_result(adata, key)
    group = resolve_group(result, key, group)
    df = _group_rows(_table(result[kind]), group) if kind in result else pd.DataFrame(columns=_EDGE_COLUMNS)
    score = df["influence"] if kind == "nodes" else df["weight"].abs()
    order = np.argsort(-score.fillna(-np.inf).to_numpy(dtype=float), kind="stable")
    return df.iloc[order].reset_index(drop=True)


def circuit(adata: AnnData, key: str, group: str | None = None) -> nx.DiGraph:
    """One group's circuit from :func:`cellcircuits.tl.trace_circuit` as a directed graph.

    Parameters
    ----------
    adata
        Annotated data matrix with a circuit in ``.uns["circuits"][key]``.
    key
        The ``key_added`` of the circuit.
    group
        The group whose circuit is returned; may be left out when the circuit has one group.

    Returns
    -------
    A :class:`networkx.DiGraph` whose nodes are the node ids, carrying every column of the nodes table (``kind``,
    ``layer``, ``feature``, ``gene``, ``role``, ``influence``, ``attribution``, ``activation``, ``frequency``,
    ``label``, ``is_marker``, ``marker_sets``, ...) as plain Python values; edges (source to target) carry
    ``weight``, ``frequency``, ``via``, ``via_share`` and any other stored edge column. Edges whose ends are not in
    the nodes table are left out. The graph's attributes hold the tracing parameters, ``circuit_key``, ``group`` and,
    when stored, ``n_traced_cells`` (the group's traced cells).
    """
    import networkx as nx

    result = circuit_result(adata, key)
    group = resolve_group(result, key, group)
    params = {k: plain(v) for k, v in dict(result.get("params", {})).items()}
    graph = nx.DiGraph()
    graph.graph.update(params)
    graph.graph.update(circuit_key=key, group=group)
    if "cells" in result:
        cells = _table(result["cells"])
        graph.graph["n_traced_cells"] = int((cells["group"].astype(str) == group).sum())
    nodes = _group_rows(_table(result["nodes"]), group)
    graph.add_nodes_from(zip(nodes["node"].astype(str), _plain_records(nodes), strict=True))
    if "edges" in result:
        edges = _group_rows(_table(result["edges"]), group)
        source, target = edges["source"].astype(str), edges["target"].astype(str)
        kept = (source.isin(graph.nodes) & target.isin(graph.nodes)).to_numpy()
        columns = [c for c in edges.columns if c not in _EDGE_INDEX]
        records = _plain_records(edges.loc[kept, columns])
        graph.add_edges_from(zip(source[kept], target[kept], records, strict=True))
    return graph


_PLAIN_TYPES = (str, int, float, bool)


def _plain_records(df: pd.DataFrame) -> list[dict]:
    """``df``'s rows as dicts of plain Python values (:func:`plain`), a column at a time."""
    columns = {}
    for name in df.columns:
        values = df[name].tolist()  # numpy scalars become Python scalars here
        if not all(v is None or type(v) in _PLAIN_TYPES for v in values):  # numpy.str_ is a str, yet not plain
            values = [plain(v) for v in values]
        columns[str(name)] = values
    return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if value is None or type(value) in _PLAIN_TYPES:
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    value = plain(value)  # numpy scalars and arrays, bytes, pandas' missing values
    return _json_safe(value) if isinstance(value, list | float) else value


def _graphml_safe(attrs: dict) -> dict:
    """GraphML holds scalars only: missing values (None, NaN) are left out, lists written as JSON text."""
    out = {}
    for name, value in attrs.items():
        value = _json_safe(value)
        if value is None:
            continue
        out[name] = json.dumps(value) if isinstance(value, list | dict) else value
    return out


def write_circuit(
    adata: AnnData,
    key: str,
    path: str | Path,
    group: str | None = None,
    format: Literal["json", "graphml"] | None = None,
) -> Path:
    """Write one group's circuit to a file for graph viewers (d3, Cytoscape, Gephi) or other tools.

    Parameters
    ----------
    adata
        Annotated data matrix with a circuit in ``.uns["circuits"][key]``.
    key
        The ``key_added`` of the circuit.
    path
        File to write.
    group
        The group whose circuit is written; may be left out when the circuit has one group.
    format
        ``"json"``: node-link JSON (:func:`networkx.node_link_data` with ``"nodes"`` and ``"links"``, as d3 reads
        it; graph attributes under ``"graph"``; missing values as ``null``). ``"graphml"``: GraphML
        (:func:`networkx.write_graphml`; missing values are left out, list-valued graph attributes written as JSON
        text). Default from the suffix of ``path`` (``.json`` or ``.graphml``).

    Returns
    -------
    The path written. Read it back with ``networkx.node_link_graph(json.load(f), edges="links")`` or
    ``networkx.read_graphml(path)``.
    """
    format = _format_of(Path(path), format)  # checked before the graph is built
    return write_graph(circuit(adata, key, group), path, format)


def _format_of(path: Path, format: str | None) -> Literal["json", "graphml"]:
    if format is None:
        found = _SUFFIX_FORMATS.get(path.suffix.lower())
        if found is None:
            msg = f"cannot tell the format from {path.name!r}; use a .json or .graphml suffix or pass format="
            raise ValueError(msg)
        return found
    if format not in ("json", "graphml"):
        msg = f"format must be 'json' or 'graphml', got {format!r}"
        raise ValueError(msg)
    return "json" if format == "json" else "graphml"


def write_graph(graph: nx.DiGraph, path: str | Path, format: Literal["json", "graphml"] | None = None) -> Path:
    """Write a circuit graph (:func:`circuit`, perhaps filtered with networkx) as :func:`write_circuit` does.

    Parameters
    ----------
    graph
        The graph.
    path
        File to write.
    format
        ``"json"`` or ``"graphml"``, as in :func:`write_circuit`; default from the suffix of ``path``.

    Returns
    -------
    The path written.
    """
    import networkx as nx

    path = Path(path)
    if _format_of(path, format) == "json":
        try:
            data = nx.node_link_data(graph, edges="links")
        except TypeError:  # networkx < 3.4 writes "links" and knows no edges=
            data = nx.node_link_data(graph)
        path.write_text(json.dumps(_json_safe(data), allow_nan=False))  # no indent: the C encoder, 3x faster
    else:
        safe = nx.DiGraph(**_graphml_safe(graph.graph))
        safe.add_nodes_from((n, _graphml_safe(a)) for n, a in graph.nodes(data=True))
        safe.add_edges_from((u, v, _graphml_safe(a)) for u, v, a in graph.edges(data=True))
        nx.write_graphml(safe, path)
    return path
