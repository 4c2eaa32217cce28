"""Streaming training through a bounded shuffle buffer, and checkpoints that resume it bit-exactly."""

from __future__ import annotations

import json

import pytest
import torch

from cellcircuits.transcoders import (
    ActivationStream,
    TranscoderConfig,
    collect_activations,
    train_on_store,
    train_on_stream,
)
from cellcircuits.transcoders._loop import TrainingLoop
from cellcircuits.transcoders._store import tensor_names

from .streaming import CONFIG, TRAIN, make_prompts


def held_out_fvu(tset, store) -> float:
    """FVU over all rows of a store, pooled over layers."""
    err, var = 0.0, 0.0
    for layer, tc in tset.items():
        n_in, n_out = tensor_names(layer)
        batch = next(store.iter_batches(store.n_rows, [layer], shuffle=False))
        with torch.no_grad():
            y_hat = tc(batch[n_in]).output
        y = batch[n_out]
        err += float((y - y_hat).pow(2).sum())
        var += float((y - y.mean(0)).pow(2).sum())
    return err / var


def test_streaming_reaches_the_held_out_fvu_of_store_training(tiny_c2s, tmp_path):
    train, test = make_prompts(tiny_c2s, 40, seed=1), make_prompts(tiny_c2s, 20, seed=2)
    store = collect_activations(tiny_c2s, train, tmp_path / "train", progress=False)
    test_store = collect_activations(tiny_c2s, test, tmp_path / "test", progress=False)
    n_tokens = 6000
    from_store = train_on_store(store, CONFIG, n_layers_model=2, n_tokens=n_tokens, **TRAIN)
    stream = ActivationStream(tiny_c2s, train, buffer_rows=1024)
    streamed = train_on_stream(stream, CONFIG, n_tokens=n_tokens, **TRAIN)
    torch.manual_seed(3)
    fvu_store, fvu_stream = held_out_fvu(from_store, test_store), held_out_fvu(streamed, test_store)
    assert streamed.layers == [0, 1] and streamed[1].cfg.hook_out == "gpt_neox.layers.1.mlp:output"
    assert fvu_store < 0.5  # both learn
    assert fvu_stream < 1.2 * fvu_store + 0.02, (fvu_stream, fvu_store)
    print(f"held-out FVU: store {fvu_store:.4f}, stream {fvu_stream:.4f}")


def _interrupt_at(monkeypatch, at: int) -> None:
    original = TrainingLoop.train_step

    def step(self, batch):
        if self.step == at:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(TrainingLoop, "train_step", step)


@pytest.mark.parametrize("source", ["stream", "store"])
def test_a_resumed_run_reproduces_an_uninterrupted_one(tiny_c2s, tmp_path, monkeypatch, source):
    prompts = make_prompts(tiny_c2s, 30)
    store = collect_activations(tiny_c2s, prompts, tmp_path / "store", progress=False) if source == "store" else None
    config = TranscoderConfig(d_in=32, d_out=32, n_features=64, k=4, dead_after_tokens=300)  # dead features: aux

    def run(checkpoint_dir=None):
        kw = {"n_tokens": 64 * 40, "checkpoint_dir": checkpoint_dir, "checkpoint_every": 7, **TRAIN}
        if store is not None:
            return train_on_store(store, config, n_layers_model=2, **kw)
        return train_on_stream(ActivationStream(tiny_c2s, prompts, buffer_rows=256, cells_per_pass=3), config, **kw)

    whole = run()
    with monkeypatch.context() as m:
        _interrupt_at(m, 17)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert index["step"] == 14  # the last interval before the interruption
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "checkpoint.json",
        "rank0-00000014.safetensors",
        "state-00000014.safetensors",
    ]
    resumed = run(tmp_path / "ckpt")
    for (name, p), (_, q) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    for layer in whole.layers:
        assert torch.equal(whole[layer].tokens_since_fired, resumed[layer].tokens_since_fired)


