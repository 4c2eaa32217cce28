from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import cellcircuits as cc
from cellcircuits.models import C2SModel, ModelAdapter, label_token_ids
from cellcircuits.models._generate import decode_answer, generate_ids
from cellcircuits.pp import PromptConfig

from ..helpers import GENES, LABELS, forced_tokens, make_tiny

SENTENCES = [" ".join(np.random.default_rng(i).permutation(GENES)[: 1 + (3 * i) % 8]) for i in range(7)]


def c2s_of(arch: str, tokenizer, **prompt) -> C2SModel:
    """A tiny random model of ``arch`` wrapped as ``tiny_c2s`` is (``prompt``: prompt settings)."""
    model = make_tiny(arch, len(tokenizer))
    config = PromptConfig(n_genes=8, labels=LABELS, append_eos=True, **prompt)
    return C2SModel(model=model, tokenizer=tokenizer, adapter=ModelAdapter(model), prompt=config, name=arch)


def prompt_ids(c2s: C2SModel, sentences=SENTENCES) -> list[list[int]]:
    return c2s.tokenizer([p.text for p in c2s.build_prompts(sentences)])["input_ids"]


def argmax_loop(c2s: C2SModel, prompt: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding by hand: a full forward pass over the whole sequence per new token."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(c2s.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            new.append(token)
            ids.append(token)
            if token in stop:
                break
    return new


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gemma2"])
def test_generation_equals_a_greedy_argmax_loop(arch, tiny_tokenizer):
    c2s = c2s_of(arch, tiny_tokenizer)
    prompts = prompt_ids(c2s, SENTENCES[:4])
    assert len({len(p) for p in prompts}) == 4  # left padding happens in the batch of 3
    stop = {tiny_tokenizer.eos_token_id}
    expected = [argmax_loop(c2s, p, 5, stop) for p in prompts]
    assert generate_ids(c2s, prompts, max_new_tokens=5, batch_size=3, progress=False) == expected
    unfinished = sum(1 for e in expected if e[-1] not in stop)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answers = cc.models.generate_answers(c2s, prompts, max_new_tokens=5, batch_size=3, progress=False)
    assert answers == [decode_answer(tiny_tokenizer, e, c2s.prompt) for e in expected]
    messages = [str(w.message) for w in caught if "max_new_tokens" in str(w.message)]
    if unfinished:
        assert len(messages) == 1 and messages[0].startswith(f"{unfinished} of 4 answer(s) reached max_new_tokens=5")
    else:
        assert messages == []


def test_batch_size_and_order_do_not_change_the_answers(tiny_c2s):
    prompts = prompt_ids(tiny_c2s)
    assert len({len(p) for p in prompts}) >= 5
    one = generate_ids(tiny_c2s, prompts, max_new_tokens=6, batch_size=1, progress=False)
    five = generate_ids(tiny_c2s, prompts, max_new_tokens=6, batch_size=5, progress=False)
    assert five == one
    assert len({tuple(ids) for ids in one}) > 1  # the cells get different answers
    # results come back in input order, whatever order the batches ran in
    reversed_ = generate_ids(tiny_c2s, prompts[::-1], max_new_tokens=6, batch_size=5, progress=False)
    assert reversed_ == one[::-1]


def answer_then(tokenizer, config: PromptConfig, *after: list[int]) -> list[int]:
    """Tokens of the answer " CD14+ Monocyte." with its end-of-answer token, then ``after``."""
    ids = label_token_ids(tokenizer, config, ["CD14+ Monocyte"])[0]
    return ids + [t for tokens in after for t in tokens]


def test_generation_stops_at_the_end_of_answer_token(tiny_c2s):
    tok = tiny_c2s.tokenizer
    after = tok(" CD19+ B.", add_special_tokens=False)["input_ids"]
    forced = answer_then(tok, tiny_c2s.prompt, after)
    n_answer = len(forced) - len(after)
    assert forced[n_answer - 1] == tok.eos_token_id
    prompts = prompt_ids(tiny_c2s, SENTENCES[:3])
    with forced_tokens(tiny_c2s.model, forced) as passes, warnings.catch_warnings():
        warnings.simplefilter("error")  # every answer ends: no warning about max_new_tokens
        answers = cc.models.generate_answers(tiny_c2s, prompts, max_new_tokens=30, batch_size=3, progress=False)
    assert answers == ["CD14+ Monocyte"] * 3
    assert len(passes) == n_answer  # generation stopped at the terminator: no pass for the tokens after it
    with forced_tokens(tiny_c2s.model, forced):
        ids = generate_ids(tiny_c2s, prompts, max_new_tokens=30, batch_size=3, progress=False)
    assert ids == [forced[:n_answer]] * 3


def test_generation_stops_at_a_custom_terminator_and_at_the_tokenizer_eos(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_tokens(["<end_of_turn>"], special_tokens=True)
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    c2s = c2s_of("gpt_neox", tok, eos_token="<end_of_turn>")
    assert cc.models.end_of_answer_id(tok, c2s.prompt) == end
    prompts = prompt_ids(c2s, SENTENCES[:2])
    more = tok(" CD56+ NK.", add_special_tokens=False)["input_ids"]
    # the model's terminator, then the tokenizer's EOS and more text: it stops at its terminator
    forced = answer_then(tok, c2s.prompt, [tok.eos_token_id], more)
    assert forced[len(forced) - len(more) - 2] == end
    with forced_tokens(c2s.model, forced) as passes:
        answers = cc.models.generate_answers(c2s, prompts, max_new_tokens=30, batch_size=2, progress=False)
    assert answers == ["CD14+ Monocyte"] * 2 and len(passes) == len(forced) - len(more) - 1
    # the tokenizer's EOS in place of the terminator ends the answer too
    forced = [*answer_then(tok, c2s.prompt)[:-1], tok.eos_token_id, *more, end]
    with forced_tokens(c2s.model, forced):
        ids = generate_ids(c2s, prompts, max_new_tokens=30, batch_size=2, progress=False)
    with forced_tokens(c2s.model, forced):
        answers = cc.models.generate_answers(c2s, prompts, max_new_tokens=30, batch_size=2, progress=False)
    assert ids == [forced[: len(forced) - len(more) - 1]] * 2
    assert answers == ["CD14+ Monocyte"] * 2


def test_the_checkpoint_generation_config_does_not_apply(tiny_c2s):
    prompts = prompt_ids(tiny_c2s, SENTENCES[:3])
    plain = generate_ids(tiny_c2s, prompts, max_new_tokens=6, batch_size=3, progress=False)
    saved = tiny_c2s.model.generation_config
    # a checkpoint's generation_config.json asking for sampling, penalties and suppressed tokens
    saved.do_sample, saved.temperature, saved.top_k = True, 50.0, 5
    saved.repetition_penalty, saved.no_repeat_ngram_size = 10.0, 1
    saved.suppress_tokens = sorted({ids[0] for ids in plain})
    saved.max_new_tokens = 2
    torch.manual_seed(1)
    assert generate_ids(tiny_c2s, prompts, max_new_tokens=6, batch_size=3, progress=False) == plain
    assert tiny_c2s.model.generation_config is saved and saved.do_sample is True  # left as it was


def test_decoding_strips_the_answer_format(tiny_c2s):
    tok = tiny_c2s.tokenizer
    ids = tok(" CD14+ Monocyte.", add_special_tokens=False)["input_ids"]
    pad = tok.pad_token_id
    assert decode_answer(tok, [pad, *ids, tok.eos_token_id, *ids], tiny_c2s.prompt) == "CD14+ Monocyte"
    assert decode_answer(tok, ids, PromptConfig(answer_suffix="")) == "CD14+ Monocyte."
    assert decode_answer(tok, [tok.eos_token_id, *ids], tiny_c2s.prompt) == ""


def test_bad_arguments_fail_before_any_work(tiny_c2s):
    prompts = prompt_ids(tiny_c2s, SENTENCES[:2])
    with forced_tokens(tiny_c2s.model, []) as passes:
        with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
            cc.models.generate_answers(tiny_c2s, prompts, max_new_tokens=0)
        with pytest.raises(ValueError, match="batch_size must be positive"):
            cc.models.generate_answers(tiny_c2s, prompts, batch_size=0)
        with pytest.raises(ValueError, match="at least one token"):
            cc.models.generate_answers(tiny_c2s, [prompts[0], []])
    assert passes == []
