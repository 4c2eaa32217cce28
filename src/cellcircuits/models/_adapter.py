"""Where things are inside each supported causal-LM architecture.

An adapter names, per layer, the modules that transcoders and circuit tracing hook: the MLP's input (after its
layer norm) and output, the attention block and its per-head Q/K/V/O weights, the layer norms, the embedding
and the unembedding. Nothing here knows about AnnData.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, cast

import torch

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one architecture (relative to the causal-LM root, or to a decoder layer)."""

    name: str
    """Architecture tag."""
    model_types: tuple[str, ...]
    """``config.model_type`` values this spec serves."""
    layers: str
    """Path of the ``ModuleList`` of decoder layers."""
    embed: str
    """Path of the token embedding (its output is what enters the residual stream)."""
    final_norm: str
    """Path of the final layer norm, applied before the unembedding."""
    unembed: tuple[str, ...]
    """Candidate paths of the unembedding, first existing wins (transformers 5 renamed GPT-NeoX's)."""
    attn: str
    """Attention block, relative to a layer."""
    attn_in_norm: str
    """Norm applied to the residual before attention, relative to a layer."""
    mlp: str
    """MLP block, relative to a layer; its input is the normalised residual."""
    mlp_in_norm: str
    """Norm whose output is the MLP's input, relative to a layer."""
    qkv_layout: Literal["neox_fused", "separate"]
    """``neox_fused``: one ``query_key_value`` Linear laid out per head as ``[q | k | v]``."""
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    attn_out_norm: str | None = None
    """Norm applied to the attention output before it joins the residual (Gemma-2)."""
    mlp_out_norm: str | None = None
    """Norm applied to the MLP output before it joins the residual (Gemma-2)."""


GPT_NEOX = ArchitectureSpec(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    unembed=("lm_head", "embed_out"),
    attn="attention",
    attn_in_norm="input_layernorm",
    mlp="mlp",
    mlp_in_norm="post_attention_layernorm",
    qkv_layout="neox_fused",
    q="query_key_value",
    k="query_key_value",
    v="query_key_value",
    o="dense",
)
LLAMA = ArchitectureSpec(
    name="llama",
    model_types=("llama",),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed=("lm_head",),
    attn="self_attn",
    attn_in_norm="input_layernorm",
    mlp="mlp",
    mlp_in_norm="post_attention_layernorm",
    qkv_layout="separate",
)
GEMMA2 = ArchitectureSpec(
    name="gemma2",
    model_types=("gemma2",),
    layers="model.layers",
    # Gemma-2's embedding module multiplies by sqrt(d_model) itself, so its output is the residual's start
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed=("lm_head",),
    attn="self_attn",
    attn_in_norm="input_layernorm",
    mlp="mlp",
    mlp_in_norm="pre_feedforward_layernorm",
    qkv_layout="separate",
    attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
)
SPECS = (GPT_NEOX, LLAMA, GEMMA2)


class AttentionWeights(NamedTuple):
    """Per-head attention weights of one layer, oriented so that ``x @ W_Q[h]`` gives head ``h``'s queries."""

    W_Q: torch.Tensor
    """``(n_heads, d_model, d_head)``"""
    W_K: torch.Tensor
    """``(n_kv_heads, d_model, d_head)``"""
    W_V: torch.Tensor
    """``(n_kv_heads, d_model, d_head)``"""
    W_O: torch.Tensor
    """``(n_heads, d_head, d_model)``"""
    b_Q: torch.Tensor
    """``(n_heads, d_head)``, zeros when the model has no bias"""
    b_K: torch.Tensor
    """``(n_kv_heads, d_head)``"""
    b_V: torch.Tensor
    """``(n_kv_heads, d_head)``"""
    b_O: torch.Tensor
    """``(d_model,)``"""


class HookPoint(NamedTuple):
    """A module and which side of it carries the activation."""

    module: str
    """Full module name, as in ``model.named_modules()``."""
    side: Literal["input", "output"]


def spec_for(model_type: str) -> ArchitectureSpec:
    """The spec serving ``model_type``; a clear error for an unsupported architecture."""
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    supported = sorted(t for s in SPECS for t in s.model_types)
    msg = f"Unsupported architecture {model_type!r}; cellcircuits supports {supported}."
    raise ValueError(msg)


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


