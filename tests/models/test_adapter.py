"""ModelAdapter: its hook points and per-head weights reproduce what the Hugging Face models compute.

Each architecture is built tiny and randomly initialised (with norm weights and biases perturbed so that every
part matters), run once, and the adapter's view of it is checked against the model's own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.testing import assert_close
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.llama import modeling_llama

from cellcircuits.models._adapter import AttentionWeights, HookPoint, ModelAdapter, spec_for
from cellcircuits.models._hooks import record

VOCAB, BATCH, SEQ = 100, 2, 12
TOL = {"rtol": 1e-5, "atol": 1e-5}

# gpt_neox_sequential: GPT-NeoX with use_parallel_residual=False, which the adapter must also follow
ARCHS = ["gpt_neox", "gpt_neox_sequential", "llama", "gemma2"]


def _config(arch: str):
    common = {"vocab_size": VOCAB, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64}
    if arch.startswith("gpt_neox"):
        # Pythia-like: partial rotary (half of each head here; Pythia uses a quarter), biases on
        return GPTNeoXConfig(
            **common,
            hidden_size=32,
            intermediate_size=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            use_parallel_residual=arch == "gpt_neox",
            attention_bias=True,
        )
    if arch == "llama":
        return LlamaConfig(
            **common, hidden_size=32, intermediate_size=48, num_key_value_heads=2, attention_bias=True, mlp_bias=True
        )
    # Gemma-2: head_dim * n_heads != d_model, a query_pre_attn_scalar != head_dim, softcaps that bite
    return Gemma2Config(
        **common,
        hidden_size=32,
        intermediate_size=48,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=1.5,
        final_logit_softcapping=2.0,
        sliding_window=64,
    )


MODEL_CLASS = {
    "gpt_neox": GPTNeoXForCausalLM,
    "gpt_neox_sequential": GPTNeoXForCausalLM,
    "llama": LlamaForCausalLM,
    "gemma2": Gemma2ForCausalLM,
}
ROTARY = {
    "gpt_neox": modeling_gpt_neox.apply_rotary_pos_emb,
    "gpt_neox_sequential": modeling_gpt_neox.apply_rotary_pos_emb,
    "llama": modeling_llama.apply_rotary_pos_emb,
    "gemma2": modeling_gemma2.apply_rotary_pos_emb,
}


@dataclass
class Run:
    arch: str
    model: torch.nn.Module
    adapter: ModelAdapter
    ids: torch.Tensor
    logits: torch.Tensor
    attentions: tuple[torch.Tensor, ...]
    acts: dict[HookPoint, torch.Tensor]


def _points(adapter: ModelAdapter) -> dict[str, HookPoint]:
    pts = {"embed": HookPoint(adapter.spec.embed, "output")}
    for i in range(adapter.n_layers):
        pts |= {
            f"resid_in{i}": adapter.resid_in(i),
            f"attn_out{i}": adapter.attn_out(i),
            f"mlp_in{i}": adapter.mlp_in(i),
            f"mlp_out{i}": adapter.mlp_out(i),
            f"layer_out{i}": HookPoint(adapter.layer_name(i), "output"),
            f"attn_in{i}": HookPoint(adapter.module_name(i, "attn_in_norm"), "output"),
            f"attn{i}": HookPoint(adapter.module_name(i, "attn"), "output"),
        }
    return pts


def _build(arch: str) -> Run:
    torch.manual_seed(0)
    config = _config(arch)
    config._attn_implementation = "eager"
    model = MODEL_CLASS[arch](config).float().eval()
    with torch.no_grad():
        # larger weights than HF's 0.02 init so attention is far from uniform and softcaps bite;
        # norm weights/biases moved off their (1, 0) init so a wrong norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    adapter = ModelAdapter(model)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    pts = _points(adapter)
    # attn_out(i) *is* the attention output for architectures without a post-attention norm; pass each point once
    with torch.no_grad(), record(model, list(dict.fromkeys(pts.values()))) as store:
        out = model(input_ids=ids, output_attentions=True)
    # our hooks are removed on leaving the block (transformers keeps output-capturing hooks of its own)
    assert not [h for m in model.modules() for h in m._forward_hooks.values() if h.__module__ == record.__module__]
    acts = {}
    for key, point in pts.items():
        assert len(store[point]) == 1, key
        acts[key] = store[point][0]
    assert out.attentions is not None
    assert len(out.attentions) == adapter.n_layers
    return Run(arch, model, adapter, ids, out.logits, tuple(out.attentions), acts)


_RUNS: dict[str, Run] = {}


@pytest.fixture(params=ARCHS)
def run(request) -> Run:
    if request.param not in _RUNS:
        _RUNS[request.param] = _build(request.param)
    return _RUNS[request.param]


# 1. residual decomposition
def test_layer_output_is_resid_plus_attn_plus_mlp(run: Run):
    a = run.acts
    for i in range(run.adapter.n_layers):
        assert_close(a[f"layer_out{i}"], a[f"resid_in{i}"] + a[f"attn_out{i}"] + a[f"mlp_out{i}"], **TOL)
        if i + 1 < run.adapter.n_layers:
            assert_close(a[f"resid_in{i + 1}"], a[f"layer_out{i}"], rtol=0, atol=0)


def test_mlp_in_is_norm_of_the_right_residual(run: Run):
    ad, a = run.adapter, run.acts
    with torch.no_grad():
        for i in range(ad.n_layers):
            resid = a[f"resid_in{i}"] if ad.parallel_residual else a[f"resid_in{i}"] + a[f"attn_out{i}"]
            assert_close(a[f"mlp_in{i}"], ad.module(i, "mlp_in_norm")(resid), **TOL)
            # the attention block reads the normed layer input
            assert_close(a[f"attn_in{i}"], ad.module(i, "attn_in_norm")(a[f"resid_in{i}"]), **TOL)


def test_parallel_residual_matters(run: Run):
    """The choice above is not vacuous: the other residual gives a different MLP input."""
    ad, a = run.adapter, run.acts
    with torch.no_grad():
        wrong = a["resid_in0"] + a["attn_out0"] if ad.parallel_residual else a["resid_in0"]
        assert not torch.allclose(ad.module(0, "mlp_in_norm")(wrong), a["mlp_in0"], atol=1e-3)


def test_mlp_out_is_mlp_of_mlp_in(run: Run):
    ad, a = run.adapter, run.acts
    with torch.no_grad():
        for i in range(ad.n_layers):
            y = ad.module(i, "mlp")(a[f"mlp_in{i}"])
            if ad.spec.mlp_out_norm:
                y = ad.module(i, "mlp_out_norm")(y)
            assert_close(a[f"mlp_out{i}"], y, **TOL)


def test_attn_out_is_attention_output_after_its_norm(run: Run):
    ad, a = run.adapter, run.acts
    with torch.no_grad():
        for i in range(ad.n_layers):
            y = a[f"attn{i}"]
            if ad.spec.attn_out_norm:
                y = ad.module(i, "attn_out_norm")(y)
            assert_close(a[f"attn_out{i}"], y, **TOL)


def test_embedding_starts_the_residual(run: Run):
    ad, a = run.adapter, run.acts
    assert_close(a["embed"], a["resid_in0"], rtol=0, atol=0)
    with torch.no_grad():
        assert_close(ad.embed(run.ids), a["resid_in0"], **TOL)
    if run.arch == "gemma2":
        # the sqrt(d_model) scale is inside the module, so the residual starts at the scaled embedding
        assert_close(a["embed"], ad.embed.weight[run.ids] * ad.d_model**0.5, **TOL)


def test_final_norm_and_unembed_give_logits(run: Run):
    ad, a = run.adapter, run.acts
    with torch.no_grad():
        logits = ad.unembed(ad.final_norm(a[f"layer_out{ad.n_layers - 1}"]))
    cap = ad.final_logit_softcap
    if run.arch == "gemma2":
        assert cap == 2.0
        assert not torch.allclose(logits, run.logits, atol=1e-2)  # the cap bites
        logits = cap * torch.tanh(logits / cap)
    else:
        assert cap is None
    assert_close(logits, run.logits, **TOL)


# 2. OV circuit
def test_ov_circuit_reconstructs_attention_output(run: Run):
    ad, a = run.adapter, run.acts
    for i in range(ad.n_layers):
        w = ad.attention_weights(i)
        x = a[f"attn_in{i}"]  # (b, s, d)
        pattern = run.attentions[i]  # (b, h, q, k)
        assert pattern.shape == (BATCH, ad.n_heads, SEQ, SEQ)
        v = torch.einsum("bsd,hde->bhse", x, w.W_V) + w.b_V[None, :, None, :]  # (b, kv, s, dh)
        out = w.b_O.expand(BATCH, SEQ, ad.d_model).clone()
        for h in range(ad.n_heads):
            z = pattern[:, h] @ v[:, ad.kv_head(h)]  # (b, q, dh)
            out = out + z @ w.W_O[h]
        assert_close(out, a[f"attn{i}"], **TOL)


# 3. QK circuit
def _scores(run: Run, layer: int) -> torch.Tensor:
    """Pre-mask attention scores rebuilt from the adapter's weights, the model's rotary and its scaling."""
    ad = run.adapter
    w = ad.attention_weights(layer)
    x = run.acts[f"attn_in{layer}"]
    q = torch.einsum("bsd,hde->bhse", x, w.W_Q) + w.b_Q[None, :, None, :]  # (b, h, s, dh)
    k = torch.einsum("bsd,hde->bhse", x, w.W_K) + w.b_K[None, :, None, :]  # (b, kv, s, dh)
    base = run.model.gpt_neox if run.arch.startswith("gpt_neox") else run.model.model
    position_ids = torch.arange(SEQ)[None]
    with torch.no_grad():
        cos, sin = base.rotary_emb(x, position_ids)
    if run.arch.startswith("gpt_neox"):
        # only the first rotary_ndims of each head rotate (apply_rotary_pos_emb splits on cos's width)
        assert cos.shape[-1] == ad.d_head // 2
    else:
        assert cos.shape[-1] == ad.d_head
    q, k = ROTARY[run.arch](q, k, cos, sin)
    k = k[:, [ad.kv_head(h) for h in range(ad.n_heads)]]
    if run.arch == "gemma2":
        scaling = run.model.config.query_pre_attn_scalar**-0.5
    else:
        scaling = ad.d_head**-0.5
    s = q @ k.transpose(-1, -2) * scaling
    if ad.attn_logit_softcap is not None:
        s = ad.attn_logit_softcap * torch.tanh(s / ad.attn_logit_softcap)
    return s


def _softmax_causal(s: torch.Tensor) -> torch.Tensor:
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    return s.masked_fill(~causal, float("-inf")).softmax(-1)


def test_qk_circuit_reconstructs_attention_pattern(run: Run):
    ad = run.adapter
    for i in range(ad.n_layers):
        assert_close(_softmax_causal(_scores(run, i)), run.attentions[i], **TOL)


def test_attention_pattern_is_not_trivial(run: Run):
    """The QK check has teeth: patterns are far from uniform and Gemma-2's softcap changes them."""
    ad = run.adapter
    p = run.attentions[0]
    uniform = _softmax_causal(torch.zeros(1, 1, SEQ, SEQ))
    assert (p - uniform).abs().max() > 0.1
    if run.arch == "gemma2":
        cap = ad.attn_logit_softcap
        assert cap == 1.5
        ad.attn_logit_softcap = None
        try:
            uncapped = _softmax_causal(_scores(run, 0))
        finally:
            ad.attn_logit_softcap = cap
        assert (uncapped - p).abs().max() > 1e-2


