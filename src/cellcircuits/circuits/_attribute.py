"""Direct attributions of targets to the sources of a replacement model, by batched backward passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..models._adapter import ModelAdapter
    from ..transcoders._transcoder_set import TranscoderSet
    from ._frozen import FrozenAttention, FrozenNorms
    from ._nodes import ActiveFeatures, Nodes
    from ._targets import Readout, Target

#: Largest ``batch x positions x n_features`` for which feature attributions use one dense matmul.
DENSE_DOTS_MAX = 2**26
#: Most padded slots per active feature for which feature attributions use per-position products.
PADDING_MAX = 2


@dataclass(eq=False)
class Attribution:
    """Direct attributions of targets to the nodes of one prompt's replacement model.

    ``values[k] == matrix[k].sum() + bias[k]`` up to float rounding (see :meth:`residual`).
    """

    targets: list[Target]
    values: torch.Tensor
    """``(n_targets,)`` target values in the frozen model (logit targets before the softcap)."""
    matrix: torch.Tensor
    """``(n_targets, n_nodes)`` direct attribution of each target to each node (in the order of
    :class:`~cellcircuits.circuits.Nodes`)."""
    bias: torch.Tensor
    """``(n_targets,)`` the constant part: the target in the frozen model with every source zeroed."""

    def residual(self) -> torch.Tensor:
        """``values - matrix.sum(1) - bias``: zero up to float rounding."""
        return self.values - self.matrix.sum(1) - self.bias


class AttributionMixin:
    """The attribution methods of :class:`~cellcircuits.circuits.ReplacementModel`.

    They run on its frozen forward pass (``_sources``, ``_run``, ``_readout``, ``_node_scale``) and read its
    ``nodes``, ``features``, ``transcoders``, ``embed``, ``errors`` and ``n_layers``.
    """

    _decoders: dict[int, torch.Tensor]
    _padded: dict[int, tuple[torch.Tensor, torch.Tensor] | None]
    # held by ReplacementModel
    nodes: Nodes
    features: dict[int, ActiveFeatures]
    transcoders: TranscoderSet
    embed: torch.Tensor
    errors: torch.Tensor
    n_layers: int
    adapter: ModelAdapter
    attention: list[FrozenAttention]
    norms: FrozenNorms

    if TYPE_CHECKING:  # ReplacementModel's frozen forward pass

        @property
        def device(self) -> torch.device: ...

        def _sources(self, node_scale: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

        def _run(
            self,
            embed: torch.Tensor,
            writes: list[torch.Tensor],
            readout: Readout,
            *,
            final: bool = False,
        ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

        def _readout(self, targets: Sequence[Target]) -> Readout: ...

        def _node_scale(self, node_scale: torch.Tensor | None) -> torch.Tensor: ...

        def _skip_transposed(self, layer: int, g: torch.Tensor) -> torch.Tensor | None: ...

    def _gradients(
        self, readout: Readout, *, values: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None]:
        """Target values and their gradients, one target per batch row (each row seeds only its own target).

        Returns the ``(B,)`` values, the gradients at the embedding and at each layer's MLP write (``(B, T, d)``
        each, the embedding's first), and with ``values`` at each layer's attention values (``(n_heads, T, B,
        d_head)``, :meth:`FrozenAttention.value_gradient`).

        The frozen model is affine, so its gradients do not depend on the point they are taken at: the values come
        from one forward pass, and the ``B`` gradients from one pass of the model's adjoint (the transposed linear
        maps in reverse order, :meth:`_transposed_run`), batched, with no forward pass per row.
        """
        with torch.no_grad():
            out, _ = self._run(*self._sources(self._node_scale(None)), readout)
            at_writes, at_values = self._transposed_run(readout)
        return out[0], at_writes, (at_values if values else None)

    def _transposed_run(self, readout: Readout) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The adjoint of :meth:`_run` seeded with one readout per batch row.

        Returns the ``(B, T, d)`` gradients at the embedding and each layer's MLP write (embedding first), and the
        ``(n_heads, T, B, d_head)`` gradients at each layer's attention values.
        """
        L, B, T = self.n_layers, len(readout.layer), len(self.embed)
        rows = torch.arange(B, device=self.device)

        def seed(layer: int) -> torch.Tensor | None:
            mine = readout.layer == layer
            if not bool(mine.any()):
                return None
            g = self.embed.new_zeros(B, T, self.embed.shape[-1])
            g[rows[mine], readout.position[mine]] = readout.weight[mine]
            return g

        g = self.embed.new_zeros(B, T, self.embed.shape[-1])
        at_final = seed(L)
        if at_final is not None:
            g = self.norms["final"].transpose(at_final)
        zeros = torch.zeros_like(g)
        H, d_head = self.attention[0].W_V.shape[0], self.attention[0].W_V.shape[-1]
        at_writes, at_values = [zeros] * L, [g.new_zeros(H, T, B, d_head)] * L
        for m in range(int(readout.layer.max().clamp(max=L - 1)), -1, -1):
            at_writes[m] = g
            at_x = self._skip_transposed(m, g)
            here = seed(m)
            if here is not None:
                at_x = here if at_x is None else at_x + here
            at_mlp_in = None if at_x is None else self.norms[m, "mlp_in_norm"].transpose(at_x)
            at_r = g if at_mlp_in is None or self.adapter.parallel_residual else g + at_mlp_in
            # through the attention block: its post-norm, the attention, its input norm
            at_a = at_r
            if (m, "attn_out_norm") in self.norms:
                at_a = self.norms[m, "attn_out_norm"].transpose(at_a)
            at_values[m] = self.attention[m].value_gradient(at_a)
            g = at_r + self.norms[m, "attn_in_norm"].transpose(self.attention[m].transpose(at_a, at_values[m]))
            if at_mlp_in is not None and self.adapter.parallel_residual:
                g = g + at_mlp_in
        return [g, *at_writes], at_values

    def _feature_dots(self, layer: int, grad: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """``(B, n_active)`` each active feature's source vector · ``grad`` (``(B, T, d)``) at its position."""
        f, tc = self.features[layer], self.transcoders[layer]
        B, T, _ = grad.shape
        padded = self._padded_sources(layer)
        if padded is not None:
            # per position, its own features' source vectors: one small product per position, batched
            vectors, slot = padded
            dots = torch.bmm(grad.transpose(0, 1), vectors.transpose(1, 2))  # (T, B, k_max)
            return dots.transpose(0, 1).reshape(B, -1)[:, slot]
        if B * T * tc.cfg.n_features <= DENSE_DOTS_MAX:
            # one matmul against every decoder row, then pick the active (position, feature) pairs
            dense = grad @ self._decoder(layer).T
            out = dense[:, f.position, f.feature] * f.activation
        else:
            parts = []
            for i in range(0, len(f.feature), chunk):
                rows = tc.W_dec[f.feature[i : i + chunk].to(tc.W_dec.device)].float().to(self.device)
                dots = torch.einsum("bnd,nd->bn", grad[:, f.position[i : i + chunk]], rows)
                parts.append(dots * f.activation[i : i + chunk])
            out = torch.cat(parts, 1) if parts else grad.new_zeros(grad.shape[0], 0)
        return out / tc.output_scale.float().to(self.device)

    def _padded_sources(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each position's active features' source vectors, padded to ``(T, k_max, d)``, and each feature's slot.

        Built once per layer. ``None`` when padding would more than double the active features (positions with far
        more active features than the rest), or when a dense product against every decoder row is cheaper.
        """
        if layer not in self._padded:
            f, tc = self.features[layer], self.transcoders[layer]
            T, n = len(f.offsets), len(f.feature)
            k_max = int(torch.bincount(f.position, minlength=T).max()) if n else 0
            if n == 0 or T * k_max > PADDING_MAX * n or 2 * k_max > tc.cfg.n_features:
                self._padded[layer] = None
            else:
                slot = f.position * k_max + torch.arange(n, device=f.position.device) - f.offsets[f.position]
                rows = tc.W_dec[f.feature.to(tc.W_dec.device)].float().to(self.device)
                vectors = rows.new_zeros(T * k_max, rows.shape[1])
                vectors[slot] = rows * (f.activation / tc.output_scale.float().to(self.device))[:, None]
                self._padded[layer] = (vectors.view(T, k_max, -1), slot)
        return self._padded[layer]

    def _decoder(self, layer: int) -> torch.Tensor:
        """``W_dec`` of a layer as float32 on the model's device, copied once."""
        if layer not in self._decoders:
            self._decoders[layer] = self.transcoders[layer].W_dec.detach().float().to(self.device)
        return self._decoders[layer]

    def _attribution_rows(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """``(B, n_nodes)`` direct attributions from the gradients at the embedding and the MLP writes."""
        parts = [(self.embed * grads[0]).sum(-1)]
        parts += [self._feature_dots(m, grads[m + 1]) for m in self.features]
        parts += [(self.errors[m] * grads[m + 1]).sum(-1) for m in range(self.n_layers)]
        return torch.cat(parts, 1)

    def attribute(self, targets: Sequence[Target], *, batch_size: int = 32, on_device: bool = False) -> Attribution:
        """Direct attributions of each target to every node, by batched backward passes.

        Parameters
        ----------
        targets
            Feature pre-activations and/or logit targets.
        batch_size
            Targets per backward pass; memory grows with it (about ``(n_layers + 1) * batch_size * T * d`` floats).
        on_device
            Keep the attribution matrix on the model's device (default: move it to CPU).

        Returns
        -------
        Values, the ``(n_targets, n_nodes)`` attribution matrix and the bias terms.
        """
        if batch_size < 1:
            msg = f"batch_size must be a positive integer, got {batch_size!r}"
            raise ValueError(msg)
        targets = list(targets)
        values, rows, bias = [], [], []
        for start in range(0, len(targets), batch_size):
            batch = targets[start : start + batch_size]
            readout = self._readout(batch)
            v, grads, _ = self._gradients(readout)
            with torch.no_grad():
                matrix = self._attribution_rows(grads)
                rows.append(matrix if on_device else matrix.cpu())
                values.append(v.cpu())
                # every source zeroed: by linearity, what the frozen model adds on its own
                zero = torch.zeros(1, len(self.nodes), device=self.device)
                bias.append(self._run(*self._sources(zero), readout)[0][0].cpu())
        empty = torch.zeros(0)
        return Attribution(
            targets,
            torch.cat(values) if values else empty,
            torch.cat(rows) if rows else torch.zeros(0, len(self.nodes), device=self.device if on_device else "cpu"),
            torch.cat(bias) if bias else empty,
        )
