"""Direct attributions of targets to the sources of a replacement model, by batched backward passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from ._adjoint import AdjointMixin

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..transcoders._transcoder_set import TranscoderSet
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


class AttributionMixin(AdjointMixin):
    """The attribution methods of :class:`~cellcircuits.circuits.ReplacementModel`.

    They take gradients from its adjoint pass (:class:`~cellcircuits.circuits._adjoint.AdjointMixin`), run its frozen
    forward pass for the constant terms (``_sources``, ``_run``, ``_readout``) and read its ``nodes``,
    ``features``, ``transcoders``, ``embed``, ``errors`` and ``n_layers``.
    """

    _decoders: dict[int, torch.Tensor]
    _padded: dict[int, tuple[torch.Tensor, torch.Tensor, np.ndarray] | None]
    # held by ReplacementModel
    nodes: Nodes
    features: dict[int, ActiveFeatures]
    transcoders: TranscoderSet
    errors: torch.Tensor
    n_positions: int

    if TYPE_CHECKING:  # ReplacementModel's frozen forward pass

        def _readout(self, targets: Sequence[Target]) -> Readout: ...

    def _feature_dots(self, layer: int, grad: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """``(B, m)`` source vector · ``grad`` (``(B, P, d)``) of the first ``m`` active features, at their positions.

        ``grad`` may cover only the first ``P`` positions; features after them (whose dots are 0) may be left out,
        so ``m`` is at least the number of features at those positions.
        """
        f, tc = self.features[layer], self.transcoders[layer]
        B, P, _ = grad.shape
        padded = self._padded_sources(layer)
        if padded is not None:
            # per position, its own features' source vectors: one small product per position, batched
            vectors, slot, before = padded
            dots = torch.bmm(grad.transpose(0, 1), vectors[:P].transpose(1, 2))  # (P, B, k_max)
            m = int(before[P])  # features at positions before P
            return dots[f.position[:m], :, slot[:m]].T  # one gather, no (B, T * k_max) block
        T = self.n_positions
        grad = F.pad(grad, (0, 0, 0, T - P))
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

    def _padded_sources(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray] | None:
        """Each position's active features' source vectors, padded to ``(T, k_max, d)``, with their slots and counts.

        Also each feature's slot at its position, and the number of features before each position (``T + 1``
        values, on the host). Built once per layer. ``None`` when padding would more than double the active
        features (positions with far more active features than the rest), or when a dense product against every
        decoder row is cheaper.
        """
        if layer not in self._padded:
            f, tc = self.features[layer], self.transcoders[layer]
            T, n = len(f.offsets), len(f.feature)
            k_max = int(torch.bincount(f.position, minlength=T).max()) if n else 0
            if n == 0 or T * k_max > PADDING_MAX * n or 2 * k_max > tc.cfg.n_features:
                self._padded[layer] = None
            else:
                slot = torch.arange(n, device=f.position.device) - f.offsets[f.position]  # place at its position
                rows = tc.W_dec[f.feature.to(tc.W_dec.device)].float().to(self.device)
                vectors = rows.new_zeros(T, k_max, rows.shape[1])
                vectors[f.position, slot] = rows * (f.activation / tc.output_scale.float().to(self.device))[:, None]
                # features before each position, on the host: read for every batch without waiting for the device
                before = np.append(f.offsets.cpu().numpy(), n)
                self._padded[layer] = (vectors, slot, before)
        return self._padded[layer]

    def _decoder(self, layer: int) -> torch.Tensor:
        """``W_dec`` of a layer as float32 on the model's device, copied once."""
        if layer not in self._decoders:
            self._decoders[layer] = self.transcoders[layer].W_dec.detach().float().to(self.device)
        return self._decoders[layer]

    def _attribution_rows(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """``(B, n_nodes)`` direct attributions from the gradients at the embedding and the MLP writes.

        The gradients may cover only the first ``P`` positions (zero after them).
        """
        B, P, _ = grads[0].shape
        nodes = self.nodes
        out = grads[0].new_zeros(B, len(nodes))
        out[:, nodes.token_slice.start : nodes.token_slice.start + P] = (self.embed[:P] * grads[0]).sum(-1)
        for m, where in nodes.feature_slices.items():
            dots = self._feature_dots(m, grads[m + 1])
            out[:, where.start : where.start + dots.shape[1]] = dots
        for m, where in nodes.error_slices.items():
            out[:, where.start : where.start + P] = (self.errors[m, :P] * grads[m + 1]).sum(-1)
        return out

    def attribute(self, targets: Sequence[Target], *, batch_size: int = 32, on_device: bool = False) -> Attribution:
        """Direct attributions of each target to every node, by batched backward passes.

        Parameters
        ----------
        targets
            Feature pre-activations and/or logit targets.
        batch_size
            Most targets per backward pass; memory grows with it (about ``(n_layers + 1) * batch_size * T * d``
            floats). Targets are batched by position (a batch of early targets needs only the start of the prompt),
            so the batches may hold fewer.
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
        device = self.device if on_device else torch.device("cpu")
        # each batch's rows written straight to their targets' places: no concatenation and reordering copies
        matrix = torch.zeros(0, len(self.nodes), device=device)
        values, bias, order = [], [], []
        for batch in self._batch_plan(targets, batch_size):
            readout = self._readout([targets[i] for i in batch])
            v, grads, _ = self._gradients(readout, pad=False)
            with torch.no_grad():
                rows = self._attribution_rows(grads)
                if not len(matrix):
                    matrix = torch.empty(len(targets), len(self.nodes), dtype=rows.dtype, device=device)
                matrix.index_copy_(0, torch.as_tensor(batch, device=device), rows.to(device))
                values.append(v.cpu())
                # every source zeroed: by linearity, what the frozen model adds on its own
                bias.append(self._read_points(readout, zero=True).cpu())
            order.append(batch)
        if order:  # back to the order of the targets
            back = torch.as_tensor(np.argsort(np.concatenate(order), kind="stable"))
            values, bias = [torch.cat(values)[back]], [torch.cat(bias)[back]]
        empty = torch.zeros(0)
        return Attribution(
            targets,
            torch.cat(values) if values else empty,
            matrix,
            torch.cat(bias) if bias else empty,
        )
