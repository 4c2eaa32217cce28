from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellcircuits.circuits._influence import edge_influence, node_influence, normalize_matrix
from cellcircuits.circuits._kinds import NodeKind
from cellcircuits.circuits._paths import greedy_paths
from cellcircuits.circuits._prune import completeness_score, prune_graph, replacement_score

T, F, E, L = NodeKind.TOKEN, NodeKind.FEATURE, NodeKind.ERROR, NodeKind.TARGET


def hand_graph():
    """Tokens 0, 1; error 2; features 3, 4; target 5. Row = target, column = source.

    Normalised rows: 3 <- 0 (3/4), 1 (1/4); 4 <- 3 (1/2), 2 (1/4), 1 (1/4); 5 <- 4 (3/4), 3 (1/4).
    """
    A = np.zeros((6, 6))
    A[3, 0], A[3, 1] = 3.0, -1.0
    A[4, 3], A[4, 2], A[4, 1] = 2.0, -1.0, 1.0
    A[5, 4], A[5, 3] = 6.0, -2.0
    kinds = np.array([T, T, E, F, F, L])
    w = np.array([0, 0, 0, 0, 0, 1.0])
    return A, kinds, w


# influence of each node on target 5 through all paths, by hand:
# I4 = 3/4; I3 = 1/4 + 1/2 * 3/4 = 5/8; I2 = 1/4 * 3/4 = 3/16; I1 = 1/4 * 5/8 + 1/4 * 3/4 = 11/32; I0 = 3/4 * 5/8
HAND_INFLUENCE = np.array([15 / 32, 11 / 32, 3 / 16, 5 / 8, 3 / 4, 0.0])


def random_dag(n, density, seed, *, n_targets=1):
    """Random signed DAG (edges from lower to higher index in a hidden order), shuffled node order."""
    rng = np.random.default_rng(seed)
    A = np.tril(rng.normal(size=(n, n)) * (rng.random((n, n)) < density), k=-1)
    perm = rng.permutation(n)
    A = A[np.ix_(perm, perm)]
    w = np.zeros(n)
    w[perm[n - n_targets :]] = rng.dirichlet(np.ones(n_targets))  # the last nodes of the hidden order
    return A, w


def layered_dag(n_layers, width, n_tokens, n_errors, density, seed):
    """A graph shaped like an attribution graph: tokens and errors feed features in layers, the last layer a target."""
    rng = np.random.default_rng(seed)
    layer = np.concatenate([np.zeros(n_tokens + n_errors, int), np.repeat(np.arange(1, n_layers + 1), width), [99]])
    n = len(layer)
    kinds = np.array([T] * n_tokens + [E] * n_errors + [F] * (n_layers * width) + [L])
    earlier = layer[:, None] > layer[None, :]
    A = (rng.normal(size=(n, n)) * (rng.random((n, n)) < density) * earlier).astype(np.float32)
    n_inner = n - n_tokens - n_errors
    A[-1, n_tokens + n_errors :] = rng.normal(size=n_inner) * (rng.random(n_inner) < 0.2)
    A[-1, -1] = 0
    return A, kinds


# --------------------------------------------------------------------------------------------------------------------
# normalisation and influence


def test_normalize_matrix_abs_row_sums_and_zero_rows():
    A, _, _ = hand_graph()
    B = normalize_matrix(A)
    np.testing.assert_allclose(B[3, [0, 1]], [0.75, 0.25])
    np.testing.assert_allclose(B[4, [1, 2, 3]], [0.25, 0.25, 0.5])
    np.testing.assert_allclose(B.sum(1), [0, 0, 0, 1, 1, 1])
    assert (B >= 0).all() and not (B[:3] != 0).any()
    Bs = normalize_matrix(sp.csr_matrix(A))
    assert sp.issparse(Bs)
    np.testing.assert_allclose(Bs.toarray(), B)


