from __future__ import annotations

import copy

import pytest
import torch

from cellcircuits.models import C2SModel, ModelAdapter, record
from cellcircuits.pp import PromptConfig
from cellcircuits.transcoders import Transcoder, TranscoderConfig, TranscoderSet, splice

from ..helpers import make_tiny

ARCHS = ["gpt_neox", "llama", "gemma2"]
VOCAB = 50
D = 32


def c2s(arch: str) -> C2SModel:
    model = make_tiny(arch, VOCAB)
    # the tokenizer is never used here
    return C2SModel(model=model, tokenizer=None, adapter=ModelAdapter(model), prompt=PromptConfig(), name=arch)


def random_set(layers=(0, 1), *, d=D, n_layers=2) -> TranscoderSet:
    tcs = {}
    for layer in layers:
        tc = Transcoder(TranscoderConfig(d_in=d, d_out=d, n_features=64, activation="relu", layer=layer, skip=True))
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.05)
            tc.b_dec.normal_(0, 0.1)
            tc.W_skip.normal_(0, 0.1)
        tcs[layer] = tc
    return TranscoderSet(tcs, n_layers_model=n_layers)


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(m: C2SModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m.model(input_ids=x).logits


def n_hooks(m: C2SModel) -> int:
    return sum(
        len(mod._forward_hooks) + len(mod._forward_pre_hooks) + len(mod._forward_hooks_with_kwargs)
        for mod in m.model.modules()
    )


def zero_mlp_(m: C2SModel, layer: int) -> None:
    """Make a layer's MLP contribute exactly nothing by editing weights."""
    arch = m.adapter.spec.name
    with torch.no_grad():
        if arch == "gpt_neox":
            out = m.adapter.module(layer, "mlp").dense_4h_to_h
            out.weight.zero_()
            out.bias.zero_()
        elif arch == "llama":
            out = m.adapter.module(layer, "mlp").down_proj
            out.weight.zero_()
            if out.bias is not None:
                out.bias.zero_()
        else:
            # Gemma-2's RMSNorm scales by (1 + weight)
            m.adapter.module(layer, "mlp_out_norm").weight.fill_(-1.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_transcoder_mode_writes_the_transcoder_prediction(arch):
    m = c2s(arch)
    tset = random_set()
    points = [p for layer in (0, 1) for p in (m.adapter.mlp_in(layer), m.adapter.mlp_out(layer))]
    x = ids()
    before = logits(m, x)
    with splice(m, tset) as layers, record(m.model, points) as rec, torch.no_grad():
        spliced = m.model(input_ids=x).logits
    assert layers == [0, 1]
    for layer in (0, 1):
        (inp,) = rec[m.adapter.mlp_in(layer)]
        (out,) = rec[m.adapter.mlp_out(layer)]
        with torch.no_grad():
            expected = tset[layer](inp).output
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(spliced, before)
    # hooks are gone: the model is its old self again
    assert n_hooks(m) == 0
    torch.testing.assert_close(logits(m, x), before, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_recording_registered_before_the_splice_sees_the_replacement(arch):
    m = c2s(arch)
    tset = random_set(layers=(1,))
    point_in, point_out = m.adapter.mlp_in(1), m.adapter.mlp_out(1)
    with record(m.model, [point_in, point_out]) as rec, splice(m, tset), torch.no_grad():
        m.model(input_ids=ids())
    with torch.no_grad():
        expected = tset[1](rec[point_in][0]).output
    torch.testing.assert_close(rec[point_out][0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layers", [[0], [1], [0, 1]])
def test_zero_mode_equals_zeroed_weights(arch, layers):
    m = c2s(arch)
    x = ids()
    ref = copy.deepcopy(m)
    for layer in layers:
        zero_mlp_(ref, layer)
    with splice(m, mode="zero", layers=layers) as chosen:
        spliced = logits(m, x)
    assert chosen == layers
    torch.testing.assert_close(spliced, logits(ref, x), rtol=0, atol=0)
    assert not torch.allclose(spliced, logits(m, x))
    assert n_hooks(m) == 0


def test_zero_mode_defaults():
    m = c2s("llama")
    with splice(m, mode="zero") as chosen:
        assert chosen == [0, 1]
    with splice(m, random_set(layers=(1,)), mode="zero") as chosen:
        assert chosen == [1]
    with splice(m, mode="zero", layers=[-1, 1]) as chosen:
        assert chosen == [1]


@pytest.mark.parametrize("arch", ARCHS)
def test_mean_mode_writes_the_mean(arch):
    m = c2s(arch)
    means = {1: torch.randn(D)}
    x = ids()
    with splice(m, mode="mean", mean_outputs=means) as chosen, record(m.model, [m.adapter.mlp_out(1)]) as rec:
        logits(m, x)
    assert chosen == [1]
    (out,) = rec[m.adapter.mlp_out(1)]
    torch.testing.assert_close(out, means[1].expand_as(out), rtol=0, atol=0)
    # a zero mean is zero ablation
    with splice(m, mode="mean", mean_outputs={1: torch.zeros(D)}):
        mean_logits = logits(m, x)
    with splice(m, mode="zero", layers=[1]):
        zero_logits = logits(m, x)
    torch.testing.assert_close(mean_logits, zero_logits, rtol=0, atol=0)
    assert n_hooks(m) == 0


def test_only_chosen_layers_are_spliced():
    m = c2s("gpt_neox")
    tset = random_set()
    with splice(m, tset, layers=[1]) as chosen, record(m.model, [m.adapter.mlp_out(0)]) as rec, torch.no_grad():
        m.model(input_ids=ids())
    assert chosen == [1]
    with record(m.model, [m.adapter.mlp_out(0)]) as plain, torch.no_grad():
        m.model(input_ids=ids())
    torch.testing.assert_close(rec[m.adapter.mlp_out(0)][0], plain[m.adapter.mlp_out(0)][0], rtol=0, atol=0)


def test_hooks_removed_on_error():
    m = c2s("gemma2")
    x = ids()
    before = logits(m, x)
    with pytest.raises(RuntimeError, match="boom"), splice(m, random_set()):
        assert n_hooks(m) > 0
        raise RuntimeError("boom")
    assert n_hooks(m) == 0
    torch.testing.assert_close(logits(m, x), before, rtol=0, atol=0)


def test_transcoders_in_another_dtype_keep_the_model_dtype():
    m = c2s("llama")
    tset = random_set().to(torch.float64)
    with splice(m, tset), record(m.model, [m.adapter.mlp_out(0)]) as rec:
        out = logits(m, ids())
    assert out.dtype == torch.float32 and rec[m.adapter.mlp_out(0)][0].dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"transcoders": random_set(d=16)}, ValueError, "d_model 16"),
        ({"transcoders": random_set(n_layers=3)}, ValueError, "3 layers"),
        ({"transcoders": random_set(layers=(0,)), "layers": [1]}, ValueError, r"covers layers \[0\]"),
        ({}, ValueError, "needs a TranscoderSet"),
        ({"mode": "mean"}, ValueError, "needs mean_outputs"),
        ({"mode": "mean", "mean_outputs": {0: torch.zeros(D)}, "layers": [1]}, ValueError, r"covers layers \[0\]"),
        ({"mode": "mean", "mean_outputs": {0: torch.zeros(D + 1)}}, ValueError, "expected"),
        ({"mode": "zero", "layers": [2]}, ValueError, "out of range"),
        ({"mode": "shuffle"}, ValueError, "unknown mode"),
    ],
)
def test_errors(kwargs, err, match):
    m = c2s("gpt_neox")
    with pytest.raises(err, match=match), splice(m, **kwargs):
        pass
    assert n_hooks(m) == 0
