"""compare_answer_formats on tiny models trained in a known answer format, and its values computed by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import cellcircuits as cc
from cellcircuits.models import compare_answer_formats, label_token_ids
from cellcircuits.pp import PromptConfig, build_prompt

from ..helpers import GENES, LABELS

SETTINGS = ["answer_prefix", "answer_suffix", "append_eos", "eos_token", "answer_tokenization"]
C2S = (" ", ".", True, None, "joint")
MARKERS = {LABELS[0]: ["CD14", "LYZ", "S100A8"], LABELS[1]: ["MS4A1", "CD79A", "HLA-DRA"], LABELS[2]: ["NKG7", "GNLY"]}


def marker_cells(n: int = 60, seed: int = 0) -> tuple[list[str], list[str]]:
    """Sentences led by their label's markers, the labels in turn."""
    rng = np.random.default_rng(seed)
    sentences, labels = [], []
    for i in range(n):
        label = LABELS[i % 3]
        rest = [g for g in rng.permutation(GENES) if g not in MARKERS[label]][: rng.integers(2, 6)]
        sentences.append(" ".join([*rng.permutation(MARKERS[label]), *rest]))
        labels.append(label)
    return sentences, labels


def train(answer_suffix: str):
    sentences, labels = marker_cells()
    return cc.models.train_c2s(
        sentences, labels, answer_suffix=answer_suffix, n_genes=8, n_layers=1, d_model=32, vocab_size=300,
        epochs=15, batch_size=8, lr=1e-2, progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def with_dot():
    return train(".")


@pytest.fixture(scope="module")
def without_dot():
    return train("")


def settings(row) -> tuple:
    return tuple(row[SETTINGS])


def test_the_format_a_model_was_trained_on_ranks_first(with_dot):
    sentences, labels = marker_cells()
    table = compare_answer_formats(with_dot, sentences, labels, progress=False)
    assert len(table) == 7 and table["format"].is_unique  # the default grid; the tokenizer has no <end_of_turn>
    assert table["loglik_per_token"].is_monotonic_decreasing
    best = table.iloc[0]
    assert settings(best) == C2S and best["format"] == "' {label}.' + <|endoftext|> (joint)"
    assert best["current"] and table["current"].sum() == 1 and best["config"] == with_dot.prompt
    assert best["terminator_loglik"] > -0.5  # the EOS after "." is near certain
    assert (table["error"] == "").all()
    by = {settings(row): row for _, row in table.iterrows()}
    assert np.isnan(by[(" ", "", False, None, "joint")]["terminator_loglik"])  # nothing ends that answer
    assert by[(" ", "", True, None, "joint")]["terminator_loglik"] < -2  # EOS right after the label: never seen
    assert by[(" ", ".", True, None, "joint")]["n_tokens"] == by[(" ", "", True, None, "joint")]["n_tokens"] + 1


def test_a_model_trained_without_the_dot_ranks_the_formats_without_it_higher(without_dot):
    sentences, labels = marker_cells()
    table = compare_answer_formats(without_dot, sentences, labels, progress=False)
    assert settings(table.iloc[0]) == (" ", "", True, None, "joint") and table.iloc[0]["current"]
    rank = {settings(row): i for i, row in table.iterrows()}
    for prefix, eos, tokenization in [(" ", True, "joint"), (" ", False, "joint"), ("", True, "separate")]:
        assert rank[(prefix, "", eos, None, tokenization)] < rank[(prefix, ".", eos, None, tokenization)]
    dotted = table.set_index("format").loc["' {label}.' + <|endoftext|> (joint)"]
    assert dotted["terminator_loglik"] < -2  # an EOS after a "." it never saw


def test_values_are_those_of_the_full_training_text(with_dot):
    sentences, labels = marker_cells(12, seed=1)
    formats = [{}, {"answer_suffix": ""}, {"answer_prefix": "", "answer_tokenization": "separate"}]
    table = compare_answer_formats(with_dot, sentences, labels, formats=formats, batch_size=5, progress=False)
    assert list(table["current"]) == [True, False, False]  # the model's own format is the best here
    tok, candidates = with_dot.tokenizer, list(dict.fromkeys(labels))
    for overrides in formats:
        config = dataclasses.replace(with_dot.prompt, **overrides)
        answers = label_token_ids(tok, config, candidates)
        loglik = np.zeros((len(sentences), len(candidates)))
        last = np.zeros_like(loglik)
        for i, sentence in enumerate(sentences):
            prompt = tok(build_prompt(sentence, config).text)["input_ids"]
            for j, answer in enumerate(answers):
                ids = prompt + answer  # one forward of the whole training text
                with torch.no_grad():
                    logits = with_dot.model(input_ids=torch.tensor([ids])).logits[0].double()
                logp = torch.log_softmax(logits, -1)
                per_token = [logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))]
                loglik[i, j], last[i, j] = sum(per_token), per_token[-1]
        truth = np.array([candidates.index(label) for label in labels])
        rows = np.arange(len(sentences))
        n_tokens = np.array([len(answers[y]) for y in truth])
        row = table[[c == config for c in table["config"]]].iloc[0]
        assert row["loglik_per_answer"] == pytest.approx(loglik[rows, truth].mean(), abs=1e-4)
        assert row["loglik_per_token"] == pytest.approx((loglik[rows, truth] / n_tokens).mean(), abs=1e-4)
        assert row["terminator_loglik"] == pytest.approx(last[rows, truth].mean(), abs=1e-4)
        assert row["n_tokens"] == pytest.approx(n_tokens.mean())
        assert row["accuracy"] == pytest.approx((loglik.argmax(1) == truth).mean())