def test_attention_weights_shapes_and_biases(run: Run):
    ad = run.adapter
    w = ad.attention_weights(0)
    assert isinstance(w, AttentionWeights)
    nh, nkv, dh, d = ad.n_heads, ad.n_kv_heads, ad.d_head, ad.d_model
    assert w.W_Q.shape == (nh, d, dh)
    assert w.W_K.shape == w.W_V.shape == (nkv, d, dh)
    assert w.W_O.shape == (nh, dh, d)
    assert w.b_Q.shape == (nh, dh)
    assert w.b_K.shape == w.b_V.shape == (nkv, dh)
    assert w.b_O.shape == (d,)
    if run.arch == "gemma2":  # no biases: zeros
        for b in (w.b_Q, w.b_K, w.b_V, w.b_O):
            assert_close(b, torch.zeros_like(b), rtol=0, atol=0)
    # copies: editing them leaves the model alone
    before = run.model.state_dict()[f"{ad.module_name(0, 'attn')}.{ad.spec.o}.weight"].clone()
    w.W_O.zero_()
    assert_close(run.model.get_submodule(f"{ad.module_name(0, 'attn')}.{ad.spec.o}").weight, before)


# 4. unsupported architectures
def test_spec_for_unknown_lists_supported():
    with pytest.raises(ValueError, match="bert") as exc:
        spec_for("bert")
    for t in ("gemma2", "gpt_neox", "llama"):
        assert t in str(exc.value)
    assert spec_for("llama").name == "llama"
    assert spec_for("gpt_neox").name == "gpt_neox"
    assert spec_for("gemma2").name == "gemma2"


