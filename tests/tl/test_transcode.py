from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import torch

import cellcircuits as cc
from cellcircuits.models import distinguishing_tokens, identifying_offsets, record, tokenize_prompts
from cellcircuits.transcoders import Transcoder, TranscoderConfig, TranscoderSet
from cellcircuits.transcoders._features import direct_logit_effects, gene_logit_effects, norm_scale


@pytest.fixture
def tset():
    torch.manual_seed(3)
    tcs = {}
    for layer in (0, 1):
        cfg = TranscoderConfig(d_in=32, d_out=32, n_features=48, activation="relu", layer=layer, model_name="tiny")
        tc = Transcoder(cfg)
        with torch.no_grad():
            tc.b_enc.fill_(0.02)  # some features fire on most tokens, others rarely
        tcs[layer] = tc
    return TranscoderSet(tcs, n_layers_model=2)


def reference(adata, model, tset, layer, pool):
    """Per cell: record the MLP input, encode each gene's tokens, pool and average per gene, one cell at a time."""
    prompts = tokenize_prompts(model.tokenizer, model.build_prompts(adata.obs["cell_sentence"]))
    genes = [g.upper() for g in adata.var_names]
    pooled = np.zeros((adata.n_obs, 48))
    gene_sum, gene_n = np.zeros((len(genes), 48)), np.zeros(len(genes))
    point = model.adapter.mlp_in(layer)
    for c, p in enumerate(prompts):
        with torch.no_grad(), record(model.model, [point]) as rec:
            model.model(input_ids=torch.tensor([p.input_ids]))
        acts = tset[layer].encode(rec[point][0][0]).detach().numpy()
        if p.gene_positions:
            tok = acts[np.concatenate(p.gene_positions)]
            pooled[c] = {"max": tok.max(0), "mean": tok.mean(0), "sum": tok.sum(0)}[pool]
        for g, pos in zip(p.genes, p.gene_positions, strict=True):
            gene_sum[genes.index(g)] += acts[pos].mean(0)
            gene_n[genes.index(g)] += 1
    gene_mean = np.divide(gene_sum, gene_n[:, None], out=np.zeros_like(gene_sum), where=gene_n[:, None] > 0)
    return pooled, gene_mean, gene_n


@pytest.mark.parametrize("pool", ["max", "mean", "sum"])
def test_transcode_matches_a_per_cell_reference(toy_adata, tiny_c2s, tset, pool):
    cc.pp.cell_sentences(toy_adata)
    cc.tl.transcode(toy_adata, tiny_c2s, tset, pool=pool, batch_size=5, progress=False)
    for layer in (0, 1):
        pooled, gene_mean, gene_n = reference(toy_adata, tiny_c2s, tset, layer, pool)
        X = toy_adata.obsm[f"X_transcoder_L{layer}"]
        np.testing.assert_allclose(X.toarray(), pooled, atol=1e-5)
        np.testing.assert_allclose(toy_adata.varm[f"transcoder_L{layer}_in"], gene_mean, atol=1e-5)
    unseen = list(toy_adata.uns["transcoder"]["unseen_genes"])
    assert unseen == [g for g, n in zip(toy_adata.var_names, gene_n, strict=True) if n == 0]
    assert toy_adata.obsm["X_transcoder_L0"][3].nnz == 0  # the cell with no gene has no gene-token activation


def test_fields_h5ad_round_trip_and_copy(toy_adata, tiny_c2s, tset, tmp_path):
    before = toy_adata.copy()
    out = cc.tl.transcode(toy_adata, tiny_c2s, tset, layers=[1], key_added="tc", progress=False, copy=True)
    assert set(toy_adata.obsm) == set(before.obsm) and "tc" not in toy_adata.uns  # input untouched
    assert out.obsm["X_tc_L1"].shape == (12, 48) and "X_tc_L0" not in out.obsm
    assert out.varm["tc_L1_in"].shape == (12, 48) and out.varm["tc_L1_out"].shape == (12, 48)
    uns = out.uns["tc"]
    assert list(uns["params"]["layers"]) == [1] and uns["params"]["pool"] == "max"
    assert uns["transcoders"]["1"]["n_features"] == 48 and uns["version"] == cc.__version__
    assert len(uns["content_hash"]) == 32
    out.write_h5ad(tmp_path / "t.h5ad")
    back = ad.read_h5ad(tmp_path / "t.h5ad")
    assert (back.obsm["X_tc_L1"] != out.obsm["X_tc_L1"]).nnz == 0
    np.testing.assert_array_equal(back.varm["tc_L1_out"], out.varm["tc_L1_out"])
    assert back.uns["tc"]["content_hash"] == uns["content_hash"]
    assert back.uns["tc"]["transcoders"]["1"]["activation"] == "relu"
    # another set of weights, another hash
    with torch.no_grad():
        tset[1].W_dec.mul_(2)
    again = cc.tl.transcode(toy_adata, tiny_c2s, tset, layers=[1], key_added="tc", progress=False, copy=True)
    assert again.uns["tc"]["content_hash"] != uns["content_hash"]


