from __future__ import annotations

import numpy as np
import pytest
import torch

from cellcircuits.models import score_continuations
from cellcircuits.models._scoring import ContinuationBlock, pad, position_ids, token_batches

from ..helpers import make_tiny


def naive_scores(model, prompts, conts):
    """One unpadded sequence at a time, no cache: the reference."""
    out = np.zeros((len(prompts), len(conts)))
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for j, c in enumerate(conts):
                ids = torch.tensor([p + c])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                out[i, j] = sum(logp[len(p) - 1 + t, c[t]].item() for t in range(len(c)))
    return out


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gemma2"])
def test_scores_match_naive_reference_left_and_right(arch):
    model = make_tiny(arch, 60, attn="sdpa" if arch != "gemma2" else "eager")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 60, size=n).tolist() for n in (5, 9, 3, 12, 7)]
    conts = [[4], [7, 8, 9], [10, 11]]
    ref = naive_scores(model, prompts, conts)
    left = score_continuations(model, prompts, conts, pad_token_id=1, batch_size=3, padding_side="left", progress=False)
    right = score_continuations(
        model, prompts, conts, pad_token_id=1, batch_size=3, padding_side="right", progress=False
    )
    np.testing.assert_allclose(left, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(right, ref, atol=1e-4, rtol=1e-4)
    one = score_continuations(model, prompts, conts, pad_token_id=1, batch_size=1, progress=False)
    np.testing.assert_allclose(one, ref, atol=1e-4, rtol=1e-4)


def test_pad_and_positions():
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match="padding side"):
        pad([[1]], 0, side="middle")


def test_empty_continuation_or_prompt_raises():
    model = make_tiny("gpt_neox", 20)
    with pytest.raises(ValueError, match="continuation"):
        score_continuations(model, [[1, 2]], [[]], pad_token_id=0, progress=False)
    with pytest.raises(ValueError, match="prompt"):
        score_continuations(model, [[]], [[1]], pad_token_id=0, progress=False)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gemma2"])
