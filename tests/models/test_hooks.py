from __future__ import annotations

import torch

from cellcircuits.models import HookPoint, ModelAdapter, record
from cellcircuits.models._hooks import input_tensor as _input_tensor

from ..helpers import make_tiny


def test_record_input_passed_by_keyword_and_duplicates_once():
    model = make_tiny("llama", 50)
    adapter = ModelAdapter(model)
    attn_in = adapter.module_name(0, "attn")
    points = [adapter.attn_out(0), adapter.attn_out(0)]  # same point twice
    norm_out = HookPoint(adapter.module_name(0, "attn_in_norm"), "output")
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad(), record(model, [*points, HookPoint(attn_in, "input"), norm_out]) as store:
        model(input_ids=ids)
        model(input_ids=ids)
    assert len(store[adapter.attn_out(0)]) == 2  # two forward passes, recorded once each
    # Llama calls self_attn(hidden_states=...): the keyword input is what the norm produced
    torch.testing.assert_close(store[HookPoint(attn_in, "input")][0], store[norm_out][0])
    assert store[norm_out][0].shape == (2, 7, 32)
    # hooks are gone after the block
    assert not any(
        "_hooks" in getattr(h, "__module__", "") for h in model.get_submodule(attn_in)._forward_hooks.values()
    )


def test_input_tensor_prefers_positional_then_hidden_states():
    a, b = torch.zeros(1), torch.ones(1)
    assert _input_tensor((a,), {"hidden_states": b}) is a
    assert _input_tensor((), {"mask": None, "hidden_states": b}) is b