def test_genes_outside_var_are_reported(toy_adata, tiny_c2s, tset):
    toy_adata.obs["cell_sentence"] = ["CD14 NOTAGENE LYZ"] * toy_adata.n_obs
    with pytest.warns(UserWarning, match=r"10 of 12 genes never appear in a cell sentence \(e.g. HLA-DRA"):
        cc.tl.transcode(toy_adata, tiny_c2s, tset, progress=False)
    uns = toy_adata.uns["transcoder"]
    assert uns["n_genes_outside_var"] == 1 and list(uns["genes_outside_var_examples"]) == ["NOTAGENE"]
    assert set(uns["unseen_genes"]) == set(toy_adata.var_names) - {"CD14", "LYZ"}
    assert list(uns["unspellable_genes"]) == []  # byte-level BPE spells anything


def test_unspellable_genes_are_found():
    from cellcircuits.models._spelling import unspellable_genes

    class Letters:
        """Knows upper-case letters only; anything else is token 0, the unknown token."""

        unk_token_id = 0

        def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
            return {"input_ids": [ord(c) if c.isalpha() or c == " " else 0 for c in text]}

    assert unspellable_genes(Letters(), ["CD", "HLA-DRA", "LYZ", "RP11"]) == ["HLA-DRA", "RP11"]


def test_direct_logit_effect_equals_a_frozen_norm_intervention(tiny_c2s):
    adapter = tiny_c2s.adapter
    torch.manual_seed(0)
    v = torch.randn(3, 32)
    x = torch.randn(32)
    scale = 1.7
    tokens = [5, 17, 40]
    got = direct_logit_effects(adapter, v, tokens, scale)  # (tokens, features)
    norm, W_U = adapter.final_norm, adapter.unembed.weight
    for f in range(3):
        # make x's centred part orthogonal to v's so its scale does not change to first order; set its std to scale
        c = lambda t: t - t.mean()  # noqa: E731
        xc = c(x) - (c(x) @ c(v[f])) / (c(v[f]) @ c(v[f])) * c(v[f])
        x0 = xc / norm_scale(adapter, xc[None])[0] * scale
        eps = 1e-3
        with torch.no_grad():
            delta = (norm(x0 + eps * v[f]) - norm(x0)) @ W_U.T / eps
        np.testing.assert_allclose(got[:, f], delta[tokens].numpy(), rtol=2e-3, atol=2e-4)


def test_distinguishing_tokens(tiny_tokenizer):
    genes = ["HLA-DRA", "HLA-DRB1", "CD14", "CD3", "CD3E", "LYZ"]
    spelled = {g: tiny_tokenizer(" " + g, add_special_tokens=False)["input_ids"] for g in genes}
    got = dict(zip(genes, distinguishing_tokens(tiny_tokenizer, genes), strict=True))
    for g, ids in spelled.items():
        others = [spelled[o] for o in genes if o != g]
        unique = [j for j in range(len(ids)) if not any(o[: j + 1] == ids[: j + 1] for o in others)]
        assert got[g] == ids[unique[0] if unique else -1 :]
    assert spelled["HLA-DRA"][0] == spelled["HLA-DRB1"][0] and got["HLA-DRA"][0] != spelled["HLA-DRA"][0]


def test_transcode_errors(toy_adata, tiny_c2s, tset):
    with pytest.raises(ValueError, match=r"no transcoder for layers \[1\]"):
        cc.tl.transcode(toy_adata, tiny_c2s, TranscoderSet({0: tset[0]}, n_layers_model=2), layers=[1])
    with pytest.raises(ValueError, match="pool"):
        cc.tl.transcode(toy_adata, tiny_c2s, tset, pool="median")
    with pytest.raises(TypeError, match="model layers are chosen with layers"):
        cc.tl.transcode(toy_adata, tiny_c2s, tset, layer=0)
    other = TranscoderSet({0: tset[0]}, n_layers_model=4)
    with pytest.raises(ValueError, match="4 layers"):
        cc.tl.transcode(toy_adata, tiny_c2s, other)


