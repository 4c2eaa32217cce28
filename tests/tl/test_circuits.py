from __future__ import annotations

import itertools
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import cellcircuits as cc
from cellcircuits.circuits._aggregate import aggregate
from cellcircuits.circuits._targets import label_target
from cellcircuits.models import label_token_ids

from ..helpers import LABELS, tiny_tset


@pytest.fixture
def cells(toy_adata) -> ad.AnnData:
    return toy_adata[[i for i in range(12) if i != 3]].copy()  # cell 3 expresses nothing


def test_trace_tables_and_target_values(cells, tiny_c2s):
    tset = tiny_tset()
    cc.tl.trace_circuit(cells, tiny_c2s, tset, groupby="label", n_cells=2, max_feature_nodes=8, progress=False)
    result = cells.uns["circuits"]["label"]
    nodes, edges, table = result["nodes"], result["edges"], result["cells"]
    assert set(table["group"]) == set(LABELS) and len(table) == 6
    assert list(result["params"]["groups"]) == list(pd.unique(cells.obs["label"]))
    for g in LABELS:
        n = nodes[nodes["group"] == g]
        target = n[n["kind"] == "target"]
        assert list(target["node"]) == [f"target:{g}"] and target["frequency"].iloc[0] == 1.0
        assert (n["influence"] >= 0).all() and (n["frequency"] <= 1).all()
        e = edges[edges["group"] == g]
        assert set(e["source"]) | set(e["target"]) <= set(n["node"])
        # genes are named by the cell's sentence genes
        genes = set(n.loc[n["kind"] == "gene", "gene"])
        assert genes and genes <= {v.upper() for v in cells.var_names}
    paths = result["paths"]
    for g in LABELS:
        mine = paths[paths["group"] == g]
        assert 0 < len(mine) <= 10 and list(mine["rank"]) == list(range(len(mine)))
        assert mine["score"].is_monotonic_decreasing and (mine["score"] <= 1).all()
        for path in mine["path"]:
            names = path.split(" -> ")
            assert names[-1] == f"target:{g}" and names[0].startswith(("gene:", "token:", "err "))
            e = edges[edges["group"] == g]
            pairs = set(zip(e["source"], e["target"], strict=True))
            assert all((a, b) in pairs for a, b in itertools.pairwise(names))
    # the target value is the model's own logit difference at the first token telling the label apart
    ids = label_token_ids(tiny_c2s.tokenizer, tiny_c2s.prompt, LABELS)
    for row in table.itertuples():
        lt = label_target(ids, LABELS.index(row.label))
        prompt = cc.tl._cells.cell_prompts(cells, tiny_c2s, cells=np.array([cells.obs_names.get_loc(row.obs_name)]))[0]
        with torch.no_grad():
            logits = tiny_c2s.model(input_ids=torch.tensor([prompt.input_ids + lt.prefix])).logits[0, -1]
        expected = logits[lt.token] - logits[list(lt.competitors)].mean()
        assert row.target_value == pytest.approx(float(expected), rel=1e-3, abs=1e-4)
        assert 0 <= row.replacement_score <= 1 and 0 <= row.completeness_score <= 1


def test_one_target_for_chosen_cells_and_h5ad(cells, tiny_c2s, tmp_path):
    out = cc.tl.trace_circuit(
        cells, tiny_c2s, tiny_tset(), "CD19+ B", cells=list(cells.obs_names[:3]), max_feature_nodes=8,
        progress=False, copy=True,
    )  # fmt: skip
    assert "circuits" not in cells.uns
    result = out.uns["circuits"]["CD19+ B"]
    assert set(result["nodes"]["group"]) == {"all"}
    assert (result["nodes"].loc[result["nodes"]["kind"] == "target", "node"] == "target:CD19+ B").all()
    out.write_h5ad(tmp_path / "c.h5ad")
    back = ad.read_h5ad(tmp_path / "c.h5ad").uns["circuits"]["CD19+ B"]
    pd.testing.assert_frame_equal(
        back["nodes"], result["nodes"], check_dtype=False, check_index_type=False, check_categorical=False
    )
    assert back["params"]["target"] == "CD19+ B"


