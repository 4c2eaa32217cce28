"""A damaged activation store is found, refused with what to do, and repaired; training warns on a partial store."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import cellcircuits as cc
from cellcircuits.models import tokenize_prompts
from cellcircuits.transcoders import ActivationStore, TranscoderConfig, collect_activations, train_on_store

from ..helpers import interrupted_store


@pytest.fixture
def prompts(toy_adata, tiny_c2s):
    cc.pp.cell_sentences(toy_adata)
    return tokenize_prompts(tiny_c2s.tokenizer, tiny_c2s.build_prompts(toy_adata.obs["cell_sentence"]))


def all_rows(store: ActivationStore) -> dict[str, torch.Tensor]:
    """Every stored tensor, in stored order."""
    batches = list(store.iter_batches(store.n_rows, shuffle=False, with_index=True))
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def collect(model, prompts, directory, **kw):
    return collect_activations(model, prompts, directory, shard_rows=30, progress=False, **kw)


def truncate(path):
    path.write_bytes(path.read_bytes()[:-40])


def drop_rows(path):
    """Rewrite a shard as valid safetensors holding fewer rows than its manifest entry."""
    tensors = load_file(str(path))
    save_file({k: v[:-2].contiguous() for k, v in tensors.items()}, str(path))


def remove(path):
    path.unlink()


@pytest.mark.parametrize("damage", [truncate, drop_rows, remove])
def test_damaged_shard_is_refused_then_repaired(tiny_c2s, prompts, tmp_path, damage):
    ref = all_rows(collect(tiny_c2s, prompts, tmp_path / "ref"))
    store = collect(tiny_c2s, prompts, tmp_path / "s")
    shards = store.manifest.shards
    assert len(shards) >= 3
    first = tmp_path / "s" / shards[0]["file"]
    first_mtime = first.stat().st_mtime_ns
    damage(tmp_path / "s" / shards[1]["file"])
    problems = ActivationStore(tmp_path / "s").verify()
    assert len(problems) == 1 and shards[1]["file"] in problems[0]
    # collecting again without repair refuses, and says what to do
    with pytest.raises(ValueError, match=r"damaged.*repair=True") as err:
        collect(tiny_c2s, prompts, tmp_path / "s")
    assert shards[1]["file"] in str(err.value) and "1 intact shard" in str(err.value)
    repaired = collect(tiny_c2s, prompts, tmp_path / "s", repair=True)
    assert repaired.manifest.complete and repaired.verify() == []
    assert first.stat().st_mtime_ns == first_mtime  # the intact shard before the damage is kept
    assert repaired.manifest.n_rows == store.manifest.n_rows
    got = all_rows(repaired)
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)


def test_reading_a_damaged_shard_says_how_to_repair(tiny_c2s, prompts, tmp_path):
    store = collect(tiny_c2s, prompts, tmp_path)
    truncate(tmp_path / store.manifest.shards[0]["file"])
    with pytest.raises(ValueError, match=r"collect_activations\(\.\.\., repair=True\)"):
        store.load_shard(0)
    drop_rows(tmp_path / store.manifest.shards[1]["file"])
    with pytest.raises(ValueError, match=r"rows the manifest records.*repair=True"):
        store.load_shard(1)


def test_repair_of_an_intact_or_unfinished_store(tiny_c2s, prompts, tmp_path, monkeypatch):
    store = collect(tiny_c2s, prompts, tmp_path / "s")
    mtime = (tmp_path / "s" / "manifest.json").stat().st_mtime_ns
    again = collect(tiny_c2s, prompts, tmp_path / "s", repair=True)  # intact: nothing to do
    assert again.verify() == [] and (tmp_path / "s" / "manifest.json").stat().st_mtime_ns == mtime
    # a manifest whose counts disagree with its shards is repaired too
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["shards"][2]["n_rows"] += 5
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    assert len(ActivationStore(tmp_path / "s").verify()) >= 1
    fixed = collect(tiny_c2s, prompts, tmp_path / "s", repair=True)
    assert fixed.verify() == [] and fixed.manifest.complete and fixed.manifest.n_rows == store.manifest.n_rows


def test_tl_collect_activations_repairs(toy_adata, tiny_c2s, tmp_path):
    store = cc.tl.collect_activations(toy_adata, tiny_c2s, tmp_path, shard_rows=30, progress=False)
    truncate(tmp_path / store.manifest.shards[-1]["file"])
    with pytest.raises(ValueError, match=r"cc\.tl\.collect_activations|repair=True"):
        cc.tl.collect_activations(toy_adata, tiny_c2s, tmp_path, shard_rows=30, progress=False)
    repaired = cc.tl.collect_activations(toy_adata, tiny_c2s, tmp_path, shard_rows=30, repair=True, progress=False)
    assert repaired.verify() == [] and repaired.manifest.complete


def partial_store(model, prompts, directory, monkeypatch) -> ActivationStore:
    """A store interrupted after its second shard."""
    return interrupted_store(lambda d: collect(model, prompts, d), directory, monkeypatch)


def test_training_on_a_partial_store_warns_with_the_counts(toy_adata, tiny_c2s, prompts, tmp_path, monkeypatch):
    store = partial_store(tiny_c2s, prompts, tmp_path, monkeypatch)
    m = store.manifest
    assert not m.complete
    config = TranscoderConfig(d_in=32, d_out=32, n_features=16, k=2)
    expected = f"store holds {m.n_cells_done} of {len(prompts)} cells"
    with pytest.warns(UserWarning, match=expected):
        train_on_store(store, config, n_layers_model=2, n_tokens=64, batch_size=16, progress=False)
    with pytest.warns(UserWarning, match=expected):
        cc.tl.train_transcoders(
            toy_adata, tiny_c2s, store=store, n_features=16, k=2, n_tokens=64, batch_size=16, progress=False
        )
    # a manifest that claims more cells than its shards hold warns too
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["n_cells_done"] = manifest["n_cells_total"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    held = sum(s["n_cells"] for s in manifest["shards"])
    with pytest.warns(UserWarning, match=f"store holds {held} of {len(prompts)} cells"):
        train_on_store(ActivationStore(tmp_path), config, n_layers_model=2, n_tokens=64, batch_size=16, progress=False)


def test_training_on_a_complete_store_does_not_warn(tiny_c2s, prompts, tmp_path, recwarn):
    store = collect(tiny_c2s, prompts, tmp_path)
    config = TranscoderConfig(d_in=32, d_out=32, n_features=16, k=2)
    train_on_store(store, config, n_layers_model=2, n_tokens=64, batch_size=16, progress=False)
    assert not [w for w in recwarn if "store holds" in str(w.message)]