def test_gene_effects_average_over_distinguishing_tokens(tiny_c2s):
    torch.manual_seed(1)
    W = torch.randn(4, 32)
    gene_tokens = [[5, 9], [9], [7, 5, 5]]
    got = gene_logit_effects(tiny_c2s.adapter, W, gene_tokens, 2.0)
    single = direct_logit_effects(tiny_c2s.adapter, W, [5, 7, 9], 2.0)  # rows: tokens 5, 7, 9
    expected = np.stack([(single[0] + single[2]) / 2, single[2], (single[1] + 2 * single[0]) / 3])
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_output_map_reads_the_gene_tokens(toy_adata, tiny_c2s, tset):
    cc.tl.transcode(toy_adata, tiny_c2s, tset, layers=[0], progress=False)
    genes = [g.upper() for g in toy_adata.var_names]
    tokens = distinguishing_tokens(tiny_c2s.tokenizer, genes)
    scale = toy_adata.uns["transcoder"]["params"]["final_norm_scale"]
    expected = gene_logit_effects(tiny_c2s.adapter, tset[0].W_dec.detach(), tokens, scale)
    np.testing.assert_allclose(toy_adata.varm["transcoder_L0_out"], expected, rtol=1e-5, atol=1e-6)
    assert len({tuple(r) for r in np.round(toy_adata.varm["transcoder_L0_out"], 6)}) == len(genes)  # all distinct


def gene_token_inputs(adata, model, layer):
    """MLP inputs at every gene token of every cell, with the gene, the token's index within it, and its cell."""
    prompts = tokenize_prompts(model.tokenizer, model.build_prompts(adata.obs["cell_sentence"]))
    point = model.adapter.mlp_in(layer)
    xs, genes, index, cells = [], [], [], []
    for c, p in enumerate(prompts):
        with torch.no_grad(), record(model.model, [point]) as rec:
            model.model(input_ids=torch.tensor([p.input_ids]))
        for g, pos in zip(p.genes, p.gene_positions, strict=True):
            xs.append(rec[point][0][0, pos])
            genes += [g] * len(pos)
            index += list(range(len(pos)))
            cells += [c] * len(pos)
    return torch.cat(xs), np.array(genes), np.array(index), np.array(cells)


def plant(tc, feature, x, fires) -> bool:
    """Make ``feature`` fire on exactly the rows of ``x`` where ``fires`` holds (a separating hyperplane)."""
    from sklearn.svm import LinearSVC

    x_n = tc._normalise_input(x).double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whether it separates is checked below, converged or not
        svm = LinearSVC(C=1e4, max_iter=20_000, tol=1e-8).fit(x_n, fires)
    s = svm.decision_function(x_n)
    low, high = float(s[~fires].max()), float(s[fires].min())
    if high <= low:
        return False
    with torch.no_grad():
        tc.W_enc[:, feature] = torch.as_tensor(svm.coef_[0], dtype=tc.W_enc.dtype)
        tc.b_enc[feature] = float(svm.intercept_[0]) - (low + high) / 2
    return True


def test_planted_one_gene_feature_tops_its_input_map(toy_adata, tiny_c2s, tset):
    cc.pp.cell_sentences(toy_adata)
    x, genes, index, cells = gene_token_inputs(toy_adata, tiny_c2s, 0)
    # the gene's last token, where the model has read all of it; the first gene for which the feature can fire
    # there and on no other token (this toy tokenizer spells genes letter by letter: LYZ ends in the only "Z")
    last = np.r_[index[1:] == 0, True]
    candidates = [g for g in np.unique(genes) if len(np.unique(cells[genes == g])) >= 3]
    target = next(g for g in candidates if plant(tset[0], 5, x, last & (genes == g)))
    for gene_tokens in ("all", "identifying"):
        cc.tl.transcode(toy_adata, tiny_c2s, tset, layers=[0], gene_tokens=gene_tokens, progress=False)
        in_map = toy_adata.varm["transcoder_L0_in"][:, 5]
        row = [g.upper() for g in toy_adata.var_names].index(target)
        assert in_map.argmax() == row and in_map[row] > 0
        assert np.count_nonzero(in_map) == 1  # no other gene's tokens activate it
        pooled = toy_adata.obsm["X_transcoder_L0"][:, 5].toarray().ravel()
        np.testing.assert_array_equal(np.flatnonzero(pooled), np.unique(cells[genes == target]))
    assert toy_adata.uns["transcoder"]["params"]["gene_tokens"] == "identifying"