def test_scoring_uses_the_cache_api_without_deprecation_warnings(arch):
    import warnings

    model = make_tiny(arch, 60, attn="sdpa" if arch != "gemma2" else "eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = score_continuations(model, [[5, 6, 7], [8, 9]], [[4, 5], [7]], pad_token_id=1, progress=False)
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    np.testing.assert_allclose(scores, naive_scores(model, [[5, 6, 7], [8, 9]], [[4, 5], [7]]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gemma2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_all_labels_at_once_equal_a_per_label_reference_under_a_token_budget(arch, side):
    model = make_tiny(arch, 60, attn="sdpa" if arch == "llama" else "eager")
    if arch == "gemma2":
        model.config.sliding_window = 6  # prompts reach past the window: the sliding layers' mask is exercised
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, 60, size=n).tolist() for n in (4, 11, 3, 9, 14, 6, 8)]
    conts = [[4], [7, 8, 9, 3], [7, 8], [10, 11, 12]]  # shared first tokens, a one-token label
    ref = naive_scores(model, prompts, conts)
    for budget in (20, 45, 10_000):
        got = score_continuations(
            model,
            prompts,
            conts,
            pad_token_id=1,
            batch_size=None,
            max_batch_tokens=budget,
            padding_side=side,
            progress=False,
        )
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_only_one_token_labels_need_no_appended_tokens():
    model = make_tiny("gpt_neox", 30)
    prompts, conts = [[5, 6, 7], [8, 9], [3]], [[4], [7], [20]]
    got = score_continuations(model, prompts, conts, pad_token_id=1, progress=False)
    np.testing.assert_allclose(got, naive_scores(model, prompts, conts), atol=1e-5, rtol=1e-5)


def test_token_batches_respect_rows_and_budget():
    lengths = [5, 1, 9, 3, 3, 20]
    batches = token_batches(lengths, batch_size=None, max_batch_tokens=12, extra=1)
    assert [b.tolist() for b in batches] == [[1, 3, 4], [0], [2], [5]]  # (3+1)*3 = 12; 20 + 1 alone over budget
    assert sorted(np.concatenate(batches).tolist()) == list(range(6))
    assert [len(b) for b in token_batches(lengths, batch_size=2, max_batch_tokens=None)] == [2, 2, 2]
    assert [len(b) for b in token_batches(lengths, batch_size=2, max_batch_tokens=1000)] == [2, 2, 2]
    with pytest.raises(ValueError, match="max_batch_tokens must be positive"):
        token_batches(lengths, batch_size=None, max_batch_tokens=0)
    with pytest.raises(ValueError, match="batch_size or max_batch_tokens"):
        token_batches(lengths, batch_size=None, max_batch_tokens=None)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_attention_without_4d_masks_runs_as_sdpa_or_eager_during_the_call(arch):
    model = make_tiny(arch, 30)
    prompts, conts = [[5, 6, 7], [8, 9]], [[4, 5], [7]]
    ref = naive_scores(model, prompts, conts)
    seen = []
    hook = model.model.layers[0].register_forward_hook(lambda *_: seen.append(model.config._attn_implementation))
    model.config._attn_implementation = "flash_attention_2"
    got = score_continuations(model, prompts, conts, pad_token_id=1, progress=False)
    hook.remove()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert set(seen) == {"eager" if arch == "gemma2" else "sdpa"}  # soft-capped Gemma-2 attention runs eager
    assert model.config._attn_implementation == "flash_attention_2"  # restored


def test_bfloat16_model_scores_in_float32_close_to_float32():
    model = make_tiny("gpt_neox", 60)
    prompts, conts = [[5, 6, 7, 8], [9, 10]], [[4, 5], [7, 8, 9]]
    ref = score_continuations(model, prompts, conts, pad_token_id=1, progress=False)
    low = score_continuations(model.to(torch.bfloat16), prompts, conts, pad_token_id=1, progress=False)
    assert low.dtype == np.float64
    np.testing.assert_allclose(low, ref, atol=0.1)


def test_labels_sharing_first_tokens_share_their_fed_tokens():
    block = ContinuationBlock.build([[4], [7, 8, 9, 3], [7, 8], [7, 5], [10, 11]])
    # distinct fed prefixes: (7,), (7, 8), (7, 8, 9), (10,)
    assert block.fed.tolist() == [7, 8, 9, 10] and block.depth.tolist() == [0, 1, 2, 0]
    assert block.sees.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]
    assert block.first.tolist() == [4, 7, 7, 7, 10]
    assert list(zip(block.node.tolist(), block.target.tolist(), block.owner.tolist(), strict=True)) == [
        (0, 8, 1),
        (1, 9, 1),
        (2, 3, 1),
        (0, 8, 2),
        (0, 5, 3),
        (3, 11, 4),
    ]


@pytest.mark.parametrize("arch", ["gpt_neox", "gemma2"])
def test_scores_with_prompt_logits_equal_each_prompt_alone(arch):
    """The prompt pass can hand back its logits at every position: each unpadded prompt's own logits."""
    from cellcircuits.models._scoring import score_batch

    model = make_tiny(arch, 60, attn="sdpa" if arch != "gemma2" else "eager")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, 60, size=n).tolist() for n in (5, 9, 3)]
    conts = [[4], [7, 8, 9]]
    block = ContinuationBlock.build(conts)
    with torch.no_grad():
        plain, none = score_batch(model, prompts, block, 1, "right", torch.device("cpu"))
        scores, logits = score_batch(model, prompts, block, 1, "right", torch.device("cpu"), prompt_logits=True)
        assert none is None and logits is not None and logits.shape[:2] == (3, 9)
        for i, p in enumerate(prompts):
            alone = model(input_ids=torch.tensor([p])).logits[0]
            torch.testing.assert_close(logits[i, : len(p)], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores, plain)
    np.testing.assert_allclose(scores.double().numpy(), naive_scores(model, prompts, conts), atol=1e-4, rtol=1e-4)
