"""Direct edges split by the first attention head they pass through (or none: the residual stream, skip connections)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._adjoint import AdjointMixin

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..transcoders._transcoder_set import TranscoderSet
    from ._nodes import ActiveFeatures, Nodes
    from ._targets import Readout, Target


@dataclass(eq=False)
class ViaHeads:
    """Direct edges split by the first attention head they pass through."""

    values: torch.Tensor
    """``(n_sources, n_layers * n_heads + 2)``; the columns add up to :attr:`total`."""
    columns: list[str]
    """``"L{layer}.H{head}"`` per head, then ``"residual"`` (no attention, no skip) and ``"skip"`` (no attention,
    through at least one transcoder skip connection)."""
    total: torch.Tensor
    """``(n_sources,)`` the direct edge weights."""


class ViaHeadsMixin(AdjointMixin):
    """The per-head split of :class:`~cellcircuits.circuits.ReplacementModel`'s direct edges.

    It takes the gradients at each head's values from the model's adjoint pass
    (:class:`~cellcircuits.circuits._adjoint.AdjointMixin`), builds readouts and skip terms with ``_readout`` and
    ``_skip_out``, and reads its ``nodes``, ``errors``, ``features`` and ``transcoders``.
    """

    # held by ReplacementModel
    nodes: Nodes
    features: dict[int, ActiveFeatures]
    transcoders: TranscoderSet
    errors: torch.Tensor

    if TYPE_CHECKING:  # ReplacementModel's frozen forward pass

        def _readout(self, targets: Sequence[Target]) -> Readout: ...

        def _skip_out(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...

    def _source_vectors(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(S, d)`` what each node writes, the layer it writes after (-1: embedding) and its position."""
        nodes, dev = self.nodes, self.device
        layer = torch.as_tensor(nodes.layer[index], dtype=torch.long, device=dev)
        position = torch.as_tensor(nodes.position[index], dtype=torch.long, device=dev)
        kind = nodes.kind[index]
        v = self.embed.new_zeros(len(index), self.embed.shape[1])
        tok, err = (torch.as_tensor(kind == k, device=dev) for k in ("token", "error"))
        v[tok] = self.embed[position[tok]]
        v[err] = self.errors[layer[err], position[err]]
        for m, where in nodes.feature_slices.items():
            mine = (index >= where.start) & (index < where.stop)
            local = torch.as_tensor(index[mine] - where.start, dtype=torch.long, device=dev)
            f, tc = self.features[m], self.transcoders[m]
            rows = tc.W_dec[f.feature[local].to(tc.W_dec.device)].float().to(dev)
            v[torch.as_tensor(mine, device=dev)] = f.activation[local, None] * rows / tc.output_scale.float().to(dev)
        return v, layer, position

    def edge_via_heads(self, target: Target, sources: Sequence[int] | np.ndarray) -> ViaHeads:
        """Split direct edges into the part through each attention head's OV circuit, and what stays in place.

        Every path from a source (written at position ``q``) to the target either crosses attention or not; a
        path that does is credited to the *first* head it crosses, ``(m, h)``: the source's vector, carried along
        position ``q`` to layer ``m`` (through any transcoder skip connections on the way), normed by layer
        ``m``'s frozen attention norm, sent through head ``h``'s frozen OV circuit to every query position ``p``
        (``pattern[h, p, q]``) and dotted with the target's full gradient at head ``h``'s output at ``p``. Paths
        that never cross attention reach the target only at position ``q``: ``"residual"`` when they go straight
        there, ``"skip"`` when they go through a transcoder skip connection.

        Parameters
        ----------
        target
            The target.
        sources
            Node indices (any kind).

        Returns
        -------
        The split, whose columns add up to the direct edge weights.
        """
        return self.edges_via_heads([target], [sources])[0]

    def edges_via_heads(
        self, targets: Sequence[Target], sources: Sequence[Sequence[int] | np.ndarray], *, batch_size: int = 32
    ) -> list[ViaHeads]:
        """:meth:`edge_via_heads` for many targets, each with its own sources, in batched backward passes.

        Parameters
        ----------
        targets
            The targets (e.g. every kept node of a graph that has kept inputs).
        sources
            Per target, the node indices of its sources.
        batch_size
            Most targets per backward pass (batched by position, as in
            :meth:`~cellcircuits.circuits.ReplacementModel.attribute`).

        Returns
        -------
        One split per target.
        """
        if len(targets) != len(sources):
            msg = f"{len(targets)} targets for {len(sources)} source lists"
            raise ValueError(msg)
        out: list[ViaHeads | None] = [None] * len(targets)
        for batch in self._batch_plan(targets, batch_size):
            splits = self._split_batch([targets[i] for i in batch], [sources[i] for i in batch])
            for i, split in zip(batch, splits, strict=True):
                out[i] = split
        return [split for split in out if split is not None]

    def _split_batch(self, targets: list[Target], sources: list[Sequence[int] | np.ndarray]) -> list[ViaHeads]:
        """One backward pass for ``targets``; every (target, source) pair split at once.

        What a source carries to each layer (its vector plus what the skip connections add, and the heads' values
        of it) does not depend on the target, so it is computed once per distinct source; only the gradients are
        read per pair.
        """
        index_of = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sources]
        counts = [len(i) for i in index_of]
        index = np.concatenate(index_of) if index_of else np.zeros(0, dtype=np.int64)
        dev = self.device
        owner = torch.as_tensor(np.repeat(np.arange(len(targets)), counts), dtype=torch.long, device=dev)
        distinct, pair_of = np.unique(index, return_inverse=True)
        of = torch.as_tensor(pair_of.reshape(-1), dtype=torch.long, device=dev)  # each pair's distinct source
        readout = self._readout(targets)
        v, src_layer, q = self._source_vectors(distinct)  # per distinct source
        # a causal model's gradients stop at the last target's position; sources after it (no edge) need them all
        late = len(index) > 0 and int(q.max()) > readout.last_position
        _, grads, value_grads = self._gradients(readout, values=True, pad=late)
        assert value_grads is not None  # given with values=True
        H, L = self.adapter.n_heads, self.n_layers
        pair_layer, pair_q = src_layer[of], q[of]
        with torch.no_grad():
            # each pair's direct edge: the source's vector dotted with its target's gradient where it is written
            total = v.new_zeros(len(index))
            for layer in torch.unique(src_layer).tolist():
                mine = pair_layer == layer
                total[mine] = (v[of[mine]] * grads[layer + 1][owner[mine], pair_q[mine]]).sum(-1)
            heads = v.new_zeros(len(index), L * H)
            skip = torch.zeros_like(v)  # what the skip connections have added so far, at the source's position
            target_layer = readout.layer.to(dev)[owner]
            skip_at_target = v.new_zeros(len(index), v.shape[1])
            for m in range(L):
                here_now = target_layer == m
                skip_at_target[here_now] = skip[of[here_now]]
                r = (v + skip) * (src_layer < m)[:, None]  # only sources written before layer m reach it
                att = self.attention[m]
                value_in = torch.einsum("sd,hde->she", self.norms[m, "attn_in_norm"](r, q, bias=False), att.W_V)
                # each target's gradient at each head's value of key q: sum_p pattern[h, p, q] (grad at p) W_O[h]^T
                back = value_grads[m][:, pair_q, owner]  # (H, n_pairs, d_head)
                heads[:, m * H : (m + 1) * H] = (value_in[of] * back.transpose(0, 1)).sum(-1)
                skip = skip + self._skip_out(m, self.norms[m, "mlp_in_norm"](r, q, bias=False))
            at_end = target_layer == L
            skip_at_target[at_end] = skip[of[at_end]]
            residual = torch.zeros(len(index), dtype=v.dtype, device=dev)
            skipped = torch.zeros_like(residual)
            position = readout.position.to(dev)[owner]
            weight = readout.weight.to(dev)[owner]
            for layer in torch.unique(target_layer).tolist():
                # paths without attention reach the target only at the source's own position
                mine = (target_layer == layer) & (pair_q == position) & (pair_layer < layer)
                if not bool(mine.any()):
                    continue
                norm = self.norms["final"] if layer == L else self.norms[layer, "mlp_in_norm"]
                residual[mine] = (norm(v[of[mine]], pair_q[mine], bias=False) * weight[mine]).sum(-1)
                skipped[mine] = (norm(skip_at_target[mine], pair_q[mine], bias=False) * weight[mine]).sum(-1)
            values = torch.cat([heads, residual[:, None], skipped[:, None]], 1).cpu()
            total = total.cpu()
        columns = [f"L{m}.H{h}" for m in range(L) for h in range(H)] + ["residual", "skip"]
        bounds = np.concatenate([[0], np.cumsum(counts)])
        return [ViaHeads(values[a:b], columns, total[a:b]) for a, b in itertools.pairwise(bounds)]