def test_aggregate_averages_over_cells_with_absence_as_zero():
    def cell(influence: float, weight: float, via: str):
        nodes = pd.DataFrame(
            {
                "node": ["target:X", "gene:A"], "kind": ["target", "gene"], "layer": [2, -1], "feature": [-1, -1],
                "gene": ["", "A"], "role": ["target", "gene"], "influence": [1.0, influence],
                "attribution": [3.0, weight], "activation": [np.nan, np.nan],
            }
        )  # fmt: skip
        edges = pd.DataFrame({"source": ["gene:A"], "target": ["target:X"], "weight": [weight], "via": [via]})
        return nodes, edges

    empty = (
        pd.DataFrame({"node": ["target:X"], "kind": ["target"], "layer": [2], "feature": [-1], "gene": [""],
                      "role": ["target"], "influence": [1.0], "attribution": [1.0], "activation": [np.nan]}),
        pd.DataFrame({"source": [], "target": [], "weight": [], "via": []}),
    )  # fmt: skip
    tables = [cell(0.4, 1.0, "L0.H1"), cell(0.2, 3.0, "residual"), empty, empty]
    nodes, edges = aggregate(tables, np.array(["g", "g", "g", "h"]))
    a = nodes[(nodes["group"] == "g") & (nodes["node"] == "gene:A")].iloc[0]
    assert a["influence"] == pytest.approx(0.2) and a["frequency"] == pytest.approx(2 / 3)
    e = edges[edges["group"] == "g"].iloc[0]
    assert e["weight"] == pytest.approx(4.0 / 3) and e["frequency"] == pytest.approx(2 / 3)
    assert e["via"] == "residual" and e["via_share"] == pytest.approx(0.75)
    assert set(nodes.loc[nodes["group"] == "h", "node"]) == {"target:X"}


def test_uncovered_layers_warn_and_bad_input(cells, tiny_c2s):
    with pytest.warns(UserWarning, match=r"no transcoder for layer\(s\) \[1\]"):
        cc.tl.trace_circuit(
            cells, tiny_c2s, tiny_tset((0,)), "CD56+ NK", cells=[0], max_feature_nodes=4, progress=False
        )
    err = cells.uns["circuits"]["CD56+ NK"]["nodes"]
    assert (err.loc[err["kind"] == "error", "layer"] >= 0).all()
    tset = tiny_tset()
    with pytest.raises(ValueError, match=r"not a label the model knows; its labels are \['CD14\+ Monocyte'"):
        cc.tl.trace_circuit(cells, tiny_c2s, tset, "T cell", groupby="label")
    with pytest.raises(ValueError, match="has no cells"):
        cc.tl.trace_circuit(cells, tiny_c2s, tset, "CD19+ B", groupby="label", groups=["Platelet"])
    with pytest.raises(KeyError, match=r"not in adata\.obs_names"):
        cc.tl.trace_circuit(cells, tiny_c2s, tset, "CD19+ B", cells=["nope"])
    with pytest.raises(IndexError, match="outside"):
        cc.tl.trace_circuit(cells, tiny_c2s, tset, "CD19+ B", cells=[99])
    with pytest.raises(ValueError, match="node_threshold"):
        cc.tl.trace_circuit(cells, tiny_c2s, tset, "CD19+ B", groupby="label", node_threshold=0)
    with pytest.raises(ValueError, match="edge_threshold"):
        cc.tl.trace_circuit(cells, tiny_c2s, tset, "CD19+ B", groupby="label", edge_threshold=2)
    with pytest.raises(KeyError, match="not a column"):
        cc.tl.trace_circuit(cells, tiny_c2s, tset, "CD19+ B", groupby="nope")
    cells.obs["odd"] = "Platelet"
    with pytest.raises(ValueError, match="not a label the model knows"):
        cc.tl.trace_circuit(cells, tiny_c2s, tset, groupby="odd")  # each group traced to its own name
    assert set(cells.uns["circuits"]) == {"CD56+ NK"}


