"""Feature selection: the incremental influence estimate equals the from-scratch one, batch after batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cellcircuits.circuits import _select
from cellcircuits.circuits._graph import attribution_graph
from cellcircuits.circuits._select import (
    InfluenceTracker,
    RowStore,
    available_memory,
    check_graph_size,
    device_budget,
    influence_from_rows,
    parse_bytes,
    round_size,
    select_features,
)
from cellcircuits.circuits._targets import FeatureTarget, LogitTarget


def numpy_influence(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Reference: reach of each row by walking the row-normalised absolute attributions down from the target."""
    A = np.abs(rows)
    R = A / np.maximum(A.sum(1, keepdims=True), 1e-30)
    reach = np.zeros(len(R))
    reach[0] = 1.0
    # reach[k] = sum_j reach[j] * R[j, cols[k-1]], solved by fixed-point iteration on a DAG
    for _ in range(len(R) + 1):
        new = np.concatenate([[1.0], reach @ R[:, cols]])
        if np.allclose(new, reach, rtol=0, atol=1e-15):
            break
        reach = new
    return reach @ R


def random_dag_rows(rng, n_nodes: int, n_rows: int):
    """A target row and feature rows whose sources all sit earlier in a random order of the nodes (a DAG)."""
    rank = rng.permutation(n_nodes)
    cols = rng.choice(n_nodes, size=n_rows, replace=False)
    target = rng.normal(size=n_nodes) * (rng.random(n_nodes) < 0.5)
    rows = np.zeros((n_rows, n_nodes))
    for r, c in enumerate(cols):
        earlier = rank < rank[c]
        rows[r] = rng.normal(size=n_nodes) * earlier * (rng.random(n_nodes) < 0.6)
    return target, cols, rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("seed", "near_rows"), [(0, None), (1, None), (2, None), (0, 4), (1, 1)])
def test_incremental_influence_equals_from_scratch_after_every_batch(seed, near_rows, dtype):
    rng = np.random.default_rng(seed)
    target, cols, rows = random_dag_rows(rng, n_nodes=60, n_rows=24)
    if dtype == torch.float32:  # rows as the model computes them: exact in float32
        target, rows = target.astype(np.float32).astype(np.float64), rows.astype(np.float32).astype(np.float64)
    # rtol: float64 rows round as the from-scratch computation does; float32 products over rows round in float32
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    row_bytes = 60 * (torch.empty(0, dtype=dtype).element_size() + 1)  # a value and a sign byte per node
    budget = None if near_rows is None else near_rows * row_bytes  # the rest of the rows offloaded
    tracker = InfluenceTracker(torch.as_tensor(target), capacity=24, memory_budget=budget, dtype=dtype)
    if near_rows is not None:
        assert tracker.store.n_near == near_rows
    np.testing.assert_allclose(tracker.influence.numpy(), np.abs(target) / np.abs(target).sum(), rtol=rtol)
    start = 0
    for size in (1, 5, 3, 8, 7):
        batch = slice(start, start + size)
        tracker.add(torch.as_tensor(cols[batch]), torch.as_tensor(rows[batch]))
        start += size
        stacked = np.vstack([target, rows[:start]])
        expected = numpy_influence(stacked, cols[:start])
        np.testing.assert_allclose(tracker.influence.numpy(), expected, rtol=rtol, atol=1e-14)
        scratch = influence_from_rows(torch.as_tensor(stacked), torch.as_tensor(cols[:start]))
        np.testing.assert_allclose(scratch.numpy(), expected, rtol=1e-10, atol=1e-14)
    assert tracker.size == 24 and (tracker.selected().numpy() == cols).all()
    np.testing.assert_array_equal(tracker.feature_rows().double().numpy(), rows)
    with pytest.raises(ValueError, match="capacity"):
        tracker.add(torch.as_tensor(cols[:1]), torch.as_tensor(rows[:1]))


def test_influence_flows_through_a_chain():
    # target <- a (all of its input) <- b: b's influence reaches the target only through a's row
    target = np.array([0.0, 2.0, 0.0, 2.0])  # nodes: 0 unused, 1 = a, 2 = b, 3 = a leaf
    tracker = InfluenceTracker(torch.as_tensor(target), capacity=2)
    assert tracker.influence[2] == 0.0
    tracker.add(torch.tensor([1]), torch.tensor([[0.0, 0.0, -3.0, 1.0]]))
    np.testing.assert_allclose(tracker.influence.numpy(), [0.0, 0.5, 0.5 * 0.75, 0.5 + 0.5 * 0.25])


