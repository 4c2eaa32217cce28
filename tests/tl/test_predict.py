from __future__ import annotations

import time
import warnings

import anndata as ad
import numpy as np
import pytest
import torch

import cellcircuits as cc

from ..helpers import LABELS


def full_text_loglik(c2s, sentence: str, label: str, organism: str | None = None) -> float:
    """Log-likelihood of the answer tokens in the C2S training text prompt + ' ' + label + '.' + EOS."""
    prompt = cc.pp.build_prompt(sentence, c2s.prompt, organism).text
    p_ids = c2s.tokenizer(prompt)["input_ids"]
    ids = c2s.tokenizer(prompt + " " + label + ".")["input_ids"] + [c2s.tokenizer.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(c2s.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(p_ids), len(ids)))


def test_predict_writes_fields_and_matches_full_text_likelihood(toy_adata, tiny_c2s):
    cc.pp.cell_sentences(toy_adata)
    cc.tl.predict_cell_types(toy_adata, tiny_c2s, batch_size=5, progress=False)
    obs = toy_adata.obs["c2s_cell_type"]
    assert list(obs.cat.categories) == LABELS
    proba = cc.get.cell_type_probabilities(toy_adata)
    logprob = cc.get.cell_type_probabilities(toy_adata, kind="logprob")
    assert list(proba.columns) == LABELS and proba.index.equals(toy_adata.obs_names)
    np.testing.assert_array_equal(proba.to_numpy(), toy_adata.obsm["c2s_cell_type_proba"])
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-12)
    assert (obs.astype(str).to_numpy() == proba.idxmax(1).to_numpy()).all()
    for i in (0, 5, 7):
        sentence = toy_adata.obs["cell_sentence"].iloc[i]
        for label in LABELS:
            ref = full_text_loglik(tiny_c2s, sentence, label)
            assert logprob.iloc[i][label] == pytest.approx(ref, abs=1e-4)
    params = toy_adata.uns["c2s_cell_type"]["params"]
    assert params["labels"] == LABELS and params["model"] == "tiny" and params["sentence_key"] == "cell_sentence"


def test_left_right_padding_and_batch_size_agree(toy_adata, tiny_c2s):
    runs = [
        cc.tl.predict_cell_types(toy_adata, tiny_c2s, batch_size=b, padding_side=s, progress=False, copy=True)
        for b, s in [(4, "left"), (4, "right"), (1, "left"), (12, "right")]
    ]
    ref = runs[0].obsm["c2s_cell_type_logprob"]
    # prompts differ in token length, so padding really happens
    sentences = cc.pp.cell_sentences(toy_adata, copy=True).obs["cell_sentence"]
    lengths = {len(tiny_c2s.tokenizer(p.text)["input_ids"]) for p in tiny_c2s.build_prompts(sentences)}
    assert len(lengths) > 3
    for r in runs[1:]:
        np.testing.assert_allclose(r.obsm["c2s_cell_type_logprob"], ref, atol=1e-4)


def test_sentences_built_on_the_fly_are_not_stored(toy_adata, tiny_c2s):
    before = set(toy_adata.obs.columns)
    out = cc.tl.predict_cell_types(toy_adata, tiny_c2s, progress=False, copy=True)
    assert set(toy_adata.obs.columns) == before and "c2s_cell_type" not in toy_adata.uns  # input untouched
    assert "cell_sentence" not in out.obs and out.uns["c2s_cell_type"]["params"]["sentence_key"] == ""
    stored = cc.pp.cell_sentences(toy_adata, n_genes=tiny_c2s.prompt.n_genes, copy=True)
    cc.tl.predict_cell_types(stored, tiny_c2s, progress=False)
    np.testing.assert_allclose(stored.obsm["c2s_cell_type_logprob"], out.obsm["c2s_cell_type_logprob"], atol=1e-5)


