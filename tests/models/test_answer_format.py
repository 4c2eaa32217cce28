"""The answer format of checkpoints as the Hub gives them (no cellcircuits.json), for the three tokenizer families.

The scored answer ids must be those of the C2S training text tokenized as cell2sentence does: ``tokenize_all``
tokenizes ``prompt + " " + label + "."`` at once and appends EOS; ``tokenize_loss_on_response`` appends
``tokenizer(label + ".")`` (its special tokens included) and EOS to the prompt's ids.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import pytest

import cellcircuits as cc
from cellcircuits.circuits._targets import label_target
from cellcircuits.models import get_preset, label_token_ids
from cellcircuits.pp import PromptConfig, build_prompt
from cellcircuits.pp._prompts import C2S_CELL_TYPE_TEMPLATE, template_fields

from ..helpers import HUB_KINDS, HUB_TOKENIZER_CLASSES, ONTOLOGY_LABELS

SHORT, LONG = ONTOLOGY_LABELS[:2]  # SHORT is the start of LONG
SENTENCE = "CD3E IL7R HLA-DRA CD14 NKG7 S100A8"
NO_SETTINGS = r"has no cellcircuits\.json.*n_genes=200, organism='Homo sapiens', answer ' \{label\}\.' \+ EOS, joint"


def load_quietly(path, **kwargs):
    """Load a checkpoint without settings, checking that the load warns about it."""
    with pytest.warns(UserWarning, match=NO_SETTINGS):
        return cc.models.load(path, device="cpu", **kwargs)


@pytest.fixture(params=list(HUB_KINDS))
def hub_model(request, hub_checkpoints):
    return request.param, load_quietly(hub_checkpoints[request.param])


def test_hub_checkpoints_load_with_the_c2s_defaults_and_say_so(hub_model):
    kind, model = hub_model
    assert model.prompt == PromptConfig()
    assert type(model.tokenizer).__name__ == HUB_TOKENIZER_CLASSES[kind]
    assert model.adapter.spec.name == HUB_KINDS[kind]
    tok = model.tokenizer
    first = tok("CD14")["input_ids"][0]
    expected_bos = {"pythia": None, "gemma2": "<bos>", "llama": "<s>"}[kind]
    assert (tok.convert_ids_to_tokens(first) == expected_bos) if expected_bos else first != tok.bos_token_id
    assert tok.eos_token == {"pythia": "<|endoftext|>", "gemma2": "<eos>", "llama": "</s>"}[kind]
    # genes and labels are spelled by several tokens each, as in the real vocabularies
    assert len(tok(" HLA-DRA", add_special_tokens=False)["input_ids"]) > 1
    assert all(len(tok(" " + label, add_special_tokens=False)["input_ids"]) > 3 for label in ONTOLOGY_LABELS)


def test_scored_answer_ids_are_those_of_the_c2s_training_text(hub_model):
    kind, model = hub_model
    tok, eos = model.tokenizer, model.tokenizer.eos_token_id
    prompt = build_prompt(SENTENCE, model.prompt).text
    base = tok(prompt)["input_ids"]
    joint = label_token_ids(tok, model.prompt, ONTOLOGY_LABELS)
    separate_config = dataclasses.replace(model.prompt, answer_tokenization="separate", answer_prefix="")
    separate = label_token_ids(tok, separate_config, ONTOLOGY_LABELS)
    for label, joint_ids, separate_ids in zip(ONTOLOGY_LABELS, joint, separate, strict=True):
        full = tok(prompt + " " + label + ".")["input_ids"] + [eos]  # tokenize_all
        assert full[: len(base)] == base
        assert joint_ids == full[len(base) :]
        assert separate_ids == tok(label + ".")["input_ids"] + [eos]  # tokenize_loss_on_response
    # the response is tokenized with the tokenizer's special tokens: Gemma's and Llama's BOS stand mid-text
    assert (separate[0][0] == tok.bos_token_id) == (kind != "pythia")
    assert tok.convert_ids_to_tokens(joint[0][-2:]) == [".", tok.eos_token]


def test_end_of_turn_ends_gemma_answers(hub_checkpoints):
    model = load_quietly(hub_checkpoints["gemma2"])
    tok = model.tokenizer
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn not in (tok.eos_token_id, tok.unk_token_id, tok.pad_token_id)
    turns = dataclasses.replace(model.prompt, eos_token="<end_of_turn>")
    for ids, eos_ids in zip(
        label_token_ids(tok, turns, ONTOLOGY_LABELS), label_token_ids(tok, model.prompt, ONTOLOGY_LABELS), strict=True
    ):
        assert ids == [*eos_ids[:-1], end_of_turn]
    pythia = cc.models.load(hub_checkpoints["pythia"], preset=turns)  # a tokenizer without the token
    with pytest.raises(ValueError, match=r"no token '<end_of_turn>'"):
        label_token_ids(pythia.tokenizer, pythia.prompt, ONTOLOGY_LABELS)


def test_prefix_labels_are_told_apart_by_the_terminator(hub_model):
    _, model = hub_model
    tok = model.tokenizer
    ids = label_token_ids(tok, model.prompt, ONTOLOGY_LABELS)
    shared = len(ids[0]) - 2  # all of SHORT's answer but "." and EOS
    assert ids[1][:shared] == ids[0][:shared]
    short = label_target(ids, 0)
    assert short.prefix == ids[0][:shared]
    assert tok.convert_ids_to_tokens([short.token, *short.competitors]) == [".", ","]
    long = label_target(ids, 1)
    assert long.prefix == short.prefix
    assert tok.convert_ids_to_tokens([long.token, *long.competitors]) == [",", "."]
    # without the ".", the end token tells the shorter label apart
    no_dot = label_token_ids(tok, dataclasses.replace(model.prompt, answer_suffix=""), ONTOLOGY_LABELS)
    short = label_target(no_dot, 0)
    assert (short.token, tok.convert_ids_to_tokens(list(short.competitors))) == (tok.eos_token_id, [","])
    # without either, nothing does
    bare = label_token_ids(tok, dataclasses.replace(model.prompt, answer_suffix="", append_eos=False), ONTOLOGY_LABELS)
    assert bare[1][: len(bare[0])] == bare[0]
    with pytest.raises(ValueError, match=r"label 0's answer tokens are the start of another label's"):
        label_target(bare, 0)
    assert tok.convert_ids_to_tokens([label_target(bare, 1).token]) == [","]


def test_presets_by_name_and_by_hub_id():
    ft = get_preset("pythia-160m-c2s")
    assert get_preset("VandijkLab/Pythia-160m-C2S/") == ft
    assert ft.extra == {"preset": "pythia-160m-c2s"}
    assert template_fields(ft.template) == ["cell_sentence"]  # no {organism}, no {num_genes}
    assert (ft.n_genes, ft.answer_prefix, ft.answer_suffix, ft.append_eos, ft.answer_tokenization) == (
        100, "", "", True, "separate"
    )  # fmt: skip
    prompt = build_prompt(" ".join(f"G{i}" for i in range(150)), ft, organism="Mus musculus").text
    assert "100 highly expressed genes" in prompt and prompt.endswith(": ")
    assert "G99 This is" in prompt and "G100" not in prompt and "Mus musculus" not in prompt
    for name in ["c2s-scale-gemma-2-2b", "vandijklab/C2S-Scale-Gemma-2-2B", "VANDIJKLAB/c2s-scale-gemma-2-2b"]:
        gemma = get_preset(name)
        assert dataclasses.replace(gemma, extra={}) == PromptConfig()  # the cell2sentence format
        assert gemma.extra == {"preset": "c2s-scale-gemma-2-2b"}
    assert get_preset("vandijklab/C2S-Pythia-410m-cell-type-prediction").template == C2S_CELL_TYPE_TEMPLATE
    fresh = get_preset("pythia-160m-c2s")
    fresh.extra["note"] = "changed"
    assert "note" not in get_preset("pythia-160m-c2s").extra


def test_load_with_a_preset_name_or_settings_does_not_warn(hub_checkpoints):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        named = cc.models.load(hub_checkpoints["gemma2"], preset="c2s-scale-gemma-2-2b")
        own = PromptConfig(n_genes=8, labels=ONTOLOGY_LABELS, eos_token="<end_of_turn>")
        given = cc.models.load(hub_checkpoints["gemma2"], preset=own)
    assert named.prompt == get_preset("c2s-scale-gemma-2-2b")
    assert given.prompt is own and given.labels == ONTOLOGY_LABELS
    ids = label_token_ids(given.tokenizer, given.prompt, ONTOLOGY_LABELS)
    assert {i[-1] for i in ids} == {given.tokenizer.convert_tokens_to_ids("<end_of_turn>")}


def test_unknown_preset_fails_before_loading(hub_checkpoints, monkeypatch):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    with pytest.raises(KeyError, match=r"No preset 'c2s-gemma'; presets are \[.*'pythia-160m-c2s'\]"):
        cc.models.load(hub_checkpoints["gemma2"], preset="c2s-gemma")


def test_hub_id_in_the_cache_gets_its_preset(hub_checkpoints, tmp_path, monkeypatch):
    """A public checkpoint loaded by its hub id from the Hugging Face cache (offline) takes its preset, silently."""
    import huggingface_hub.constants

    repo_id = "vandijklab/C2S-Pythia-410m-cell-type-prediction"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--vandijklab--C2S-Pythia-410m-cell-type-prediction"
    shutil.copytree(hub_checkpoints["pythia"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    # the Hub client reads the cache location from its constants at call time; the variable was read at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = cc.models.load(repo_id, local_files_only=True, device="cpu")
    assert model.prompt == get_preset(repo_id)
    assert model.prompt.extra["preset"] == "c2s-pythia-410m-cell-type-prediction"
    assert model.name == repo_id and type(model.tokenizer).__name__ == "GPTNeoXTokenizer"
    reference = load_quietly(hub_checkpoints["pythia"])
    assert model.tokenizer(SENTENCE)["input_ids"] == reference.tokenizer(SENTENCE)["input_ids"]


def test_settings_files_of_the_previous_version_and_by_hand(hub_checkpoints, tmp_path):
    # every field the previous version wrote, which had no answer suffix: the model was trained without one
    old = tmp_path / "old"
    shutil.copytree(hub_checkpoints["pythia"], old)
    fields = {
        "template": C2S_CELL_TYPE_TEMPLATE,
        "n_genes": 8,
        "organism": "Homo sapiens",
        "labels": ONTOLOGY_LABELS,
        "answer_prefix": " ",
        "append_eos": True,
        "extra": {"trained_by": "cellcircuits.models.train_c2s"},
    }
    (old / "cellcircuits.json").write_text(json.dumps(fields))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = cc.models.load(old)
    assert model.prompt.answer_suffix == "" and model.prompt.n_genes == 8 and model.labels == ONTOLOGY_LABELS
    tok = model.tokenizer
    prompt = build_prompt(SENTENCE, model.prompt).text
    base = tok(prompt)["input_ids"]
    for label, ids in zip(ONTOLOGY_LABELS, label_token_ids(tok, model.prompt, ONTOLOGY_LABELS), strict=True):
        assert ids == [*tok(prompt + " " + label)["input_ids"][len(base) :], tok.eos_token_id]
    # a hand-written file sets what it names; the rest is the C2S recipe
    hand = tmp_path / "hand"
    shutil.copytree(hub_checkpoints["pythia"], hand)
    (hand / "cellcircuits.json").write_text(json.dumps({"n_genes": 50}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = cc.models.load(hand)
    assert model.prompt == PromptConfig(n_genes=50)
    assert model.prompt.answer_suffix == "." and model.prompt.append_eos


def test_no_settings_warning_names_the_settings_and_the_way_out(hub_checkpoints):
    with pytest.warns(UserWarning) as record:
        cc.models.load(hub_checkpoints["llama"])
    (message,) = [str(w.message) for w in record if "cellcircuits.json" in str(w.message)]
    assert str(hub_checkpoints["llama"]) in message
    for part in [
        "template 'The following is a list of {num_genes} g'...",
        "fields ['num_genes', 'organism', 'cell_sentence']",
        "n_genes=200",
        "organism='Homo sapiens'",
        "answer ' {label}.' + EOS",
        "joint tokenization",
        "pass preset=",
        "'pythia-160m-c2s'",
        "compare_answer_formats",
    ]:
        assert part in message, part


def test_the_eos_token_named_explicitly_on_a_pythia_tokenizer(hub_checkpoints):
    model = cc.models.load(hub_checkpoints["pythia"], preset=PromptConfig(eos_token="<|endoftext|>"))
    assert model.tokenizer.unk_token == model.tokenizer.eos_token == "<|endoftext|>"
    named = label_token_ids(model.tokenizer, model.prompt, ONTOLOGY_LABELS)
    assert named == label_token_ids(model.tokenizer, PromptConfig(), ONTOLOGY_LABELS)
    with pytest.raises(ValueError, match="has no token '<nope>'"):
        label_token_ids(model.tokenizer, PromptConfig(eos_token="<nope>"), ONTOLOGY_LABELS)
