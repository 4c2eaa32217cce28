"""The feature-pair split: the input-invariant connection is the weight product, and the parts add up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellcircuits.circuits import FeatureTarget, feature_pair
from cellcircuits.models._hooks import record


def _pair_nodes(rm, transcoders, same_position: bool):
    early, late = min(transcoders.layers), max(transcoders.layers)
    src = rm.nodes.feature_slices[early].start
    pos = int(rm.nodes.position[src])
    later = rm.features[late]
    positions = later.position.cpu().numpy()
    j = np.flatnonzero(positions == pos)[0] if same_position else np.flatnonzero(positions != pos)[0]
    return src, FeatureTarget(late, int(positions[j]), int(later.feature[j]))


def test_connection_is_the_weight_product(case):
    rm, tset, model = case.rm, case.transcoders, case.model
    src, target = _pair_nodes(rm, tset, same_position=True)
    pair = feature_pair(rm, src, target)
    # independently: the norm's input at the later MLP, its scale there, its gain, and the raw weights
    norm = rm.adapter.module(target.layer, "mlp_in_norm")
    point = rm.adapter.mlp_in(target.layer)._replace(module=rm.adapter.module_name(target.layer, "mlp_in_norm"))
    with torch.no_grad(), record(model, [point]) as rec:
        model(input_ids=case.ids[None])
    x = rec[point][0][0, target.position].double()
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    centred = isinstance(norm, torch.nn.LayerNorm)
    scale = ((x - x.mean()).pow(2).mean() if centred else x.pow(2).mean()).add(eps).sqrt()
    gain = norm.weight.detach().double() + (1.0 if rm.adapter.spec.name == "gemma2" else 0.0)
    f = int(rm.nodes.feature[src])
    early, late = tset[int(rm.nodes.layer[src])], tset[target.layer]
    dec = early.W_dec[f].detach().double() / early.output_scale.double()
    if centred:
        dec = dec - dec.mean()
    enc = late.W_enc[:, target.feature].detach().double() * late.input_scale.double()
    expected = float((dec / scale * gain) @ enc)
    assert pair.connection == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # same position: the residual stream carries the connection times the activation
    assert pair.attribution == pytest.approx(pair.connection * float(rm.nodes.activation[src]), rel=1e-4, abs=1e-6)
    assert pair.attribution + pair.attention + pair.skip == pytest.approx(pair.total, rel=1e-4, abs=1e-6)
    row = rm.attribute([target]).matrix[0, src].item()
    assert pair.total == pytest.approx(row, rel=1e-4, abs=1e-6)


def test_other_positions_go_through_attention_only(case):
    rm, tset = case.rm, case.transcoders
    src, target = _pair_nodes(rm, tset, same_position=False)
    pair = feature_pair(rm, src, target)
    assert pair.attribution == 0.0 and pair.skip == 0.0
    assert pair.attention == pytest.approx(pair.total, rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="must come after"):
        feature_pair(rm, rm.nodes.feature_slices[max(tset.layers)].start, FeatureTarget(min(tset.layers), 0, 0))
    with pytest.raises(ValueError, match="not a feature"):
        feature_pair(rm, 0, target)
