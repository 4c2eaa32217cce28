"""Gene symbols as single tokens: the tokenizer option, the models trained with it and the shipped ``pbmc68k-genes``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cellcircuits as cc
from cellcircuits.models import (
    distinguishing_tokens,
    gene_token_ids,
    identifying_offsets,
    label_token_ids,
    tokenize_prompts,
    train_tokenizer,
)
from cellcircuits.pp import PromptConfig, build_prompt
from cellcircuits.pp._sentences import sentence_gene_names

from ..helpers import GENES, LABELS

# genes in the vocabulary: CD1 is a prefix of CD14 and of CD1C (which stays outside), HLA-DRB1 holds a hyphen
VOCAB = [*GENES, "CD1", "HLA-DRB1"]
OUTSIDE = ["CD1C", "MALAT1", "HLA-DRB1-AS1"]


def training_texts(n: int = 200) -> list[str]:
    rng = np.random.default_rng(2)
    config = PromptConfig(n_genes=8, labels=LABELS)
    texts = []
    for i in range(n):
        genes = list(rng.permutation([*VOCAB, *OUTSIDE])[: rng.integers(3, 9)])
        texts.append(build_prompt(genes, config).text + " " + LABELS[i % 3] + ".")
    return texts


@pytest.fixture(scope="module")
def gene_tokenizer():
    return train_tokenizer(training_texts(), vocab_size=320, gene_vocab=VOCAB)


def test_vocabulary_genes_are_single_tokens_with_one_position_each(gene_tokenizer):
    ids = gene_token_ids(gene_tokenizer, VOCAB + OUTSIDE)
    assert sorted(ids) == sorted(VOCAB)  # every vocabulary gene, and no gene outside it, is one token
    assert len(set(ids.values())) == len(VOCAB)
    config = PromptConfig(n_genes=10)
    sentence = ["HLA-DRB1", "CD14", "CD1", "LYZ", "HLA-DRA", "S100A8", "CD3E"]  # CD3E ends the sentence before "."
    (tp,) = tokenize_prompts(gene_tokenizer, [build_prompt(sentence, config)])
    assert [len(p) for p in tp.gene_positions] == [1] * len(sentence)
    assert [tp.input_ids[p[0]] for p in tp.gene_positions] == [ids[g] for g in sentence]
    assert np.all(np.diff(np.concatenate(tp.gene_positions)) == 1)  # one gene after the other, nothing between
    # the text around the sentence is spelled by the BPE: the sentence's "." is its own token after the last gene
    last = tp.gene_positions[-1][0]
    assert gene_tokenizer.convert_ids_to_tokens(tp.input_ids[last + 1]) == "."
    assert gene_tokenizer.decode(tp.input_ids) == build_prompt(sentence, config).text


def test_genes_outside_the_vocabulary_keep_their_multi_token_positions(gene_tokenizer):
    config = PromptConfig(n_genes=10)
    sentence = ["CD14", "MALAT1", "CD1C", "HLA-DRB1-AS1", "CD1"]
    (tp,) = tokenize_prompts(gene_tokenizer, [build_prompt(sentence, config)])
    n_tokens = dict(zip(sentence, map(len, tp.gene_positions), strict=True))
    assert n_tokens["CD14"] == n_tokens["CD1"] == 1
    assert all(n_tokens[g] > 1 for g in OUTSIDE)
    for gene, pos in zip(tp.genes, tp.gene_positions, strict=True):
        assert np.all(np.diff(pos) == 1)
        assert gene_tokenizer.decode([tp.input_ids[i] for i in pos]).strip() == gene


def test_a_gene_never_matches_inside_a_longer_word(gene_tokenizer):
    vocab_ids = set(gene_token_ids(gene_tokenizer, VOCAB).values())
    for word in ["CD1C", "CD14+", "HLA-DRB1-AS1", "CD1.5", "xCD14"]:
        ids = gene_tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        assert not vocab_ids & set(ids), word  # CD1 not in CD1C, CD14 not in CD14+, HLA-DRB1 not in its antisense
    # a tokenizer whose vocabulary has CD1 but not CD14 spells CD14 without CD1's token
    texts = [f"Cell sentence: CD1 CD14 LYZ {g}.\nThe cell type is: CD14+ Monocyte." for g in GENES]
    only_cd1 = train_tokenizer(texts, vocab_size=300, gene_vocab=["CD1", "LYZ"])
    cd1 = gene_token_ids(only_cd1, ["CD1"])["CD1"]
    cd14 = only_cd1(" CD14", add_special_tokens=False)["input_ids"]
    assert cd1 not in cd14 and only_cd1.decode(cd14) == " CD14"
    (tp,) = tokenize_prompts(only_cd1, [build_prompt("CD14 CD1 CD1", PromptConfig(n_genes=3))])
    assert [only_cd1.decode([tp.input_ids[i] for i in p]).strip() for p in tp.gene_positions] == ["CD14", "CD1", "CD1"]
    assert [tp.input_ids[p[0]] for p in tp.gene_positions[1:]] == [cd1, cd1]


def test_the_bpe_merges_serve_the_text_around_the_genes():
    tok = train_tokenizer(training_texts(), vocab_size=1000, gene_vocab=VOCAB)
    gene_words = {tok.convert_ids_to_tokens(i) for i in gene_token_ids(tok, VOCAB).values()}
    merged = [t for t in tok.get_vocab() if len(t) > 1 and t not in gene_words]
    # pieces of vocabulary genes that no other word of the texts holds: the BPE is trained without the gene words
    pieces = ["NKG", "GNL", "PPB", "FCG", "S10", "MS4", "IL7", "79A", "LYZ"]
    assert [t for t in merged if any(p in t for p in pieces)] == []
    # with the merges to spare, every word of the template and the labels is one token
    assert len(tok(" Monocyte following descending", add_special_tokens=False)["input_ids"]) == 3


def test_each_vocabulary_gene_identifies_itself_from_its_first_token(gene_tokenizer):
    offsets = identifying_offsets(gene_tokenizer, VOCAB + OUTSIDE)
    assert all(offsets[g] == 0 for g in VOCAB)
    ids = gene_token_ids(gene_tokenizer, VOCAB)
    assert distinguishing_tokens(gene_tokenizer, VOCAB) == [[ids[g]] for g in VOCAB]


def test_scored_answer_ids_are_those_of_the_joint_c2s_text(gene_tokenizer):
    config = PromptConfig(n_genes=8, labels=LABELS)  # " " + label + "." + EOS, tokenized with the prompt
    prompt = build_prompt("CD14 LYZ CD1 HLA-DRB1", config).text
    base = gene_tokenizer(prompt)["input_ids"]
    scored = label_token_ids(gene_tokenizer, config, LABELS)
    cd14 = gene_token_ids(gene_tokenizer, ["CD14"])["CD14"]
    for label, ids in zip(LABELS, scored, strict=True):
        full = gene_tokenizer(prompt + " " + label + ".")["input_ids"] + [gene_tokenizer.eos_token_id]
        assert full[: len(base)] == base
        assert ids == full[len(base) :]
        assert cd14 not in ids  # "CD14+" of "CD14+ Monocyte" is a label word, not the gene
    assert gene_tokenizer.convert_ids_to_tokens(scored[0][-2:]) == [".", gene_tokenizer.eos_token]


def test_gene_vocabularies_that_cannot_be_words_are_refused():
    for bad in (["CD14", "HLA DRA"], ["ABC."], [""], []):
        with pytest.raises(ValueError, match="gene_vocab"):
            train_tokenizer(["CD14 LYZ"], vocab_size=300, gene_vocab=bad)
    with pytest.raises(ValueError, match="gene_vocab"):
        cc.models.train_c2s(["CD14 LYZ", "CD3E"], ["a", "b"], gene_vocab=["X Y"], progress=False)


def test_train_c2s_with_gene_tokens_round_trips(toy_adata, tmp_path):
    small = {"n_genes": 8, "n_layers": 1, "d_model": 16, "n_heads": 2, "vocab_size": 300, "batch_size": 4}
    model = cc.tl.train_c2s(toy_adata, "label", epochs=1, gene_tokens=True, progress=False, **small)
    tok = model.tokenizer
    assert sorted(gene_token_ids(tok, GENES)) == sorted(GENES)
    assert model.prompt.extra["hyperparameters"]["gene_tokens"] == len(GENES)
    assert model.model.config.vocab_size == len(tok)
    plain = cc.tl.train_c2s(toy_adata, "label", epochs=1, progress=False, **small)
    assert gene_token_ids(plain.tokenizer, GENES).keys() < set(GENES)  # without the option some genes split
    model.save(tmp_path / "m")
    loaded = cc.models.load(tmp_path / "m")
    assert loaded.prompt == model.prompt
    assert gene_token_ids(loaded.tokenizer, GENES) == gene_token_ids(tok, GENES)
    text = build_prompt("HLA-DRA CD14 LYZ", model.prompt).text + " CD14+ Monocyte."
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert loaded.tokenizer(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, model.model(input_ids=ids).logits)


@pytest.fixture(scope="module")
def pbmc():
    return cc.ds.pbmc68k()


@pytest.fixture(scope="module")
def genes_model():
    return cc.models.load("pbmc68k-genes", device="cpu")


def test_shipped_genes_model_spells_every_gene_in_one_token(genes_model, pbmc):
    assert "pbmc68k-genes" in cc.models.SHIPPED_MODELS
    genes = sentence_gene_names(pbmc).tolist()
    assert len(genes) == 765
    assert sorted(gene_token_ids(genes_model.tokenizer, genes)) == sorted(genes)
    assert genes_model.prompt.answer_suffix == "." and genes_model.prompt.append_eos
    test = pbmc[pbmc.obs["split"] == "test"][:4].copy()
    cc.pp.cell_sentences(test, n_genes=genes_model.prompt.n_genes)
    prompts = genes_model.build_prompts(list(test.obs["cell_sentence"]))
    for tp in tokenize_prompts(genes_model.tokenizer, prompts):
        assert len(tp.genes) == genes_model.prompt.n_genes
        assert [len(p) for p in tp.gene_positions] == [1] * len(tp.genes)


def test_shipped_genes_model_records_its_heldout_accuracy(genes_model, pbmc):
    test = pbmc[pbmc.obs["split"] == "test"].copy()
    cc.tl.predict_cell_types(test, genes_model, progress=False)
    accuracy = float((test.obs["c2s_cell_type"].astype(str) == test.obs["bulk_labels"].astype(str)).mean())
    extra = json.loads((cc.models.shipped_model_path("pbmc68k-genes") / "cellcircuits.json").read_text())["extra"]
    assert extra["n_test_cells"] == test.n_obs
    assert extra["heldout_accuracy"] == pytest.approx(accuracy, abs=5e-5)
