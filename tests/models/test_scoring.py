from __future__ import annotations

import numpy as np
import pytest
import torch

from cellcircuits.models import score_continuations
from cellcircuits.models._scoring import pad, position_ids

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
