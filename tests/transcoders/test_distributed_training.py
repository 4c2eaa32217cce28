"""Data-parallel transcoder training with DistributedDataParallel, over two real gloo processes on the CPU."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from cellcircuits.transcoders import (
    ActivationStore,
    ActivationStream,
    TranscoderConfig,
    collect_activations,
    train_on_store,
    train_on_stream,
)

from ..helpers import free_port
from .streaming import make_prompts

# no feature goes dead in these short runs, so the auxiliary loss (normalised per rank) stays off
CONFIG = TranscoderConfig(d_in=32, d_out=32, n_features=64, k=4, dead_after_tokens=10**6)
N_TOKENS = 64 * 12


def _weights(tset) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in tset.named_parameters()}


def _worker(r: int, world: int, port: int, out_dir: str, model, prompts) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=r, world_size=world)
    try:
        # a store: each rank takes its half of every global batch of 2 x 32 rows
        store = ActivationStore(os.path.join(out_dir, "store"))
        tset = train_on_store(store, CONFIG, n_layers_model=2, n_tokens=N_TOKENS, batch_size=32, progress=False)
        save_file(_weights(tset), os.path.join(out_dir, f"store-rank{r}.safetensors"))
        # streaming: each rank runs the model on its own cells, rank 0 writes the checkpoints
        stream = ActivationStream(model, prompts, buffer_rows=256, cells_per_pass=3)
        checkpoints = os.path.join(out_dir, "ckpt")
        tset = train_on_stream(
            stream, CONFIG, n_tokens=N_TOKENS, batch_size=32, checkpoint_dir=checkpoints, checkpoint_every=5,
            progress=False,
        )  # fmt: skip
        save_file(_weights(tset), os.path.join(out_dir, f"stream-rank{r}.safetensors"))
        cells = stream.cells.tolist()
        try:
            ActivationStream(model, prompts[:1])
            error = ""
        except ValueError as err:
            error = str(err)
        with open(os.path.join(out_dir, f"rank{r}.json"), "w") as f:
            json.dump({"cells": cells, "error": error}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_the_transcoders_one_process_trains_on_the_doubled_batch(tiny_c2s, tmp_path):
    prompts = make_prompts(tiny_c2s, 12)
    store = collect_activations(tiny_c2s, prompts, tmp_path / "store", progress=False)
    port = free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path), tiny_c2s, prompts), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _weights(
            train_on_store(store, CONFIG, n_layers_model=2, n_tokens=N_TOKENS, batch_size=64, progress=False)
        )
    finally:
        torch.set_num_threads(threads)
    ranks = [load_file(tmp_path / f"store-rank{r}.safetensors") for r in range(2)]
    assert set(ranks[0]) == set(single)
    for name, value in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank holds the same transcoders
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # not vacuous: one process with the per-rank batch ends elsewhere
    half = _weights(train_on_store(store, CONFIG, n_layers_model=2, n_tokens=N_TOKENS, batch_size=32, progress=False))
    assert not torch.allclose(half["transcoders.0.W_enc"], single["transcoders.0.W_enc"], rtol=1e-4, atol=1e-5)
    # streaming: the ranks took disjoint halves of the cells and ended with the same transcoders
    streamed = [load_file(tmp_path / f"stream-rank{r}.safetensors") for r in range(2)]
    for name in streamed[0]:
        assert torch.equal(streamed[0][name], streamed[1][name]), name
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert info[0]["cells"] == list(range(6)) and info[1]["cells"] == list(range(6, 12))
    assert all("2 ranks for 1 cells" in i["error"] for i in info)
    index = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert index["step"] == 10 and index["world_size"] == 2
    assert sorted(index["ranks"]) == ["rank0-00000010.safetensors", "rank1-00000010.safetensors"]
    assert np.isfinite([float(v.float().abs().sum()) for v in streamed[0].values()]).all()


def test_resuming_with_another_number_of_ranks_is_refused(tiny_c2s, tmp_path):
    """A checkpoint records the world size; one process cannot take over two ranks' buffers."""
    prompts = make_prompts(tiny_c2s, 6)
    stream = ActivationStream(tiny_c2s, prompts, buffer_rows=256)
    train_on_stream(stream, CONFIG, n_tokens=64 * 4, batch_size=32, checkpoint_dir=tmp_path, checkpoint_every=2,
                    progress=False)  # fmt: skip
    index = json.loads((tmp_path / "checkpoint.json").read_text())
    index["settings"]["world_size"] = 2
    (tmp_path / "checkpoint.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="world_size: 2 in the checkpoint, 1 now"):
        train_on_stream(ActivationStream(tiny_c2s, prompts, buffer_rows=256), CONFIG, n_tokens=64 * 4, batch_size=32,
                        checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)  # fmt: skip
