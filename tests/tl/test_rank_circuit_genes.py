from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy.stats import rankdata

import cellcircuits as cc
from cellcircuits._keys import GENE_RANKING, circuit_genes, gene_ranking
from cellcircuits.tl._rank_circuit_genes import bootstrap_interval, positional_expectation

from ..helpers import (
    RANKED_LEADER,
    RANKED_PLANTED,
    ranked_circuit_adata,
    ranked_knockouts,
    ranked_positional,
    tiny_tset,
)


@pytest.fixture(scope="module")
def ranked_base() -> ad.AnnData:
    return ranked_circuit_adata()


@pytest.fixture
def ranked(ranked_base) -> ad.AnnData:
    return ranked_base.copy()


def _hand_means(adata: ad.AnnData, key: str = "t") -> pd.DataFrame:
    """Per group and gene, mean influence and attribution over the group's traced cells (absent: 0), and frequency."""
    genes = pd.DataFrame(circuit_genes(adata, key))
    cells = pd.DataFrame(adata.uns["circuits"][key]["cells"])
    n = cells.groupby("group")["obs_name"].nunique()
    sums = genes.groupby(["group", "gene"])[["influence", "attribution"]].sum()
    counts = genes.groupby(["group", "gene"]).size()
    groups = sums.index.get_level_values("group")
    return sums.div(n.loc[groups].to_numpy(), axis=0).assign(frequency=counts.to_numpy() / n.loc[groups].to_numpy())


