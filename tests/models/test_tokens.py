from __future__ import annotations

import numpy as np
import pytest

from cellcircuits.models import gene_token_positions, label_token_ids, tokenize_prompts
from cellcircuits.pp import PromptConfig, build_prompt


def test_gene_positions_spell_each_gene_on_a_bpe_tokenizer(tiny_tokenizer):
    config = PromptConfig(n_genes=8)
    prompt = build_prompt("HLA-DRA CD14 LYZ S100A8 FCGR3A", config)
    (tp,) = tokenize_prompts(tiny_tokenizer, [prompt])
    assert tp.genes == ["HLA-DRA", "CD14", "LYZ", "S100A8", "FCGR3A"]
    assert tp.input_ids == tiny_tokenizer(prompt.text)["input_ids"]
    assert tp.answer_position == len(tp.input_ids) - 1
    n_tokens = [len(p) for p in tp.gene_positions]
    assert max(n_tokens) > 1  # the BPE tokenizer splits at least one gene into several tokens
    for gene, pos in zip(tp.genes, tp.gene_positions, strict=True):
        assert np.all(np.diff(pos) == 1)  # contiguous
        assert tiny_tokenizer.decode([tp.input_ids[i] for i in pos]).strip() == gene
    # positions of consecutive genes do not overlap and follow prompt order
    flat = np.concatenate(tp.gene_positions)
    assert np.all(np.diff(flat) > 0)


def test_gene_token_positions_with_special_tokens_and_untrimmed_offsets():
    # offsets: [BOS (0,0)] [" AB" (4,7) incl. space] ["C" (7,8)] [" D" (8,10)] ["." (10,11)]
    offsets = np.array([[0, 0], [4, 7], [7, 8], [8, 10], [10, 11]])
    spans = [(5, 8), (9, 10)]  # "ABC" and "D"
    got = gene_token_positions(offsets, spans)
    assert [g.tolist() for g in got] == [[1, 2], [3]]


def test_label_token_ids_match_full_text(tiny_tokenizer):
    config = PromptConfig(n_genes=8)  # the C2S format: " " + label + "." + EOS
    labels = ["CD14+ Monocyte", "CD19+ B"]
    ids = label_token_ids(tiny_tokenizer, config, labels)
    prompt = build_prompt("CD14 LYZ", config).text
    for label, lid in zip(labels, ids, strict=True):
        full = tiny_tokenizer(prompt + " " + label + ".")["input_ids"]
        base = tiny_tokenizer(prompt)["input_ids"]
        assert full[: len(base)] == base
        assert lid == [*full[len(base) :], tiny_tokenizer.eos_token_id]
    no_end = PromptConfig(n_genes=8, answer_suffix="", append_eos=False)
    assert label_token_ids(tiny_tokenizer, no_end, labels)[0] == tiny_tokenizer(" CD14+ Monocyte")["input_ids"]


def test_label_that_merges_with_prompt_raises(tiny_tokenizer):
    config = PromptConfig(n_genes=8, answer_prefix="", answer_suffix="")
    with pytest.raises(ValueError, match="clean continuation"):
        label_token_ids(tiny_tokenizer, config, [""])
