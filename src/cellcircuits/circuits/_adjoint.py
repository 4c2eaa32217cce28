"""Gradients of a replacement model's targets by its adjoint: the transposed linear maps in reverse order.

The frozen model is affine in its sources, so the gradient of a target does not depend on the point it is taken at.
One forward pass gives the targets' values; one pass of the adjoint, batched over targets, gives every target's
gradient at every source, with no forward pass per target. When the model is causal (no recorded pattern reads a
later key), a batch of targets needs only the positions up to its last target's: batches are planned over targets
sorted by position (:func:`plan_batches`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from ._targets import FeatureTarget

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..models._adapter import ModelAdapter
    from ._frozen import FrozenAttention, FrozenNorms
    from ._targets import Readout, Target


def plan_batches(
    positions: np.ndarray, depths: np.ndarray, batch_size: int, n_positions: int, d_model: int
) -> list[np.ndarray]:
    """Split targets into backward batches of at most ``batch_size``, at the least estimated cost.

    A batch costs one pass through the first ``depth`` layers (its deepest target's) on the positions up to its
    last target's, per target in it, plus a fixed cost of one full-length target per batch: per layer and target,
    ``P d`` for the projections and ``P^2`` for the attention patterns (in units of ``2 d`` flops, ``P`` positions).
    Targets are taken in order of position, so a batch of early targets runs on a short prefix of the prompt.

    Parameters
    ----------
    positions, depths
        Per target, its position and the number of layers its gradient passes through.
    batch_size
        Most targets per batch.
    n_positions, d_model
        The prompt's length and the model's width.

    Returns
    -------
    Index arrays into the targets, one per batch, in order of position.
    """
    order = np.lexsort((depths, positions))
    n = len(order)
    pos, depth = positions[order].astype(np.float64) + 1, depths[order]

    def row_cost(p: float, layers: np.ndarray | int) -> np.ndarray | float:
        return layers * (2 * p * d_model + p * p)

    overhead = row_cost(n_positions, int(depths.max(initial=1)))
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    start = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        lo = max(0, j - batch_size)  # batch i..j-1 for i in lo..j-1; its last position is pos[j - 1]
        deepest = np.maximum.accumulate(depth[lo:j][::-1])[::-1]  # deepest[i - lo]: max depth of i..j-1
        cost = best[lo:j] + overhead + (j - np.arange(lo, j)) * row_cost(pos[j - 1], deepest)
        i = int(np.argmin(cost))
        best[j], start[j] = cost[i], lo + i
    batches, j = [], n
    while j > 0:
        batches.append(order[start[j] : j])
        j = int(start[j])
    return batches[::-1]


class AdjointMixin:
    """The gradients of :class:`~cellcircuits.circuits.ReplacementModel`'s targets, by its adjoint pass.

    They read its frozen ``attention`` and ``norms``, ``embed`` and the transposed skip connections, and run its
    frozen forward pass once for the values.
    """

    # held by ReplacementModel
    adapter: ModelAdapter
    attention: list[FrozenAttention]
    norms: FrozenNorms
    embed: torch.Tensor
    n_layers: int
    causal: bool

    if TYPE_CHECKING:  # ReplacementModel's frozen forward pass

        @property
        def device(self) -> torch.device: ...

        def _read_points(self, readout: Readout, *, zero: bool = False) -> torch.Tensor: ...

        def _skip_transposed(self, layer: int, g: torch.Tensor) -> torch.Tensor | None: ...

    def _batch_plan(self, targets: Sequence[Target], batch_size: int) -> list[np.ndarray]:
        """:func:`plan_batches` for ``targets`` (a logit target passes through every layer)."""
        L = self.n_layers
        positions = np.array([t.position for t in targets], dtype=np.int64)
        depths = np.array([t.layer + 1 if isinstance(t, FeatureTarget) else L for t in targets], dtype=np.int64)
        T = len(self.embed) if self.causal else 1  # not causal: every batch runs on the whole prompt
        if not self.causal:
            positions = np.zeros_like(positions)
        return plan_batches(positions, np.minimum(depths, L), batch_size, T, self.embed.shape[-1])

    def _gradients(
        self, readout: Readout, *, values: bool = False, pad: bool = True
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None]:
        """Target values and their gradients, one target per batch row (each row seeds only its own target).

        Returns the ``(B,)`` values, the gradients at the embedding and at each layer's MLP write (``(B, T, d)``
        each, the embedding's first), and with ``values`` at each layer's attention values (``(n_heads, T, B,
        d_head)``, :meth:`~cellcircuits.circuits._frozen.FrozenAttention.value_gradient`). Without ``pad``, a
        causal model's gradients cover only the positions up to the batch's last target's.
        """
        with torch.no_grad():
            at_writes, at_values = self._transposed_run(readout, pad=pad)
            return self._read_points(readout), at_writes, (at_values if values else None)

    def _transposed_run(self, readout: Readout, *, pad: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The adjoint of the frozen forward pass seeded with one readout per batch row.

        Returns the ``(B, T, d)`` gradients at the embedding and each layer's MLP write (embedding first), and the
        ``(n_heads, T, B, d_head)`` gradients at each layer's attention values. In a causal model they are zero
        after the batch's last target position, and only the positions up to it are computed (and returned, without
        ``pad``).
        """
        L, B, T, d = self.n_layers, len(readout.layer), len(self.embed), self.embed.shape[-1]
        P = readout.last_position + 1 if self.causal else T

        def seed(layer: int) -> torch.Tensor | None:
            mine = readout.by_layer.get(layer)
            if mine is None:
                return None
            g = self.embed.new_zeros(B, P, d)
            g[mine, readout.position[mine]] = readout.weight[mine]
            return g

        g = self.embed.new_zeros(B, P, d)
        at_final = seed(L)
        if at_final is not None:
            g = self.norms["final"].transpose(at_final)
        H, d_head = self.attention[0].W_V.shape[0], self.attention[0].W_V.shape[-1]
        at_writes, at_values = [torch.zeros_like(g)] * L, [g.new_zeros(H, P, B, d_head)] * L
        for m in range(min(max(readout.by_layer), L - 1), -1, -1):
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
        if not pad:
            return [g, *at_writes], at_values
        at_sources = [F.pad(x, (0, 0, 0, T - P)) for x in (g, *at_writes)]
        return at_sources, [F.pad(v, (0, 0, 0, 0, 0, T - P)) for v in at_values]
