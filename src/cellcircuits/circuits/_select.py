"""Which features get attribution rows: influence on the target, estimated from the rows so far, kept on the device.

Circuit tracing gives rows to the features of most influence on the target, a batch at a time; each batch's rows make
the estimate better for the next. :class:`InfluenceTracker` updates that estimate as each batch arrives, in torch, on
the device the rows are computed on: only what the new rows change is propagated, instead of recomputing influence
from every row after every batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ._targets import FeatureTarget

if TYPE_CHECKING:
    from ._replacement import ReplacementModel

#: flows below this are treated as zero (influence is a share of the target, between 0 and 1)
TINY = 1e-15


def influence_from_rows(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Influence of every node on the target, from scratch, given the target's row and the selected features' rows.

    Parameters
    ----------
    rows
        ``(1 + S, n_nodes)`` attribution rows: the target's first, then one per selected feature.
    cols
        ``(S,)`` node index of each selected feature (the column of row ``k + 1``).

    Returns
    -------
    ``(n_nodes,)`` influence: the target's absolute, row-normalised attribution flowing to each node, directly and
    through the selected features (columns without a row are leaves).
    """
    A = rows.abs().double()
    R = A / A.sum(1, keepdim=True).clamp_min(1e-30)
    C = R[:, cols]
    reach = torch.zeros(R.shape[0], dtype=R.dtype, device=R.device)
    frontier = torch.zeros_like(reach)
    frontier[0] = 1.0
    for _ in range(R.shape[0]):  # a DAG: the frontier dies out within its depth
        step = frontier @ C
        if not bool((step > TINY).any()):
            break
        frontier = torch.cat([frontier.new_zeros(1), step])
        reach += frontier
    reach[0] = 1.0
    return reach @ R


class InfluenceTracker:
    """The influence estimate of :func:`influence_from_rows`, updated incrementally as rows arrive.

    Rows are kept where they come from (the model's device), in float64 on CPU and float32 elsewhere. Adding a batch
    seeds the new features with the influence the earlier rows send them, then propagates only that change through the
    rows (``Δ = s (I - C)^-1`` with ``C`` the rows' shares of the selected features), and adds
    ``Δ @ rows`` for the rows it reached.

    Parameters
    ----------
    target_row
        ``(n_nodes,)`` direct attributions of the target.
    capacity
        Most feature rows that will be added.
    """

    def __init__(self, target_row: torch.Tensor, capacity: int) -> None:
        device = target_row.device
        self.dtype = torch.float64 if device.type == "cpu" else torch.float32
        self.rows = torch.zeros(capacity + 1, target_row.numel(), dtype=self.dtype, device=device)
        self.rows[0] = target_row.to(self.dtype)
        self.norm = torch.zeros(capacity + 1, dtype=torch.float64, device=device)
        self.norm[0] = self.rows[0].abs().double().sum().clamp_min(1e-30)
        self.cols = torch.zeros(capacity, dtype=torch.long, device=device)
        self.C = torch.zeros(capacity + 1, capacity, dtype=torch.float64, device=device)
        self.reach = torch.zeros(capacity + 1, dtype=torch.float64, device=device)
        self.reach[0] = 1.0
        self.influence = self.rows[0].abs().double() / self.norm[0]
        self.size = 0

    def _shares(self, rows: slice | torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self.rows[rows][:, cols].abs().double() / self.norm[rows][:, None]

    def add(self, cols: torch.Tensor, rows: torch.Tensor) -> None:
        """Add the attribution rows of newly selected features.

        Parameters
        ----------
        cols
            ``(B,)`` node index of each new feature.
        rows
            ``(B, n_nodes)`` their direct attributions.
        """
        S, B = self.size, len(cols)
        if S + B > len(self.cols):
            msg = f"{S + B} rows exceed the tracker's capacity of {len(self.cols)}"
            raise ValueError(msg)
        new = slice(S + 1, S + 1 + B)
        cols = cols.to(self.cols.device)
        self.rows[new] = rows.to(self.rows.device, self.dtype)
        self.norm[new] = self.rows[new].abs().double().sum(1).clamp_min(1e-30)
        self.cols[S : S + B] = cols
        self.C[: S + 1 + B, S : S + B] = self._shares(slice(0, S + 1 + B), cols)
        self.C[new, :S] = self._shares(new, self.cols[:S])
        C = self.C[: S + 1 + B, : S + B]
        delta = torch.zeros(S + 1 + B, dtype=torch.float64, device=C.device)
        delta[new] = self.reach[: S + 1] @ C[: S + 1, S:]
        frontier = delta.clone()
        for _ in range(S + B + 1):
            step = frontier @ C
            if not bool((step > TINY).any()):
                break
            frontier = torch.cat([frontier.new_zeros(1), step])
            delta += frontier
        self.reach[: S + 1 + B] += delta
        touched = torch.nonzero(delta > 0).ravel()
        if len(touched):
            shares = self.rows[touched].abs().double() / self.norm[touched][:, None]
            self.influence += delta[touched] @ shares
        self.size = S + B

    def selected(self) -> torch.Tensor:
        """Node indices of the features added so far, in order."""
        return self.cols[: self.size]

    def feature_rows(self) -> torch.Tensor:
        """``(S, n_nodes)`` the added features' attribution rows (a view)."""
        return self.rows[1 : 1 + self.size]


def select_features(
    rm: ReplacementModel, target_row: torch.Tensor | np.ndarray, *, max_feature_nodes: int, batch_size: int
) -> tuple[np.ndarray, torch.Tensor]:
    """Pick the features with most influence on the target, computing their attribution rows in batches.

    Starting from the direct attributions, the next batch is always the unselected features of highest influence
    estimated through the rows computed so far (the circuit-tracing recipe, so features that act only through others
    are found too). The estimate is updated as each batch arrives (:class:`InfluenceTracker`), on the device the
    rows are computed on.

    Parameters
    ----------
    rm
        The prompt's replacement model.
    target_row
        ``(n_nodes,)`` the target's direct attributions.
    max_feature_nodes
        Most features selected.
    batch_size
        Features whose rows one backward pass computes.

    Returns
    -------
    The selected node indices and their ``(S, n_nodes)`` attribution rows (a tensor on the model's device).
    """
    if max_feature_nodes < 1:
        msg = f"max_feature_nodes must be a positive integer, got {max_feature_nodes!r}"
        raise ValueError(msg)
    nodes = rm.nodes
    row = torch.as_tensor(target_row).to(rm.device)
    tracker = InfluenceTracker(row, max_feature_nodes)
    eligible = torch.as_tensor(nodes.kind == "feature", device=rm.device)
    while tracker.size < max_feature_nodes:
        score = torch.where(eligible, tracker.influence, torch.full_like(tracker.influence, -1.0))
        score[tracker.selected()] = -1.0
        k = min(batch_size, max_feature_nodes - tracker.size, len(score))
        best, index = torch.topk(score, k)
        take = index[best > 0].cpu().numpy()
        if len(take) == 0:
            break
        targets = [FeatureTarget(int(nodes.layer[i]), int(nodes.position[i]), int(nodes.feature[i])) for i in take]
        rows = rm.attribute(targets, batch_size=batch_size, on_device=True).matrix
        tracker.add(torch.as_tensor(take, device=rm.device), rows)
    return tracker.selected().cpu().numpy().astype(np.int64), tracker.feature_rows()
