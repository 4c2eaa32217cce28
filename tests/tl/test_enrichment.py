from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import cellcircuits as cc
from cellcircuits.tl._enrichment import as_net
from cellcircuits.tl._enrichment_methods import fdr, one_sided, ora, top_gene_mask

N_GENES, N_FEATURES = 400, 12


def _sets(genes: list[str], rng: np.random.Generator, n: int = 60) -> dict[str, list[str]]:
    return {f"T{j}": sorted(rng.choice(genes, int(rng.integers(6, 40)), replace=False)) for j in range(n)}


@pytest.fixture
def mapped() -> tuple[ad.AnnData, dict[str, list[str]]]:
    """400 genes x 12 features of input maps: feature 0 planted on set T3, feature 1 is its shuffled control."""
    rng = np.random.default_rng(0)
    genes = [f"gene{i}" for i in range(N_GENES)]  # lower case on purpose: symbols are upper-cased
    sets = _sets([g.upper() for g in genes], rng)
    values = rng.exponential(0.3, size=(N_GENES, N_FEATURES)) * (rng.random((N_GENES, N_FEATURES)) < 0.3)
    planted = [genes.index(g.lower()) for g in sets["T3"]]
    values[:, 0] = rng.exponential(0.1, N_GENES)
    values[planted, 0] = 2.0 + rng.random(len(planted))
    values[:, 1] = rng.permutation(values[:, 0])
    values[:, 11] = 0.0  # a dead feature
    cells = rng.random((30, N_FEATURES)) * (values.max(0) > 0)
    adata = ad.AnnData(np.zeros((30, N_GENES), dtype=np.float32))
    adata.var_names = genes
    adata.varm["transcoder_L1_in"] = values
    adata.varm["transcoder_L1_out"] = values[:, ::-1].copy()
    adata.obsm["X_transcoder_L1"] = sparse.csr_matrix(cells)
    adata.uns["transcoder"] = {"params": {"layers": np.array([1])}, "unseen_genes": np.array(["GENE399"])}
    return adata, sets


def test_ora_equals_gseapy_and_decoupler_query_set():
    import decoupler as dc
    import gseapy

    rng = np.random.default_rng(1)
    universe = [f"G{i}" for i in range(300)]
    sets = _sets(universe, rng, n=25)
    values = rng.normal(size=(3, len(universe)))
    query = top_gene_mask(values, 40)
    net, _ = as_net(sets)
    M, terms = cc.tl._enrichment.membership(net, universe)
    overlap, pvals, odds = ora(query, M)
    for i in range(3):
        genes = [universe[j] for j in query[i].indices]
        theirs = gseapy.enrich(genes, sets, background=universe, cutoff=1.0, no_plot=True, outdir=None).results
        theirs = theirs.set_index("Term")
        for j, term in enumerate(terms):
            if overlap[i, j] == 0:
                assert term not in theirs.index  # gseapy skips empty overlaps; we give them p = 1
                assert pvals[i, j] == 1.0
                continue
            assert pvals[i, j] == pytest.approx(theirs.loc[term, "P-value"], rel=1e-9)
            assert odds[i, j] == pytest.approx(theirs.loc[term, "Odds Ratio"], rel=1e-9)
            assert f"{overlap[i, j]}/" in theirs.loc[term, "Overlap"]
        qs = dc.mt.query_set(genes, net, n_bg=len(universe), tmin=1).set_index("source")
        np.testing.assert_allclose(pvals[i], qs.loc[terms, "pval"].to_numpy(), rtol=1e-6)


def test_top_gene_mask_takes_the_largest_positive_values():
    values = np.array([[0.0, 3.0, 1.0, 2.0], [-1.0, 0.0, 0.0, 5.0]])
    mask = top_gene_mask(values, 2).toarray()
    np.testing.assert_array_equal(mask, [[0, 1, 0, 1], [0, 0, 0, 1]])


