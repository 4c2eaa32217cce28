from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

import cellcircuits as cc
from cellcircuits._keys import GENE_VALIDATION, gene_validation
from cellcircuits.circuits._targets import label_target
from cellcircuits.models import label_token_ids, tokenize_prompts

from ..helpers import GENES, LABELS, planted_c2s, tiny_tset

EFFECT_COLUMNS = [
    "obs_name", "group", "gene", "rank", "in_circuit", "attribution", "influence", "deletion", "masking",
    "gradient_x_input", "expression", "de_score",
]  # fmt: skip


@pytest.fixture
def traced(toy_adata, tiny_c2s):
    cells = toy_adata[[i for i in range(12) if i != 3]].copy()
    cc.tl.trace_circuit(cells, tiny_c2s, tiny_tset(), groupby="label", n_cells=2, max_feature_nodes=8, progress=False)
    return cells


def test_effects_summary_and_storage(traced, tiny_c2s, tmp_path):
    import scanpy as sc

    before = traced.copy()
    summary = cc.tl.validate_circuit_genes(traced, tiny_c2s, "label", n_other_genes=2, progress=False)
    stored = gene_validation(traced, "label")
    assert stored["summary"] is summary
    effects = stored["effects"]
    assert list(effects.columns) == EFFECT_COLUMNS
    result = traced.uns["circuits"]["label"]
    genes, nodes = result["genes"], result["nodes"]
    assert list(effects["obs_name"].unique()) == list(result["cells"]["obs_name"])
    for (obs_name, group), t in effects.groupby(["obs_name", "group"], sort=False):
        sentence = genes[genes["obs_name"] == obs_name].set_index("gene")
        circuit = set(nodes.loc[(nodes["group"] == group) & (nodes["kind"] == "gene"), "gene"])
        # every circuit gene of the sentence is knocked out, and 2 others
        assert set(t.loc[t["in_circuit"], "gene"]) == circuit & set(sentence.index)
        assert (~t["in_circuit"]).sum() == min(2, len(set(sentence.index) - circuit))
        assert not (set(t.loc[~t["in_circuit"], "gene"]) & circuit)
        # the circuit's scores come from its genes table; expression is minus the rank
        np.testing.assert_allclose(t["attribution"], sentence.loc[t["gene"], "attribution"])
        np.testing.assert_allclose(t["influence"], sentence.loc[t["gene"], "influence"])
        np.testing.assert_array_equal(t["rank"], sentence.loc[t["gene"], "rank"])
        np.testing.assert_array_equal(t["expression"], -t["rank"].to_numpy(dtype=float))
    assert np.isfinite(effects[["deletion", "masking", "gradient_x_input", "de_score"]].to_numpy()).all()
    assert (effects["deletion"].abs() > 0).all() and (effects["masking"].abs() > 0).all()

    # the summary's correlations are those of the effects table
    assert list(summary["group"]) == list(pd.unique(result["cells"]["group"]))
    for row in summary.itertuples():
        t = effects[effects["group"] == row.group]
        assert row.n_pairs == len(t) and row.n_cells == 2 and row.n_circuit_pairs == t["in_circuit"].sum()
        for mode in ("deletion", "masking"):
            for score, column in [("circuit", "attribution"), ("expression", "expression"), ("de_score", "de_score"),
                                  ("gradient_x_input", "gradient_x_input")]:  # fmt: skip
                expected = spearmanr(t[column], t[mode]).statistic
                assert getattr(row, f"{mode}_{score}") == pytest.approx(expected, nan_ok=True)
        assert row.masking_vs_deletion == pytest.approx(spearmanr(t["masking"], t["deletion"]).statistic)
        r = np.corrcoef(t["deletion"], t["masking"])[0, 1]
        assert row.deletion_unexplained == pytest.approx(1 - r**2)
        baselines = {b: getattr(row, f"deletion_{b}") for b in ("expression", "de_score", "gradient_x_input")}
        assert row.best_baseline == max(baselines, key=baselines.get)
        assert row.circuit_wins == (row.deletion_circuit > max(baselines.values()))

    # de_score: scanpy's Wilcoxon score of the gene in the cell's group
    expected = before.copy()
    sc.tl.rank_genes_groups(expected, "label", method="wilcoxon", n_genes=expected.n_vars, use_raw=False)
    for row in effects.sample(8, random_state=0).itertuples():
        df = sc.get.rank_genes_groups_df(expected, group=row.group).set_index("names")
        assert row.de_score == pytest.approx(df.loc[row.gene, "scores"], rel=1e-6)

    # nothing but the documented key changed
    assert "rank_genes_groups" not in traced.uns
    assert set(traced.uns) == set(before.uns) and set(traced.uns["circuits"]) == set(before.uns["circuits"])
    assert set(result) == set(before.uns["circuits"]["label"]) | {GENE_VALIDATION}
    for k, v in before.uns["circuits"]["label"].items():
        if isinstance(v, pd.DataFrame):
            pd.testing.assert_frame_equal(result[k], v)
    pd.testing.assert_frame_equal(traced.obs, before.obs)
    pd.testing.assert_frame_equal(traced.var, before.var)
    np.testing.assert_array_equal(traced.X.toarray(), before.X.toarray())

    # h5ad round trip
    traced.write_h5ad(tmp_path / "a.h5ad")
    back = gene_validation(ad.read_h5ad(tmp_path / "a.h5ad"), "label")
    pd.testing.assert_frame_equal(back["effects"], effects, check_dtype=False, check_categorical=False)
    pd.testing.assert_frame_equal(back["summary"], summary, check_dtype=False)
    assert back["params"]["n_other_genes"] == 2 and back["params"]["groupby_de"] == "label"


