from __future__ import annotations

import json
import math

import anndata as ad
import networkx as nx
import numpy as np
import pandas as pd
import pytest

import cellcircuits as cc

from ..helpers import CIRCUIT_EDGES as EDGES
from ..helpers import TARGET, make_circuit_adata


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _assert_graph_matches_tables(graph: nx.DiGraph, adata: ad.AnnData, group: str) -> None:
    store = adata.uns["circuits"]["t"]
    nodes = store["nodes"][store["nodes"]["group"] == group]
    edges = store["edges"][store["edges"]["group"] == group]
    assert sorted(graph.nodes) == sorted(nodes["node"])
    for record in nodes.to_dict("records"):
        attrs = graph.nodes[record["node"]]
        assert set(attrs) == set(nodes.columns)
        for col, value in record.items():
            assert _same(attrs[col], value.item() if hasattr(value, "item") else value), (record["node"], col)
            assert type(attrs[col]) in (int, float, str, bool), (col, type(attrs[col]))
    assert sorted(graph.edges) == sorted(zip(edges["source"], edges["target"], strict=True))
    for record in edges.to_dict("records"):
        attrs = graph.edges[record["source"], record["target"]]
        assert set(attrs) == {"weight", "frequency", "via", "via_share"}
        assert attrs["weight"] == pytest.approx(record["weight"])
        assert attrs["frequency"] == pytest.approx(record["frequency"])
        assert attrs["via"] == record["via"]
        assert type(attrs["weight"]) is float and type(attrs["via"]) is str


def test_circuit_graph(circ):
    graph = cc.get.circuit(circ, "t", "B")
    assert isinstance(graph, nx.DiGraph)
    assert graph.number_of_nodes() == 15 and graph.number_of_edges() == len(EDGES)
    _assert_graph_matches_tables(graph, circ, "B")
    assert graph.nodes["gene:LYZ"]["is_marker"] is True
    assert graph.nodes["gene:S100A9"]["is_marker"] is False
    assert graph.nodes["L2.F7@answer"]["layer"] == 2 and graph.nodes["L2.F7@answer"]["feature"] == 7
    assert math.isnan(graph.nodes["gene:LYZ"]["activation"])
    assert graph.graph["groups"] == ["mono", "B"] and type(graph.graph["n_layers"]) is int
    assert graph.graph["target"] == TARGET and graph.graph["group"] == "B" and graph.graph["circuit_key"] == "t"
    assert graph.graph["n_traced_cells"] == 5 and graph.graph["n_cells"] == 50
    assert graph.graph["uncovered_layers"] == [1] and type(graph.graph["uncovered_layers"][0]) is int
    # the two groups hold the same ids but different values
    other = cc.get.circuit(circ, "t", "mono")
    assert other.nodes["gene:LYZ"]["influence"] != graph.nodes["gene:LYZ"]["influence"]


def test_circuit_group_and_key_errors(circ):
    with pytest.raises(ValueError, match=r"2 groups.*\['mono', 'B'\]"):
        cc.get.circuit(circ, "t")
    with pytest.raises(KeyError, match="traced groups are"):
        cc.get.circuit(circ, "t", "NK")
    with pytest.raises(KeyError, match="trace_circuit"):
        cc.get.circuit(circ, "nope")
    with pytest.raises(KeyError, match="trace_circuit"):
        cc.get.circuit_df(ad.AnnData(np.zeros((2, 2))), "t")
    with pytest.raises(ValueError, match="kind must be"):
        cc.get.circuit_df(circ, "t", "mono", kind="cells")
    single = make_circuit_adata(("mono",))
    assert cc.get.circuit(single, "t").graph["group"] == "mono"


def test_circuit_df_sorted(circ):
    nodes = cc.get.circuit_df(circ, "t", "mono")
    assert len(nodes) == 15 and set(nodes["group"]) == {"mono"}
    assert nodes["node"].iloc[0] == f"target:{TARGET}"
    assert np.all(np.diff(nodes["influence"].to_numpy()) < 0)
    assert list(nodes.index) == list(range(15))
    table = circ.uns["circuits"]["t"]["nodes"]
    expected = table[table["group"] == "mono"].sort_values("influence", ascending=False)["node"]
    assert nodes["node"].tolist() == expected.tolist()
    edges = cc.get.circuit_df(circ, "t", "mono", kind="edges")
    assert len(edges) == len(EDGES)
    assert np.all(np.diff(edges["weight"].abs().to_numpy()) <= 0)
    assert edges["weight"].iloc[-1] == 0
    nodes.loc[0, "influence"] = -1.0  # a copy
    assert table["influence"].max() == 1.0


