"""The TopK search (``_select``): the k largest entries of each row, columns ascending, on every path it takes."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from cellcircuits import transcoders
from cellcircuits.transcoders import Transcoder, TranscoderConfig, _cpu
from cellcircuits.transcoders._select import sparse_topk, sparse_topk_and_columns, topk_indices


@pytest.mark.parametrize(
    ("shape", "k"), [((64, 256), 8), ((3, 5, 128), 4), ((16, 96), 4), ((16, 100), 8), ((8, 64), 32)]
)
def test_topk_indices_selects_the_k_largest(shape, k):
    pre = torch.randn(*shape) @ torch.randn(shape[-1], shape[-1]) + torch.randn(shape[-1])  # correlated columns
    indices = topk_indices(pre, k)
    assert indices.shape == (*shape[:-1], k)
    expected = pre.topk(k, dim=-1).indices
    torch.testing.assert_close(indices.sort(-1).values, expected.sort(-1).values, rtol=0, atol=0)


def test_topk_indices_falls_back_on_nan_rows():
    pre = torch.randn(8, 256)
    pre[3, 10] = torch.nan
    expected = pre.topk(8, dim=-1).indices
    torch.testing.assert_close(topk_indices(pre, 8).sort(-1).values, expected.sort(-1).values, rtol=0, atol=0)


def test_topk_indices_off_the_cpu_is_one_topk():
    # the search reads the values on the host: on a meta tensor (no values, like a device the host would have to
    # wait for) it cannot run, so a result shows that only torch.topk ran
    assert topk_indices(torch.empty(16, 256, device="meta"), 8).shape == (16, 8)
    with pytest.raises(TypeError, match="can't convert meta device type tensor to numpy"):
        torch.empty(3, device="meta").numpy()  # what the search would do


def test_sparse_topk_with_tied_values_keeps_k_of_the_largest():
    # integer-valued rows: many ties at each row's k-th largest value
    torch.manual_seed(0)
    pre = torch.randint(0, 20, (64, 256)).float()
    values, indices = sparse_topk(pre, 8)
    assert values.shape == indices.shape == (64, 8)
    assert torch.equal(indices, indices.sort(-1).values)
    assert (indices.diff(dim=-1) > 0).all()  # distinct columns
    assert torch.equal(values, pre.gather(-1, indices))
    want = pre.topk(8, dim=-1).values
    torch.testing.assert_close(values.sort(-1).values, want.sort(-1).values, rtol=0, atol=0)


def test_sparse_topk_values_are_the_entries_at_its_indices():
    pre = torch.randn(40, 512, dtype=torch.float64)
    values, indices = sparse_topk(pre, 16)
    assert values.dtype == torch.float64
    assert torch.equal(values, pre.gather(-1, indices))
    assert torch.equal(indices, pre.topk(16, dim=-1).indices.sort(-1).values)


def test_ties_at_the_kth_value_keep_the_leftmost_columns():
    # one large entry and a tie of zeros: every row has all 256 entries at or above its floor, more than the first
    # block held, so the search packs again into a wider one
    pre = torch.zeros(4, 256)
    pre[:, 100] = 1.0
    values, indices = sparse_topk(pre, 8)
    assert indices.tolist() == [[0, 1, 2, 3, 4, 5, 6, 100]] * 4
    assert values.tolist() == [[0.0] * 7 + [1.0]] * 4


def test_rows_of_minus_infinity_give_their_first_columns():
    pre = torch.randn(3, 128)
    pre[1] = -torch.inf
    values, indices = sparse_topk(pre, 4)
    assert indices[1].tolist() == [0, 1, 2, 3]
    assert torch.isneginf(values[1]).all()
    assert torch.equal(indices[[0, 2]], pre[[0, 2]].topk(4, dim=-1).indices.sort(-1).values)


def test_bfloat16_takes_torch_topk():
    pre = torch.randn(16, 256).bfloat16()
    values, indices = sparse_topk(pre, 8)
    assert values.dtype == torch.bfloat16
    assert torch.equal(values, pre.gather(-1, indices))
    assert torch.equal(values.sort(-1).values, pre.topk(8, dim=-1).values.sort(-1).values)


@pytest.fixture
def three_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_search_split_over_threads_equals_one_thread(monkeypatch, three_threads):
    pre = torch.randn(300, 512) @ torch.randn(512, 512)
    one = sparse_topk(pre, 16)
    monkeypatch.setattr(_cpu, "_ENTRIES_PER_THREAD", 1)  # every row could be its own part: three threads share them
    split = sparse_topk(pre, 16)
    assert torch.equal(one[0], split[0]) and torch.equal(one[1], split[1])
    assert torch.equal(one[1], pre.topk(16, dim=-1).indices.sort(-1).values)


def test_thread_pool_is_renewed_after_a_fork(monkeypatch):
    pool = _cpu._threads(1)
    assert _cpu._threads(1) is pool
    child = os.getpid() + 1
    monkeypatch.setattr(_cpu.os, "getpid", lambda: child)  # what a forked child sees
    assert _cpu._threads(1) is not pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the search, and torch.topk's fallback
def test_columns_read_with_the_search_are_the_columns(dtype):
    pre = (torch.randn(64, 256) @ torch.randn(256, 256)).to(dtype)
    columns = torch.tensor([5, 0, 255, 17, 5])
    values, indices, gathered = sparse_topk_and_columns(pre, 8, columns)
    assert torch.equal(gathered, pre.index_select(1, columns))
    assert torch.equal(values, pre.gather(-1, indices))
    assert torch.equal(indices, pre.topk(8, dim=-1).indices.sort(-1).values)
    with pytest.raises(IndexError, match=r"columns must lie in 0 \.\. 255"):
        sparse_topk_and_columns(pre.float(), 8, torch.tensor([256]))


def _training_step() -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    cfg = TranscoderConfig(d_in=16, d_out=16, n_features=128, activation="topk", k=8, dead_after_tokens=1)
    tc = Transcoder(cfg)
    tc.tokens_since_fired[:20] = 5  # dead features: AuxK reads their columns
    out = tc.loss(torch.randn(64, 16), torch.randn(64, 16))
    out.total.backward()
    tc.update_dead(out.features)
    return out.total.detach(), [p.grad for p in tc.parameters()], out.features.to_dense(), tc.tokens_since_fired


def test_without_numba_a_training_step_is_the_same(monkeypatch):
    # an environment installed without dependencies may lack numba: torch's operations then give the same step
    assert _cpu.cpu_kernels() is not None
    with_numba = _training_step()
    monkeypatch.setitem(sys.modules, "numba", None)  # any import of numba now raises ImportError
    monkeypatch.delitem(sys.modules, "cellcircuits.transcoders._cpu_kernels", raising=False)
    monkeypatch.delattr(transcoders, "_cpu_kernels", raising=False)
    assert _cpu.cpu_kernels() is None
    without = _training_step()
    assert torch.equal(with_numba[0], without[0])
    for a, b in zip(with_numba[1], without[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.equal(with_numba[2], without[2])
    assert torch.equal(with_numba[3], without[3])
    assert (without[3] == 0).any() and (without[3] == 64).any()