def test_influence_is_the_mean_over_cells_with_an_interval_around_it(ranked):
    cc.tl.rank_circuit_genes(ranked, "t", n_bootstrap=500)
    table = gene_ranking(ranked, "t")["table"]
    hand = _hand_means(ranked).loc[list(zip(table["group"], table["gene"], strict=True))]
    np.testing.assert_allclose(table["influence"], hand["influence"], rtol=1e-12)
    np.testing.assert_allclose(table["attribution"], hand["attribution"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(table["frequency"], hand["frequency"], rtol=1e-12)
    assert (table["influence_lo"] <= table["influence"]).all() and (table["influence"] <= table["influence_hi"]).all()
    assert (table["influence_lo"] < table["influence_hi"]).all()
    for _, rows in table.groupby("group", sort=False):
        assert rows["influence"].is_monotonic_decreasing
        assert list(rows["rank"]) == list(range(1, len(rows) + 1))
        assert len(rows) == 30  # every gene of the group's sentences
    assert list(pd.unique(table["group"])) == ["mono", "B"]
    params = gene_ranking(ranked, "t")["params"]
    assert params["n_bootstrap"] == 500 and params["ci"] == 0.95 and list(params["n_cells"]) == [30, 30]
    assert params["knockout"] is False and table["knockout"].isna().all()
    # marker sets as the circuit's nodes name them
    sets = dict(zip(table["gene"], table["marker_sets"], strict=False))
    assert "CD14+ Monocyte" in sets["LYZ"].split(";") and sets["GENE3"] == ""
    assert set(table.loc[table["is_marker"], "gene"]) == {"LYZ", "CD14", "MS4A1", "NKG7"}


def test_bootstrap_interval_matches_resampling_and_shrinks_with_more_cells():
    rng = np.random.default_rng(0)
    matrix = rng.exponential(1.0, (40, 3))
    lo, hi = bootstrap_interval(matrix, 4000, 0.9, np.random.default_rng(1))
    draws = np.stack([matrix[rng.integers(0, 40, 40)].mean(0) for _ in range(4000)])  # the plain loop
    np.testing.assert_allclose(lo, np.quantile(draws, 0.05, axis=0), rtol=0.05)
    np.testing.assert_allclose(hi, np.quantile(draws, 0.95, axis=0), rtol=0.05)
    widths = {}
    for n in (10, 160):
        adata = ranked_circuit_adata((n,), seed=1)
        cc.tl.rank_circuit_genes(adata, "t", n_bootstrap=400)
        table = gene_ranking(adata, "t")["table"]
        assert (table["influence_lo"] <= table["influence"]).all()
        assert (table["influence"] <= table["influence_hi"]).all()
        widths[n] = float((table["influence_hi"] - table["influence_lo"]).mean())
    assert widths[160] < widths[10] / 2.5  # about sqrt(16) = 4 times narrower
    one = ranked_circuit_adata((1,))
    cc.tl.rank_circuit_genes(one, "t", n_bootstrap=10)
    table = gene_ranking(one, "t")["table"]
    np.testing.assert_allclose(table["influence_lo"], table["influence"])  # one cell: nothing to resample


def test_planted_position_adjusted():
    adata = ranked_circuit_adata((60, 60), bump=0.2, seed=2)
    cc.tl.rank_circuit_genes(adata, "t", n_bootstrap=10)
    table = gene_ranking(adata, "t")["table"].set_index(["group", "gene"])
    mono, b = table.loc["mono"], table.loc["B"]
    # the leader ranks first by influence, all of it positional
    assert mono.index[0] == RANKED_LEADER and b.index[0] == RANKED_LEADER
    assert mono.loc[RANKED_LEADER, "influence"] > 0.6
    assert abs(mono.loc[RANKED_LEADER, "position_adjusted"]) < 0.02
    pure = mono.drop(index=[RANKED_PLANTED])
    assert pure["position_adjusted"].abs().max() < 0.02
    # the planted gene: its bump times the share of cells holding it, less its own part of the positions' means
    planted = mono.loc[RANKED_PLANTED]
    assert planted["position_adjusted"] > 0.1
    assert planted["position_adjusted"] == pytest.approx(0.2 * planted["frequency"], rel=0.15)
    assert abs(b.loc[RANKED_PLANTED, "position_adjusted"]) < 0.02  # no bump in group B
    assert mono["position_adjusted"].idxmax() == RANKED_PLANTED
    # influence = positional + position_adjusted; the residuals of each position sum to 0
    np.testing.assert_allclose(table["positional"] + table["position_adjusted"], table["influence"], rtol=1e-12)
    for g in ("mono", "B"):
        assert abs(table.loc[g, "position_adjusted"].sum()) < 1e-12


def test_positional_expectation_is_the_mean_per_position():
    rank = np.array([0, 0, 1, 1, 1, 3])
    influence = np.array([1.0, 3.0, 0.5, 0.5, 2.0, 7.0])
    np.testing.assert_allclose(positional_expectation(rank, influence), [2, 2, 1, 1, 1, 7])
    np.testing.assert_allclose(ranked_positional([0, 5]), [1.0, np.exp(-1.0)])


def test_knockout_is_the_mean_deletion_effect(ranked):
    effects = ranked_knockouts(ranked)
    ranked.uns["circuits"]["t"]["gene_validation"] = {"effects": effects, "params": {"n_genes": 5}}
    cc.tl.rank_circuit_genes(ranked, "t", n_bootstrap=10)
    table = gene_ranking(ranked, "t")["table"].set_index(["group", "gene"])
    expected = effects.groupby(["group", "gene"])["deletion"].mean()
    np.testing.assert_allclose(table.loc[expected.index, "knockout"], expected, rtol=1e-12)
    assert table.loc[table.index.difference(expected.index), "knockout"].isna().all()
    ranked.uns["circuits"]["t"]["gene_validation"] = {"effects": effects[effects["gene"] != "GENE5"]}
    cc.tl.rank_circuit_genes(ranked, "t", n_bootstrap=10)
    table = gene_ranking(ranked, "t")["table"].set_index(["group", "gene"])
    kept = expected.drop(index="GENE5", level="gene")
    assert table.xs("GENE5", level="gene")["knockout"].isna().all()
    assert table["knockout"].notna().sum() == len(kept) > 50
    assert gene_ranking(ranked, "t")["params"]["knockout"] is True
    ranked.uns["circuits"]["t"]["gene_validation"] = {"effects": effects.drop(columns="deletion")}
    with pytest.raises(KeyError, match="deletion"):
        cc.tl.rank_circuit_genes(ranked, "t")


def test_de_and_expression_ranks_match_scanpy_and_the_data(ranked):
    reference = ranked.copy()
    sc.tl.rank_genes_groups(reference, "cell_type", method="wilcoxon")
    cc.tl.rank_circuit_genes(ranked, "t", n_bootstrap=10)
    table = gene_ranking(ranked, "t")["table"]
    X = np.asarray(ranked.X)
    for g in ("mono", "B"):
        mine = table[table["group"] == g].set_index("gene")
        names = list(reference.uns["rank_genes_groups"]["names"][g])
        scores = reference.uns["rank_genes_groups"]["scores"][g]
        de = pd.DataFrame({"rank": np.arange(1, len(names) + 1), "score": scores}, index=names).loc[mine.index]
        np.testing.assert_array_equal(mine["de_rank"], de["rank"])
        np.testing.assert_allclose(mine["de_score"], de["score"], rtol=1e-6)
        # expression: mean over all the group's cells (traced or not), 1 the highest
        means = X[(ranked.obs["cell_type"] == g).to_numpy()].mean(0)
        expected = pd.Series(rankdata(-means, method="min"), index=ranked.var_names).loc[mine.index]
        np.testing.assert_array_equal(mine["expression_rank"], expected)
    assert table.loc[(table["group"] == "mono") & (table["gene"] == "LYZ"), "de_rank"].item() == 1  # planted DE
    # .raw when present (the circuit's sentences read it), a layer when asked
    raw = ranked.copy()
    raw.raw = ad.AnnData(X[:, ::-1].copy(), obs=raw.obs, var=raw.var)
    raw.layers["flipped"] = X[:, ::-1].copy()
    for kwargs in ({}, {"layer": "flipped"}):
        cc.tl.rank_circuit_genes(raw, "t", n_bootstrap=10, **kwargs)
        other = gene_ranking(raw, "t")
        mono = other["table"][other["table"]["group"] == "mono"].set_index("gene")
        means = X[:, ::-1][(raw.obs["cell_type"] == "mono").to_numpy()].mean(0)
        expected = pd.Series(rankdata(-means, method="min"), index=raw.var_names).loc[mono.index]
        np.testing.assert_array_equal(mono["expression_rank"], expected)
    assert other["params"]["expression"] == "adata.layers['flipped']"


def test_without_groupby_no_de_and_traced_cells_for_expression(ranked):
    ranked.uns["circuits"]["t"]["params"]["groupby"] = ""
    cc.tl.rank_circuit_genes(ranked, "t", n_bootstrap=10)
    table = gene_ranking(ranked, "t")["table"]
    assert table["de_rank"].isna().all() and table["de_score"].isna().all()
    cells = pd.DataFrame(ranked.uns["circuits"]["t"]["cells"])
    traced = ranked.obs_names.isin(cells.loc[cells["group"] == "B", "obs_name"])
    means = np.asarray(ranked.X)[traced].mean(0)
    b = table[table["group"] == "B"].set_index("gene")
    expected = pd.Series(rankdata(-means, method="min"), index=ranked.var_names).loc[b.index]
    np.testing.assert_array_equal(b["expression_rank"], expected)


def test_h5ad_round_trip_and_getter(ranked, tmp_path):
    effects = ranked_knockouts(ranked)
    ranked.uns["circuits"]["t"]["gene_validation"] = {"effects": effects[effects["gene"] != "GENE5"]}
    cc.tl.rank_circuit_genes(ranked, "t", n_bootstrap=20)
    ranked.write_h5ad(tmp_path / "r.h5ad")
    back = ad.read_h5ad(tmp_path / "r.h5ad")
    for group in (None, "B"):
        pd.testing.assert_frame_equal(
            cc.get.rank_circuit_genes_df(back, "t", group), cc.get.rank_circuit_genes_df(ranked, "t", group)
        )
    params = gene_ranking(back, "t")["params"]
    assert list(params["groups"]) == ["mono", "B"] and bool(params["knockout"])

    every = cc.get.rank_circuit_genes_df(ranked, "t")
    assert list(every.columns[:3]) == ["group", "rank", "gene"] and len(every) == 60
    b = cc.get.rank_circuit_genes_df(ranked, "t", "B")
    assert set(b["group"]) == {"B"} and b["influence"].is_monotonic_decreasing and list(b["rank"]) == list(range(1, 31))
    adjusted = cc.get.rank_circuit_genes_df(ranked, "t", ["B", "mono"], sort_by="position_adjusted")
    assert list(pd.unique(adjusted["group"])) == ["B", "mono"]
    for _, rows in adjusted.groupby("group"):
        assert rows["position_adjusted"].is_monotonic_decreasing
    knock = cc.get.rank_circuit_genes_df(ranked, "t", "mono", sort_by="knockout")["knockout"]
    assert knock.dropna().is_monotonic_decreasing and knock.iloc[-1:].isna().all()  # missing ones last
    with pytest.raises(KeyError, match="not ranked"):
        cc.get.rank_circuit_genes_df(ranked, "t", "NK")
    with pytest.raises(ValueError, match="sort_by"):
        cc.get.rank_circuit_genes_df(ranked, "t", sort_by="rank")
    with pytest.raises(KeyError, match="rank_circuit_genes"):
        cc.get.rank_circuit_genes_df(ranked, "t", key_added="other")


def _snapshot(adata: ad.AnnData) -> dict:
    circuit = dict(adata.uns["circuits"]["t"])
    return {
        "X": np.asarray(adata.X).copy(),
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "uns": sorted(adata.uns),
        "circuits": sorted(adata.uns["circuits"]),
        "circuit": sorted(circuit),
        "genes": pd.DataFrame(circuit["genes"]).copy(),
        "layers": sorted(adata.layers),
        "obsm": sorted(adata.obsm),
        "varm": sorted(adata.varm),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], pd.DataFrame):
            pd.testing.assert_frame_equal(a[k], b[k])
        elif isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k], k


