from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cellcircuits as cc

from ..helpers import forced_tokens


def expected_answers(c2s, sentences, organism=None, max_new_tokens=4):
    prompts = c2s.tokenizer([p.text for p in c2s.build_prompts(sentences, organism)])["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random model's answers reach max_new_tokens
        return cc.models.generate_answers(c2s, prompts, max_new_tokens=max_new_tokens, progress=False)


def test_generate_cell_types_stores_the_answers_and_params(toy_adata, tiny_c2s, tmp_path):
    adata = toy_adata[:6].copy()
    cc.pp.cell_sentences(adata)
    with pytest.warns(UserWarning, match="reached max_new_tokens=4"):
        cc.tl.generate_cell_types(adata, tiny_c2s, max_new_tokens=4, batch_size=4, progress=False)
    obs = adata.obs["c2s_generated_cell_type"]
    assert isinstance(obs.dtype, pd.CategoricalDtype)
    expected = expected_answers(tiny_c2s, adata.obs["cell_sentence"].tolist())
    assert obs.astype(str).tolist() == expected and len(set(expected)) > 1
    params = adata.uns["c2s_generated_cell_type"]["params"]
    assert params["model"] == "tiny" and params["max_new_tokens"] == 4 and params["organism"] == "Homo sapiens"
    assert params["n_genes"] == 8 and params["sentence_key"] == "cell_sentence"
    assert cc._keys.SentenceSettings.from_params(params["sentences"]) == cc._keys.SentenceSettings()
    adata.write_h5ad(tmp_path / "a.h5ad")  # h5ad-safe
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert back.obs["c2s_generated_cell_type"].astype(str).tolist() == expected
    assert back.uns["c2s_generated_cell_type"]["params"]["organism"] == "Homo sapiens"


def test_organism_and_copy(toy_adata, tiny_c2s):
    adata = toy_adata[:4].copy()
    before = adata.copy()
    seen = []  # the token ids the model reads in each first (prompt) pass
    embed = tiny_c2s.model.get_input_embeddings()
    handle = embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0]) if args[0].shape[1] > 1 else None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = cc.tl.generate_cell_types(
                adata, tiny_c2s, organism="Mus musculus", max_new_tokens=4, key_added="gen", progress=False, copy=True
            )
    finally:
        handle.remove()
    # the input is untouched; the sentences built on the fly are not stored
    assert list(adata.obs.columns) == list(before.obs.columns) and "gen" not in adata.uns
    assert "cell_sentence" not in out.obs and out.uns["gen"]["params"]["sentence_key"] == ""
    assert out.uns["gen"]["params"]["organism"] == "Mus musculus"
    sentences = cc.pp.cell_sentences(adata, n_genes=8, copy=True).obs["cell_sentence"].tolist()
    assert out.obs["gen"].astype(str).tolist() == expected_answers(tiny_c2s, sentences, "Mus musculus")
    # the organism reaches the prompts the model reads
    texts = tiny_c2s.tokenizer.batch_decode(seen[0], skip_special_tokens=True)
    assert len(texts) == 4 and all("in a Mus musculus cell." in t for t in texts)


def test_generated_labels_feed_prediction(toy_adata, tiny_c2s):
    adata = toy_adata[:5].copy()
    tok = tiny_c2s.tokenizer
    forced = cc.models.label_token_ids(tok, tiny_c2s.prompt, ["CD56+ NK"])[0]
    with forced_tokens(tiny_c2s.model, forced), warnings.catch_warnings():
        warnings.filterwarnings("error", "answer.*max_new_tokens")  # every answer ends with the terminator
        cc.tl.generate_cell_types(adata, tiny_c2s, batch_size=5, progress=False)
    assert adata.obs["c2s_generated_cell_type"].tolist() == ["CD56+ NK"] * 5
    labels = cc.tl.generated_labels(adata)
    assert labels == ["CD56+ NK"]
    cc.tl.predict_cell_types(adata, tiny_c2s, labels=[*labels, "CD19+ B"], progress=False)
    assert list(adata.obs["c2s_cell_type"].cat.categories) == ["CD56+ NK", "CD19+ B"]


def test_generated_labels_order_and_min_cells():
    answers = ["T cell", "B cell", "T cell", "", "NK cell", "B cell", "monocyte", "T cell", None, " B cell "]
    adata = ad.AnnData(np.zeros((len(answers), 1), dtype=np.float32))
    adata.obs["gen"] = pd.Categorical(answers)
    assert cc.tl.generated_labels(adata, "gen") == ["B cell", "T cell", "NK cell", "monocyte"]
    adata.obs["gen"] = pd.Categorical(answers[:-1])[[*range(9), 0]]  # a fourth "T cell"
    assert cc.tl.generated_labels(adata, "gen") == ["T cell", "B cell", "NK cell", "monocyte"]
    assert cc.tl.generated_labels(adata, "gen", min_cells=2) == ["T cell", "B cell"]
    assert cc.tl.generated_labels(adata, "gen", min_cells=5) == []
    with pytest.raises(KeyError, match=r"run cellcircuits\.tl\.generate_cell_types"):
        cc.tl.generated_labels(adata)
    with pytest.raises(ValueError, match="min_cells"):
        cc.tl.generated_labels(adata, "gen", min_cells=0)


def test_bad_arguments_fail_before_any_work(toy_adata, tiny_c2s):
    with forced_tokens(tiny_c2s.model, []) as passes:
        with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
            cc.tl.generate_cell_types(toy_adata, tiny_c2s, max_new_tokens=0)
        with pytest.raises(ValueError, match="batch_size must be positive"):
            cc.tl.generate_cell_types(toy_adata, tiny_c2s, batch_size=0)
        with pytest.raises(ValueError, match="no cells"):
            cc.tl.generate_cell_types(toy_adata[:0], tiny_c2s)
        tiny_c2s.prompt.eos_token = "<no such token>"
        with pytest.raises(ValueError, match="no token '<no such token>'"):
            cc.tl.generate_cell_types(toy_adata, tiny_c2s)
    assert passes == [] and "c2s_generated_cell_type" not in toy_adata.obs
