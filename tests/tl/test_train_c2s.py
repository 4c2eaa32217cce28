from __future__ import annotations

import pytest
import torch

import cellcircuits as cc
from cellcircuits.pp._sentences import sentences_from_adata

SMALL = {"lr": 1e-2, "n_genes": 8, "n_layers": 2, "d_model": 16, "n_heads": 2, "vocab_size": 300, "batch_size": 4}


def test_train_c2s_learns_is_deterministic_and_round_trips(toy_adata, tmp_path):
    a = cc.tl.train_c2s(toy_adata, "label", epochs=10, progress=False, output_dir=tmp_path / "m", **SMALL)
    b = cc.tl.train_c2s(toy_adata, "label", epochs=10, progress=False, **SMALL)
    history = a.prompt.extra["loss_history"]
    assert len(history) == 10 and history[-1] < 0.7 * history[0]
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)  # same seed, same weights on CPU
    assert a.labels == ["CD14+ Monocyte", "CD19+ B", "CD56+ NK"]
    assert a.prompt.n_genes == 8 and a.prompt.append_eos
    assert a.adapter.n_layers == 2 and a.adapter.parallel_residual
    # genes are split into several tokens by the small BPE vocabulary
    assert len(a.tokenizer(" HLA-DRA", add_special_tokens=False)["input_ids"]) > 1
    loaded = cc.models.load(tmp_path / "m")
    ids = a.tokenizer("CD14 LYZ HLA-DRA", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, a.model(input_ids=ids).logits)
    assert loaded.prompt == a.prompt


def test_train_c2s_errors(toy_adata):
    with pytest.raises(KeyError, match="label_key 'nope'"):
        cc.tl.train_c2s(toy_adata, "nope", progress=False)
    toy_adata.obs["one"] = "x"
    with pytest.raises(ValueError, match="fewer than two labels"):
        cc.tl.train_c2s(toy_adata, "one", progress=False)
    toy_adata.obs["gap"] = toy_adata.obs["label"].astype(object)
    toy_adata.obs.loc["cell0", "gap"] = None
    with pytest.raises(ValueError, match="missing labels"):
        cc.tl.train_c2s(toy_adata, "gap", progress=False)


def test_models_train_c2s_on_raw_sentences_equals_the_anndata_adapter(toy_adata):
    settings = {k: SMALL[k] for k in SMALL if k != "n_genes"}
    from_adata = cc.tl.train_c2s(toy_adata, "label", epochs=2, resample_ties=False, progress=False, **SMALL)
    sentences = sentences_from_adata(toy_adata, n_genes=8, random_state=0)
    labels = toy_adata.obs["label"].astype(str).tolist()
    raw = cc.models.train_c2s(sentences, labels, n_genes=8, epochs=2, progress=False, **settings)
    assert raw.labels == from_adata.labels
    for (n, p), (_, q) in zip(raw.model.named_parameters(), from_adata.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert raw.prompt.extra["n_train_cells"] == 12 and "label_key" not in raw.prompt.extra
    assert from_adata.prompt.extra["label_key"] == "label"


def test_models_train_c2s_refuses_anndata_and_bad_lengths(toy_adata):
    with pytest.raises(TypeError, match=r"cellcircuits\.tl\.train_c2s"):
        cc.models.train_c2s(toy_adata, ["a"] * 12, progress=False)
    with pytest.raises(ValueError, match="2 sentences for 3 labels"):
        cc.models.train_c2s(["CD14 LYZ", "CD3E"], ["a", "b", "a"], progress=False)
    with pytest.raises(ValueError, match="fewer than two labels"):
        cc.models.train_c2s(["CD14 LYZ", "CD3E"], ["a", "a"], progress=False)
