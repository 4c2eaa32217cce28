"""Direct attributions of targets to the sources of a replacement model, by batched backward passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..transcoders._transcoder_set import TranscoderSet
    from ._nodes import ActiveFeatures, Nodes
    from ._targets import Readout, Target

#: Largest ``batch x positions x n_features`` for which feature attributions use one dense matmul.
DENSE_DOTS_MAX = 2**26


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
    # held by ReplacementModel
    nodes: Nodes
    features: dict[int, ActiveFeatures]
    transcoders: TranscoderSet
    embed: torch.Tensor
    errors: torch.Tensor
    n_layers: int

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
            probes: list[torch.Tensor] | None = None,
            final: bool = False,
        ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

        def _readout(self, targets: Sequence[Target]) -> Readout: ...

        def _node_scale(self, node_scale: torch.Tensor | None) -> torch.Tensor: ...

    def _gradients(
        self, readout: Readout, *, probes: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None]:
        """Target values and their gradients, one target per batch row (each row seeds only its own target).

        Returns the ``(B,)`` values, the gradients at the embedding and at each layer's MLP write (``(B, T, d)``
        each, the embedding's first), and with ``probes`` at each layer's attention output before any post-norm.
        """
        B = len(readout.layer)
        embed, writes = self._sources(self._node_scale(None))
        leaves = [t.expand(B, *t.shape[1:]).clone().requires_grad_() for t in (embed, *writes)]
        probe = [torch.zeros_like(leaves[0], requires_grad=True) for _ in range(self.n_layers)] if probes else None
        with torch.enable_grad():
            values, _ = self._run(leaves[0], leaves[1:], readout, probes=probe)
            values = values.diagonal()
            found = torch.autograd.grad(values.sum(), leaves + (probe or []), allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(leaves[0]) for g in found]
        n = len(leaves)
        return values.detach(), grads[:n], (grads[n:] if probes else None)

    def _feature_dots(self, layer: int, grad: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """``(B, n_active)`` each active feature's source vector · ``grad`` (``(B, T, d)``) at its position."""
        f, tc = self.features[layer], self.transcoders[layer]
        B, T, _ = grad.shape
        if B * T * tc.cfg.n_features <= DENSE_DOTS_MAX:
            # one matmul against every decoder row, then pick the active (position, feature) pairs: far cheaper
            # than gathering a (B, n_active, d) block when the dictionary is small
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