def test_selection_equals_a_from_scratch_selection(case):
    rm = case.rm
    target = LogitTarget(rm.n_positions - 1, 3, (4, 5, 6))
    row = rm.attribute([target]).matrix[0].double()
    selected, tracker = select_features(rm, row, max_feature_nodes=12, batch_size=4)
    rows = tracker.feature_rows()
    # reference: recompute influence from every row before each batch, in numpy
    nodes = rm.nodes
    chosen: list[int] = []
    all_rows = [row.numpy()]
    while len(chosen) < 12:
        influence = numpy_influence(np.vstack(all_rows), np.asarray(chosen, dtype=np.int64))
        influence[nodes.kind != "feature"] = -1.0
        influence[chosen] = -1.0
        take = [int(i) for i in np.argsort(-influence, kind="stable")[:4] if influence[i] > 0]
        targets = [FeatureTarget(int(nodes.layer[i]), int(nodes.position[i]), int(nodes.feature[i])) for i in take]
        all_rows += list(rm.attribute(targets).matrix.double().numpy())
        chosen += take
    assert set(selected.tolist()) == set(chosen)
    order = np.argsort(selected)
    np.testing.assert_allclose(rows.numpy()[order], np.vstack(all_rows[1:])[np.argsort(chosen)], rtol=1e-6, atol=1e-7)


def test_max_feature_nodes_below_one_is_refused(case):
    row = torch.zeros(len(case.rm.nodes))
    with pytest.raises(ValueError, match="max_feature_nodes must be a positive integer"):
        select_features(case.rm, row, max_feature_nodes=0, batch_size=4)