def test_planted_feature_is_enriched_and_its_shuffled_control_is_not(mapped):
    adata, sets = mapped
    for method in ("ora", "ulm"):
        cc.tl.feature_enrichment(adata, sets, layers=1, method=method, n_top_genes=30, key_added=method)
        best = adata.uns[method]["best"].set_index("feature")
        assert best.loc[0, "term"] == "T3", method
        assert best.loc[0, "fdr"] < 1e-4, method
        assert best.loc[1, "fdr"] > 0.05, method
        assert 11 not in best.index  # dead features are not tested
        assert adata.uns[method]["params"]["n_features"] == N_FEATURES - 1
    # the overlapping genes of the planted term are reported, highest first
    best = adata.uns["ora"]["best"].set_index("feature")
    assert set(best.loc[0, "genes"].split(";")) <= set(sets["T3"])
    assert best.loc[0, "n_overlap"] == len([g for g in sets["T3"] if g != "GENE399"])


def test_gsea_finds_the_planted_set(mapped):
    adata, sets = mapped
    small = {k: sets[k] for k in ("T1", "T2", "T3", "T4")}
    cc.tl.feature_enrichment(
        adata, small, layers=1, method="gsea", features=[0, 1], permutations=200, progress=False, key_added="gsea"
    )
    best = adata.uns["gsea"]["best"].set_index("feature")
    assert best.loc[0, "term"] == "T3" and best.loc[0, "score"] > 1.5
    assert best.loc[0, "pval"] < 0.01
    assert best.loc[1, "fdr"] > 0.05


def test_a_term_the_feature_avoids_is_not_an_enrichment(mapped):
    adata, sets = mapped
    values = np.asarray(adata.varm["transcoder_L1_in"]).copy()
    name = max(sets, key=lambda k: len(sets[k]))
    avoided = [adata.var_names.get_loc(g.lower()) for g in sets[name]]
    values[:, 2] = 1.0 + np.random.default_rng(3).random(N_GENES)
    values[avoided, 2] = 0.0  # active on every gene but those of one set
    values[:, 4] = 0.0  # no slope to test: score 0, p-value 1 (decoupler alone would fail on it)
    adata.varm["transcoder_L1_in"] = values
    cc.tl.feature_enrichment(adata, sets, layers=1, method="ulm", features=[0, 2, 4], max_pval=1.0, key_added="ulm")
    ulm = adata.uns["ulm"]["results"].set_index(["feature", "term"])
    assert ulm.loc[(2, name), "score"] < -5  # a strongly negative slope: depletion, not enrichment
    assert ulm.loc[(2, name), "pval"] > 0.99
    assert ulm.loc[(0, "T3"), "fdr"] < 1e-4
    assert (ulm.loc[4, "score"] == 0).all() and (ulm.loc[4, "pval"] == 1).all()
    cc.tl.feature_enrichment(
        adata, {name: sets[name], "T3": sets["T3"]}, layers=1, method="gsea", features=[2], permutations=100,
        progress=False, max_pval=1.0, key_added="gsea",
    )  # fmt: skip
    gsea = adata.uns["gsea"]["results"].set_index("term")
    assert gsea.loc[name, "score"] < 0 and gsea.loc[name, "pval"] == 1.0


def test_one_sided_p_values():
    score = np.array([2.0, -2.0, 0.0])
    pvals = np.array([0.04, 0.04, 1.0])
    np.testing.assert_allclose(one_sided(score, pvals, "ulm"), [0.02, 0.98, 1.0])
    np.testing.assert_allclose(one_sided(score, pvals, "gsea"), [0.04, 1.0, 1.0])


def test_fdr_is_corrected_across_features_and_terms(mapped):
    adata, sets = mapped
    cc.tl.feature_enrichment(adata, sets, layers=1, n_top_genes=30, max_pval=1.0)
    res = adata.uns["transcoder_L1_in_enrichment"]
    params = res["params"]
    assert params["n_tests"] == params["n_features"] * params["n_terms"]
    table = res["results"]
    # every tested pair was kept with max_pval=1; BH over all of them reproduces the stored FDR
    assert len(table) == params["n_tests"]
    np.testing.assert_allclose(np.sort(table["fdr"].to_numpy()), np.sort(fdr(table["pval"].to_numpy())))
    # the universe: genes of the map that are in some set, less the unseen GENE399
    in_sets = {g for genes in sets.values() for g in genes} - {"GENE399"}
    assert params["universe_size"] == len(in_sets)