def test_write_json_round_trip(circ, tmp_path):
    path = cc.get.write_circuit(circ, "t", tmp_path / "c.json", group="mono")
    text = path.read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert {"nodes", "links", "graph"} <= set(data)
    lyz = next(n for n in data["nodes"] if n["id"] == "gene:LYZ")
    assert lyz["activation"] is None and lyz["is_marker"] is True
    graph = nx.node_link_graph(data, directed=True, multigraph=False, edges="links")
    original = cc.get.circuit(circ, "t", "mono")
    assert set(graph.nodes) == set(original.nodes)
    assert set(graph.edges) == set(original.edges)
    for u, v, w in original.edges(data="weight"):
        assert graph.edges[u, v]["weight"] == pytest.approx(w)
    assert graph.nodes["L1.F5@LYZ"]["influence"] == pytest.approx(original.nodes["L1.F5@LYZ"]["influence"])
    assert graph.graph["groups"] == ["mono", "B"]


def test_write_graphml_round_trip(circ, tmp_path):
    path = cc.get.write_circuit(circ, "t", tmp_path / "c.xml", group="B", format="graphml")
    graph = nx.read_graphml(path)
    original = cc.get.circuit(circ, "t", "B")
    assert isinstance(graph, nx.DiGraph)
    assert set(graph.nodes) == set(original.nodes)
    assert set(graph.edges) == set(original.edges)
    for u, v, w in original.edges(data="weight"):
        assert graph.edges[u, v]["weight"] == pytest.approx(w)
        assert graph.edges[u, v]["via"] == original.edges[u, v]["via"]
    node = graph.nodes["L0.F3@LYZ"]
    assert node["layer"] == 0 and node["feature"] == 3 and node["is_marker"] is False
    assert node["activation"] == pytest.approx(original.nodes["L0.F3@LYZ"]["activation"])
    assert "activation" not in graph.nodes["gene:LYZ"]  # missing values are left out
    assert json.loads(graph.graph["groups"]) == ["mono", "B"] and json.loads(graph.graph["uncovered_layers"]) == [1]
    with pytest.raises(ValueError, match="suffix"):
        cc.get.write_circuit(circ, "t", tmp_path / "c.txt", group="B")
    with pytest.raises(ValueError, match="format must be"):
        cc.get.write_circuit(circ, "t", tmp_path / "c.txt", group="B", format="gml")


def test_write_graph_writes_a_filtered_circuit(circ, tmp_path):
    graph = cc.get.circuit(circ, "t", "mono")
    strong = graph.edge_subgraph([(u, v) for u, v, w in graph.edges(data="weight") if abs(w) >= 0.5]).copy()
    assert 0 < strong.number_of_edges() < graph.number_of_edges()
    for suffix in (".json", ".graphml"):
        path = cc.get.write_graph(strong, tmp_path / f"strong{suffix}")
        back = (
            nx.read_graphml(path)
            if suffix == ".graphml"
            else nx.node_link_graph(json.loads(path.read_text()), directed=True, multigraph=False, edges="links")
        )
        assert set(back.edges) == set(strong.edges) and set(back.nodes) == set(strong.nodes)
    assert (tmp_path / "whole.json").exists() is False
    cc.get.write_circuit(circ, "t", tmp_path / "whole.json", group="mono")
    assert (
        json.loads((tmp_path / "whole.json").read_text())["links"]
        == json.loads(cc.get.write_graph(graph, tmp_path / "again.json").read_text())["links"]
    )
    with pytest.raises(ValueError, match="suffix"):
        cc.get.write_graph(graph, tmp_path / "c.txt")


def test_circuit_survives_h5ad(circ, tmp_path):
    circ.write_h5ad(tmp_path / "c.h5ad")
    back = ad.read_h5ad(tmp_path / "c.h5ad")
    for group in ("mono", "B"):
        before, after = cc.get.circuit(circ, "t", group), cc.get.circuit(back, "t", group)
        assert set(after.nodes) == set(before.nodes) and set(after.edges) == set(before.edges)
        for node, attrs in before.nodes(data=True):
            assert all(_same(after.nodes[node][k], v) for k, v in attrs.items()), node
            assert all(type(after.nodes[node][k]) is type(v) for k, v in attrs.items()), node
        for u, v, attrs in before.edges(data=True):
            assert after.edges[u, v]["via"] == attrs["via"]
            assert after.edges[u, v]["weight"] == pytest.approx(attrs["weight"])
        assert after.graph == before.graph
    pd.testing.assert_frame_equal(
        cc.get.circuit_df(back, "t", "B", kind="edges"), cc.get.circuit_df(circ, "t", "B", kind="edges")
    )