def test_a_shared_prefix_feature_is_read_only_with_all_tokens(toy_adata, tiny_c2s, tset):
    """A feature on the first token of genes that share it maps to them with every token, to none when identifying."""
    cc.pp.cell_sentences(toy_adata)
    x, genes, index, _ = gene_token_inputs(toy_adata, tiny_c2s, 0)
    symbols = [g.upper() for g in toy_adata.var_names]
    offsets = identifying_offsets(tiny_c2s.tokenizer, symbols)
    first = {g: tiny_c2s.tokenizer(" " + g, add_special_tokens=False)["input_ids"][0] for g in symbols}
    cd = first["CD14"]
    shared = np.array([first[g] == cd for g in genes])  # CD14, CD79A and CD3E start with " CD"
    assert all(offsets[g] >= 1 for g in genes[shared]) and len(set(genes[shared])) == 3
    assert plant(tset[0], 7, x, shared & (index == 0))
    cc.tl.transcode(toy_adata, tiny_c2s, tset, layers=[0], gene_tokens="all", progress=False)
    prefixed = sorted({g for g, s in zip(genes, shared, strict=True) if s})
    in_map = toy_adata.varm["transcoder_L0_in"][:, 7]
    assert sorted(np.asarray(symbols)[in_map > 0]) == prefixed
    cc.tl.transcode(toy_adata, tiny_c2s, tset, layers=[0], gene_tokens="identifying", progress=False)
    assert np.count_nonzero(toy_adata.varm["transcoder_L0_in"][:, 7]) == 0


def test_identifying_tokens_match_a_per_cell_reference(toy_adata, tiny_c2s, tset):
    cc.pp.cell_sentences(toy_adata)
    cc.tl.transcode(toy_adata, tiny_c2s, tset, layers=[1], gene_tokens="identifying", progress=False)
    symbols = [g.upper() for g in toy_adata.var_names]
    offsets = identifying_offsets(tiny_c2s.tokenizer, symbols)
    x, genes, index, cells = gene_token_inputs(toy_adata, tiny_c2s, 1)
    keep = np.array([i >= offsets[g] for g, i in zip(genes, index, strict=True)])
    acts = tset[1].encode(x).detach().numpy()
    for c in range(toy_adata.n_obs):
        rows = keep & (cells == c)
        expected = acts[rows].max(0) if rows.any() else np.zeros(acts.shape[1])
        np.testing.assert_allclose(toy_adata.obsm["X_transcoder_L1"][c].toarray().ravel(), expected, atol=1e-5)
    for g in np.unique(genes):
        per_cell = [acts[keep & (genes == g) & (cells == c)].mean(0) for c in np.unique(cells[genes == g])]
        np.testing.assert_allclose(
            toy_adata.varm["transcoder_L1_in"][symbols.index(g)], np.mean(per_cell, 0), atol=1e-5
        )


def test_transcoders_of_another_model_name_warn(toy_adata, tiny_c2s, tset, recwarn):
    from ..helpers import tiny_tset

    cc.pp.cell_sentences(toy_adata)
    other = tiny_tset()
    other.model_name = "vandijklab/other-model"
    with pytest.warns(UserWarning, match=r"trained on 'vandijklab/other-model'.*'tiny'"):
        cc.tl.transcode(toy_adata, tiny_c2s, other, progress=False)
    with (
        pytest.warns(UserWarning, match=r"trained on 'vandijklab/other-model'.*'tiny'"),
        cc.transcoders.splice(tiny_c2s, other),
    ):
        pass
    recwarn.clear()
    cc.tl.transcode(toy_adata, tiny_c2s, tset, progress=False)  # trained on "tiny"
    cc.tl.transcode(toy_adata, tiny_c2s, tiny_tset(), progress=False)  # no recorded name
    assert not [w for w in recwarn if "trained on" in str(w.message)]