def test_duplicate_obs_names_refused_by_trace_accepted_by_positional_tools(cells, tiny_c2s):
    names = list(cells.obs_names)
    names[1], names[-1] = names[0], names[-2]
    dup = cells.copy()
    dup.obs_names = names
    before = dup.copy()
    tset = tiny_tset()
    expected = r"holds 2 duplicated name\(s\), e\.g\. \['cell0', 'cell10'\].*adata\.obs_names_make_unique\(\)"
    with pytest.raises(ValueError, match=expected):
        cc.tl.trace_circuit(dup, tiny_c2s, tset, "CD19+ B", cells=[0, 1], max_feature_nodes=4, progress=False)
    with pytest.raises(ValueError, match=expected):
        cc.tl.trace_circuit(dup, tiny_c2s, tset, groupby="label", n_cells=1, max_feature_nodes=4, progress=False)
    assert "circuits" not in dup.uns
    pd.testing.assert_frame_equal(dup.obs, before.obs)
    # predict_cell_types and transcode store by position: the same sentences give the same rows as unique names
    named = cc.pp.cell_sentences(cells, copy=True)
    dup.obs["cell_sentence"] = named.obs["cell_sentence"].to_numpy()
    want = cc.tl.predict_cell_types(named, tiny_c2s, progress=False, copy=True)
    got = cc.tl.predict_cell_types(dup, tiny_c2s, progress=False, copy=True)
    np.testing.assert_allclose(got.obsm["c2s_cell_type_proba"], want.obsm["c2s_cell_type_proba"], rtol=1e-5)
    assert list(got.obs["c2s_cell_type"]) == list(want.obs["c2s_cell_type"])
    want = cc.tl.transcode(named, tiny_c2s, tset, layers=[0], progress=False, copy=True).obsm["X_transcoder_L0"]
    got = cc.tl.transcode(dup, tiny_c2s, tset, layers=[0], progress=False, copy=True).obsm["X_transcoder_L0"]
    np.testing.assert_allclose(got.toarray(), want.toarray(), rtol=1e-5)


def test_tools_refuse_colliding_gene_symbols_before_any_work(cells, tiny_c2s):
    clash = cells.copy()
    clash.var_names = ["lyz" if g == "HLA-DRA" else g for g in clash.var_names]
    before = clash.copy()
    tset = tiny_tset()
    match = r"'LYZ' and 'lyz' both become 'LYZ'"
    with pytest.raises(ValueError, match=match):
        cc.tl.trace_circuit(clash, tiny_c2s, tset, "CD19+ B", cells=[0], max_feature_nodes=4, progress=False)
    with pytest.raises(ValueError, match=match):
        cc.tl.predict_cell_types(clash, tiny_c2s, progress=False)
    with pytest.raises(ValueError, match=match):
        cc.tl.transcode(clash, tiny_c2s, tset, progress=False)
    # transcode reads var_names even when the sentences are stored: it would map activations to one duplicate
    clash.obs["cell_sentence"] = cc.pp.cell_sentences(cells, copy=True).obs["cell_sentence"].to_numpy()
    with pytest.raises(ValueError, match=match):
        cc.tl.transcode(clash, tiny_c2s, tset, progress=False)
    clash.obs = clash.obs.drop(columns="cell_sentence")
    assert not clash.obsm and not clash.varm and set(clash.uns) == set(before.uns)
    pd.testing.assert_frame_equal(clash.obs, before.obs)
    ids = cells.copy()
    ids.var_names = [f"ENSG{i:011d}" for i in range(ids.n_vars)]
    with pytest.raises(ValueError, match=r"look like Ensembl IDs.*gene_symbols="):
        cc.tl.trace_circuit(ids, tiny_c2s, tset, "CD19+ B", cells=[0], max_feature_nodes=4, progress=False)
    ids.var["feature_name"] = list(cells.var_names)
    cc.tl.trace_circuit(
        ids, tiny_c2s, tset, "CD19+ B", cells=[0], max_feature_nodes=4, gene_symbols="feature_name", progress=False
    )
    genes = ids.uns["circuits"]["CD19+ B"]["nodes"]["gene"]
    assert set(genes[genes != ""]) <= set(cells.var_names)


def test_validate_refuses_obs_names_duplicated_after_tracing(cells, tiny_c2s):
    tset = tiny_tset((0,))
    cc.tl.trace_circuit(cells, tiny_c2s, tset, "CD56+ NK", cells=[0], max_feature_nodes=4, progress=False)
    names = list(cells.obs_names)
    names[1] = names[0]
    cells.obs_names = names
    with pytest.raises(ValueError, match=r"validate_circuit stores its per-cell results by obs name"):
        cc.tl.validate_circuit(cells, tiny_c2s, tset, "CD56+ NK", progress=False)