def test_adata_gains_only_the_ranking(ranked):
    ranked.uns["circuits"]["other"] = {"nodes": pd.DataFrame({"group": ["x"]})}
    before = _snapshot(ranked)
    out = cc.tl.rank_circuit_genes(ranked, "t", n_bootstrap=10, copy=True)
    assert isinstance(out, ad.AnnData) and GENE_RANKING in out.uns["circuits"]["t"]
    _assert_same(before, _snapshot(ranked))  # copy=True leaves adata as it was
    assert cc.tl.rank_circuit_genes(ranked, "t", n_bootstrap=10, key_added="mine") is None
    after = _snapshot(ranked)
    assert after["circuit"] == sorted([*before["circuit"], "mine"])
    after["circuit"] = before["circuit"]
    _assert_same(before, after)
    assert "rank_genes_groups" not in ranked.uns and "other" in ranked.uns["circuits"]
    pd.testing.assert_frame_equal(ranked.uns["circuits"]["t"]["mine"]["table"], gene_ranking(out, "t")["table"])


@pytest.mark.parametrize(
    ("change", "kwargs", "error", "match"),
    [
        (None, {"key": "nope"}, KeyError, "No circuit"),
        ("no genes", {}, KeyError, "trace it again"),
        (None, {"ci": 0.0}, ValueError, "ci"),
        (None, {"ci": 1.0}, ValueError, "ci"),
        (None, {"ci": 1.5}, ValueError, "ci"),
        (None, {"n_bootstrap": 0}, ValueError, "n_bootstrap"),
        (None, {"layer": "missing"}, KeyError, "missing"),
        (None, {"use_raw": True}, ValueError, "raw"),
        ("no groupby", {}, KeyError, "groupby"),
    ],
)
def test_errors_before_any_work(ranked, change, kwargs, error, match):
    if change == "no genes":
        del ranked.uns["circuits"]["t"]["genes"]
    if change == "no groupby":
        del ranked.obs["cell_type"]
    before = _snapshot(ranked) if change != "no genes" else None
    kwargs = {"key": "t", **kwargs}
    with pytest.raises(error, match=match):
        cc.tl.rank_circuit_genes(ranked, **kwargs)
    assert GENE_RANKING not in ranked.uns["circuits"]["t"]
    if before is not None:
        _assert_same(before, _snapshot(ranked))


