"""The replacement model's gradients come from its adjoint pass; they equal autograd through its forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellcircuits.circuits import FeatureTarget, LogitTarget, _adjoint, _attribute

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
        # a gradient over the first P positions: the features there come first; any left out get 0
        P = rm.n_positions // 2
        short = rm._feature_dots(layer, grad[:, :P], chunk=7)
        want = _dense_dots(rm, layer, torch.cat([grad[:, :P], torch.zeros_like(grad[:, P:])], 1))
        m = short.shape[1]
        assert int((f.position < P).sum()) <= m <= len(f.position)
        torch.testing.assert_close(short, want[:, :m], rtol=1e-5, atol=1e-5)
        assert not want[:, m:].any()
    rm._padded.clear()


def _plan_cost(batches, positions, depths, n_positions, d_model) -> float:
    def row(p, layers):
        return layers * (2 * p * d_model + p * p)

    overhead = row(n_positions, int(depths.max()))
    return sum(overhead + len(b) * row(positions[b].max() + 1, int(depths[b].max())) for b in batches)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_plan_covers_every_target_once_in_position_order(seed):
    rng = np.random.default_rng(seed)
    n, T, d, batch_size = 70, 200, 64, 16
    positions = np.concatenate([rng.integers(0, T // 3, n - 10), np.full(10, T - 1)])  # many early, some last
    depths = rng.integers(1, 7, n)
    batches = _adjoint.plan_batches(positions, depths, batch_size, T, d)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(n))
    assert max(len(b) for b in batches) <= batch_size
    assert np.all(np.diff(positions[flat]) >= 0)  # in order of position
    # no worse than batching in the given order, and than sorted fixed-size chunks
    order = np.argsort(positions, kind="stable")
    naive = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    sorted_chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    cost = _plan_cost(batches, positions, depths, T, d)
    assert cost <= _plan_cost(sorted_chunks, positions, depths, T, d) < _plan_cost(naive, positions, depths, T, d)
    # early targets run on a short prefix: the first batch ends well before the last position
    assert positions[batches[0]].max() < T // 3


def test_attributions_do_not_depend_on_the_batches(case: Case):
    rm = case.rm
    targets = _targets(case)
    one = rm.attribute(targets, batch_size=1)
    many = rm.attribute(targets, batch_size=64)
    assert len(rm._batch_plan(targets, 64)) < len(targets)
    torch.testing.assert_close(many.values, one.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many.bias, one.bias, rtol=1e-5, atol=1e-5)
    scale = float(one.matrix.abs().max())
    torch.testing.assert_close(many.matrix, one.matrix, rtol=0, atol=1e-5 * scale)


def test_attribution_rows_never_wait_for_the_device(case: Case):
    # on a GPU, a value read back by the host (item, nonzero, bincount, unique) stalls the queue of work; the
    # attribution passes read what they need from host copies instead
    from torch.utils._python_dispatch import TorchDispatchMode

    rm = case.rm
    f = next(iter(rm.features.values()))
    layer = next(iter(rm.features))
    picks = torch.linspace(0, len(f.feature) - 1, 12).long()
    targets = [FeatureTarget(layer, int(f.position[i]), int(f.feature[i])) for i in picks]
    targets.append(LogitTarget(rm.n_positions - 1, 3, (4, 5, 6)))
    waits = {"_local_scalar_dense", "nonzero", "bincount", "_unique2", "masked_select", "repeat_interleave"}
    seen: list[str] = []

    class Waits(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name in waits:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    rm.attribute(targets[:1], batch_size=4)  # per-layer set-up, once per prompt
    with Waits():
        attribution = rm.attribute(targets, batch_size=4, on_device=True)
    assert seen == []
    torch.testing.assert_close(attribution.residual(), torch.zeros(len(targets)), atol=1e-3, rtol=0)