def test_backed_data_is_refused_before_work_where_results_cannot_be_stored(cells, tiny_c2s, tmp_path):
    cc.pp.cell_sentences(cells)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    tset = tiny_tset((0,))
    calls = {
        "predict_cell_types": lambda a, copy: cc.tl.predict_cell_types(a, tiny_c2s, progress=False, copy=copy),
        "transcode": lambda a, copy: cc.tl.transcode(a, tiny_c2s, tset, progress=False, copy=copy),
        "trace_circuit": lambda a, copy: cc.tl.trace_circuit(
            a, tiny_c2s, tset, "CD56+ NK", cells=[0], max_feature_nodes=4, progress=False, copy=copy
        ),
    }
    for tool, call in calls.items():
        with pytest.raises(ValueError, match=rf"{tool}: copy=True cannot copy a backed AnnData"):
            call(backed, True)
        with pytest.raises(ValueError, match=rf"{tool} cannot store results in a view of a backed AnnData"):
            call(backed[:3], False)
    assert "c2s_cell_type" not in backed.obs and "circuits" not in backed.uns
    cc.tl.predict_cell_types(backed, tiny_c2s, progress=False)  # in place on backed data works
    assert backed.obs["c2s_cell_type"].notna().all()


def test_uncovered_layer_warning_points_at_the_callers_line(cells, tiny_c2s):
    with pytest.warns(UserWarning, match=r"no transcoder for layer\(s\) \[1\]") as record:
        cc.tl.trace_circuit(
            cells, tiny_c2s, tiny_tset((0,)), "CD56+ NK", cells=[0], max_feature_nodes=4, progress=False
        )
    assert {Path(w.filename).name for w in record if "no transcoder" in str(w.message)} == {Path(__file__).name}


def test_organism_of_a_trace_is_recorded_and_reused_by_validation(cells, tiny_c2s, monkeypatch):
    tset = tiny_tset((0, 1))
    cc.tl.trace_circuit(
        cells, tiny_c2s, tset, "CD56+ NK", cells=[0], max_feature_nodes=4, organism="Mus musculus", progress=False
    )
    assert cells.uns["circuits"]["CD56+ NK"]["params"]["sentences"]["organism"] == "Mus musculus"
    built = []
    original = type(tiny_c2s).build_prompts

    def spy(self, sentences, organism=None):
        built.append(organism)
        return original(self, sentences, organism)

    monkeypatch.setattr(type(tiny_c2s), "build_prompts", spy)
    cc.tl.validate_circuit(cells, tiny_c2s, tset, "CD56+ NK", progress=False)
    assert built and set(built) == {"Mus musculus"}


def test_gene_table_holds_every_sentence_gene_and_agrees_with_the_kept_gene_nodes(cells, tiny_c2s, tmp_path):
    tset = tiny_tset()
    cc.tl.trace_circuit(
        cells, tiny_c2s, tset, groupby="label", n_cells=1, max_feature_nodes=8, node_threshold=1.0,
        edge_threshold=1.0, progress=False,
    )  # fmt: skip
    result = cells.uns["circuits"]["label"]
    genes = cc._keys.circuit_genes(cells, "label")
    assert list(genes.columns) == ["obs_name", "group", "gene", "rank", "n_tokens", "influence", "attribution"]
    assert list(pd.unique(genes["obs_name"])) == list(result["cells"]["obs_name"])
    for obs_name, rows in genes.groupby("obs_name", sort=False):
        prompt = cc.tl._cells.cell_prompts(cells, tiny_c2s, cells=np.array([cells.obs_names.get_loc(obs_name)]))[0]
        assert list(rows["gene"]) == prompt.genes and list(rows["rank"]) == list(range(len(prompt.genes)))
        assert list(rows["n_tokens"]) == [len(p) for p in prompt.gene_positions]
        assert (rows["influence"] >= 0).all() and rows["influence"].sum() > 0
        # one cell per group, nothing pruned: the gene nodes carry the same whole-graph values
        group = rows["group"].iloc[0]
        nodes = result["nodes"]
        kept = nodes[(nodes["group"] == group) & (nodes["kind"] == "gene")].set_index("gene")
        assert len(kept) > 0
        mine = rows.set_index("gene").loc[kept.index]
        np.testing.assert_allclose(mine["influence"], kept["influence"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(mine["attribution"], kept["attribution"], rtol=1e-9, atol=1e-12)
    cells.write_h5ad(tmp_path / "c.h5ad")
    back = cc._keys.circuit_genes(ad.read_h5ad(tmp_path / "c.h5ad"), "label")
    pd.testing.assert_frame_equal(back.reset_index(drop=True), genes.reset_index(drop=True), check_dtype=False)
    del cells.uns["circuits"]["label"]["genes"]
    with pytest.raises(KeyError, match="trace it again"):
        cc._keys.circuit_genes(cells, "label")