def test_node_influence_hand_graph():
    A, _, w = hand_graph()
    for method in ("series", "solve"):
        np.testing.assert_allclose(node_influence(A, w, method=method), HAND_INFLUENCE, atol=1e-12)
    # the sources' influence adds up to the target weight: every path starts at a token or the error
    assert HAND_INFLUENCE[:3].sum() == pytest.approx(1.0)
    # torch and sparse inputs give the same numbers
    np.testing.assert_allclose(node_influence(torch.tensor(A, dtype=torch.float32), w), HAND_INFLUENCE, rtol=1e-6)
    np.testing.assert_allclose(node_influence(sp.csr_array(A), w), HAND_INFLUENCE, atol=1e-12)


def test_edge_influence_hand_graph():
    A, _, w = hand_graph()
    S = edge_influence(A, w)
    expected = np.zeros((6, 6))
    expected[5, 4], expected[5, 3] = 3 / 4, 1 / 4  # x (I5 + w5) = 1
    expected[4, 3], expected[4, 2], expected[4, 1] = 1 / 2 * 3 / 4, 1 / 4 * 3 / 4, 1 / 4 * 3 / 4  # x I4 = 3/4
    expected[3, 0], expected[3, 1] = 3 / 4 * 5 / 8, 1 / 4 * 5 / 8  # x I3 = 5/8
    np.testing.assert_allclose(S, expected, atol=1e-12)
    # the edges into a node carry its influence (plus its target weight)
    np.testing.assert_allclose(S.sum(1), HAND_INFLUENCE * [0, 0, 0, 1, 1, 1] + w)
    np.testing.assert_allclose(edge_influence(sp.csr_array(A), w).toarray(), expected, atol=1e-12)


@pytest.mark.parametrize("n_targets", [1, 3])
def test_series_and_solve_agree_on_random_dag(n_targets):
    A, w = random_dag(200, 0.05, seed=n_targets, n_targets=n_targets)
    series = node_influence(A, w, method="series")
    solved = node_influence(A, w, method="solve")
    assert series.max() > 0.1
    np.testing.assert_allclose(series, solved, atol=1e-10, rtol=1e-8)
    # and against the explicit matrix power sum
    B = normalize_matrix(A)
    explicit, term = np.zeros(200), w.copy()
    for _ in range(200):
        term = term @ B
        explicit += term
    np.testing.assert_allclose(series, explicit, atol=1e-12)
    np.testing.assert_allclose(node_influence(sp.csr_array(A), w, method="solve"), solved, atol=1e-10)


def test_series_raises_on_a_cycle():
    A = np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    with pytest.raises(RuntimeError, match="cycle"):
        node_influence(A, np.array([0, 0, 1.0]))


# --------------------------------------------------------------------------------------------------------------------
# pruning


def test_prune_hand_graph_drops_the_error_node():
    A, kinds, w = hand_graph()
    res = prune_graph(A, kinds, w, node_threshold=0.8, edge_threshold=0.9)
    np.testing.assert_allclose(res.node_influence, HAND_INFLUENCE, atol=1e-12)
    # prunable influence: f2 3/4, f1 5/8, error 3/16 (total 25/16); f2 + f1 = 88% >= 80%, so the error goes
    np.testing.assert_array_equal(res.node_mask, [True, True, False, True, True, True])
    # without the error, row 4 renormalises to 3 (2/3), 1 (1/3), and I3 = 1/4 + 2/3 * 3/4 = 3/4. Edge influence:
    # 5<-4 3/4, 3<-0 9/16, 4<-3 1/2, 5<-3 1/4, 4<-1 1/4, 3<-1 3/16 (total 5/2): cumulative 30%, 52.5%, 72.5%, 82.5%,
    # 92.5%, 100%: 90% is reached at the second 1/4, so only 3<-1 goes
    expected_scores = {(5, 4): 3 / 4, (3, 0): 9 / 16, (4, 3): 1 / 2, (5, 3): 1 / 4, (4, 1): 1 / 4, (3, 1): 3 / 16}
    scores = np.zeros((6, 6))
    for (i, j), s in expected_scores.items():
        scores[i, j] = s
    np.testing.assert_allclose(res.edge_influence, scores, atol=1e-12)
    kept = {(int(i), int(j)) for i, j in zip(*np.nonzero(res.edge_mask), strict=True)}
    assert kept == {(5, 4), (3, 0), (4, 3), (5, 3), (4, 1)}


