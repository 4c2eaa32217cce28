from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import cellcircuits as cc
from cellcircuits.tl._interpret import group_means, shared_spelling

N_GENES, N_FEATURES = 300, 10


@pytest.fixture
def featured() -> tuple[ad.AnnData, dict[str, list[str]]]:
    """60 cells in groups a/b/c and 10 features of layer 0 and 2.

    Feature 0 fires only in group 'a' and reads set S0; feature 1 fires everywhere (dense) and reads set S1;
    feature 9 never fires. The other features read random genes.
    """
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(N_GENES)]
    sets = {f"S{j}": genes[20 * j : 20 * j + 20] for j in range(10)}
    groups = np.repeat(["a", "b", "c"], 20)
    X = rng.exponential(0.1, size=(60, N_FEATURES)) * (rng.random((60, N_FEATURES)) < 0.3)
    X[:, 0] = 0.0
    X[groups == "a", 0] = 3.0 + rng.random(20)
    X[:, 1] = 1.0 + rng.random(60)
    X[:, 9] = 0.0
    in_map = rng.exponential(0.05, size=(N_GENES, N_FEATURES))
    in_map[:20, 0] += 2.0  # S0
    in_map[20:40, 1] += 2.0  # S1
    in_map[:, 9] = 0.0
    out_map = rng.normal(size=(N_GENES, N_FEATURES))
    obs = pd.DataFrame({"type": groups}, index=[f"c{i}" for i in range(60)])
    adata = ad.AnnData(np.zeros((60, N_GENES), dtype=np.float32), obs=obs)
    adata.var_names = genes
    for layer in (0, 2):
        adata.obsm[f"X_transcoder_L{layer}"] = sparse.csr_matrix(X)
        adata.varm[f"transcoder_L{layer}_in"] = in_map
        adata.varm[f"transcoder_L{layer}_out"] = out_map
    adata.uns["transcoder"] = {"params": {"layers": np.array([0, 2])}, "unseen_genes": np.array([], dtype=str)}
    return adata, sets


def test_planted_features_are_labelled(featured):
    adata, sets = featured
    cc.tl.interpret_features(adata, groupby="type", net=sets, n_top_genes=20, n_top=2)
    table = adata.uns["interpret_features"]["features"]
    assert len(table) == 2 * N_FEATURES
    f = table[table["layer"] == 0].set_index("feature")
    assert f.loc[0, "label"] == "S0" and f.loc[0, "enriched"]
    assert f.loc[0, "cell_type"] == "a" and f.loc[0, "cell_type_auroc"] == pytest.approx(1.0)
    # group 'a' holds all of feature 0's activation, so its share of the summed group means is 1
    assert f.loc[0, "specificity"] == pytest.approx(1.0)
    assert f.loc[1, "label"] == "S1" and f.loc[1, "dense"] and not f.loc[0, "dense"]
    assert f.loc[9, "label"] == "" and not f.loc[9, "live"]
    # unenriched live features are labelled by their top input genes
    plain = f[f["live"] & ~f["enriched"]]
    assert len(plain) > 0
    assert all(lab == genes for lab, genes in zip(plain["label"], plain["top_input_genes"], strict=True))
    top_genes = f.loc[0, "top_input_genes"].split(", ")
    assert len(top_genes) == 5 and set(top_genes) <= set(sets["S0"])


def test_summary_counts(featured):
    adata, sets = featured
    cc.tl.interpret_features(adata, groupby="type", net=sets, n_top_genes=20, n_top=2, key_added="res")
    table = adata.uns["res"]["features"]
    summary = adata.uns["res"]["summary"]
    assert list(summary["layer"]) == [0, 2]
    for _, row in summary.iterrows():
        t = table[table["layer"] == row["layer"]]
        live = t[t["live"]]
        assert row["n_live_features"] == N_FEATURES - 1 == len(live)
        # the two most active live features are the planted 0 and 1, both enriched
        assert row["fraction_enriched_top2"] == 1.0
        assert row["fraction_enriched_live"] == pytest.approx(live["enriched"].mean())
        assert row["n_enriched_live"] == live["enriched"].sum()
    # the enrichment each layer needed was run and stored
    assert adata.uns["transcoder_L2_in_enrichment"]["params"]["layer"] == 2


