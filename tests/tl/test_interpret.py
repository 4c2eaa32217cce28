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


def circuit_nodes(rows: list[tuple[str, str, int, int, float]]) -> pd.DataFrame:
    """A circuit's node table from ``(group, kind, layer, feature, influence)`` rows."""
    df = pd.DataFrame(rows, columns=["group", "kind", "layer", "feature", "influence"])
    df["node"] = [f"n{i}" for i in range(len(df))]
    return df


def test_top_features_by_circuit_use(featured):
    adata, sets = featured
    # two circuits: feature nodes of layers 0 and 2 in two groups, and nodes of other kinds that must not count
    adata.uns["circuits"] = {
        "one": {
            "nodes": circuit_nodes(
                [
                    ("a", "feature", 0, 3, 0.5),
                    ("a", "feature", 0, 3, 0.25),  # the same feature at a second position
                    ("b", "feature", 0, 4, 0.6),
                    ("a", "feature", 0, 0, 0.2),
                    ("a", "feature", 2, 5, 0.9),
                    ("a", "gene", -1, -1, 5.0),
                    ("a", "error", 0, -1, 5.0),
                ]
            )
        },
        "two": {"nodes": circuit_nodes([("a", "feature", 0, 0, 0.3), ("b", "feature", 0, 7, 0.1)])},
    }
    cc.tl.interpret_features(adata, groupby="type", net=sets, n_top_genes=20, n_top=2)
    result = adata.uns["interpret_features"]
    table = result["features"].set_index(["layer", "feature"])["circuit_influence"]
    # by hand: layer 0 -> feature 3: 0.75, 4: 0.6, 0: 0.5, 7: 0.1; layer 2 -> feature 5: 0.9; the rest 0
    expected = {(0, 3): 0.75, (0, 4): 0.6, (0, 0): 0.5, (0, 7): 0.1, (2, 5): 0.9}
    for (layer, feature), value in table.items():
        assert value == pytest.approx(expected.get((layer, feature), 0.0))
    summary = result["summary"].set_index("layer")
    assert summary.loc[0, "n_circuit_features"] == 4 and summary.loc[2, "n_circuit_features"] == 1
    enriched = result["features"].set_index(["layer", "feature"])["enriched"]
    # the two of most use in layer 0 are features 3 and 4; in layer 2 only feature 5 is used
    assert summary.loc[0, "fraction_enriched_top2_circuit"] == pytest.approx(enriched[[(0, 3), (0, 4)]].mean())
    assert summary.loc[2, "fraction_enriched_top2_circuit"] == pytest.approx(float(enriched[(2, 5)]))
    assert list(result["params"]["circuits"]) == ["one", "two"]
    # one circuit by name
    cc.tl.interpret_features(adata, net=sets, n_top_genes=20, n_top=2, circuits="two", key_added="two")
    two = adata.uns["two"]["features"].set_index(["layer", "feature"])["circuit_influence"]
    assert two[(0, 0)] == pytest.approx(0.3) and two[(0, 3)] == 0.0
    with pytest.raises(KeyError, match="No circuit"):
        cc.tl.interpret_features(adata, net=sets, circuits="three", key_added="three")
    assert "three" not in adata.uns


def test_without_circuits_the_circuit_use_is_nan(featured):
    adata, sets = featured
    cc.tl.interpret_features(adata, net=sets, n_top_genes=20, n_top=2)
    result = adata.uns["interpret_features"]
    assert result["features"]["circuit_influence"].isna().all()
    assert result["summary"]["fraction_enriched_top2_circuit"].isna().all()
    assert (result["summary"]["n_circuit_features"] == 0).all()
    assert len(result["params"]["circuits"]) == 0


def test_shuffled_gene_labels_control(featured):
    adata, sets = featured
    cc.tl.interpret_features(adata, net=sets, n_top_genes=20, n_top=2)
    result = adata.uns["interpret_features"]
    table, summary = result["features"], result["summary"]
    # the planted features are enriched; with the gene labels shuffled nothing is
    assert table.loc[table["feature"].isin([0, 1]), "enriched"].all()
    assert (summary["fraction_enriched_top2"] == 1.0).all()
    assert (summary["fraction_enriched_top2_shuffled"] == 0.0).all()
    assert (summary["fraction_enriched_live_shuffled"] == 0.0).all()
    assert (table.loc[table["live"], "enrichment_fdr_shuffled"] > 0.05).all()
    # the control's maps are the same values under other genes: the shuffled run tested the same features
    tested = adata.uns["transcoder_L0_in_enrichment"]["best"]["feature"]
    assert table.loc[(table["layer"] == 0) & ~table["feature"].isin(tested), "enrichment_fdr_shuffled"].eq(1.0).all()
    # the user's maps are left alone
    assert adata.varm["transcoder_L0_in"][:20, 0].min() > 2.0
    assert list(summary["gene_tokens"]) == ["all", "all"]
    off = cc.tl.interpret_features(adata, net=sets, n_top_genes=20, shuffled_control=False, copy=True)
    assert "enriched_shuffled" not in off.uns["interpret_features"]["features"]
    assert off.uns["interpret_features"]["summary"]["fraction_enriched_live_shuffled"].isna().all()


def test_shuffled_control_is_the_enrichment_of_maps_permuted_among_seen_genes(featured):
    adata, sets = featured
    unseen = adata.var_names[-10:]
    adata.varm["transcoder_L0_in"] = adata.varm["transcoder_L0_in"].copy()
    adata.varm["transcoder_L0_in"][-10:] = 0.0
    adata.uns["transcoder"]["unseen_genes"] = np.asarray(unseen)
    cc.tl.interpret_features(adata, layers=0, net=sets, n_top_genes=20, random_state=3)
    table = adata.uns["interpret_features"]["features"]
    # by hand: the rows of the genes the model saw permuted with the seed (random_state, layer), the rest in place
    rows = np.arange(N_GENES)
    rows[: N_GENES - 10] = np.random.default_rng([3, 0]).permutation(N_GENES - 10)
    by_hand = adata.copy()
    by_hand.varm["transcoder_L0_in"] = adata.varm["transcoder_L0_in"][rows]
    cc.tl.feature_enrichment(by_hand, sets, layers=0, n_top_genes=20, key_added="by_hand")
    best = by_hand.uns["by_hand"]["best"].set_index("feature")["fdr"]
    live = table[table["live"]].set_index("feature")
    np.testing.assert_allclose(live["enrichment_fdr_shuffled"], best.reindex(live.index))
    assert (live["enriched_shuffled"] == (best.reindex(live.index) < 0.05)).all()


def test_read_out_mode_is_recorded(featured):
    adata, sets = featured
    adata.uns["transcoder"]["params"]["gene_tokens"] = "identifying"
    cc.tl.interpret_features(adata, net=sets, n_top_genes=20)
    assert list(adata.uns["interpret_features"]["summary"]["gene_tokens"]) == ["identifying", "identifying"]
    assert adata.uns["interpret_features"]["params"]["gene_tokens"] == "identifying"
