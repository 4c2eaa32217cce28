"""Prediction and collection over two gloo ranks equal a one-process run."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cellcircuits as cc
from cellcircuits.models import tokenize_prompts
from cellcircuits.transcoders import ActivationStore, collect_activations

from ..helpers import free_port


def _worker(r: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=r, world_size=world)
    try:
        torch.set_num_threads(1)
        model = cc.models.load(os.path.join(root, "model"), device="cpu")
        adata = ad.read_h5ad(os.path.join(root, "cells.h5ad"))
        out = cc.tl.predict_cell_types(adata, model, max_batch_tokens=200, progress=False)
        assert out is None
        if r == 0:
            np.save(os.path.join(root, "logprob.npy"), adata.obsm["c2s_cell_type_logprob"])
            np.save(os.path.join(root, "labels.npy"), adata.obs["c2s_cell_type"].astype(str).to_numpy())
        else:
            assert "c2s_cell_type" not in adata.obs  # only rank 0 writes
        prompts = tokenize_prompts(model.tokenizer, model.build_prompts(adata.obs["cell_sentence"]))
        w = os.path.join(root, "store")
        store = collect_activations(model, prompts, w, batch_size=3, shard_rows=25, dtype=torch.float32, progress=False)
        assert store.manifest.complete
        # a rank that cannot open its part stops every rank before any work, instead of leaving them waiting
        bad = os.path.join(root, "bad")
        if r == 1:
            os.makedirs(os.path.join(bad, "ranks", "1-of-2"))
            with open(os.path.join(bad, "ranks", "1-of-2", "manifest.json"), "w") as f:
                f.write("{not json")
        try:
            collect_activations(model, prompts, bad, progress=False)
        except ValueError as err:
            message = str(err)
        else:
            message = ""
        expected = "rank(s) [1] could not open" if r == 0 else "is not valid JSON"
        assert expected in message, message
        assert not os.path.exists(os.path.join(bad, "ranks", "0-of-2", "manifest.json"))
        # training from a store: every rank collects its share of the cells into it, then trains on it
        tset = cc.tl.train_transcoders(
            adata, model, [0], n_features=32, k=4, n_tokens=256, batch_size=32,
            store=os.path.join(root, "train_store"), progress=False,
        )  # fmt: skip
        np.save(os.path.join(root, f"W_enc_rank{r}.npy"), tset[0].W_enc.detach().numpy())
    finally:
        dist.destroy_process_group()


def _all_rows(store: ActivationStore) -> dict:
    out = {}
    for batch in store.iter_batches(1000, shuffle=False, with_index=True):
        for i, key in enumerate(zip(batch["cell"].tolist(), batch["position"].tolist(), strict=True)):
            assert key not in out
            out[key] = {k: v[i] for k, v in batch.items() if k.startswith("L")}
    return out


def test_two_gloo_ranks_predict_and_collect_as_one_process(toy_adata, tiny_c2s, tmp_path):
    cc.pp.cell_sentences(toy_adata)
    tiny_c2s.save(tmp_path / "model")
    toy_adata.write_h5ad(tmp_path / "cells.h5ad")
    port = free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)

    model = cc.models.load(tmp_path / "model", device="cpu")
    one = ad.read_h5ad(tmp_path / "cells.h5ad")
    cc.tl.predict_cell_types(one, model, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "logprob.npy"), one.obsm["c2s_cell_type_logprob"], atol=1e-5)
    assert np.load(tmp_path / "labels.npy", allow_pickle=True).tolist() == one.obs["c2s_cell_type"].astype(str).tolist()

    parallel = ActivationStore(tmp_path / "store")
    assert parallel.verify() == [] and parallel.manifest.complete and parallel.n_cells == 12
    assert {s["file"].split("/")[1] for s in parallel.manifest.shards} == {"0-of-2", "1-of-2"}
    prompts = tokenize_prompts(model.tokenizer, model.build_prompts(one.obs["cell_sentence"]))
    single = collect_activations(model, prompts, tmp_path / "single", dtype=torch.float32, progress=False)
    assert single.n_rows == parallel.n_rows
    got, ref = _all_rows(parallel), _all_rows(single)
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key]["L1_out"], ref[key]["L1_out"], atol=1e-5, rtol=1e-5)
    trained = [np.load(tmp_path / f"W_enc_rank{r}.npy") for r in range(2)]
    np.testing.assert_array_equal(trained[0], trained[1])  # the ranks end with the same transcoder
    assert ActivationStore(tmp_path / "train_store").n_cells == 12
    # the merged store is an ordinary one: a one-process call with the same prompts returns it as it is
    again = collect_activations(model, prompts, tmp_path / "store", batch_size=3, dtype=torch.float32, progress=False)
    assert again.manifest.shards == parallel.manifest.shards


def test_more_ranks_than_cells_is_refused_before_work(toy_adata, tiny_c2s, monkeypatch):
    import cellcircuits.models._distributed as distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 20)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    with pytest.raises(ValueError, match="20 ranks for 12 cells"):
        cc.tl.predict_cell_types(toy_adata, tiny_c2s, progress=False)
    prompts = tokenize_prompts(tiny_c2s.tokenizer, tiny_c2s.build_prompts(["CD14 LYZ"] * 3))
    with pytest.raises(ValueError, match="20 ranks for 3 cells"):
        collect_activations(tiny_c2s, prompts, "/nonexistent/never-written", progress=False)
