from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import cellcircuits as cc
from cellcircuits.tl._detection import count_active, detection_auroc, shuffled_detection_auroc
from cellcircuits.tl._rank_features import auroc

from ..helpers import (
    GENES,
    planted_feature_adata,
    planted_feature_read_tokens,
    planted_feature_tokens,
    planted_feature_transcoders,
)

PLANTED = ["LYZ", "GNLY", "NKG7", "CD3E", "CD79A"]
CD_GENES = [g for g in GENES if g.startswith("CD")]
NET = {
    "planted": PLANTED,
    "rest": [g for g in GENES if g not in PLANTED],
    "cd": CD_GENES,
}


@pytest.fixture
def planted(tiny_c2s):
    """``tiny_c2s`` with a layer-0 transcoder: feature 0 fires at the identifying tokens of exactly the genes of
    ``PLANTED``, feature 1 at the shared prefix token " CD" only; 60 cells, the first 40 ``train``."""
    tok = tiny_c2s.tokenizer
    gene_level = planted_feature_tokens(tok, GENES, PLANTED, "identifying")
    prefix = set(tok(" CD", add_special_tokens=False)["input_ids"])
    tset = planted_feature_transcoders(tiny_c2s, GENES, {0: gene_level, 1: prefix})
    adata = planted_feature_adata()
    train = adata[adata.obs["split"] == "train"].copy()
    return tiny_c2s, tset, adata, train


def interpret(model, tset, train, gene_tokens):
    cc.tl.transcode(train, model, tset, gene_tokens=gene_tokens, progress=False)
    # the " CD" set holds 3 genes: test sets from 3 genes on, and let interpret_features reuse the result
    cc.tl.feature_enrichment(train, NET, layers=0, n_top_genes=5, min_size=3)
    cc.tl.interpret_features(train, net=NET)
    return train.uns["interpret_features"]["features"].set_index("feature")


def occurrences_in(adata, model, genes):
    """How many times ``genes`` occur in the sentences the model reads for ``adata``'s cells."""
    sentences = cc.pp.cell_sentences(adata, n_genes=model.prompt.n_genes, copy=True).obs["cell_sentence"]
    return sum(g in genes for s in sentences for g in s.split())


def test_planted_feature_is_enriched_and_detected_at_identifying_tokens(planted, tmp_path):
    model, tset, adata, train = planted
    table = interpret(model, tset, train, "identifying")
    assert table.loc[0, "enriched"] and table.loc[0, "best_term"] == "planted"
    assert table.loc[0, "top_input_genes"] and set(table.loc[0, "top_input_genes"].split(", ")) <= set(PLANTED)
    assert train.uns["interpret_features"]["summary"]["gene_tokens"].tolist() == ["identifying"]
    assert not table.loc[0, "enriched_shuffled"]

    test = adata.obs["split"].to_numpy() == "test"
    cc.tl.score_feature_labels(train, model, tset, cells=adata[test], net=NET, n_shuffles=400, progress=False)
    scored = train.uns["interpret_features"]["features"].set_index("feature")
    assert scored.loc[0, "detection_auroc"] == pytest.approx(1.0)
    assert scored.loc[0, "detection_auroc_shuffled"] == pytest.approx(0.5, abs=0.03)
    # the feature fires at every occurrence of a planted gene in the held-out cells, and nowhere else
    n_planted = occurrences_in(adata[test], model, PLANTED)
    assert scored.loc[0, "detection_n_positive"] == n_planted
    assert scored.loc[0, "detection_n_negative"] == occurrences_in(adata[test], model, GENES) - n_planted
    # unlabelled features are not scored
    assert scored.loc[~scored["enriched"], "detection_auroc"].isna().all()
    summary = train.uns["interpret_features"]["summary"]
    assert summary["n_detection_scored"].iloc[0] == scored["detection_auroc"].notna().sum() >= 1
    assert summary["median_detection_auroc"].iloc[0] == pytest.approx(scored["detection_auroc"].median())
    detection = train.uns["interpret_features"]["detection"]
    assert detection["cells"] == "other AnnData" and detection["n_cells"] == test.sum()
    train.write_h5ad(tmp_path / "scored.h5ad")
    back = ad.read_h5ad(tmp_path / "scored.h5ad").uns["interpret_features"]
    np.testing.assert_allclose(back["features"]["detection_auroc"], scored["detection_auroc"].to_numpy())
    assert back["detection"]["gene_tokens"] == "identifying"