def test_same_seed_same_draw_and_no_other_genes(traced, tiny_c2s):
    cc.tl.validate_circuit_genes(traced, tiny_c2s, "label", n_other_genes=2, random_state=1, progress=False)
    first = gene_validation(traced, "label")["effects"]
    cc.tl.validate_circuit_genes(traced, tiny_c2s, "label", n_other_genes=2, random_state=1, progress=False)
    pd.testing.assert_frame_equal(gene_validation(traced, "label")["effects"], first)
    cc.tl.validate_circuit_genes(traced, tiny_c2s, "label", n_other_genes=0, progress=False)
    assert gene_validation(traced, "label")["effects"]["in_circuit"].all()
    # the circuit's genes cut to the group's two of most influence
    cc.tl.validate_circuit_genes(traced, tiny_c2s, "label", n_other_genes=0, n_circuit_genes=2, progress=False)
    effects = gene_validation(traced, "label")["effects"]
    nodes = traced.uns["circuits"]["label"]["nodes"]
    for group, t in effects.groupby("group"):
        genes = nodes[(nodes["group"] == group) & (nodes["kind"] == "gene")].nlargest(2, "influence")["gene"]
        assert set(t["gene"]) <= set(genes) and len(t) > 0


def test_without_groupby_the_de_baseline_is_skipped_or_taken_from_groupby_de(toy_adata, tiny_c2s):
    cells = toy_adata[[i for i in range(12) if i != 3]].copy()
    cc.tl.trace_circuit(cells, tiny_c2s, tiny_tset(), LABELS[0], cells=[0, 4, 7], max_feature_nodes=8, progress=False)
    summary = cc.tl.validate_circuit_genes(cells, tiny_c2s, LABELS[0], n_other_genes=1, progress=False)
    effects = gene_validation(cells, LABELS[0])["effects"]
    assert effects["de_score"].isna().all() and summary["deletion_de_score"].isna().all()
    assert summary["best_baseline"].iloc[0] in ("expression", "gradient_x_input")
    cc.tl.validate_circuit_genes(cells, tiny_c2s, LABELS[0], n_other_genes=1, groupby_de="label", progress=False)
    assert np.isfinite(gene_validation(cells, LABELS[0])["effects"]["de_score"]).all()