def test_net_formats_agree(mapped, tmp_path):
    adata, sets = mapped
    path = tmp_path / "sets.gmt"
    path.write_text("".join(f"{k}\tdesc\t" + "\t".join(v) + "\n" for k, v in sets.items()))
    long = pd.DataFrame([(k, g.lower()) for k, v in sets.items() for g in v], columns=["source", "target"])
    results = []
    for i, net in enumerate((sets, str(path), long)):
        cc.tl.feature_enrichment(adata, net, layers=1, key_added=f"e{i}")
        results.append(adata.uns[f"e{i}"]["best"])
    pd.testing.assert_frame_equal(results[0], results[1])
    pd.testing.assert_frame_equal(results[0], results[2])


def test_shipped_markers_and_side_out():
    rng = np.random.default_rng(2)
    markers = cc.ds.gene_sets("markers_immune")
    genes = sorted({g for v in markers.values() for g in v})
    values = rng.exponential(0.1, size=(len(genes), 3))
    mono = next(k for k in markers if "CD14" in k)
    values[[genes.index(g) for g in markers[mono]], 2] = 5.0
    small = ad.AnnData(np.zeros((2, len(genes))))
    small.var_names = genes
    small.varm["tc_L0_out"] = values
    cc.tl.feature_enrichment(small, "markers_immune", layers=0, side="out", key="tc", n_top_genes=15)
    best = small.uns["tc_L0_out_enrichment"]["best"].set_index("feature")
    assert best.loc[2, "term"] == mono and best.loc[2, "fdr"] < 1e-6


def test_bad_input(mapped):
    adata, sets = mapped
    before = {k: v.copy() for k, v in adata.varm.items()}
    with pytest.raises(ValueError, match="empty"):
        cc.tl.feature_enrichment(adata, {}, layers=1)
    with pytest.raises(ValueError, match="no gene is shared"):
        cc.tl.feature_enrichment(adata, {"A": ["CD3E", "CD4", "CD8A", "NKG7", "LYZ"]}, layers=1)
    with pytest.raises(ValueError, match="between 5 and 500"):
        cc.tl.feature_enrichment(adata, {"A": ["GENE1", "GENE2"]}, layers=1)
    with pytest.raises(KeyError, match="transcode"):
        cc.tl.feature_enrichment(adata, sets, layers=3)
    with pytest.raises(ValueError, match="method"):
        cc.tl.feature_enrichment(adata, sets, layers=1, method="fisher")
    with pytest.raises(ValueError, match="source"):
        cc.tl.feature_enrichment(adata, pd.DataFrame({"a": [1]}), layers=1)
    with pytest.raises(FileNotFoundError):
        cc.tl.feature_enrichment(adata, "missing.gmt", layers=1)
    for k, v in before.items():
        np.testing.assert_array_equal(adata.varm[k], v)
    assert not any(k.endswith("enrichment") for k in adata.uns)


def test_copy_and_h5ad_round_trip(mapped, tmp_path):
    adata, sets = mapped
    out = cc.tl.feature_enrichment(adata, sets, layers=1, copy=True)
    assert "transcoder_L1_in_enrichment" not in adata.uns
    path = tmp_path / "e.h5ad"
    out.write_h5ad(path)
    back = ad.read_h5ad(path)
    res, ref = back.uns["transcoder_L1_in_enrichment"], out.uns["transcoder_L1_in_enrichment"]
    pd.testing.assert_frame_equal(res["best"], ref["best"], check_dtype=False, check_index_type=False)
    assert res["params"]["method"] == "ora" and res["params"]["universe_size"] == ref["params"]["universe_size"]


def test_layer_is_the_old_name_of_layers(mapped):
    adata, sets = mapped
    cc.tl.feature_enrichment(adata, sets, layers=1, key_added="new")
    with pytest.warns(FutureWarning, match="layers="):
        cc.tl.feature_enrichment(adata, sets, layer=1, key_added="old")
    for part in ("best", "results"):
        pd.testing.assert_frame_equal(adata.uns["old"][part], adata.uns["new"][part])
    assert adata.uns["old"]["params"] == adata.uns["new"]["params"]
