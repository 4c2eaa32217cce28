from __future__ import annotations

import pytest

from cellcircuits.pp import C2S_CELL_TYPE_TEMPLATE, PromptConfig, build_prompt


def test_template_is_c2s_template_0():
    text = build_prompt("CD14 LYZ", PromptConfig(n_genes=200)).text
    assert text == (  # {num_genes} is the configured count, as C2S writes it
        "The following is a list of 200 gene names ordered by descending expression level in a Homo sapiens cell. "
        "Your task is to give the cell type which this cell belongs to based on its gene expression.\n"
        "Cell sentence: CD14 LYZ.\nThe cell type corresponding to these genes is:"
    )


def test_prompt_cut_to_n_genes_and_spans():
    config = PromptConfig(n_genes=3, organism="Mus musculus")
    prompt = build_prompt("A1 HLA-DRA C3 D4 E5", config)
    assert prompt.genes == ["A1", "HLA-DRA", "C3"]
    assert "list of 3 gene names" in prompt.text and "Mus musculus" in prompt.text
    assert [prompt.text[s:e] for s, e in prompt.gene_spans] == prompt.genes


def test_prompt_config_json_round_trip(tmp_path):
    config = PromptConfig(n_genes=50, labels=["a", "b"], append_eos=True, extra={"k": 1})
    config.to_json(tmp_path / "cellcircuits.json")
    assert PromptConfig.from_dir(tmp_path) == config
    assert PromptConfig.from_dir(tmp_path / "missing") is None
    assert PromptConfig().template == C2S_CELL_TYPE_TEMPLATE and PromptConfig().n_genes == 200


def test_prompt_config_errors(tmp_path):
    with pytest.raises(ValueError, match="cell_sentence"):
        PromptConfig(template="no fields")
    with pytest.raises(ValueError, match="unknown fields"):
        PromptConfig(template="{cell_sentence} {tissue}")
    with pytest.raises(ValueError, match="exactly once"):
        PromptConfig(template="{cell_sentence} {cell_sentence}")
    with pytest.raises(ValueError, match="malformed"):
        PromptConfig(template="{cell_sentence} {")
    with pytest.raises(ValueError, match="answer_tokenization"):
        PromptConfig(answer_tokenization="both")
    with pytest.raises(ValueError, match="n_genes"):
        PromptConfig(n_genes=0)
    with pytest.raises(ValueError, match="duplicates"):
        PromptConfig(labels=["a", "a"])
    (tmp_path / "cellcircuits.json").write_text('{"n_genes": 5, "bogus": 1}')
    with pytest.raises(ValueError, match="unknown prompt settings"):
        PromptConfig.from_dir(tmp_path)
