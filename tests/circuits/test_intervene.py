"""Feature edits in the replacement model: exact without edits, and an ablation equal to a hand-made hook."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from cellcircuits.circuits._intervene import FeatureEdits, clean_run, run_edits, run_feature_edits
from cellcircuits.models._hooks import output_tensor as _output_tensor
from cellcircuits.transcoders._splice import replace_output as _replace_output

from ..helpers import random_feature_edits


def _ones(run, transcoders, batch: int) -> dict:
    return {m: torch.ones(batch, len(run.input_ids), transcoders[m].cfg.n_features) for m in transcoders.layers}


def test_no_edit_reproduces_the_model(case):
    run = clean_run(case.model, case.transcoders, case.ids)
    with torch.no_grad():
        ref = case.model(input_ids=case.ids[None]).logits[0].float()
    assert_close(run.logits, ref)
    logits = run_edits(case.model, case.transcoders, run, _ones(run, case.transcoders, 3))
    for b in range(3):
        assert_close(logits[b], ref, rtol=1e-4, atol=1e-4)


def test_ablating_a_last_layer_feature_equals_removing_its_decoder_row(case):
    model, tset = case.model, case.transcoders
    run = clean_run(model, tset, case.ids)
    last = max(tset.layers)
    acts = run.activations[last]
    pos, feat = (acts > 0).nonzero(as_tuple=True)
    p, f = int(pos[-1]), int(feat[-1])  # features of the last covered layer feed no other feature
    scale = _ones(run, tset, 2)
    scale[last][1, p, f] = 0.0
    edited = run_edits(model, tset, run, scale)
    tc = tset[last]
    removed = acts[p, f] * tc.W_dec[f].float() / tc.output_scale.float()
    adapter = case.rm.adapter
    module = model.get_submodule(adapter.mlp_out(last).module)

    def hook(_mod, _args, output):
        y = _output_tensor(output).clone()
        y[:, p] -= removed.to(y.dtype)
        return _replace_output(output, y)

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            expected = model(input_ids=case.ids[None]).logits[0].float()
    finally:
        handle.remove()
    assert_close(edited[1], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(edited[1], edited[0])


def test_override_sets_values(case):
    model, tset = case.model, case.transcoders
    run = clean_run(model, tset, case.ids)
    first = min(tset.layers)
    scale = _ones(run, tset, 2)
    scale[first][1] = 0.0  # every feature of the first covered layer off ...
    override = {first: torch.full_like(scale[first], float("nan"))}
    override[first][1] = run.activations[first]  # ... and set back to its clean value: nothing changes
    logits = run_edits(model, tset, run, scale, override)
    assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_feature_edits_equal_the_dense_edits(case):
    """The sparse path (TopK) and its dense fallback (JumpReLU) give the logits of the same edits made densely."""
    model, tset = case.model, case.transcoders
    run = clean_run(model, tset, case.ids)
    generator = torch.Generator().manual_seed(0)
    edits = {m: random_feature_edits(run, tset[m], m, 4, generator) for m in tset.layers}
    T = len(run.input_ids)
    dense = {m: e.dense(T, tset[m].cfg.n_features) for m, e in edits.items()}
    want = run_edits(model, tset, run, {m: d[0] for m, d in dense.items()}, {m: d[1] for m, d in dense.items()})
    got = run_feature_edits(model, tset, run, edits)
    assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - run.logits).abs().amax() > 1e-2  # the edits do change the logits
    # values set on features the run does not activate reach the output through their decoder rows
    only_set = {
        m: e._replace(default=torch.ones(4), scale_at=e.scale_at[:0], scale=e.scale[:0]) for m, e in edits.items()
    }
    dense = {m: e.dense(T, tset[m].cfg.n_features) for m, e in only_set.items()}
    want = run_edits(model, tset, run, {m: d[0] for m, d in dense.items()}, {m: d[1] for m, d in dense.items()})
    assert_close(run_feature_edits(model, tset, run, only_set), want, rtol=1e-4, atol=1e-4)


def test_no_feature_edit_reproduces_the_model(case):
    run = clean_run(case.model, case.transcoders, case.ids)
    none = torch.zeros(0, 3, dtype=torch.long)
    edits = {
        m: FeatureEdits(torch.ones(2), none, torch.zeros(0), none, torch.zeros(0)) for m in case.transcoders.layers
    }
    logits = run_feature_edits(case.model, case.transcoders, run, edits)
    for b in range(2):
        assert_close(logits[b], run.logits, rtol=1e-4, atol=1e-4)
