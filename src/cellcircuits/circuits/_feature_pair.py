"""How an earlier transcoder feature feeds a later one, the direct edge split into its parts.

The input-invariant connection, and the parts through the residual stream, attention heads and skip connections.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from ._replacement import ReplacementModel
    from ._targets import FeatureTarget


class FeaturePair(NamedTuple):
    """How an earlier feature feeds a later one (Dunefsky et al. 2024's split, plus the attention-mediated part)."""

    connection: float
    """Input-invariant term: the later feature's encoder row · the frozen MLP-input norm of the earlier feature's
    decoder row (per unit of the earlier activation), through the residual stream alone."""
    attribution: float
    """Input-dependent term: ``connection`` times the earlier activation, when both sit at one position (the
    residual stream carries nothing across positions); else 0."""
    attention: float
    """The part of the direct edge that crosses attention heads (see :meth:`ReplacementModel.edge_via_heads`)."""
    skip: float
    """The part through transcoder skip connections."""
    total: float
    """The direct edge: ``attribution + attention + skip``."""


def feature_pair(rm: ReplacementModel, source: int, target: FeatureTarget) -> FeaturePair:
    """Split the direct edge from an active feature to a later feature's pre-activation.

    Parameters
    ----------
    rm
        The prompt's replacement model.
    source
        Node index of the earlier feature (:attr:`ReplacementModel.nodes`).
    target
        The later feature (its layer must come after the source's).

    Returns
    -------
    The input-invariant connection, the input-dependent attribution through the residual stream, and the parts
    through attention and skip connections, which add up to the direct edge.

    Raises
    ------
    ValueError
        When ``source`` is not a feature node, or ``target`` does not come after it.
    """
    nodes = rm.nodes
    if nodes.kind[source] != "feature":
        msg = f"node {source} is a {nodes.kind[source]} node, not a feature"
        raise ValueError(msg)
    layer = int(nodes.layer[source])
    if target.layer <= layer:
        msg = f"the target feature (layer {target.layer}) must come after the source (layer {layer})"
        raise ValueError(msg)
    src_tc, dst_tc = rm.transcoders[layer], rm.transcoders[target.layer]
    dev = rm.device
    decoder = src_tc.W_dec[int(nodes.feature[source])].float().to(dev) / src_tc.output_scale.float().to(dev)
    encoder = dst_tc.W_enc[:, target.feature].float().to(dev) * dst_tc.input_scale.float().to(dev)
    norm = rm.norms[target.layer, "mlp_in_norm"]
    at = torch.tensor([target.position], device=dev)
    with torch.no_grad():
        connection = float(norm(decoder[None], at, bias=False)[0] @ encoder)
    split = rm.edge_via_heads(target, [source])
    parts = dict(zip(split.columns, split.values[0].tolist(), strict=True))
    residual, skip = parts.pop("residual"), parts.pop("skip")
    return FeaturePair(connection, residual, float(sum(parts.values())), skip, float(split.total[0]))