def test_row_store_past_its_budget_equals_one_in_memory():
    rng = np.random.default_rng(3)
    full = torch.as_tensor(rng.normal(size=(10, 30)))
    store = RowStore(
        10, 30, torch.float64, torch.device("cpu"), budget=3 * 30 * 9 + 7
    )  # 3 rows near, 7 far (8 bytes a value, 1 a sign)
    assert store.n_near == 3 and len(store.far) == 7
    sums = [store.put(0, full[:2]), store.put(2, full[2:6]), store.put(6, full[6:])]  # the second straddles
    torch.testing.assert_close(torch.cat(sums), full.abs().sum(1), rtol=1e-15, atol=0)
    index = torch.tensor([9, 0, 4, 2, 3])
    cols = torch.tensor([5, 1, 29])
    torch.testing.assert_close(store.abs_columns(index, cols), full[index][:, cols].abs(), rtol=0, atol=0)
    w = torch.as_tensor(rng.random(9))  # rows 0-2 on the device, 3-8 on the host
    torch.testing.assert_close(store.weighted_abs_sum(w), w @ full[:9].abs(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(store.weighted_abs_sum(w[:2]), w[:2] @ full[:2].abs(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(store.rows(1, 8), full[1:8], rtol=0, atol=0)
    column = torch.as_tensor(rng.integers(0, 4, size=30))
    folded = torch.zeros(8, 4, dtype=torch.float64).index_add_(1, column, full[1:9])
    torch.testing.assert_close(store.fold_columns(1, 9, column, 4), folded, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="cannot hold one attribution row"):
        RowStore(10, 30, torch.float64, torch.device("cpu"), budget=100)


def test_parse_bytes():
    assert parse_bytes(None) is None and parse_bytes(4096) == 4096
    assert parse_bytes("4GB") == 4 * 10**9 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("10") == 10
    for bad in ("lots", "4XB", 0, "-1GB"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)


def test_offloaded_rows_give_the_graph_of_rows_in_memory(case):
    rm = case.rm
    target = LogitTarget(rm.n_positions - 1, 3, (4, 5, 6))
    row_bytes = len(rm.nodes) * 5  # a float32 value and a sign byte per node
    kept = attribution_graph(rm, target, max_feature_nodes=16, batch_size=8)
    offloaded = attribution_graph(rm, target, max_feature_nodes=16, batch_size=8, memory_budget=3 * row_bytes)
    pd.testing.assert_frame_equal(kept.nodes, offloaded.nodes)
    pd.testing.assert_frame_equal(kept.edges, offloaded.edges)
    assert kept.scores == offloaded.scores
    with pytest.raises(ValueError, match="cannot hold one attribution row"):
        attribution_graph(rm, target, max_feature_nodes=16, memory_budget=row_bytes - 1)


def test_rounds_are_an_eighth_of_the_graph_between_32_and_the_batch_size():
    assert [round_size(n, 128) for n in (1, 128, 256, 512, 1024, 8192)] == [32, 32, 32, 64, 128, 128]
    assert round_size(1024, 16) == 16 and round_size(5, 4) == 4


def test_features_are_selected_in_rounds(case, monkeypatch):
    rm = case.rm
    target = LogitTarget(rm.n_positions - 1, 3, (4, 5, 6))
    row = rm.attribute([target]).matrix[0].double()
    sizes: list[int] = []
    add = InfluenceTracker.add

    def spy(self, cols, rows):
        sizes.append(len(cols))
        return add(self, cols, rows)

    monkeypatch.setattr(InfluenceTracker, "add", spy)
    monkeypatch.setattr("cellcircuits.circuits._select.MIN_ROUND_SIZE", 3)
    selected, _ = select_features(rm, row, max_feature_nodes=40, batch_size=8)
    assert len(selected) == sum(sizes) and max(sizes) == 5  # an eighth of 40, within 3..8


# memory: the "auto" budget, and rows refused before they are allocated
def test_the_auto_budget_is_half_a_gpus_free_memory_and_none_on_a_cpu(monkeypatch):
    assert check_graph_size(8, "auto") == "auto" and check_graph_size(8, " Auto ") == "auto"
    assert check_graph_size(8, "2GB") == 2 * 10**9 and check_graph_size(8, None) is None
    assert device_budget("auto", torch.device("cpu"), 100) is None
    assert (
        device_budget(None, torch.device("cpu"), 100) is None and device_budget("1KB", torch.device("cpu"), 1) == 1000
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 10**9, 80 * 10**9))
    assert device_budget("auto", torch.device("cuda"), 100) == 5 * 10**9
    assert device_budget("auto", torch.device("cuda"), 8 * 10**9) == 8 * 10**9  # at least one row
    assert device_budget(4096, torch.device("cuda"), 100) == 4096


def test_the_hosts_available_memory_is_read_where_linux_reports_it():
    available = available_memory()
    assert available is None or 2**20 < available < 2**50


def test_rows_that_cannot_fit_are_refused_before_allocation(monkeypatch):
    monkeypatch.setattr(_select, "available_memory", lambda: 10**9)
    RowStore(1000, 100_000, torch.float32, torch.device("cpu"))  # 0.5 GB: fits
    with pytest.raises(MemoryError, match=r"3000 attribution rows of 100000 nodes .* need 1.5 GB of host memory"):
        RowStore(3000, 100_000, torch.float32, torch.device("cpu"))
    monkeypatch.setattr(_select, "available_memory", lambda: None)  # unknown: no check
    RowStore(3000, 100_000, torch.float32, torch.device("cpu"))
    # on a GPU: the rows kept there against its free memory, the rest against the host's
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**9, 80 * 10**9))
    with pytest.raises(MemoryError, match=r"the 3000 kept on cuda need 1.5 GB, and 1.0 GB is free there; set mem"):
        _select._check_room(3000, 3000, 100_000, 500_000, torch.device("cuda"))
    monkeypatch.setattr(_select, "available_memory", lambda: 10**9)
    with pytest.raises(MemoryError, match=r"of which 2500 past memory_budget in host memory need 1.2 GB"):
        _select._check_room(3000, 500, 100_000, 500_000, torch.device("cuda"))
    _select._check_room(3000, 1000, 100_000, 500_000, torch.device("cuda"))  # 0.5 GB there, 1.0 GB here: fits


def test_a_graph_larger_than_the_prompts_features_keeps_rows_for_those_only(case):
    rm = case.rm
    target = LogitTarget(rm.n_positions - 1, 3, (4, 5, 6))
    row = rm.attribute([target]).matrix[0]
    n_features = int((rm.nodes.kind == "feature").sum())
    selected, tracker = select_features(rm, row, max_feature_nodes=10**9, batch_size=64)
    assert tracker.C.shape == (n_features + 1, n_features)
    assert len(selected) <= n_features