def test_prefix_feature_is_read_only_at_every_token(planted):
    model, tset, adata, _ = planted
    every_tokens = adata.copy()
    every = interpret(model, tset, every_tokens, "all")
    identifying = interpret(model, tset, adata.copy(), "identifying")
    # the feature planted on " CD" maps to the CD genes when every token is read, and is silent at identifying ones
    read_by = every_tokens.var_names[every_tokens.varm["transcoder_L0_in"][:, 1] > 0]
    assert sorted(read_by) == sorted(CD_GENES) and every.loc[1, "best_term"] == "cd"
    assert not identifying.loc[1, "live"] and not identifying.loc[1, "enriched"]
    assert every_tokens.uns["interpret_features"]["summary"]["gene_tokens"].tolist() == ["all"]

    held_out = (adata.obs["split"] == "test").to_numpy()
    labelled = every_tokens
    # label feature 1 by its best term, "cd": with 12 genes a 3-gene set cannot reach FDR < 0.05 over all the tests
    labelled.uns["interpret_features"]["features"].loc[1, ["enriched", "best_term"]] = [True, "cd"]
    for mode, expected in (("all", 1.0), ("identifying", np.nan)):
        out = cc.tl.score_feature_labels(
            labelled, model, tset, cells=adata.obs_names[held_out], net=NET, gene_tokens=mode, progress=False,
            copy=True,
        )  # fmt: skip
        row = out.uns["interpret_features"]["features"].set_index("feature").loc[1]
        np.testing.assert_equal(row["detection_auroc"], expected)
        assert (row["detection_n_positive"] > 0) == (mode == "all")
        assert out.uns["interpret_features"]["detection"]["cells"] == "subset"
    assert "detection_auroc" not in labelled.uns["interpret_features"]["features"]  # copy=True left it alone
    cc.tl.score_feature_labels(
        labelled, model, tset, cells=held_out, net=NET, key_added="scored", n_shuffles=0, progress=False
    )
    assert "detection_auroc" not in labelled.uns["interpret_features"]["features"]
    assert labelled.uns["scored"]["features"]["detection_auroc"].notna().sum() >= 1
    assert labelled.uns["scored"]["features"]["detection_auroc_shuffled"].isna().all()
    assert labelled.uns["scored"]["params"]["gene_tokens"] == "all"  # the rest of the interpret result comes along


def test_detection_auroc_is_the_rank_auroc_of_membership():
    rng = np.random.default_rng(0)
    n_genes, n_features = 30, 6
    gene_of = rng.integers(0, n_genes, 500)  # gene of each occurrence
    values = rng.exponential(size=(500, n_features)) * (rng.random((500, n_features)) < 0.3)
    members = rng.random((n_features, n_genes)) < 0.3
    active = count_active(values, gene_of, n_genes).T
    occurrences = np.bincount(gene_of, minlength=n_genes).astype(float)
    got = detection_auroc(active, occurrences, members)
    for f in range(n_features):
        # truth: active at the occurrence; score: the occurrence's gene is in the set (ties count half)
        expected = auroc(members[f, gene_of][:, None].astype(float), values[:, f] > 0)[0]
        assert got[f] == pytest.approx(expected)
    # a set of exactly the genes where a feature fires scores 1; one feature never active is NaN
    values[:, 0] = (np.isin(gene_of, [1, 2, 3])).astype(float)
    members[0] = np.isin(np.arange(n_genes), [1, 2, 3])
    values[:, 1] = 0.0
    got = detection_auroc(count_active(values, gene_of, n_genes).T, occurrences, members)
    assert got[0] == 1.0 and np.isnan(got[1])
    shuffled = shuffled_detection_auroc(
        count_active(values, gene_of, n_genes).T, occurrences, members, 2000, np.random.default_rng(1)
    )
    assert shuffled[0] == pytest.approx(0.5, abs=0.02)


def test_read_tokens_helper_matches_transcode_reading(tiny_c2s):
    read = planted_feature_read_tokens(tiny_c2s.tokenizer, GENES, "identifying")
    every = planted_feature_read_tokens(tiny_c2s.tokenizer, GENES, "all")
    assert all(every[g][-len(read[g]) :] == read[g] for g in GENES)
    assert any(len(read[g]) < len(every[g]) for g in GENES)  # shared prefixes are left out


def test_bad_input(planted):
    model, tset, adata, train = planted
    with pytest.raises(KeyError, match="interpret_features"):
        cc.tl.score_feature_labels(train, model, tset, cells=adata, net=NET, progress=False)
    interpret(model, tset, train, "identifying")
    with pytest.raises(ValueError, match="gene_tokens"):
        cc.tl.score_feature_labels(train, model, tset, cells=adata, net=NET, gene_tokens="first", progress=False)
    with pytest.raises(ValueError, match="gene sets"):
        cc.tl.score_feature_labels(train, model, tset, cells=adata, net={"x": GENES[:6]}, progress=False)
    with pytest.raises(ValueError, match="not interpreted"):
        cc.tl.score_feature_labels(train, model, tset, cells=adata, net=NET, layers=1, progress=False)
    with pytest.raises(KeyError, match="not in adata"):
        cc.tl.score_feature_labels(train, model, tset, cells=["nope"], net=NET, progress=False)
    assert "detection" not in train.uns["interpret_features"]
    with pytest.warns(UserWarning, match="in-sample"):
        cc.tl.score_feature_labels(train, model, tset, net=NET, progress=False)
    assert train.uns["interpret_features"]["detection"]["cells"] == "adata"
