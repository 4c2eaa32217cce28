"""Layer norms and attention frozen at one recorded forward pass: affine maps of their inputs.

A norm keeps its recorded per-position scale, attention its recorded patterns.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

import torch
from torch import nn

from ..models._hooks import model_lock

if TYPE_CHECKING:
    from collections.abc import Iterator

    from transformers import PreTrainedModel

    from ..models._adapter import ModelAdapter


@dataclass
class FrozenNorm:
    """A layer norm with its per-position scale frozen: an affine map of its input."""

    scale: torch.Tensor
    """``(n_positions,)`` recorded ``sqrt(var + eps)`` (LayerNorm) or ``sqrt(mean(x^2) + eps)`` (RMSNorm)."""
    gain: torch.Tensor
    bias: torch.Tensor | None
    centre: bool

    def __call__(self, x: torch.Tensor, positions: torch.Tensor | None = None, *, bias: bool = True) -> torch.Tensor:
        """Normalise ``x`` (``(..., n_positions, d)``, or ``(S, d)`` at ``positions``); ``bias=False``: linear part."""
        if self.centre:
            x = x - x.mean(-1, keepdim=True)
        scale = self.scale if positions is None else self.scale[positions]
        y = x / scale[:, None] * self.gain
        return y + self.bias if bias and self.bias is not None else y

    def transpose(self, g: torch.Tensor) -> torch.Tensor:
        """The adjoint of the linear part, applied to ``g`` (``(..., P, d)``, the first ``P`` positions)."""
        g = g * self.gain / self.scale[: g.shape[-2], None]
        return g - g.mean(-1, keepdim=True) if self.centre else g  # centring is its own adjoint


#: Frozen norms of a replacement model, keyed ``(layer, part)`` (parts of the adapter's spec) and ``"final"``.
FrozenNorms: TypeAlias = dict[str | tuple[int, str], FrozenNorm]


def freeze_norm(module: nn.Module, x: torch.Tensor, *, gemma: bool) -> FrozenNorm:
    """Freeze ``module`` at the scales of its recorded input ``x`` (``(n_positions, d)``)."""
    centre = isinstance(module, nn.LayerNorm)
    eps = next(float(getattr(module, n)) for n in ("eps", "variance_epsilon") if hasattr(module, n))
    x = x.float()
    var = x.var(-1, unbiased=False) if centre else x.pow(2).mean(-1)
    weight = module.weight  # a norm without a learned gain holds None
    gain = weight.detach().float() if isinstance(weight, torch.Tensor) else x.new_ones(x.shape[-1])
    if gemma:
        gain = 1.0 + gain  # Gemma's RMSNorm scales by (1 + weight)
    b = getattr(module, "bias", None)
    return FrozenNorm((var + eps).sqrt(), gain, b.detach().float() if b is not None else None, centre)


class FrozenAttention(NamedTuple):
    """One layer's attention with its patterns frozen: affine in its (normed) input."""

    pattern: torch.Tensor
    """``(n_heads, n_positions, n_positions)`` recorded pattern, ``[head, query, key]``."""
    W_V: torch.Tensor
    """``(n_heads, d_model, d_head)``, the key/value head each query head reads (GQA expanded)."""
    W_O: torch.Tensor
    b_V: torch.Tensor
    b_O: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d)`` output of the attention block (before any post-attention norm)."""
        H, T = self.pattern.shape[:2]
        v = torch.einsum("btd,hde->htbe", x, self.W_V) + self.b_V[:, None, None]
        # batch rows side by side: one (T, T) @ (T, B * d_head) product per head, the pattern never copied
        z = (self.pattern @ v.reshape(H, T, -1)).view(v.shape)
        return torch.einsum("htbe,hed->btd", z, self.W_O) + self.b_O

    def value_gradient(self, g: torch.Tensor) -> torch.Tensor:
        """``(n_heads, P, B, d_head)`` the gradient at each head's values, given ``g`` (``(B, P, d)``) at the output.

        ``g`` may cover only the first ``P`` positions when the pattern is causal (no query reads a later key).
        """
        (B, P, d), (H, e) = g.shape, (self.W_O.shape[0], self.W_O.shape[1])
        at_z = (g.reshape(B * P, d) @ self.W_O.reshape(H * e, d).T).view(B, P, H, e)
        at_z = at_z.permute(2, 1, 0, 3).reshape(H, P, B * e)  # batch rows side by side, as in the forward pass
        return (self.pattern[:, :P, :P].transpose(1, 2) @ at_z).view(H, P, B, e)

    def transpose(self, g: torch.Tensor, at_values: torch.Tensor | None = None) -> torch.Tensor:
        """The adjoint of the linear part, applied to ``g`` (``(B, P, d)``): the gradient at the (normed) input.

        ``at_values``: :meth:`value_gradient` of ``g``, when it is at hand.
        """
        at_v = self.value_gradient(g) if at_values is None else at_values
        H, P, B, e = at_v.shape
        flat = at_v.permute(2, 1, 0, 3).reshape(B * P, H * e)
        return (flat @ self.W_V.permute(0, 2, 1).reshape(H * e, -1)).view(B, P, -1)


def freeze_attention(adapter: ModelAdapter, layer: int, pattern: torch.Tensor) -> FrozenAttention:
    """Freeze ``layer``'s attention at its recorded ``pattern`` (``(n_heads, n_positions, n_positions)``)."""
    w = adapter.attention_weights(layer)
    kv = torch.tensor([adapter.kv_head(h) for h in range(adapter.n_heads)], device=w.W_V.device)
    return FrozenAttention(pattern.float(), w.W_V[kv].float(), w.W_O.float(), w.b_V[kv].float(), w.b_O.float())


@contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run the model with eager attention (the only kind that returns patterns), then restore its setting.

    The block holds the model's lock (:meth:`cellcircuits.models.C2SModel.exclusive`), so no other thread runs it
    with the switched setting or switches it meanwhile; the setting is restored also on an exception.
    """
    with model_lock(model):
        old = model.config._attn_implementation
        model.config._attn_implementation = "eager"
        try:
            yield
        finally:
            model.config._attn_implementation = old