def test_a_checkpoint_of_other_settings_is_refused_before_any_work(tiny_c2s, tmp_path, monkeypatch):
    prompts = make_prompts(tiny_c2s, 10)
    stream = ActivationStream(tiny_c2s, prompts, buffer_rows=256)
    train_on_stream(stream, CONFIG, n_tokens=64 * 4, checkpoint_dir=tmp_path, checkpoint_every=2, **TRAIN)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 2

    def no_work(self):
        raise AssertionError("the model ran")

    monkeypatch.setattr(ActivationStream, "refill", no_work)
    other = TranscoderConfig(d_in=32, d_out=32, n_features=128, k=8, dead_after_tokens=2000)
    cases = [
        ({"config": other}, "k: 4 in the checkpoint, 8 now; n_features: 64 in the checkpoint, 128 now"),
        ({"lr": 1e-3}, "lr: 0.005"),
        ({"stream": ActivationStream(tiny_c2s, prompts, layers=[1], buffer_rows=256)}, "layers"),
        ({"stream": ActivationStream(tiny_c2s, make_prompts(tiny_c2s, 12), buffer_rows=256)}, "n_cells: 10"),
    ]
    for change, match in cases:
        kw = {"stream": ActivationStream(tiny_c2s, prompts, buffer_rows=256), "config": CONFIG, **TRAIN}
        kw |= {"n_tokens": 64 * 4, "checkpoint_dir": tmp_path, "checkpoint_every": 2, **change}
        with pytest.raises(ValueError, match=f"other settings.*{match}"):
            train_on_stream(**kw)


def test_streaming_settings_are_refused_before_any_work(tiny_c2s):
    prompts = make_prompts(tiny_c2s, 4)
    with pytest.raises(ValueError, match="buffer_rows=20 is too small"):
        ActivationStream(tiny_c2s, prompts, buffer_rows=20)
    with pytest.raises(ValueError, match="no prompts"):
        ActivationStream(tiny_c2s, [])
    with pytest.raises(ValueError, match="cells_per_pass"):
        ActivationStream(tiny_c2s, prompts, cells_per_pass=0)
    stream = ActivationStream(tiny_c2s, prompts, buffer_rows=256)
    with pytest.raises(ValueError, match="at most half"):
        train_on_stream(stream, CONFIG, n_tokens=100, batch_size=200, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_on_stream(stream, CONFIG, n_tokens=100, batch_size=8, checkpoint_every=0, progress=False)
    assert stream.n == 0  # nothing ran


def test_the_buffer_gives_each_loaded_row_once(tiny_c2s):
    """Rows drawn plus rows still held are exactly the rows of the cells loaded so far, over several epochs."""
    from cellcircuits.models._hooks import record

    prompts = make_prompts(tiny_c2s, 9)
    stream = ActivationStream(tiny_c2s, prompts, layers=[1], buffer_rows=256, cells_per_pass=2, dtype=torch.float32)
    drawn = [stream.take(40) for _ in range(25)]
    assert stream.epoch >= 2 and stream.peak_rows <= 256
    got = torch.cat([b["L1_in"] for b in drawn] + [stream.buffer["L1_in"][: stream.n]])
    point = tiny_c2s.adapter.mlp_in(1)
    per_cell = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            with record(tiny_c2s.model, [point]) as seen:
                tiny_c2s.model.base_model(input_ids=torch.tensor([p.input_ids]))
            per_cell.append(seen[point][0][0, torch.from_numpy(stream._kept(i))])
    loaded = [c for e in range(stream.epoch) for c in stream._epoch_order(e)] + list(
        stream._epoch_order(stream.epoch)[: stream.cursor]
    )
    want = torch.cat([per_cell[c] for c in loaded])
    assert got.shape == want.shape
    # every loaded row is drawn or held exactly once: a one-to-one nearest match
    dist = torch.cdist(got, want)
    nearest = dist.argmin(1)
    assert float(dist.min(1).values.max()) < 2e-2
    counts = torch.bincount(nearest, minlength=len(want))
    duplicates = torch.cdist(want, want) < 2e-2  # the same cell loaded in two epochs gives equal rows
    assert torch.equal(duplicates.float() @ counts.float(), duplicates.sum(1).float())
