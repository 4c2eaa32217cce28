"""The frozen replacement model reproduces the original model and splits every target exactly.

Tiny random models of each architecture (norms and biases perturbed, weights large enough that attention is far
from uniform and Gemma-2's softcaps bite) get random transcoders on some layers, the middle layer left uncovered.
The shipped ``pbmc68k-tiny`` model is checked on one real prompt with a random transcoder set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from cellcircuits.circuits._attribute import Attribution
from cellcircuits.circuits._replacement import ReplacementModel
from cellcircuits.circuits._targets import FeatureTarget, LogitTarget
from cellcircuits.models._adapter import HookPoint
from cellcircuits.models._hooks import record

from ..helpers import (
    ARCHS,
    COVERED,
    FLAVOUR,
    N_LAYERS,
    SEQ,
    Case,
    D,
    random_model,
    random_transcoders,
    replacement_case,
)


@pytest.fixture(params=[*ARCHS, "shipped"])
def case(request) -> Case:
    """Every tiny architecture and the shipped model (overrides the tiny-only ``case`` of the circuits conftest)."""
    return replacement_case(request.param)


def _feature_targets(rm: ReplacementModel, layer: int, n: int, seed: int) -> list[FeatureTarget]:
    f = rm.features[layer]
    pick = np.random.default_rng(seed).choice(len(f.feature), size=min(n, len(f.feature)), replace=False)
    return [FeatureTarget(layer, int(f.position[i]), int(f.feature[i])) for i in pick]


def _logit_targets(rm: ReplacementModel) -> list[LogitTarget]:
    T = rm.n_positions
    return [LogitTarget(T - 1, 3, (4, 5, 6)), LogitTarget(T // 2, 7), LogitTarget(0, 11, (12,))]


def _tol(values: torch.Tensor) -> float:
    return 1e-4 * max(1.0, float(values.abs().max()))


# 1. the frozen forward pass
def test_frozen_forward_reproduces_logits(case: Case):
    with torch.no_grad():
        logits = case.model(input_ids=case.ids[None]).logits[0].float()
    frozen = case.rm.forward()
    assert frozen.shape == logits.shape
    assert_close(frozen, logits, rtol=0, atol=_tol(logits))
    if case.arch == "gemma2":  # the softcap bites, and forward(softcap=False) gives the logits before it
        assert (case.rm.forward(softcap=False) - frozen).abs().max() > 0.1


def test_record_leaves_the_model_as_it_was(case: Case):
    expected = "eager" if case.arch == "gemma2" else "sdpa"
    assert case.model.config._attn_implementation == expected
    leftover = [h for m in case.model.modules() for h in m._forward_hooks.values() if h.__module__ == record.__module__]
    assert not leftover


def test_recorded_features_and_errors(tiny: Case):
    rm, adapter = tiny.rm, tiny.rm.adapter
    points = [adapter.mlp_in(m) for m in range(N_LAYERS)] + [adapter.mlp_out(m) for m in range(N_LAYERS)]
    with torch.no_grad(), record(tiny.model, points) as rec:
        tiny.model(input_ids=tiny.ids[None])
    assert rm.uncovered_layers == [1]
    # (recorded with eager attention, compared with sdpa: equal up to float rounding)
    assert_close(rm.errors[1], rec[adapter.mlp_out(1)][0][0], rtol=1e-5, atol=1e-5)  # uncovered: all error
    for m in COVERED:
        tc, x = tiny.transcoders[m], rec[adapter.mlp_in(m)][0][0]
        out = tc(x)
        f = rm.features[m]
        assert_close(torch.zeros_like(out.features).index_put_((f.position, f.feature), f.activation), out.features)
        assert_close(f.pre_activation, out.pre_acts[f.position, f.feature])
        assert_close(rm.errors[m] + out.output, rec[adapter.mlp_out(m)][0][0], rtol=1e-5, atol=1e-5)
    nodes = rm.nodes
    n_active = sum(len(f.feature) for f in rm.features.values())
    assert len(nodes) == SEQ + n_active + N_LAYERS * SEQ
    assert (nodes.kind[nodes.feature_slices[2]] == "feature").all()
    i = nodes.index("feature", 2, int(rm.features[2].position[0]), int(rm.features[2].feature[0]))
    assert nodes.activation[i] == pytest.approx(float(rm.features[2].activation[0]))
    assert nodes.index("error", 1, 4) == nodes.error_slices[1].start + 4
    assert nodes.index("token", -1, 3) == 3
    assert len(nodes.to_frame()) == len(nodes)
    with pytest.raises(KeyError):
        nodes.index("feature", 1, 0, 0)


# 2. attribution
def _all_targets(rm: ReplacementModel) -> list:
    layers = sorted(rm.features)
    return _feature_targets(rm, layers[-1], 6, 0) + _feature_targets(rm, layers[0], 2, 1) + _logit_targets(rm)


def test_attribution_is_exact(case: Case):
    rm = case.rm
    targets = [*_all_targets(rm), FeatureTarget(sorted(rm.features)[-1], 5, 0)]  # feature 0 may well be inactive
    attr = rm.attribute(targets, batch_size=5)  # several backward passes
    assert isinstance(attr, Attribution)
    assert attr.matrix.shape == (len(targets), len(rm.nodes))
    # the target values are what the model computes: feature pre-activations, logit differences before softcap
    expected = []
    adapter = rm.adapter
    points = [adapter.mlp_in(m) for m in rm.features]
    cfg = case.model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    try:
        if cap is not None:
            cfg.final_logit_softcapping = None  # Gemma-2: read the logits before the softcap
        with torch.no_grad(), record(case.model, points) as rec:
            logits = case.model(input_ids=case.ids[None]).logits[0].float()
    finally:
        if cap is not None:
            cfg.final_logit_softcapping = cap
    for t in targets:
        if isinstance(t, FeatureTarget):
            x = rec[adapter.mlp_in(t.layer)][0][0][t.position]
            with torch.no_grad():
                expected.append(case.transcoders[t.layer].pre_acts(x)[t.feature])
        else:
            row = logits[t.position]
            comp = row[list(t.competitors)].mean() if t.competitors else 0.0
            expected.append(row[t.token] - comp)
    expected = torch.stack([torch.as_tensor(e, dtype=torch.float32) for e in expected])
    assert_close(attr.values, expected, rtol=0, atol=_tol(expected))
    # exactness: tokens + features + errors + bias = target; the bias, found with every source zeroed, agrees
    assert attr.residual().abs().max() <= _tol(attr.values) / 10
    assert_close(attr.values, rm.evaluate(targets).cpu(), rtol=0, atol=_tol(attr.values) / 10)
    # the split is the same however targets are batched
    one = rm.attribute(targets[:3], batch_size=1)
    assert_close(one.matrix, attr.matrix[:3], rtol=0, atol=1e-5)


def test_direct_edges_stop_at_features_and_respect_causality(tiny: Case):
    rm, nodes = tiny.rm, tiny.rm.nodes
    targets = _feature_targets(rm, 0, 3, 2) + _feature_targets(rm, 2, 3, 3)
    attr = rm.attribute(targets)
    for k, t in enumerate(targets):
        row = attr.matrix[k].numpy()
        # nothing written at or after the target's own layer, nor at a later position, reaches it
        later = (nodes.layer >= t.layer) | (nodes.position > t.position)
        assert np.abs(row[later]).max() == 0
        assert np.abs(row[~later]).max() > 0
    # a feature target is reached through upstream features' edges only: its value does not move when a
    # feature of its own layer is ablated
    zero = torch.ones(len(nodes))
    zero[nodes.feature_slices[2]] = 0
    assert_close(rm.evaluate(targets[3:], zero), rm.evaluate(targets[3:]), rtol=0, atol=0)


# 3. interventions in the frozen model: a direct edge is what ablating its source takes from the target
def _random_edges(rm: ReplacementModel, n: int, seed: int) -> tuple[list, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    layers = sorted(rm.features)
    targets = _feature_targets(rm, layers[-1], 4, seed) + _logit_targets(rm)
    kinds = rm.nodes.kind
    sources, target_index = [], []
    for _ in range(n):
        k = int(rng.integers(len(targets)))
        t = targets[k]
        limit = t.layer if isinstance(t, FeatureTarget) else rm.n_layers
        ok = np.flatnonzero((kinds == "feature") & (rm.nodes.layer < limit) & (rm.nodes.position <= t.position))
        sources.append(int(rng.choice(ok)))
        target_index.append(k)
    return targets, np.array(sources), np.array(target_index)


def test_interventions_match_edges(case: Case):
    rm = case.rm
    targets, sources, which = _random_edges(rm, 20, seed=4)
    attr = rm.attribute(targets)
    edges = attr.matrix[which, sources]
    scale = torch.ones(len(sources), len(rm.nodes))
    scale[torch.arange(len(sources)), torch.as_tensor(sources)] = 0.0
    ablated = rm.evaluate(targets, scale).cpu()[torch.arange(len(sources)), torch.as_tensor(which)]
    assert_close(attr.values[which] - ablated, edges, rtol=0, atol=_tol(attr.values))
    assert edges.abs().max() > 1e-2  # the check has teeth
    # doubling a source adds its edge once more; ablating an error node takes its attribution
    scale[torch.arange(len(sources)), torch.as_tensor(sources)] = 2.0
    doubled = rm.evaluate(targets, scale).cpu()[torch.arange(len(sources)), torch.as_tensor(which)]
    assert_close(doubled - attr.values[which], edges, rtol=0, atol=_tol(attr.values))
    err = rm.nodes.index("error", 1, targets[-3].position)
    no_err = torch.ones(len(rm.nodes))
    no_err[err] = 0
    k = len(targets) - 3
    assert_close(attr.values[k] - rm.evaluate(targets, no_err).cpu()[k], attr.matrix[k, err], rtol=0, atol=1e-4)


# 4. attention-head split of direct edges
def test_edge_via_heads_adds_up(case: Case):
    rm, nodes = case.rm, case.rm.nodes
    H = rm.adapter.n_heads
    rng = np.random.default_rng(5)
    layers = sorted(rm.features)
    targets = [_logit_targets(rm)[0], _feature_targets(rm, layers[-1], 1, 6)[0]]
    attr = rm.attribute(targets)
    sources = np.arange(len(nodes)) if case.arch != "shipped" else rng.choice(len(nodes), 300, replace=False)
    for k, t in enumerate(targets):
        via = rm.edge_via_heads(t, sources)
        assert via.values.shape == (len(sources), rm.n_layers * H + 2)
        assert via.columns[:2] == ["L0.H0", "L0.H1"] and via.columns[-2:] == ["residual", "skip"]
        assert_close(via.total, attr.matrix[k, sources], rtol=0, atol=1e-6)
        scale = float(via.values.abs().max())
        assert_close(via.values.sum(1), via.total, rtol=0, atol=1e-5 * max(1.0, scale))
        # a source elsewhere than the target's position reaches it only through attention
        off = nodes.position[sources] != t.position
        assert via.values[torch.as_tensor(off), -2:].abs().max() == 0
        # a head at or before the source's layer never carries it
        head_layer = np.repeat(np.arange(rm.n_layers), H)
        early = torch.as_tensor(head_layer[None, :] <= nodes.layer[sources][:, None])
        assert via.values[:, :-2][early].abs().max() == 0
        assert via.values[:, :-2].abs().max() > 1e-3
        if not FLAVOUR[case.arch][1]:
            assert via.values[:, -1].abs().max() == 0


def test_batched_head_splits_equal_one_target_at_a_time(case: Case):
    rm, nodes = case.rm, case.rm.nodes
    rng = np.random.default_rng(6)
    layers = sorted(rm.features)
    targets = [*_logit_targets(rm)[:2], *_feature_targets(rm, layers[-1], 1, 6)[:3]]
    sources = [rng.choice(len(nodes), int(rng.integers(1, 40)), replace=False) for _ in targets]
    batched = rm.edges_via_heads(targets, sources, batch_size=2)  # batches of 2, 2 and 1 targets
    assert len(batched) == len(targets)
    for t, src, split in zip(targets, sources, batched, strict=True):
        single = rm.edge_via_heads(t, src)
        assert split.columns == single.columns and split.values.shape == single.values.shape
        scale = max(1.0, float(single.values.abs().max()))
        assert_close(split.values, single.values, rtol=0, atol=1e-5 * scale)
        assert_close(split.total, single.total, rtol=0, atol=1e-6 * scale)
    with pytest.raises(ValueError, match="2 targets for 1 source lists"):
        rm.edges_via_heads(targets[:2], sources[:1])


def test_last_layer_heads_are_ov_circuits():
    """Rebuilt from the model's own weights and patterns: what a source sends through a head of the last layer.

    Errors of layer 1 reach a logit only through layer 2: through head ``h`` it is ``pattern[h, t, q]`` times the
    OV image of the layer-normed source, read through the final norm (both linear at their recorded scales).
    """
    tiny = replacement_case("gpt_neox")  # parallel residual, no skip: layer 2's heads feed the final norm directly
    rm, adapter = tiny.rm, tiny.rm.adapter
    target = LogitTarget(SEQ - 1, 3, (4, 5, 6))
    sources = np.arange(rm.nodes.error_slices[1].start, rm.nodes.error_slices[1].stop)
    via = rm.edge_via_heads(target, sources)
    attn_norm, final_norm = adapter.module(2, "attn_in_norm"), adapter.final_norm
    points = [HookPoint(adapter.module_name(2, "attn_in_norm"), "input"), HookPoint(adapter.spec.final_norm, "input")]
    config = tiny.model.config
    config._attn_implementation = "eager"
    try:
        with torch.no_grad(), record(tiny.model, points) as rec:
            pattern = tiny.model(input_ids=tiny.ids[None], output_attentions=True).attentions[2][0]
    finally:
        config._attn_implementation = "sdpa"

    def linear_norm(norm: torch.nn.LayerNorm, x: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(-1, keepdim=True)) / (seen.var(-1, unbiased=False) + norm.eps).sqrt() * norm.weight

    W_U = adapter.unembed.weight
    w = W_U[3] - W_U[[4, 5, 6]].mean(0)
    weights = adapter.attention_weights(2)
    t = SEQ - 1
    with torch.no_grad():
        for i, q in enumerate(rm.nodes.position[sources]):
            normed = linear_norm(attn_norm, rm.errors[1, q], rec[points[0]][0][0, q])
            for h in range(adapter.n_heads):
                ov = normed @ weights.W_V[h] @ weights.W_O[h]
                expected = pattern[h, t, q] * (linear_norm(final_norm, ov, rec[points[1]][0][0, t]) @ w)
                assert float(via.values[i, via.columns.index(f"L2.H{h}")]) == pytest.approx(float(expected), abs=1e-5)
    assert via.values[:, :-2].abs().max() > 1e-2


# 5. devices and input checks
@pytest.mark.gpu
def test_cuda(tiny: Case):
    model = random_model(tiny.arch).cuda()
    transcoders = random_transcoders(tiny.arch, D, COVERED, N_LAYERS).cuda()
    rm = ReplacementModel.record(model, transcoders, tiny.ids)
    assert rm.device.type == "cuda"
    with torch.no_grad():
        logits = model(input_ids=tiny.ids[None].cuda()).logits[0]
    assert_close(rm.forward(), logits, rtol=0, atol=_tol(logits))
    attr = rm.attribute(_all_targets(rm), batch_size=4)
    assert attr.residual().abs().max() <= _tol(attr.values) / 10


def test_bad_inputs(tiny: Case):
    rm = tiny.rm
    with pytest.raises(ValueError, match="node_scale"):
        rm.forward(torch.ones(3))
    with pytest.raises(IndexError, match="position"):
        rm.evaluate([LogitTarget(SEQ, 1)])
    with pytest.raises(ValueError, match="batch_size"):
        rm.attribute([LogitTarget(0, 1)], batch_size=0)
    with pytest.raises(KeyError, match="no transcoder"):
        rm.attribute([FeatureTarget(1, 0, 0)])