class ModelAdapter:
    """Architecture-aware access to the parts of a Hugging Face causal LM.

    Parameters
    ----------
    model
        A GPT-NeoX (Pythia, C2S-Pythia), Llama or Gemma-2 (C2S-Scale) causal LM.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.config = model.config
        self.spec = spec_for(getattr(model.config, "model_type", type(model).__name__))
        cfg = self.config
        self.n_layers: int = cfg.num_hidden_layers
        self.d_model: int = cfg.hidden_size
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_head: int = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads
        self.d_mlp: int = cfg.intermediate_size
        self.vocab_size: int = self.unembed.weight.shape[0]
        # GPT-NeoX (Pythia) reads attention and MLP from the same layer input and adds both at once
        self.parallel_residual: bool = bool(getattr(cfg, "use_parallel_residual", False))
        self.attn_logit_softcap: float | None = getattr(cfg, "attn_logit_softcapping", None)
        self.final_logit_softcap: float | None = getattr(cfg, "final_logit_softcapping", None)

    def __repr__(self) -> str:
        return (
            f"ModelAdapter({self.spec.name}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, d_mlp={self.d_mlp})"
        )

    def check_layer(self, layer: int) -> int:
        """A layer index, negative ones counted from the end, as ``0..n_layers - 1``.

        Parameters
        ----------
        layer
            The index, in ``-n_layers..n_layers - 1``.

        Returns
        -------
        The non-negative index.

        Raises
        ------
        IndexError
            When the model has no such layer.
        """
        if not -self.n_layers <= layer < self.n_layers:
            msg = f"layer {layer} out of range for a model with {self.n_layers} layers"
            raise IndexError(msg)
        return layer % self.n_layers

    # whole-model parts
    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers."""
        return cast("nn.ModuleList", _get(self.model, self.spec.layers))

    @property
    def embed(self) -> nn.Embedding:
        """The token embedding."""
        return cast("nn.Embedding", _get(self.model, self.spec.embed))

    @property
    def final_norm(self) -> nn.Module:
        """The final layer norm."""
        return _get(self.model, self.spec.final_norm)

    @property
    def unembed_name(self) -> str:
        """Full module name of the unembedding."""
        names = dict(self.model.named_modules())
        for path in self.spec.unembed:
            if path in names:
                return path
        msg = f"none of {self.spec.unembed} found in {type(self.model).__name__}"
        raise AttributeError(msg)

    @property
    def unembed(self) -> nn.Linear:
        """The unembedding (``lm_head``)."""
        return cast("nn.Linear", _get(self.model, self.unembed_name))

    # per-layer parts
    def layer_name(self, layer: int) -> str:
        """Full module name of a decoder layer."""
        return f"{self.spec.layers}.{self.check_layer(layer)}"

    def module_name(self, layer: int, part: str) -> str:
        """Full module name of a part (``attn``, ``mlp``, ``mlp_in_norm``, ...) of a layer."""
        rel = getattr(self.spec, part)
        if rel is None:
            msg = f"{self.spec.name} has no {part}"
            raise ValueError(msg)
        return f"{self.layer_name(layer)}.{rel}"

    def module(self, layer: int, part: str) -> nn.Module:
        """A part of a layer, e.g. ``adapter.module(0, "mlp")``."""
        return self.model.get_submodule(self.module_name(layer, part))

    def mlp_in(self, layer: int) -> HookPoint:
        """Where the MLP's input is: the output of its layer norm (= the MLP's input)."""
        return HookPoint(self.module_name(layer, "mlp"), "input")

    def mlp_out(self, layer: int) -> HookPoint:
        """Where the MLP's contribution to the residual stream is (after Gemma-2's post-MLP norm)."""
        part = "mlp_out_norm" if self.spec.mlp_out_norm else "mlp"
        return HookPoint(self.module_name(layer, part), "output")

    def attn_out(self, layer: int) -> HookPoint:
        """Where the attention block's contribution to the residual stream is."""
        part = "attn_out_norm" if self.spec.attn_out_norm else "attn"
        return HookPoint(self.module_name(layer, part), "output")

    def resid_in(self, layer: int) -> HookPoint:
        """The residual stream entering a layer."""
        return HookPoint(self.layer_name(layer), "input")

    def kv_head(self, head: int) -> int:
        """The key/value head that query head ``head`` reads (grouped-query attention)."""
        return head // (self.n_heads // self.n_kv_heads)

    @torch.no_grad()
    def attention_weights(self, layer: int) -> AttentionWeights:
        """Per-head Q/K/V/O weights and biases of a layer's attention (copies, detached)."""
        attn = self.module(layer, "attn")
        nh, nkv, dh, d = self.n_heads, self.n_kv_heads, self.d_head, self.d_model

        def bias(linear: nn.Linear, rows: int) -> torch.Tensor:
            b = linear.bias
            return b.detach().clone() if b is not None else linear.weight.new_zeros(rows)

        def projection(name: str) -> nn.Linear:
            # every supported architecture projects queries, keys, values and outputs with nn.Linear
            return cast("nn.Linear", attn.get_submodule(name))

        if self.spec.qkv_layout == "neox_fused":
            qkv = projection(self.spec.q)
            # rows of the fused Linear are grouped per head as [q | k | v], each d_head long
            w = qkv.weight.detach().view(nh, 3, dh, d)
            b = bias(qkv, 3 * nh * dh).view(nh, 3, dh)
            W_Q, W_K, W_V = (w[:, i].transpose(1, 2).clone() for i in range(3))
            b_Q, b_K, b_V = (b[:, i].clone() for i in range(3))
        else:
            q, k, v = (projection(n) for n in (self.spec.q, self.spec.k, self.spec.v))
            W_Q = q.weight.detach().view(nh, dh, d).transpose(1, 2).clone()
            W_K = k.weight.detach().view(nkv, dh, d).transpose(1, 2).clone()
            W_V = v.weight.detach().view(nkv, dh, d).transpose(1, 2).clone()
            b_Q, b_K, b_V = (
                bias(q, nh * dh).view(nh, dh),
                bias(k, nkv * dh).view(nkv, dh),
                bias(v, nkv * dh).view(nkv, dh),
            )
        o = projection(self.spec.o)
        W_O = o.weight.detach().view(d, nh, dh).permute(1, 2, 0).clone()
        return AttentionWeights(W_Q, W_K, W_V, W_O, b_Q, b_K, b_V, bias(o, d))