def test_formats_as_overrides_or_settings_and_bad_arguments(with_dot):
    sentences, labels = marker_cells(6)
    own = dataclasses.replace(with_dot.prompt, append_eos=False)
    table = compare_answer_formats(with_dot, sentences, labels, formats=[own], progress=False)
    assert len(table) == 1 and table["config"].iloc[0] is own and not table["current"].iloc[0]
    one_label = compare_answer_formats(with_dot, sentences[:1], labels[:1], formats=[{}], progress=False)
    assert np.isnan(one_label["accuracy"].iloc[0]) and np.isfinite(one_label["loglik_per_token"].iloc[0])
    with pytest.raises(ValueError, match=r"unknown prompt settings \['suffix'\]"):
        compare_answer_formats(with_dot, sentences, labels, formats=[{"suffix": ""}], progress=False)
    with pytest.raises(ValueError, match="6 sentences for 5 labels"):
        compare_answer_formats(with_dot, sentences, labels[:5], progress=False)
    with pytest.raises(ValueError, match="no cells"):
        compare_answer_formats(with_dot, [], [], progress=False)
    with pytest.raises(ValueError, match="formats is empty"):
        compare_answer_formats(with_dot, sentences, labels, formats=[], progress=False)


def test_grid_adds_end_of_turn_and_the_current_format(hub_checkpoints):
    sentences, labels = marker_cells(4)
    gemma = cc.models.load(hub_checkpoints["gemma2"], preset="c2s-scale-gemma-2-2b")
    table = compare_answer_formats(gemma, sentences, labels, progress=False)
    assert len(table) == 8 and (table["eos_token"] == "<end_of_turn>").sum() == 1
    assert "' {label}.' + <end_of_turn> (joint)" in set(table["format"])
    # a format outside the grid is checked beside it
    spaced = PromptConfig(answer_tokenization="separate")
    pythia = cc.models.load(hub_checkpoints["pythia"], preset=spaced)
    table = compare_answer_formats(pythia, sentences, labels, progress=False)
    assert len(table) == 8 and (table["eos_token"] != "<end_of_turn>").all()
    (current,) = table.index[table["current"]]
    assert settings(table.loc[current]) == (" ", ".", True, None, "separate")
    assert table.loc[current, "config"] == spaced
