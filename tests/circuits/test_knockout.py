from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cellcircuits.circuits._knockout import (
    deletion_inputs,
    gradient_x_input,
    knockout_genes,
    neutral_embedding,
    target_values,
)
from cellcircuits.circuits._targets import label_target
from cellcircuits.models import C2SModel, ModelAdapter, label_token_ids, tokenize_prompts
from cellcircuits.pp import build_prompt

from ..helpers import GENES, LABELS, make_tiny

SENTENCES = [
    ["CD14", "LYZ", "HLA-DRA", "MS4A1", "CD79A", "NKG7"],
    ["NKG7", "GNLY", "CD3E"],
    ["MS4A1", "CD79A", "HLA-DRA", "S100A8", "FCGR3A", "PPBP", "IL7R", "CD14"],
]


def _setup(c2s):
    prompts = tokenize_prompts(c2s.tokenizer, c2s.build_prompts([" ".join(s) for s in SENTENCES]))
    ids = label_token_ids(c2s.tokenizer, c2s.prompt, LABELS)
    targets = [label_target(ids, i % len(LABELS)) for i in range(len(prompts))]
    return prompts, targets


def _direct_target(hf, ids, target, inputs_embeds=None) -> torch.Tensor:
    """The target from the model's own logits (no softcap in GPT-NeoX), by one unbatched forward pass."""
    if inputs_embeds is None:
        logits = hf(input_ids=torch.tensor([ids])).logits[0, -1]
    else:
        logits = hf(inputs_embeds=inputs_embeds[None]).logits[0, -1]
    return logits[target.token] - logits[list(target.competitors)].mean()


def test_deletion_is_the_model_on_a_prompt_built_without_the_gene(tiny_c2s):
    prompts, targets = _setup(tiny_c2s)
    genes = [[0, 2, 5], [1], [7, 3]]
    table = knockout_genes(tiny_c2s, prompts, targets, genes, batch_size=4, progress=False)
    assert list(table["prompt"]) == [0, 0, 0, 1, 2, 2]
    assert list(table["gene_index"]) == [0, 2, 5, 1, 7, 3]  # in the order given
    hf = tiny_c2s.model
    with torch.no_grad():
        for row in table.itertuples():
            sentence, t = SENTENCES[row.prompt], targets[row.prompt]
            full = list(prompts[row.prompt].input_ids) + t.prefix
            assert row.target_value == pytest.approx(float(_direct_target(hf, full, t)), abs=1e-5)
            without = [g for k, g in enumerate(sentence) if k != row.gene_index]
            text = build_prompt(without, tiny_c2s.prompt).text
            ids = list(tiny_c2s.tokenizer(text)["input_ids"]) + t.prefix
            assert row.deletion == pytest.approx(row.target_value - float(_direct_target(hf, ids, t)), abs=1e-5)


def test_masking_is_the_model_with_the_embeddings_replaced(tiny_c2s):
    prompts, targets = _setup(tiny_c2s)
    genes = [[1, 4], [0, 2], [6]]
    table = knockout_genes(tiny_c2s, prompts, targets, genes, batch_size=3, progress=False)
    hf = tiny_c2s.model
    embed = hf.get_input_embeddings()
    neutral = embed.weight.detach().mean(0)  # GPT-NeoX's embedding does not rescale: the plain mean of its rows
    torch.testing.assert_close(neutral_embedding(tiny_c2s), neutral, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        for row in table.itertuples():
            p, t = prompts[row.prompt], targets[row.prompt]
            ids = torch.tensor(list(p.input_ids) + t.prefix)
            e = embed(ids).clone()
            e[torch.as_tensor(p.gene_positions[row.gene_index])] = neutral
            masked = float(_direct_target(hf, ids.tolist(), t, inputs_embeds=e))
            assert row.masking == pytest.approx(row.target_value - masked, abs=1e-5)
    # a masked gene changes the target; masking nothing changes nothing
    assert (table["masking"].abs() > 1e-6).all()
    none = target_values(tiny_c2s, [list(prompts[0].input_ids)], targets[:1], masked=[np.zeros(0, dtype=int)])
    plain = target_values(tiny_c2s, [list(prompts[0].input_ids)], targets[:1])
    assert none[0] == pytest.approx(plain[0], abs=1e-6)


def test_gradient_x_input_is_the_autograd_gradient(tiny_c2s):
    prompts, targets = _setup(tiny_c2s)
    inputs = [list(p.input_ids) + t.prefix for p, t in zip(prompts, targets, strict=True)]
    positions = [p.gene_positions for p in prompts]
    got = gradient_x_input(tiny_c2s, inputs, targets, positions, batch_size=2)
    hf = tiny_c2s.model
    embed = hf.get_input_embeddings()
    neutral = embed.weight.detach().mean(0)
    for i, (ids, t) in enumerate(zip(inputs, targets, strict=True)):
        e = embed(torch.tensor(ids)).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_direct_target(hf, ids, t, inputs_embeds=e), e)
        per_token = (grad * (e.detach() - neutral)).sum(-1)
        expected = [float(per_token[torch.as_tensor(pos)].sum()) for pos in positions[i]]
        np.testing.assert_allclose(got[i], expected, rtol=1e-4, atol=1e-7)
        assert len(got[i]) == len(SENTENCES[i])
    assert all(p.grad is None for p in hf.parameters())  # the model's parameters are left without gradients