def test_custom_labels_and_errors(toy_adata, tiny_c2s):
    out = cc.tl.predict_cell_types(toy_adata, tiny_c2s, ["CD19+ B", "CD56+ NK"], progress=False, copy=True)
    assert list(cc.get.cell_type_probabilities(out).columns) == ["CD19+ B", "CD56+ NK"]
    with pytest.raises(KeyError, match="predict_cell_types"):
        cc.get.cell_type_probabilities(toy_adata, key="nope")
    with pytest.raises(ValueError, match="kind"):
        cc.get.cell_type_probabilities(out, kind="odds")
    tiny_c2s.prompt.labels = None
    with pytest.raises(ValueError, match="No candidate labels"):
        cc.tl.predict_cell_types(toy_adata, tiny_c2s, progress=False)
    with pytest.raises(ValueError, match="duplicates"):
        cc.tl.predict_cell_types(toy_adata, tiny_c2s, ["a", "a"], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        cc.tl.predict_cell_types(toy_adata, tiny_c2s, ["a"], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="no cells"):
        cc.tl.predict_cell_types(toy_adata[:0].copy(), tiny_c2s, ["a"], progress=False)


def test_shipped_model_offline_and_accurate(tmp_path):
    start = time.perf_counter()
    model = cc.models.load("pbmc68k-tiny", device="cpu")
    load_seconds = time.perf_counter() - start
    assert load_seconds < 10  # "works offline in a second"; generous bound for a loaded CI machine
    assert model.adapter.spec.name == "gpt_neox" and model.adapter.n_layers >= 4
    assert model.prompt.n_genes == 100 and len(model.labels) == 10
    adata = cc.ds.pbmc68k()
    test = adata[adata.obs["split"] == "test"].copy()
    cc.tl.predict_cell_types(test, model, progress=False)
    accuracy = (test.obs["c2s_cell_type"].astype(str) == test.obs["bulk_labels"].astype(str)).mean()
    assert accuracy >= 0.70
    assert accuracy == pytest.approx(model.prompt.extra["heldout_accuracy"], abs=0.02)
    # results survive an .h5ad round trip
    test.write_h5ad(tmp_path / "p.h5ad")
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    assert back.obs["c2s_cell_type"].equals(test.obs["c2s_cell_type"])
    np.testing.assert_allclose(back.obsm["c2s_cell_type_proba"], test.obsm["c2s_cell_type_proba"])
    assert back.uns["c2s_cell_type"]["params"]["labels"].tolist() == model.labels
    assert cc.get.cell_type_probabilities(back).columns.tolist() == model.labels


def test_prediction_emits_no_future_warning(toy_adata, tiny_c2s):
    cc.pp.cell_sentences(toy_adata)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cc.tl.predict_cell_types(toy_adata, tiny_c2s, progress=False)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_organism_per_call_changes_the_prompt_not_the_model(toy_adata, tiny_c2s):
    cc.pp.cell_sentences(toy_adata)
    mouse = cc.tl.predict_cell_types(toy_adata, tiny_c2s, organism="Mus musculus", progress=False, copy=True)
    human = cc.tl.predict_cell_types(toy_adata, tiny_c2s, progress=False, copy=True)
    assert tiny_c2s.prompt.organism == "Homo sapiens"  # the call did not change the model's settings
    assert mouse.uns["c2s_cell_type"]["params"]["organism"] == "Mus musculus"
    assert human.uns["c2s_cell_type"]["params"]["organism"] == "Homo sapiens"
    logprob = cc.get.cell_type_probabilities(mouse, kind="logprob")
    sentence = toy_adata.obs["cell_sentence"].iloc[2]
    for label in LABELS:
        ref = full_text_loglik(tiny_c2s, sentence, label, organism="Mus musculus")
        assert logprob.iloc[2][label] == pytest.approx(ref, abs=1e-4)
    assert not np.allclose(mouse.obsm["c2s_cell_type_logprob"], human.obsm["c2s_cell_type_logprob"])


def test_stored_sentences_shorter_than_the_model_reads_warn(toy_adata, tiny_c2s):
    cc.pp.cell_sentences(toy_adata, n_genes=3)  # the model reads 8 genes
    with pytest.warns(UserWarning, match=r"were cut to 3 genes .* the model reads 8 genes"):
        cc.tl.predict_cell_types(toy_adata, tiny_c2s, progress=False)
    cc.pp.cell_sentences(toy_adata, n_genes=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cc.tl.predict_cell_types(toy_adata, tiny_c2s, progress=False)
    toy_adata.obs["short"] = "CD14 LYZ"  # a column without a record of how it was cut
    with pytest.warns(UserWarning, match=r"hold at most 2 genes"):
        cc.tl.predict_cell_types(toy_adata, tiny_c2s, sentence_key="short", progress=False)