def test_on_a_traced_circuit(toy_adata, tiny_c2s):
    cells = toy_adata[[i for i in range(12) if i != 3]].copy()  # cell 3 expresses nothing
    cc.tl.trace_circuit(cells, tiny_c2s, tiny_tset(), groupby="label", n_cells=3, max_feature_nodes=8, progress=False)
    cc.tl.rank_circuit_genes(cells, "label", n_bootstrap=50)
    table = cc.get.rank_circuit_genes_df(cells, "label")
    genes = pd.DataFrame(circuit_genes(cells, "label"))
    cell_table = pd.DataFrame(cells.uns["circuits"]["label"]["cells"])
    for group, rows in table.groupby("group"):
        traced = cell_table.loc[cell_table["group"] == group, "obs_name"]
        mine = genes[genes["group"] == group]
        assert set(rows["gene"]) == set(mine["gene"])
        for gene, influence in zip(rows["gene"], rows["influence"], strict=True):
            by_cell = [mine.loc[(mine["obs_name"] == c) & (mine["gene"] == gene), "influence"].sum() for c in traced]
            assert influence == pytest.approx(np.mean(by_cell), rel=1e-12, abs=1e-15)
    assert (table["influence"] > 0).any() and table["de_rank"].notna().all()
    np.testing.assert_allclose(table["positional"] + table["position_adjusted"], table["influence"], atol=1e-12)
