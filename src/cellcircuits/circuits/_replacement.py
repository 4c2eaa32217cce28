"""The frozen linear replacement model of one prompt, and direct attributions by backward passes through it.

Following Dunefsky et al. (2024) and Ameisen et al. (2025): one forward pass of the original model is recorded,
then every nonlinearity is frozen at its recorded value. Attention patterns and the scales of every layer norm are
constants; each MLP is replaced by its transcoder's decoded features plus an *error* node (true MLP output minus
transcoder output), and the feature activations are leaf inputs, not recomputed. What is left is an affine map
from the *sources* (token embeddings, feature activations, errors) to every point of the residual stream, which
reproduces the original model's logits exactly on that prompt. A *target* (a feature's pre-activation, a logit
difference) is a linear readout of it, so its value splits exactly into one attribution per source (source vector
· gradient of the target at the point the source writes to) plus a constant bias term.

Gemma-2's final logit softcap is not affine: logit targets are read *before* the softcap.

This module holds the recorded model and its frozen forward pass; :class:`ReplacementModel` takes its attribution
methods from :mod:`._attribute` (direct attributions) and :mod:`._via_heads` (direct edges split by attention head).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, overload

import torch
from torch import nn
from torch.nn import functional as F

from ..models._adapter import HookPoint, ModelAdapter
from ..models._hooks import one_at_a_time, record
from ._attribute import AttributionMixin
from ._frozen import eager_attention, freeze_attention, freeze_norm
from ._nodes import active_features, build_nodes
from ._targets import FeatureTarget, Readout
from ._via_heads import ViaHeadsMixin

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np
    from transformers import PreTrainedModel

    from ..models._load import C2SModel
    from ..transcoders._transcoder_set import TranscoderSet
    from ._frozen import FrozenAttention, FrozenNorms
    from ._nodes import ActiveFeatures
    from ._targets import Target


class ReplacementModel(AttributionMixin, ViaHeadsMixin):
    """The frozen linear replacement model of one prompt; build it with :meth:`record`.

    Parameters
    ----------
    adapter
        The model's adapter.
    transcoders
        The transcoder set.
    input_ids
        ``(n_positions,)`` the prompt.
    embed
        ``(n_positions, d_model)`` token embeddings (what enters the residual stream).
    attention
        Per layer, the frozen attention.
    norms
        Frozen norms, keyed ``(layer, part)`` (parts of :class:`~cellcircuits.models.ModelAdapter`'s spec) and
        ``"final"``.
    features
        Per covered layer, its active features.
    errors
        ``(n_layers, n_positions, d_model)`` per layer, true MLP output minus the transcoder's (the whole MLP output
        for uncovered layers).

    Notes
    -----
    All tensors are float32 on the model's device. A *source* is a token embedding, a feature (its activation times
    its decoder row, divided by the output scale) or an error vector; every other term (biases, ``b_dec``, skip
    connections, which read the frozen-normed MLP input) is part of the affine map.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        transcoders: TranscoderSet,
        input_ids: torch.Tensor,
        embed: torch.Tensor,
        attention: list[FrozenAttention],
        norms: FrozenNorms,
        features: dict[int, ActiveFeatures],
        errors: torch.Tensor,
    ) -> None:
        self.adapter = adapter
        self.transcoders = transcoders
        self.input_ids = input_ids
        self.embed = embed
        self.attention = attention
        self.norms = norms
        self.features = features
        self.errors = errors
        self.n_layers = adapter.n_layers
        self.n_positions = int(input_ids.shape[0])
        self.uncovered_layers = [m for m in range(self.n_layers) if m not in features]
        self.nodes = build_nodes(features, self.n_positions, self.n_layers)
        self._decoders: dict[int, torch.Tensor] = {}
        self._padded: dict[int, tuple[torch.Tensor, torch.Tensor, np.ndarray] | None] = {}
        self._points: dict[bool, list[torch.Tensor]] = {}
        # no query reads a later key: a target's gradient is zero after its position
        self.causal = all(not bool(a.pattern.triu(1).any()) for a in attention)

    @classmethod
    @one_at_a_time
    @torch.no_grad()
    def record(
        cls, model: C2SModel | PreTrainedModel, transcoders: TranscoderSet, input_ids: torch.Tensor | Sequence[int]
    ) -> ReplacementModel:
        """Run the model once on a prompt and freeze it.

        Parameters
        ----------
        model
            A :class:`~cellcircuits.models.C2SModel` or a Hugging Face causal LM (GPT-NeoX, Llama, Gemma-2).
        transcoders
            Transcoders for some or all of the model's layers; layers without one keep their whole MLP output as
            error nodes.
        input_ids
            ``(n_positions,)`` token ids of one prompt, no padding.

        Returns
        -------
        The replacement model of the prompt.

        Notes
        -----
        The pass runs with eager attention (the only kind that hands back its patterns); the model's setting is
        restored afterwards, also on an exception. The call holds the model's lock, so concurrent calls on one model
        run one at a time.
        """
        # a C2SModel holds the Hugging Face model and its adapter; a bare model gets a new adapter
        hf, adapter = (model, ModelAdapter(model)) if isinstance(model, nn.Module) else (model.model, model.adapter)
        name = None if isinstance(model, nn.Module) else model.name  # a bare model has no name to compare
        transcoders.check_compatible(name, adapter.n_layers, adapter.d_model, name_mismatch="warn")
        device = next(hf.parameters()).device
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(-1)
        spec, gemma = adapter.spec, adapter.spec.name == "gemma2"
        norm_parts = ["attn_in_norm", "mlp_in_norm"] + (["attn_out_norm"] if spec.attn_out_norm else [])
        points: dict[str | tuple[int, str], HookPoint] = {
            "embed": HookPoint(spec.embed, "output"),
            "final": HookPoint(spec.final_norm, "input"),
            **{
                (m, p): HookPoint(adapter.module_name(m, p), "input")
                for m in range(adapter.n_layers)
                for p in norm_parts
            },
            **{(m, "mlp_in"): adapter.mlp_in(m) for m in range(adapter.n_layers)},
            **{(m, "mlp_out"): adapter.mlp_out(m) for m in range(adapter.n_layers)},
        }
        with eager_attention(hf), record(hf, list(points.values())) as rec:
            out = hf(input_ids=ids[None], output_attentions=True, use_cache=False)
        got = {key: rec[p][0][0].float() for key, p in points.items()}
        if out.attentions is None or len(out.attentions) != adapter.n_layers:
            msg = "the model did not return its attention patterns (output_attentions=True with eager attention)"
            raise RuntimeError(msg)
        layer_norms = [key for key in got if isinstance(key, tuple) and key[1] in norm_parts]
        norms: FrozenNorms = {(m, p): freeze_norm(adapter.module(m, p), got[m, p], gemma=gemma) for m, p in layer_norms}
        norms["final"] = freeze_norm(adapter.final_norm, got["final"], gemma=gemma)
        attention = [freeze_attention(adapter, m, out.attentions[m][0]) for m in range(adapter.n_layers)]
        errors = torch.stack([got[m, "mlp_out"] for m in range(adapter.n_layers)])
        features = {}
        for m, tc in transcoders.items():
            feats, prediction = active_features(tc, got[m, "mlp_in"])
            features[m] = feats
            errors[m] -= prediction
        return cls(adapter, transcoders, ids, got["embed"], attention, norms, features, errors)

    @property
    def device(self) -> torch.device:
        """Where the frozen model's tensors are."""
        return self.embed.device

    # the frozen forward pass
    def _sources(self, node_scale: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(S, T, d)`` embeddings and per layer ``(S, T, d)`` MLP writes (features + error), sources scaled."""
        nodes = self.nodes
        embed = self.embed * node_scale[:, nodes.token_slice, None]
        writes = []
        for m in range(self.n_layers):
            w = self.errors[m] * node_scale[:, nodes.error_slices[m], None]
            if m in self.features:
                w = w + self._decode(m, node_scale[:, nodes.feature_slices[m]])
            writes.append(w)
        return embed, writes

    def _decode(self, layer: int, scale: torch.Tensor) -> torch.Tensor:
        """``(S, T, d)`` sum of each position's scaled decoder rows, without materialising one row per feature."""
        f, tc = self.features[layer], self.transcoders[layer]
        S, n, T = scale.shape[0], len(f.feature), self.n_positions
        dev = tc.W_dec.device
        offsets = (f.offsets[None] + n * torch.arange(S, device=self.device)[:, None]).reshape(-1)
        weights = (f.activation * scale).reshape(-1)
        out = F.embedding_bag(
            f.feature.repeat(S).to(dev),
            tc.W_dec.float(),
            offsets.to(dev),
            mode="sum",
            per_sample_weights=weights.to(dev),
        )
        return out.to(self.device).view(S, T, -1) / tc.output_scale.float().to(self.device)

    def _skip_out(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``x_n @ W_skip / output_scale`` of normed MLP inputs ``x``: linear; zero without a skip connection."""
        tc = self.transcoders[layer] if layer in self.features else None
        if tc is None or tc.W_skip is None:
            return x.new_zeros(())
        dev = x.device
        return (x * tc.input_scale.float().to(dev)) @ tc.W_skip.float().to(dev) / tc.output_scale.float().to(dev)

    def _skip_transposed(self, layer: int, g: torch.Tensor) -> torch.Tensor | None:
        """The adjoint of :meth:`_skip_out` applied to ``g``; ``None`` without a skip connection."""
        tc = self.transcoders[layer] if layer in self.features else None
        if tc is None or tc.W_skip is None:
            return None
        dev = g.device
        at_out = g / tc.output_scale.float().to(dev)
        return (at_out @ tc.W_skip.float().to(dev).T) * tc.input_scale.float().to(dev)

    def _mlp_affine(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """What a covered MLP's replacement adds besides its sources: ``b_dec / output_scale`` and the skip term."""
        out = self._skip_out(layer, x)
        if layer in self.features:
            tc = self.transcoders[layer]
            out = out + tc.b_dec.float().to(x.device) / tc.output_scale.float().to(x.device)
        return out

    def _attn_block(self, layer: int, r: torch.Tensor) -> torch.Tensor:
        """The attention block's contribution to the residual stream."""
        a = self.attention[layer](self.norms[layer, "attn_in_norm"](r))
        if (layer, "attn_out_norm") in self.norms:
            a = self.norms[layer, "attn_out_norm"](a)
        return a

    @overload
    def _run(
        self,
        embed: torch.Tensor,
        writes: list[torch.Tensor],
        readout: Readout,
        *,
        final: bool = False,
        points: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    @overload
    def _run(
        self,
        embed: torch.Tensor,
        writes: list[torch.Tensor],
        readout: None,
        *,
        final: bool = False,
        points: list[torch.Tensor] | None = None,
    ) -> tuple[None, torch.Tensor | None]: ...

    def _run(
        self,
        embed: torch.Tensor,
        writes: list[torch.Tensor],
        readout: Readout | None,
        *,
        final: bool = False,
        points: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Propagate ``(B, T, d)`` sources; ``(B, K)`` readout values and, if reached, the final norm's output.

        Stops after the last layer a readout needs unless ``final``. ``points`` collects what readouts read: each
        layer's normed MLP input, then the final norm's output.
        """
        L = self.n_layers
        values: torch.Tensor | None = None  # set with a readout, and only then
        if readout is None:
            last = L - 1
        else:
            last = L - 1 if final or L in readout.by_layer else max(readout.by_layer)
            values = readout.const[None]
        r = embed
        for m in range(last + 1):
            a = self._attn_block(m, r)
            if self.adapter.parallel_residual:
                x = self.norms[m, "mlp_in_norm"](r)
                r = r + a
            else:
                r = r + a
                x = self.norms[m, "mlp_in_norm"](r)
            if readout is not None and values is not None:
                values = values + _read(x, readout, m)
            if points is not None:
                points.append(x)
            r = r + writes[m] + self._mlp_affine(m, x)
        if last < L - 1:
            return values, None
        normed = self.norms["final"](r)
        if points is not None:
            points.append(normed)
        if readout is not None and values is not None:
            values = values + _read(normed, readout, L)
        return values, normed

    def _read_points(self, readout: Readout, *, zero: bool = False) -> torch.Tensor:
        """``(K,)`` readout values of the frozen model with every source kept (or, ``zero``, zeroed).

        What the readouts read is computed once per replacement model and kept.
        """
        if zero not in self._points:
            points: list[torch.Tensor] = []
            with torch.no_grad():
                self._run(*self._sources(self._node_scale(None) * (0.0 if zero else 1.0)), None, points=points)
            self._points[zero] = points
        values = readout.const[None]
        for m, x in enumerate(self._points[zero]):
            values = values + _read(x, readout, m)
        return values[0]

    def _node_scale(self, node_scale: torch.Tensor | np.ndarray | None) -> torch.Tensor:
        if node_scale is None:
            return torch.ones(1, len(self.nodes), device=self.device)
        s = torch.as_tensor(node_scale, dtype=torch.float32, device=self.device)
        if s.shape[-1] != len(self.nodes) or s.ndim > 2:
            msg = f"node_scale must be (n_nodes,) or (S, n_nodes) with n_nodes={len(self.nodes)}, got {tuple(s.shape)}"
            raise ValueError(msg)
        return s.reshape(-1, len(self.nodes))

    @torch.no_grad()
    def forward(self, node_scale: torch.Tensor | np.ndarray | None = None, *, softcap: bool = True) -> torch.Tensor:
        """Logits of the frozen model, from the recorded sources (scaled by ``node_scale``).

        Parameters
        ----------
        node_scale
            ``(n_nodes,)`` or ``(S, n_nodes)`` multiplier of each source (:attr:`nodes` order): a feature's
            activation, an error vector, a token embedding; 1 keeps the recorded value, 0 ablates it, ``a / a_f``
            sets feature ``f``'s activation to ``a``. All other sources stay frozen. Default: all ones.
        softcap
            Apply the model's final logit softcap (Gemma-2); off gives the pre-softcap logits that logit targets
            read.

        Returns
        -------
        ``(n_positions, vocab)``, or ``(S, n_positions, vocab)`` for a 2-d ``node_scale``.
        """
        s = self._node_scale(node_scale)
        _, normed = self._run(*self._sources(s), None, final=True)
        assert normed is not None  # final=True runs through the final norm
        unembed = self.adapter.unembed
        logits = normed @ unembed.weight.float().T.to(self.device)
        if unembed.bias is not None:
            logits = logits + unembed.bias.float().to(self.device)
        cap = self.adapter.final_logit_softcap
        if softcap and cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits if node_scale is not None and torch.as_tensor(node_scale).ndim == 2 else logits[0]

    __call__ = forward

    def _readout(self, targets: Sequence[Target]) -> Readout:
        n, d = len(targets), self.embed.shape[-1]
        for t in targets:
            if not 0 <= t.position < self.n_positions:
                msg = f"position {t.position} out of range for a prompt of {self.n_positions} tokens"
                raise IndexError(msg)
        weight = torch.zeros(n, d, device=self.device)
        const = torch.zeros(n, device=self.device)
        layer = [t.layer if isinstance(t, FeatureTarget) else self.n_layers for t in targets]
        by_layer: dict[int, tuple[list[int], list[int]]] = {}  # layer: the targets' rows and features
        unembed = self.adapter.unembed
        for i, t in enumerate(targets):
            if isinstance(t, FeatureTarget):
                rows, features = by_layer.setdefault(t.layer, ([], []))
                rows.append(i)
                features.append(t.feature)
                continue
            comp = torch.tensor(list(t.competitors), dtype=torch.long, device=unembed.weight.device)
            w = unembed.weight[t.token].float()
            c = unembed.bias[t.token].float() if unembed.bias is not None else w.new_zeros(())
            if len(comp):
                w = w - unembed.weight[comp].float().mean(0)
                c = c - (unembed.bias[comp].float().mean() if unembed.bias is not None else 0.0)
            weight[i], const[i] = w.detach().to(self.device), c.detach().to(self.device)
        for m, (rows, features) in by_layer.items():  # a feature's pre-activation reads its encoder column
            tc = self.transcoders[m]
            feature = torch.tensor(features, dtype=torch.long, device=tc.W_enc.device)
            at = torch.tensor(rows, dtype=torch.long, device=self.device)
            w = tc.W_enc.detach()[:, feature].T.float() * tc.input_scale.detach().float()
            weight[at] = w.to(self.device)
            const[at] = tc.b_enc.detach()[feature].float().to(self.device)
        rows_of: dict[int, list[int]] = {}
        for i, m in enumerate(layer):
            rows_of.setdefault(m, []).append(i)
        return Readout(
            torch.tensor(layer, dtype=torch.long, device=self.device),
            torch.tensor([t.position for t in targets], dtype=torch.long, device=self.device),
            weight,
            const,
            {m: torch.tensor(rows, dtype=torch.long, device=self.device) for m, rows in sorted(rows_of.items())},
            max((t.position for t in targets), default=-1),
        )

    @torch.no_grad()
    def evaluate(self, targets: Sequence[Target], node_scale: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Target values in the frozen model, by a forward pass.

        Parameters
        ----------
        targets
            The targets.
        node_scale
            As for :meth:`forward`.

        Returns
        -------
        ``(n_targets,)``, or ``(S, n_targets)`` for a 2-d ``node_scale``.
        """
        s = self._node_scale(node_scale)
        values, _ = self._run(*self._sources(s), self._readout(targets))
        return values if node_scale is not None and torch.as_tensor(node_scale).ndim == 2 else values[0]


def _read(x: torch.Tensor, readout: Readout, layer: int) -> torch.Tensor:
    """``(B, K)`` the readouts taken at ``layer`` (zero for the others) from ``x`` (``(B, T, d)``)."""
    out = x.new_zeros(x.shape[0], len(readout.layer))
    k = readout.by_layer.get(layer)
    if k is None:
        return out
    return out.index_add(1, k, (x[:, readout.position[k]] * readout.weight[k]).sum(-1))