def test_bad_input_fails_before_work(traced, tiny_c2s, monkeypatch):
    import cellcircuits.tl._validate_genes as module

    def no_work(*args, **kwargs):
        raise AssertionError("ran the model")

    monkeypatch.setattr(module, "knockout_genes", no_work)
    with pytest.raises(KeyError, match="trace_circuit"):
        cc.tl.validate_circuit_genes(traced, tiny_c2s, "nope")
    with pytest.raises(ValueError, match="n_other_genes"):
        cc.tl.validate_circuit_genes(traced, tiny_c2s, "label", n_other_genes=-1)
    with pytest.raises(ValueError, match="n_circuit_genes"):
        cc.tl.validate_circuit_genes(traced, tiny_c2s, "label", n_circuit_genes=-2)
    with pytest.raises(ValueError, match="min_frequency"):
        cc.tl.validate_circuit_genes(traced, tiny_c2s, "label", min_frequency=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        cc.tl.validate_circuit_genes(traced, tiny_c2s, "label", batch_size=0)
    with pytest.raises(KeyError, match="groupby_de"):
        cc.tl.validate_circuit_genes(traced, tiny_c2s, "label", groupby_de="nope")
    with pytest.raises(KeyError, match="not in adata"):
        cc.tl.validate_circuit_genes(traced[:2].copy(), tiny_c2s, "label")
    tiny_c2s.name = "another"
    with pytest.raises(ValueError, match="traced on the model 'tiny'"):
        cc.tl.validate_circuit_genes(traced, tiny_c2s, "label")
    tiny_c2s.name = "tiny"
    changed = traced.copy()
    changed.X = changed.X[:, ::-1].copy()  # other expression: other sentences than the traced ones
    with pytest.raises(ValueError, match="no longer holds"):
        cc.tl.validate_circuit_genes(changed, tiny_c2s, "label")
    del traced.uns["circuits"]["label"]["genes"]
    with pytest.raises(KeyError, match="gene table"):
        cc.tl.validate_circuit_genes(traced, tiny_c2s, "label")
    assert GENE_VALIDATION not in traced.uns["circuits"]["label"]


def test_planted_gene_tops_knockouts_and_circuit(tiny_c2s, toy_adata):
    """A model whose target only the tokens of one gene drive: knockouts and the traced circuit both find it."""
    planted = "LYZ"
    tok = tiny_c2s.tokenizer
    everything = tokenize_prompts(tok, [cc.pp.build_prompt(GENES, cc.pp.PromptConfig(n_genes=len(GENES)))])[0]
    mine = set(everything.gene_positions[GENES.index(planted)].tolist())
    label_ids = label_token_ids(tok, tiny_c2s.prompt, LABELS)
    others = {t for k, t in enumerate(everything.input_ids) if k not in mine} | {t for ids in label_ids for t in ids}
    tokens = {everything.input_ids[k] for k in mine} - others  # the gene's tokens no other text uses
    assert tokens
    sink = max(set(range(len(tok))) - others - tokens)
    lt = label_target(label_ids, 0)
    planted_c2s(tiny_c2s, tokens, sink, lt.token, lt.competitors)
    adata = toy_adata[[i for i in range(12) if i != 3]].copy()  # cell3 expresses no gene
    X = adata.X.toarray()
    X[:, GENES.index(planted)] = 2.5  # in every sentence, at a rank that varies between cells
    adata.X = X
    cc.tl.trace_circuit(
        adata, tiny_c2s, tiny_tset(), LABELS[0], groupby="label", n_cells=2, max_feature_nodes=8, progress=False
    )
    genes = adata.uns["circuits"][LABELS[0]]["genes"]
    assert genes.loc[genes["gene"] == planted, "rank"].nunique() > 1
    for _, t in genes.groupby("obs_name"):
        assert t.loc[t["attribution"].idxmax(), "gene"] == planted
        assert t.loc[t["influence"].idxmax(), "gene"] == planted
    cc.tl.validate_circuit_genes(adata, tiny_c2s, LABELS[0], n_other_genes=10, progress=False)
    effects = gene_validation(adata, LABELS[0])["effects"]
    assert effects.loc[effects["gene"] == planted, "in_circuit"].all()
    for _, t in effects.groupby("obs_name"):
        assert t.loc[t["deletion"].idxmax(), "gene"] == planted
        assert t.loc[t["masking"].idxmax(), "gene"] == planted
        top = t.loc[t["gene"] == planted]
        rest = t.loc[t["gene"] != planted]
        # the planted gene carries the target; every other gene moves it by a small fraction of that
        assert float(top["deletion"].iloc[0]) > 5 * rest["deletion"].abs().max()
        assert float(top["masking"].iloc[0]) > 5 * rest["masking"].abs().max()