def test_prune_hand_graph_drops_nodes_without_a_path_to_the_target():
    A, kinds, w = hand_graph()
    # edge threshold 50%: only 5<-4 (30%) and 3<-0 (52.5%) pass; feature 3 then leads nowhere and goes, with 3<-0
    res = prune_graph(A, kinds, w, node_threshold=0.8, edge_threshold=0.5)
    np.testing.assert_array_equal(res.node_mask, [True, True, False, False, True, True])
    kept = {(int(i), int(j)) for i, j in zip(*np.nonzero(res.edge_mask), strict=True)}
    assert kept == {(5, 4)}
    # node threshold 40%: f2 alone holds 48% of the prunable influence
    res = prune_graph(A, kinds, w, node_threshold=0.4, edge_threshold=1.0)
    np.testing.assert_array_equal(res.node_mask, [True, True, False, False, True, True])
    kept = {(int(i), int(j)) for i, j in zip(*np.nonzero(res.edge_mask), strict=True)}
    assert kept == {(5, 4), (4, 1)}


def test_prune_accepts_kind_names_and_target_weights_per_target():
    A, kinds, _ = hand_graph()
    names = [NodeKind(k).name.lower() for k in kinds]
    a = prune_graph(A, names, [1.0], node_threshold=0.8, edge_threshold=0.9)
    b = prune_graph(A, kinds, None, node_threshold=0.8, edge_threshold=0.9)
    np.testing.assert_array_equal(a.node_mask, b.node_mask)
    np.testing.assert_array_equal(a.edge_mask, b.edge_mask)
    with pytest.raises(ValueError, match="unknown node kinds"):
        prune_graph(A, [*names[:-1], "logit"])


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan")])
def test_prune_thresholds_outside_unit_interval_raise(bad):
    A, kinds, w = hand_graph()
    with pytest.raises(ValueError, match=r"node_threshold must be in \(0, 1\]"):
        prune_graph(A, kinds, w, node_threshold=bad)
    with pytest.raises(ValueError, match=r"edge_threshold must be in \(0, 1\]"):
        prune_graph(A, kinds, w, edge_threshold=bad)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_prune_at_full_thresholds_keeps_everything_with_influence(layout):
    A, kinds = layered_dag(n_layers=4, width=15, n_tokens=5, n_errors=6, density=0.1, seed=0)
    A = A.astype(np.float64)
    w = (kinds == L).astype(float)
    res = prune_graph(sp.csr_array(A) if layout == "sparse" else A, kinds, w, node_threshold=1.0, edge_threshold=1.0)
    influence = node_influence(A, w)
    assert (influence == 0).sum() > 5, "the test graph should have dead nodes"
    np.testing.assert_array_equal(res.node_mask, (influence > 0) | (kinds == T) | (kinds == L))
    edges = edge_influence(A, w)
    edge_mask = res.edge_mask.toarray() if layout == "sparse" else res.edge_mask
    np.testing.assert_array_equal(edge_mask, edges > 0)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_pruned_edges_have_both_ends_kept(layout):
    A, kinds = layered_dag(n_layers=5, width=40, n_tokens=8, n_errors=10, density=0.15, seed=1)
    for node_threshold, edge_threshold in [(0.8, 0.98), (0.5, 0.7), (0.3, 0.3), (0.9, 0.5)]:
        res = prune_graph(sp.csr_array(A) if layout == "sparse" else A, kinds, None, node_threshold, edge_threshold)
        edge_mask = res.edge_mask.toarray() if layout == "sparse" else res.edge_mask
        rows, cols = np.nonzero(edge_mask)
        assert res.node_mask[rows].all() and res.node_mask[cols].all()
        assert (A[rows, cols] != 0).all()
        assert res.node_mask[(kinds == T) | (kinds == L)].all()
        # every kept feature and error node still has a path to the target: it has a kept outgoing edge
        inner = res.node_mask & ((kinds == F) | (kinds == E))
        assert edge_mask[:, inner].any(0).all()
        assert inner.sum() < (kinds == F).sum() + (kinds == E).sum()


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_prune_5000_node_graph_runs(layout):
    # performance sanity (not asserted): prints the time with -s
    A, kinds = layered_dag(n_layers=20, width=245, n_tokens=50, n_errors=49, density=0.002, seed=2)
    assert A.shape == (5000, 5000)
    start = time.perf_counter()
    res = prune_graph(sp.csr_array(A) if layout == "sparse" else A, kinds)
    print(f"pruned a {A.shape[0]}-node graph ({layout}) in {time.perf_counter() - start:.2f} s")
    assert res.node_mask.sum() > 50


