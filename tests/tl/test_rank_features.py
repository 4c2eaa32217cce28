from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse
from sklearn.metrics import roc_auc_score

import cellcircuits as cc
from cellcircuits.tl._rank_features import auroc


@pytest.fixture
def featured() -> ad.AnnData:
    """60 cells in 3 groups, 20 features; feature 7 fires only in group 'b', feature 3 is higher in 'a'."""
    rng = np.random.default_rng(0)
    groups = np.repeat(["a", "b", "c"], 20)
    F = rng.exponential(0.2, size=(60, 20)) * (rng.random((60, 20)) < 0.5)
    F[:, 7] = 0.0
    F[groups == "b", 7] = rng.uniform(1, 2, 20)
    F[groups == "a", 3] += 1.0
    genes = [f"G{i}" for i in range(30)]
    adata = ad.AnnData(np.zeros((60, 30)), obs=pd.DataFrame({"type": groups}, index=[f"c{i}" for i in range(60)]))
    adata.var_names = genes
    adata.obsm["X_transcoder_L2"] = sparse.csr_matrix(F)
    in_map = np.zeros((30, 20))
    in_map[[11, 4, 25], 7] = [3.0, 2.0, 1.0]  # feature 7 reads G11, then G4, then G25
    adata.varm["transcoder_L2_in"] = in_map
    return adata


def test_planted_feature_tops_its_group_with_every_method(featured):
    for method in ("wilcoxon", "t-test", "auroc"):
        cc.tl.rank_features_groups(featured, "type", layers=2, method=method, key_added=method)
        df = cc.get.rank_features_groups_df(featured, "b", key=method)
        assert df["feature"].iloc[0] == 7, method
        assert df["pval_adj"].iloc[0] < 1e-6 and df["logfoldchange"].iloc[0] > 10
        assert df["top_genes"].iloc[0] == "G11, G4, G25, G0, G1"
        assert cc.get.rank_features_groups_df(featured, "a", key=method)["feature"].iloc[0] == 3
    assert cc.get.rank_features_groups_df(featured, "b", key="auroc")["score"].iloc[0] == pytest.approx(1.0)


def test_layout_and_statistics_equal_scanpy(featured):
    cc.tl.rank_features_groups(featured, "type", layers=2, method="t-test")
    ours = featured.uns["rank_features_groups"]
    ref = ad.AnnData(featured.obsm["X_transcoder_L2"].toarray(), obs=featured.obs.copy())
    ref.var_names = [str(i) for i in range(20)]
    sc.tl.rank_genes_groups(ref, "type", method="t-test", use_raw=False)
    theirs = ref.uns["rank_genes_groups"]
    assert set(theirs) <= set(ours)
    for g in ("a", "b", "c"):
        np.testing.assert_array_equal(ours["names"][g], theirs["names"][g])
        np.testing.assert_allclose(ours["scores"][g], theirs["scores"][g], rtol=1e-5)
        np.testing.assert_allclose(ours["pvals_adj"][g], theirs["pvals_adj"][g], rtol=1e-5)
    assert ours["params"]["layer"] == 2 and ours["params"]["method"] == "t-test"


def test_auroc_matches_sklearn_and_is_sorted(featured):
    X = featured.obsm["X_transcoder_L2"].toarray()
    inside = (featured.obs["type"] == "c").to_numpy()
    np.testing.assert_allclose(auroc(X, inside), [roc_auc_score(inside, X[:, j]) for j in range(20)], atol=1e-12)
    cc.tl.rank_features_groups(featured, "type", layers=2, method="auroc")
    df = cc.get.rank_features_groups_df(featured, "c")
    assert np.all(np.diff(df["score"]) <= 0)
    ref = {j: roc_auc_score(inside, X[:, j]) for j in range(20)}
    np.testing.assert_allclose(df["score"], [ref[f] for f in df["feature"]], atol=1e-6)


def test_rank_features_errors(featured):
    with pytest.raises(KeyError, match=r"run cellcircuits\.tl\.transcode"):
        cc.tl.rank_features_groups(featured, "type", layers=0)
    with pytest.raises(KeyError, match="groupby 'cluster'"):
        cc.tl.rank_features_groups(featured, "cluster", layers=2)
    featured.obs["one"] = "x"
    with pytest.raises(ValueError, match="1 group"):
        cc.tl.rank_features_groups(featured, "one", layers=2)
    with pytest.raises(ValueError, match="method"):
        cc.tl.rank_features_groups(featured, "type", layers=2, method="logreg")
    with pytest.raises(KeyError, match="No ranking"):
        cc.get.rank_features_groups_df(featured, "a", key="nothing")
    cc.tl.rank_features_groups(featured, "type", layers=2)
    with pytest.raises(KeyError, match="was not ranked"):
        cc.get.rank_features_groups_df(featured, "z")
    out = cc.tl.rank_features_groups(featured, "type", layers=2, key_added="copy", copy=True)
    assert "copy" in out.uns and "copy" not in featured.uns


def test_torch_threads_survive_scanpy(featured):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cc.tl.rank_features_groups(featured, "type", layers=2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_old_layer_spelling_warns_and_gives_the_same_ranking(featured):
    cc.tl.rank_features_groups(featured, "type", layers=2, key_added="new")
    with pytest.warns(FutureWarning, match=r"rank_features_groups\(layer=\.\.\.\) is deprecated"):
        cc.tl.rank_features_groups(featured, "type", layer=2, key_added="old")
    for g in ("a", "b", "c"):
        new = cc.get.rank_features_groups_df(featured, g, key="new")
        pd.testing.assert_frame_equal(cc.get.rank_features_groups_df(featured, g, key="old"), new)
    cc.tl.rank_features_groups(featured, "type", layers=[2], key_added="one")  # one layer in a list
    assert featured.uns["one"]["params"]["layer"] == 2
    with pytest.raises(TypeError, match="both layer= and layers="):
        cc.tl.rank_features_groups(featured, "type", layer=2, layers=2)
    with pytest.raises(TypeError, match="one model layer"):
        cc.tl.rank_features_groups(featured, "type", layers=[1, 2])