@pytest.mark.parametrize(("side", "batch_size"), [("left", 16), ("right", 16), ("left", 3)])
def test_batched_equals_one_at_a_time(tiny_c2s, side, batch_size):
    prompts, targets = _setup(tiny_c2s)
    genes = [list(range(len(s))) for s in SENTENCES]
    one = knockout_genes(tiny_c2s, prompts, targets, genes, batch_size=1, progress=False)
    # batch_size 16: every variant of every prompt in one chunk; 3: chunks of 24 variants, the first two prompts
    many = knockout_genes(tiny_c2s, prompts, targets, genes, batch_size=batch_size, padding_side=side, progress=False)
    pd.testing.assert_frame_equal(many[["prompt", "gene_index"]], one[["prompt", "gene_index"]])
    for c in ("target_value", "deletion", "masking", "gradient_x_input"):
        np.testing.assert_allclose(many[c], one[c], rtol=1e-4, atol=1e-6, err_msg=c)
    # the inputs have different lengths, so these batches were padded
    assert len({len(p.input_ids) for p in prompts}) > 1


def test_target_is_read_before_the_final_softcap(tiny_tokenizer):
    hf = make_tiny("gemma2", len(tiny_tokenizer))
    cap = hf.config.final_logit_softcapping
    with torch.no_grad():
        hf.get_output_embeddings().weight.mul_(400.0)  # logits of the size where the softcap bends them
    c2s = C2SModel(model=hf, tokenizer=tiny_tokenizer, adapter=ModelAdapter(hf), prompt=_prompt_config(), name="gemma")
    prompts, targets = _setup(c2s)
    inputs = [list(p.input_ids) + t.prefix for p, t in zip(prompts, targets, strict=True)]
    got = target_values(c2s, inputs, targets, batch_size=2)
    bent = False
    with torch.no_grad():
        for value, ids, t in zip(got, inputs, targets, strict=True):
            capped = hf(input_ids=torch.tensor([ids])).logits[0, -1].double()
            raw = cap * torch.atanh(capped / cap)
            assert value == pytest.approx(float(raw[t.token] - raw[list(t.competitors)].mean()), rel=1e-3, abs=1e-3)
            bent |= abs(value - float(capped[t.token] - capped[list(t.competitors)].mean())) > 0.1
    assert bent


def _prompt_config():
    from cellcircuits.pp import PromptConfig

    return PromptConfig(n_genes=8, labels=LABELS, append_eos=True)


def test_bad_input_fails_before_any_pass(tiny_c2s):
    prompts, targets = _setup(tiny_c2s)
    with pytest.raises(ValueError, match="one of each"):
        knockout_genes(tiny_c2s, prompts, targets[:2], [[0]] * 3, progress=False)
    with pytest.raises(ValueError, match="distinct and in"):
        knockout_genes(tiny_c2s, prompts, targets, [[0], [3], [0]], progress=False)
    with pytest.raises(ValueError, match="distinct and in"):
        knockout_genes(tiny_c2s, prompts, targets, [[0, 0], [1], [0]], progress=False)
    # prompts naming another organism do not rebuild with the default one
    mouse = tokenize_prompts(tiny_c2s.tokenizer, tiny_c2s.build_prompts([" ".join(GENES[:4])], "Mus musculus"))
    with pytest.raises(ValueError, match="organism"):
        deletion_inputs(tiny_c2s, mouse[0], [0])
    assert len(deletion_inputs(tiny_c2s, mouse[0], [0, 1], "Mus musculus")) == 2
    with pytest.raises(ValueError, match="batch_size"):
        target_values(tiny_c2s, [prompts[0].input_ids], targets[:1], batch_size=0)
