"""Sharding cells over ranks and gathering results on rank 0, with two real gloo processes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cellcircuits.models._distributed import gather_rows, my_shard, rank, shard_bounds, world_size

from ..helpers import free_port


def _worker(r: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=r, world_size=world)
    try:
        n = 7
        share = my_shard(n)
        part = np.arange(n * 3, dtype=np.float32).reshape(n, 3)[share] * 10
        gathered = gather_rows(part, n)
        if r == 0:
            np.save(os.path.join(out_dir, "gathered.npy"), gathered)
        else:
            assert gathered is None
        np.save(os.path.join(out_dir, f"rank{r}.npy"), np.array([rank(), world_size(), share.start, share.stop]))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_share_the_cells_and_gather_them_in_order(tmp_path):
    port = free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    gathered = np.load(tmp_path / "gathered.npy")
    np.testing.assert_array_equal(gathered, np.arange(21, dtype=np.float32).reshape(7, 3) * 10)
    assert np.load(tmp_path / "rank0.npy").tolist() == [0, 2, 0, 4]
    assert np.load(tmp_path / "rank1.npy").tolist() == [1, 2, 4, 7]


def test_without_a_process_group_everything_is_one_rank():
    assert (rank(), world_size()) == (0, 1)
    assert my_shard(5) == slice(0, 5)
    part = torch.arange(6.0).view(3, 2)
    np.testing.assert_array_equal(gather_rows(part, 3), part.numpy())


def test_more_ranks_than_cells_is_refused():
    assert shard_bounds(10, 3).tolist() == [0, 3, 7, 10]
    with pytest.raises(ValueError, match="3 ranks for 2 cells"):
        shard_bounds(2, 3)
