from __future__ import annotations

import pytest
import torch

import cellcircuits as cc

SMALL = {"lr": 1e-2, "n_genes": 8, "n_layers": 2, "d_model": 16, "n_heads": 2, "vocab_size": 300, "batch_size": 4}


def test_train_c2s_learns_is_deterministic_and_round_trips(toy_adata, tmp_path):
    a = cc.models.train_c2s(toy_adata, "label", epochs=10, progress=False, output_dir=tmp_path / "m", **SMALL)
    b = cc.models.train_c2s(toy_adata, "label", epochs=10, progress=False, **SMALL)
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
        cc.models.train_c2s(toy_adata, "nope", progress=False)
    toy_adata.obs["one"] = "x"
    with pytest.raises(ValueError, match="fewer than two labels"):
        cc.models.train_c2s(toy_adata, "one", progress=False)
    toy_adata.obs["gap"] = toy_adata.obs["label"].astype(object)
    toy_adata.obs.loc["cell0", "gap"] = None
    with pytest.raises(ValueError, match="missing labels"):
        cc.models.train_c2s(toy_adata, "gap", progress=False)
