"""The replacement model's gradients come from its adjoint pass; they equal autograd through its forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellcircuits.circuits import FeatureTarget, LogitTarget, _attribute

from ..helpers import ARCHS, Case, replacement_case


@pytest.fixture(params=[*ARCHS, "shipped"])
def case(request) -> Case:
    return replacement_case(request.param)


def _targets(case: Case) -> list:
    rm = case.rm
    rng = np.random.default_rng(0)
    out: list = [LogitTarget(rm.n_positions - 1, 3, (4, 5, 6)), LogitTarget(rm.n_positions // 2, 7)]
    for layer, f in rm.features.items():
        for i in rng.choice(len(f.feature), size=3, replace=False):
            out.append(FeatureTarget(layer, int(f.position[i]), int(f.feature[i])))
    return out


def _autograd(rm, readout) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One backward pass per batch row through the frozen forward pass, each row seeding its own target."""
    B = len(readout.layer)
    embed, writes = rm._sources(rm._node_scale(None))
    leaves = [t.expand(B, *t.shape[1:]).clone().requires_grad_() for t in (embed, *writes)]
    with torch.enable_grad():
        values, _ = rm._run(leaves[0], leaves[1:], readout)
        values = values.diagonal()
        found = torch.autograd.grad(values.sum(), leaves, allow_unused=True)
    return values.detach(), [g if g is not None else torch.zeros_like(leaves[0]) for g in found]


def test_adjoint_gradients_equal_autograd(case: Case):
    rm = case.rm
    readout = rm._readout(_targets(case))
    values, grads, _ = rm._gradients(readout)
    ref_values, ref_grads = _autograd(rm, readout)
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(ref_grads) == rm.n_layers + 1
    for got, ref in zip(grads, ref_grads, strict=True):
        scale = float(ref.abs().max()) or 1.0
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * scale)
    # the seeds reach back: every row has a gradient at the embedding, and none after its own position
    assert bool((grads[0].abs().sum((1, 2)) > 0).all())
    for k, p in enumerate(readout.position.tolist()):
        assert float(grads[0][k, p + 1 :].abs().sum()) == 0.0


def _dense_dots(rm, layer: int, grad: torch.Tensor) -> torch.Tensor:
    f, tc = rm.features[layer], rm.transcoders[layer]
    dense = grad @ tc.W_dec.float().T
    return dense[:, f.position, f.feature] * f.activation / tc.output_scale.float()


@pytest.mark.parametrize("path", ["per_position", "gathered"])
def test_feature_dots_equal_a_dense_product(case: Case, path, monkeypatch):
    rm = case.rm
    if path == "gathered":  # no padding allowed, and no dense product: the chunked gather
        monkeypatch.setattr(_attribute, "PADDING_MAX", 0)
        monkeypatch.setattr(_attribute, "DENSE_DOTS_MAX", 0)
    rm._padded.clear()
    grad = torch.randn(5, rm.n_positions, rm.embed.shape[1], generator=torch.Generator().manual_seed(2))
    for layer, f in rm.features.items():
        got = rm._feature_dots(layer, grad, chunk=7)
        k_max = int(torch.bincount(f.position).max())
        # per position unless padding would cost more than a dense product against all features
        padded = path == "per_position" and 2 * k_max <= rm.transcoders[layer].cfg.n_features
        assert (rm._padded[layer] is not None) == padded
        torch.testing.assert_close(got, _dense_dots(rm, layer, grad), rtol=1e-5, atol=1e-5)
    rm._padded.clear()