def test_adapter_rejects_gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="gpt2"):
        ModelAdapter(model)


# 5. geometry and indexing
EXPECTED = {
    # n_kv_heads, d_head, d_mlp, parallel_residual
    "gpt_neox": (4, 8, 64, True),
    "gpt_neox_sequential": (4, 8, 64, False),
    "llama": (2, 8, 48, False),
    "gemma2": (2, 16, 48, False),
}


def test_geometry_matches_config(run: Run):
    ad, cfg = run.adapter, run.model.config
    n_kv, d_head, d_mlp, parallel = EXPECTED[run.arch]
    assert ad.n_layers == cfg.num_hidden_layers == 2
    assert ad.d_model == cfg.hidden_size == 32
    assert ad.n_heads == cfg.num_attention_heads == 4
    assert ad.n_kv_heads == n_kv
    assert ad.d_head == d_head
    assert ad.d_mlp == cfg.intermediate_size == d_mlp
    assert ad.parallel_residual is parallel
    assert ad.vocab_size == VOCAB
    assert ad.spec.name == run.arch.removesuffix("_sequential")
    assert len(ad.layers) == 2


def test_module_indexing(run: Run):
    ad = run.adapter
    with pytest.raises(IndexError):
        ad.module(99, "mlp")
    with pytest.raises(IndexError):
        ad.layer_name(-3)
    assert ad.module(-1, "mlp") is ad.module(1, "mlp")
    assert ad.module(1, "mlp") is ad.layers[1].get_submodule(ad.spec.mlp)
    if ad.spec.mlp_out_norm is None:
        with pytest.raises(ValueError, match="mlp_out_norm"):
            ad.module(0, "mlp_out_norm")


def test_kv_head_mapping(run: Run):
    ad = run.adapter
    expected = [0, 0, 1, 1] if ad.n_kv_heads == 2 else [0, 1, 2, 3]
    assert [ad.kv_head(h) for h in range(ad.n_heads)] == expected
