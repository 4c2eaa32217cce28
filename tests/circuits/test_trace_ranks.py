"""Tracing over torch.distributed ranks: two gloo processes give the tables of one process; bad input fails first."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cellcircuits as cc
from cellcircuits.circuits import trace_prompts
from cellcircuits.models._distributed import frames_from_bytes, frames_to_bytes

from ..helpers import free_port, random_transcoders

N_CELLS = 3


def _inputs():
    model = cc.models.load("pbmc68k-tiny", device="cpu")
    adata = cc.ds.pbmc68k()[: N_CELLS * 4 : 4]
    sentences = cc.pp.cell_sentences(adata, copy=True).obs["cell_sentence"].tolist()
    prompts = cc.models.tokenize_prompts(model.tokenizer, model.build_prompts(sentences))
    torch.manual_seed(0)
    tset = random_transcoders("shipped", model.adapter.d_model, range(4), 4, n_features=64, k=4)
    labels = [model.labels[i] for i in (5, 6, 5)]
    return model, tset, prompts, labels


def _trace(model, tset, prompts, labels):
    groups = ["a", "b", "a"]
    return trace_prompts(model, tset, prompts, labels, groups, max_feature_nodes=6, batch_size=4, progress=False)


def _worker(r: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=r, world_size=world)
    try:
        tables = _trace(*_inputs())
        payload = frames_to_bytes([tables.nodes, tables.edges, tables.cells, tables.genes])
        with open(os.path.join(out_dir, f"rank{r}.npz"), "wb") as f:
            f.write(payload)
    finally:
        dist.destroy_process_group()


def test_two_ranks_trace_the_tables_of_one_process(tmp_path):
    port = free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = _trace(*_inputs())
    for r in range(2):  # every rank returns the tables of all cells
        nodes, edges, cells, genes = frames_from_bytes((tmp_path / f"rank{r}.npz").read_bytes())
        pd.testing.assert_frame_equal(genes, single.genes.reset_index(drop=True), check_dtype=False, rtol=1e-6)
        pd.testing.assert_frame_equal(cells, single.cells.reset_index(drop=True), check_dtype=False, rtol=1e-6)
        pd.testing.assert_frame_equal(nodes, single.nodes.reset_index(drop=True), check_dtype=False, rtol=1e-6)
        pd.testing.assert_frame_equal(edges, single.edges.reset_index(drop=True), check_dtype=False, rtol=1e-6)
    assert len(single.cells) == N_CELLS and set(single.cells["group"]) == {"a", "b"}
    assert list(pd.unique(single.genes["cell"])) == list(range(N_CELLS))


def test_graphs_built_in_threads_equal_one_at_a_time():
    """n_jobs builds several prompts' graphs at once: the tables and the torch thread count come out the same."""
    model, tset, prompts, labels = _inputs()
    groups = ["a", "b", "a"]
    threads = torch.get_num_threads()
    one = trace_prompts(model, tset, prompts, labels, groups, max_feature_nodes=12, batch_size=4, progress=False)
    for n_jobs in (2, 5):
        many = trace_prompts(
            model, tset, prompts, labels, groups, max_feature_nodes=12, batch_size=4, n_jobs=n_jobs, progress=False
        )
        assert torch.get_num_threads() == threads
        for got, want in zip(many[:4], one[:4], strict=True):
            pd.testing.assert_frame_equal(got, want, check_dtype=False, rtol=1e-5, atol=1e-7)
        pd.testing.assert_frame_equal(many.genes, one.genes, check_dtype=False, rtol=1e-5, atol=1e-7)


def test_frames_round_trip_exactly_without_pickle():
    frame = pd.DataFrame(
        {"x": [0.1, np.nan, 1e-300], "s": ["CD14", "", "L0.H1"], "i": [1, 2, 3], "b": [True, False, True]}
    )
    (back,) = frames_from_bytes(frames_to_bytes([frame]))
    pd.testing.assert_frame_equal(back, frame)


def test_bad_input_fails_before_any_work(monkeypatch):
    model, tset, prompts, labels = _inputs()
    recorded = []
    monkeypatch.setattr(cc.circuits.ReplacementModel, "record", classmethod(lambda *a, **k: recorded.append(1)))
    with pytest.raises(ValueError, match="max_feature_nodes must be a positive integer"):
        trace_prompts(model, tset, prompts, labels, max_feature_nodes=0, progress=False)
    with pytest.raises(ValueError, match="memory size"):
        trace_prompts(model, tset, prompts, labels, memory_budget="a lot", progress=False)
    with pytest.raises(ValueError, match="n_jobs must be at least 1"):
        trace_prompts(model, tset, prompts, labels, n_jobs=0, progress=False)
    context = model.model.config.max_position_embeddings
    long = prompts[0]._replace(input_ids=list(prompts[0].input_ids) * (context // len(prompts[0].input_ids) + 1))
    with pytest.raises(ValueError, match=rf"longer than the model's context of {context} tokens"):
        trace_prompts(model, tset, [long], labels[:1], progress=False)
    assert recorded == []