# --------------------------------------------------------------------------------------------------------------------
# replacement and completeness scores


def test_scores_hand_graph():
    A, kinds, w = hand_graph()
    # replacement: tokens 15/32 + 11/32 of the total source influence 1
    assert replacement_score(A, kinds, w) == pytest.approx(13 / 16)
    # completeness over nodes with inputs, weights I + w: f1 5/8 (all from tokens), f2 3/4 (1/4 from the error),
    # target 1 (all from features): (5/8 + 3/4 * 3/4 + 1) / (5/8 + 3/4 + 1) = 35/38
    assert completeness_score(A, kinds, w) == pytest.approx(35 / 38)


def test_scores_without_errors_are_one():
    A, kinds, w = hand_graph()
    A[4, 2] = 0
    kinds[2] = F  # an unconnected feature now
    assert replacement_score(A, kinds, w) == pytest.approx(1.0)
    assert completeness_score(A, kinds, w) == pytest.approx(1.0)
    A, kinds = layered_dag(n_layers=3, width=10, n_tokens=4, n_errors=0, density=0.3, seed=3)
    assert replacement_score(A, kinds) == pytest.approx(1.0)
    assert completeness_score(A, kinds) == pytest.approx(1.0)


def test_scores_when_everything_starts_at_errors():
    # token 0 feeds a dead-end feature 1; errors 2 and 4 feed the target 3 directly
    A = np.zeros((5, 5))
    A[1, 0] = 1.0
    A[3, 2], A[3, 4] = 1.0, -3.0
    kinds = np.array([T, F, E, L, E])
    assert replacement_score(A, kinds) == 0.0
    assert completeness_score(A, kinds) == 0.0
    # error 0 -> feature 1 -> target 2: no token influence; the feature is all error, the target all feature
    A = np.zeros((3, 3))
    A[1, 0], A[2, 1] = 2.0, 1.0
    kinds = np.array([E, F, L])
    assert replacement_score(A, kinds) == 0.0
    assert completeness_score(A, kinds) == pytest.approx(0.5)  # weights 1 and 1, completeness 0 and 1


def test_scores_of_a_pruned_graph():
    A, kinds, w = hand_graph()
    res = prune_graph(A, kinds, w, node_threshold=0.8, edge_threshold=0.9)
    # kept: error 2 and edge 3<-1 gone. Token influence along kept edges (whole-graph normalisation):
    # I4 = 3/4, I3 = 1/4 + 1/2 * 3/4 = 5/8, I1 = 1/4 * 3/4 = 3/16, I0 = 3/4 * 5/8 = 15/32: 21/32 of 1
    kw = {"node_mask": res.node_mask, "edge_mask": res.edge_mask}
    assert replacement_score(A, kinds, w, **kw) == pytest.approx(21 / 32)
    # completeness: f1 keeps 3/4 of its input, f2 3/4 (1/2 from f1 + 1/4 from t1), the target all:
    # (5/8 * 3/4 + 3/4 * 3/4 + 1) / (5/8 + 3/4 + 1) = 65/76
    assert completeness_score(A, kinds, w, **kw) == pytest.approx(65 / 76)
    # masks that keep everything give the whole graph's scores
    every = {"node_mask": np.ones(6, bool), "edge_mask": A != 0}
    assert replacement_score(A, kinds, w, **every) == pytest.approx(13 / 16)
    assert completeness_score(A, kinds, w, **every) == pytest.approx(35 / 38)
    # and a sparse graph with sparse masks gives the same
    res_s = prune_graph(sp.csr_array(A), kinds, w, node_threshold=0.8, edge_threshold=0.9)
    kw = {"node_mask": res_s.node_mask, "edge_mask": res_s.edge_mask}
    assert replacement_score(sp.csr_array(A), kinds, w, **kw) == pytest.approx(21 / 32)
    assert completeness_score(sp.csr_array(A), kinds, w, **kw) == pytest.approx(65 / 76)


