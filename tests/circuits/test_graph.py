"""Attribution graphs: exact rows, every kept edge checked by an intervention, pruning and head splits."""

from __future__ import annotations

import numpy as np
import pytest

from cellcircuits.circuits._graph import attribution_graph, compact_matrix, select_features, total_effect
from cellcircuits.circuits._targets import FeatureTarget, LogitTarget, label_target


def _target(rm):
    return LogitTarget(rm.n_positions - 1, 3, (4, 5, 6))


def test_compact_matrix_rows_are_exact_and_fold_unselected_features(case):
    rm, target = case.rm, _target(case.rm)
    att = rm.attribute([target])
    row = att.matrix[0].numpy().astype(np.float64)
    selected, tracker = select_features(rm, row, max_feature_nodes=10, batch_size=4)
    rows = tracker.feature_rows().numpy()
    assert len(selected) == 10 and len(set(selected.tolist())) == 10
    assert (rm.nodes.kind[selected] == "feature").all()
    A, order = compact_matrix(rm, selected, tracker)
    A = A.toarray()
    # folding moves attribution between columns but never changes a row's total
    np.testing.assert_allclose(A[0].sum(), row.sum(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(A[1 : 1 + len(selected)].sum(1), rows.sum(1), rtol=1e-6, atol=1e-6)
    assert order[0] == -1 and (order[1 : 1 + len(selected)] == selected).all()
    assert not A[1 + len(selected) :].any()  # tokens and errors have no inputs


def test_every_kept_edge_equals_an_intervention(case):
    rm, target = case.rm, _target(case.rm)
    graph = attribution_graph(rm, target, max_feature_nodes=16, batch_size=8, node_threshold=1.0, edge_threshold=1.0)
    nodes, edges = graph.nodes, graph.edges
    assert nodes["kind"].iloc[0] == "target" and nodes["value"].iloc[0] == pytest.approx(graph.target_value)
    assert len(edges) > 5
    features = rm.nodes.kind == "feature"
    selected = set(nodes.loc[nodes["kind"] == "feature", "node"])
    for e in edges.sample(min(25, len(edges)), random_state=0).itertuples():
        src, dst = nodes.iloc[e.source], nodes.iloc[e.target]
        if dst["kind"] == "target":
            readout = target
        else:
            readout = FeatureTarget(int(dst["layer"]), int(dst["position"]), int(dst["feature"]))
        scale = np.ones(len(rm.nodes), dtype=np.float32)
        scale[int(src["node"])] = 0.0
        if src["kind"] == "error":
            # an error node also stands for the unselected features of its layer and position
            same = features & (rm.nodes.layer == src["layer"]) & (rm.nodes.position == src["position"])
            scale[same & ~np.isin(np.arange(len(rm.nodes)), list(selected))] = 0.0
        full = float(rm.evaluate([readout])[0])
        ablated = float(rm.evaluate([readout], node_scale=scale)[0])
        assert full - ablated == pytest.approx(e.weight, rel=1e-3, abs=1e-5)


def test_pruning_thresholds_and_scores(case):
    rm, target = case.rm, _target(case.rm)
    full = attribution_graph(rm, target, max_feature_nodes=16, batch_size=8, node_threshold=1.0, edge_threshold=1.0)
    pruned = attribution_graph(rm, target, max_feature_nodes=16, batch_size=8, node_threshold=0.5, edge_threshold=0.8)
    assert len(pruned.nodes) < len(full.nodes) and len(pruned.edges) < len(full.edges)
    for g in (full, pruned):
        for name in ("replacement", "completeness"):
            assert 0.0 <= g.scores[name] <= 1.0
        assert g.scores["replacement_pruned"] <= g.scores["replacement"] + 1e-9
        # kept edges join kept nodes only, and the split of each edge sums to the edge
        assert g.edges["source"].max() < len(g.nodes) and g.edges["target"].max() < len(g.nodes)
        assert g.edges["via"].str.len().gt(0).all()
        assert g.edges["via_share"].between(0, 1 + 1e-9).all()
    with pytest.raises(ValueError, match="node_threshold"):
        attribution_graph(rm, target, node_threshold=0.0)
    with pytest.raises(ValueError, match="edge_threshold"):
        attribution_graph(rm, target, edge_threshold=1.5)


def test_total_effect_on_a_hand_made_graph():
    # target <- f1 (3.0), target <- tok (1.0); f1 (value 2) <- tok (1.5), f1 <- err (0.5)
    A = np.zeros((4, 4))
    A[0, 1], A[0, 2] = 3.0, 1.0
    A[1, 2], A[1, 3] = 1.5, 0.5
    values = np.array([4.0, 2.0, np.nan, np.nan])
    effect = total_effect(A, values, n_rows=2)
    # the token: 1.0 directly and 3/4 of f1's 3.0 through it; the error: 1/4 of f1's 3.0
    np.testing.assert_allclose(effect, [0.0, 3.0, 1.0 + 0.75 * 3.0, 0.25 * 3.0])


def test_label_targets():
    ids = [[1, 2, 9], [1, 3, 9], [1, 2, 4, 9], [5, 9]]
    assert label_target(ids, 0) == ([1, 2], 9, (4,))  # parts from [1, 2, 4, 9] at its third token
    assert label_target(ids, 1) == ([1], 3, (2,))
    assert label_target(ids, 3) == ([], 5, (1,))  # its own first token competes with the others' first
    assert label_target(ids, 0, "first_token") == ([], 1, ())
    with pytest.raises(ValueError, match="exactly like"):
        label_target([[1, 2], [1, 2]], 0)
    with pytest.raises(ValueError, match="mode"):
        label_target(ids, 0, "best")


def test_ablation_moves_the_target_as_the_graph_predicts(case):
    """Shrink one early feature a little; let every later active feature follow its pre-activation (slope 1, as for
    an active ReLU/TopK/JumpReLU feature) by forward passes alone; the target moves by the graph's total effect."""
    rm, target = case.rm, _target(case.rm)
    n_active = int((rm.nodes.kind == "feature").sum())
    graph = attribution_graph(
        rm, target, max_feature_nodes=n_active, batch_size=64, node_threshold=1.0, edge_threshold=1.0, via_heads=False
    )
    nodes = graph.nodes
    first = min(case.transcoders.layers)
    candidates = nodes[(nodes["kind"] == "feature") & (nodes["layer"] == first)]
    src = candidates.loc[candidates["effect"].abs().idxmax()]
    eps = 1e-2
    scale = np.ones(len(rm.nodes), dtype=np.float32)
    scale[int(src["node"])] = 1 - eps
    for layer in sorted(m for m in case.transcoders.layers if m > first):
        where = rm.nodes.feature_slices[layer]
        idx = np.arange(where.start, where.stop)
        feats = [FeatureTarget(layer, int(rm.nodes.position[i]), int(rm.nodes.feature[i])) for i in idx]
        before = rm.evaluate(feats).numpy()
        after = rm.evaluate(feats, node_scale=scale).numpy()
        act = rm.nodes.activation[idx]
        scale[idx] = (act + (after - before)) / act
    moved = float(rm.evaluate([target])[0] - rm.evaluate([target], node_scale=scale)[0])
    assert moved == pytest.approx(eps * src["effect"], rel=1e-3, abs=1e-6)
    assert abs(src["effect"]) > 1e-3  # a feature that matters