def test_stored_enrichment_is_reused(featured):
    adata, sets = featured
    cc.tl.feature_enrichment(adata, {"S3": sets["S3"], "S0": sets["S0"]}, layers=0, n_top_genes=20)
    cc.tl.interpret_features(adata, layers=0, net=sets, n_top_genes=20)
    table = adata.uns["interpret_features"]["features"].set_index("feature")
    assert set(table.loc[table["live"], "best_term"]) <= {"S0", "S3"}
    assert table.loc[9, "best_term"] == ""  # a dead feature is not tested
    assert (table["cell_type"] == "").all()  # no groupby


def test_group_means():
    X = sparse.csr_matrix(np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]))
    means, groups = group_means(X, pd.Series(["x", "y", np.nan]))
    np.testing.assert_allclose(means, [[1.0, 0.0], [3.0, 2.0]])
    assert list(groups) == ["x", "y"]


def test_h5ad_round_trip(featured, tmp_path):
    adata, sets = featured
    cc.tl.interpret_features(adata, groupby="type", net=sets, n_top_genes=20)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    ref = adata.uns["interpret_features"]
    pd.testing.assert_frame_equal(
        back.uns["interpret_features"]["summary"], ref["summary"], check_dtype=False, check_index_type=False
    )
    pd.testing.assert_frame_equal(
        back.uns["interpret_features"]["features"], ref["features"], check_dtype=False, check_index_type=False
    )


def test_bad_input(featured):
    adata, sets = featured
    with pytest.raises(KeyError, match="not a column"):
        cc.tl.interpret_features(adata, groupby="nope", net=sets)
    adata.obs["one"] = "x"
    with pytest.raises(ValueError, match="1 group"):
        cc.tl.interpret_features(adata, groupby="one", net=sets)
    with pytest.raises(ValueError, match="were not transcoded"):
        cc.tl.interpret_features(adata, layers=1, net=sets)
    with pytest.raises(ValueError, match="empty"):
        cc.tl.interpret_features(adata, net={})
    with pytest.raises(KeyError, match="transcode"):
        cc.tl.interpret_features(adata, key="other", net=sets)
    assert "interpret_features" not in adata.uns
    assert not any(k.endswith("enrichment") for k in adata.uns)


def test_copy_leaves_input_alone(featured):
    adata, sets = featured
    out = cc.tl.interpret_features(adata, groupby="type", net=sets, copy=True)
    assert "interpret_features" in out.uns and "interpret_features" not in adata.uns
    assert "transcoder_L0_in_enrichment" not in adata.uns


def test_shared_spelling():
    assert shared_spelling(["HNRNPA1", "HNRNPK", "HNRNPF", "LYZ"]) == ("HNR", 0.75)
    assert shared_spelling(["CD14", "LYZ", "FCN1"]) == ("CD1", pytest.approx(1 / 3))  # ties: first in order
    assert shared_spelling([]) == ("", 0.0)


def test_old_layer_spelling_warns_and_gives_the_same_table(featured):
    adata, sets = featured
    cc.tl.interpret_features(adata, layers=0, net=sets, n_top_genes=20, key_added="new")
    with pytest.warns(FutureWarning, match=r"interpret_features\(layer=\.\.\.\) is deprecated"):
        cc.tl.interpret_features(adata, layer=0, net=sets, n_top_genes=20, key_added="old")
    pd.testing.assert_frame_equal(adata.uns["old"]["features"], adata.uns["new"]["features"])
    np.testing.assert_array_equal(adata.uns["old"]["params"]["layers"], [0])