def test_pruning_lowers_scores_on_a_random_graph():
    A, kinds = layered_dag(n_layers=5, width=40, n_tokens=8, n_errors=10, density=0.15, seed=4)
    res = prune_graph(A, kinds, node_threshold=0.5, edge_threshold=0.8)
    kw = {"node_mask": res.node_mask, "edge_mask": res.edge_mask}
    full_r, full_c = replacement_score(A, kinds), completeness_score(A, kinds)
    assert 0 < full_r < 1 and 0 < full_c < 1
    assert 0 < replacement_score(A, kinds, **kw) < full_r
    assert 0 < completeness_score(A, kinds, **kw) < full_c


# --------------------------------------------------------------------------------------------------------------------
# paths


def test_greedy_paths_hand_graph():
    A, kinds, _ = hand_graph()
    paths = greedy_paths(A, kinds, target=5, k=3)
    # 0->3->4->5: 3/4 * 1/2 * 3/4 = 9/32 beats the three paths of 3/16 (0->3->5, 1->4->5, 2->4->5)
    assert paths[0].nodes == [0, 3, 4, 5]
    assert paths[0].score == pytest.approx(9 / 32)
    assert paths[0].sign == 1
    assert [p.nodes for p in paths[1:]] == [[0, 3, 5], [1, 4, 5]]  # ties in node order
    assert [p.score for p in paths[1:]] == pytest.approx([3 / 16, 3 / 16])
    assert paths[1].sign == -1  # through A[5, 3] = -2

    # all six paths; per source they add up to its influence
    paths = greedy_paths(A, kinds, target=5, k=10)
    assert len(paths) == 6
    assert [p.score for p in paths] == sorted((p.score for p in paths), reverse=True)
    per_source = np.zeros(6)
    for p in paths:
        per_source[p.nodes[0]] += p.score
    np.testing.assert_allclose(per_source, HAND_INFLUENCE * [1, 1, 1, 0, 0, 0])
    assert greedy_paths(sp.csr_array(A), kinds, target=5, k=10) == paths


def test_greedy_paths_on_random_graph_find_the_best_path():
    A, kinds = layered_dag(n_layers=3, width=6, n_tokens=3, n_errors=2, density=0.5, seed=5)
    target = len(kinds) - 1
    B = normalize_matrix(A).astype(np.float64)

    # exhaustive enumeration of every source-to-target path by depth-first search
    def all_paths(node):
        if kinds[node] in (T, E) or not B[node].any():
            return [([node], 1.0)]
        out = []
        for j in np.flatnonzero(B[node]):
            out += [([*p, node], s * B[node, j]) for p, s in all_paths(j)]
        return out

    exact = sorted(all_paths(target), key=lambda c: -c[1])
    paths = greedy_paths(A, kinds, target=target, k=5, beam=len(exact))
    assert [p.nodes for p in paths] == [p for p, _ in exact[:5]]
    np.testing.assert_allclose([p.score for p in paths], [s for _, s in exact[:5]], rtol=1e-6)
    # the default beam finds the best path too
    assert greedy_paths(A, kinds, target=target, k=1)[0].nodes == exact[0][0]
