"""Predictions and circuits of checkpoints in the Hub's layout, in the C2S answer format, with prefix labels."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import cellcircuits as cc
from cellcircuits.circuits._targets import label_target
from cellcircuits.models import label_token_ids
from cellcircuits.pp import PromptConfig

from ..helpers import GENES, ONTOLOGY_LABELS, tiny_tset

SENTENCES = [
    "CD3E IL7R NKG7 HLA-DRA",
    "CD14 LYZ S100A8 FCGR3A CD79A",
    "MS4A1 CD79A HLA-DRA",
    "GNLY NKG7 CD3E IL7R PPBP",
]
JOINT = PromptConfig(n_genes=8, labels=ONTOLOGY_LABELS)  # the C2S format: " " + label + "." + EOS, one text
SEPARATE = PromptConfig(n_genes=8, labels=ONTOLOGY_LABELS, answer_prefix="", answer_tokenization="separate")


def sentence_adata() -> ad.AnnData:
    obs = pd.DataFrame({"cell_sentence": SENTENCES}, index=[f"c{i}" for i in range(len(SENTENCES))])
    return ad.AnnData(np.zeros((len(SENTENCES), len(GENES)), dtype=np.float32), obs=obs, var=pd.DataFrame(index=GENES))


def training_text_loglik(model, sentence: str, label: str) -> float:
    """Log-likelihood of the answer in the C2S training text, from one forward of prompt + answer ids."""
    tok, eos = model.tokenizer, model.tokenizer.eos_token_id
    prompt = cc.pp.build_prompt(sentence, model.prompt).text
    prompt_ids = tok(prompt)["input_ids"]
    if model.prompt.answer_tokenization == "joint":  # cell2sentence's tokenize_all
        ids = tok(prompt + " " + label + ".")["input_ids"] + [eos]
        assert ids[: len(prompt_ids)] == prompt_ids
    else:  # cell2sentence's tokenize_loss_on_response
        ids = prompt_ids + tok(label + ".")["input_ids"] + [eos]
    with torch.no_grad():
        logp = torch.log_softmax(model.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))


@pytest.mark.parametrize(("kind", "config"), [("pythia", JOINT), ("gemma2", JOINT), ("llama", SEPARATE)])
def test_predicted_logliks_are_those_of_the_c2s_training_text(hub_checkpoints, kind, config):
    model = cc.models.load(hub_checkpoints[kind], preset=config)
    adata = sentence_adata()
    cc.tl.predict_cell_types(adata, model, batch_size=3, progress=False)
    logprob = cc.get.cell_type_probabilities(adata, kind="logprob")
    assert list(logprob.columns) == ONTOLOGY_LABELS
    for i, sentence in enumerate(SENTENCES):
        for label in ONTOLOGY_LABELS:
            assert logprob.iloc[i][label] == pytest.approx(training_text_loglik(model, sentence, label), abs=1e-4)
    # the label that is the start of another is scored with its own "." and EOS: the two differ in every cell
    short, long = logprob[ONTOLOGY_LABELS[0]], logprob[ONTOLOGY_LABELS[1]]
    assert (np.abs(short - long) > 1e-3).all()


@pytest.mark.parametrize("kind", ["pythia", "gemma2"])
def test_circuit_of_the_shorter_of_two_prefix_labels(hub_checkpoints, kind):
    model = cc.models.load(hub_checkpoints[kind], preset=JOINT)
    adata = sentence_adata()
    target = ONTOLOGY_LABELS[0]
    cc.tl.trace_circuit(adata, model, tiny_tset(), target, cells=[0, 1], max_feature_nodes=8, progress=False)
    result = adata.uns["circuits"][target]
    nodes, edges, cells = result["nodes"], result["edges"], result["cells"]
    assert len(nodes) > 1 and len(edges) > 0 and len(cells) == 2
    assert list(nodes.loc[nodes["kind"] == "target", "node"]) == [f"target:{target}"]
    assert set(nodes["kind"]) - {"target"} <= {"gene", "token", "feature", "error"} and (nodes["influence"] >= 0).all()
    # the target is the logit of the "." after the shared label text, against the "," of the longer label
    tok = model.tokenizer
    lt = label_target(label_token_ids(tok, model.prompt, ONTOLOGY_LABELS), 0)
    assert tok.convert_ids_to_tokens([lt.token, *lt.competitors]) == [".", ","]
    for row in cells.itertuples():
        prompt = cc.pp.build_prompt(SENTENCES[adata.obs_names.get_loc(row.obs_name)], model.prompt).text
        with torch.no_grad():
            logits = model.model(input_ids=torch.tensor([tok(prompt)["input_ids"] + lt.prefix])).logits[0, -1]
        expected = logits[lt.token] - logits[list(lt.competitors)].mean()
        assert row.target_value == pytest.approx(float(expected), rel=1e-3, abs=1e-4)
