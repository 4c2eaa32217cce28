from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cellcircuits as cc
from cellcircuits.models import record, tokenize_prompts
from cellcircuits.transcoders import ActivationStore, collect_activations
from cellcircuits.transcoders._activations import kept_positions

from ..helpers import interrupted_store


@pytest.fixture
def prompts(toy_adata, tiny_c2s):
    cc.pp.cell_sentences(toy_adata)
    return tokenize_prompts(tiny_c2s.tokenizer, tiny_c2s.build_prompts(toy_adata.obs["cell_sentence"]))


def rows_by_index(store, layers=None, **kw):
    """All rows of one pass keyed by (cell, position)."""
    out = {}
    for batch in store.iter_batches(7, layers, with_index=True, **kw):
        for i, (c, p) in enumerate(zip(batch["cell"].tolist(), batch["position"].tolist(), strict=True)):
            assert (c, p) not in out  # each row once per pass
            out[c, p] = {k: v[i] for k, v in batch.items() if k.startswith("L")}
    return out


def test_collected_rows_equal_an_unpadded_forward_pass(tiny_c2s, prompts, tmp_path):
    store = collect_activations(tiny_c2s, prompts, tmp_path / "s", batch_size=5, shard_rows=20, dtype=torch.float32)
    m = store.manifest
    assert m.complete and m.layers == [0, 1] and m.positions == "genes+answer"
    assert m.n_rows == sum(len(kept_positions(p, "genes+answer")) for p in prompts)
    assert len(m.shards) > 2 and m.hook_in["0"] == "gpt_neox.layers.0.mlp:input"
    rows = rows_by_index(store)
    assert len(rows) == m.n_rows
    adapter = tiny_c2s.adapter
    for cell in (0, 5, 11):
        p = prompts[cell]
        points = [adapter.mlp_in(1), adapter.mlp_out(1)]
        with torch.no_grad(), record(tiny_c2s.model, points) as rec:
            tiny_c2s.model(input_ids=torch.tensor([p.input_ids]))
        for pos in kept_positions(p, "genes+answer"):
            torch.testing.assert_close(rows[cell, int(pos)]["L1_in"], rec[points[0]][0][0, pos], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rows[cell, int(pos)]["L1_out"], rec[points[1]][0][0, pos], atol=1e-5, rtol=1e-5)
    # the answer position is kept for every cell, including the empty one
    assert all((c, prompts[c].answer_position) in rows for c in range(len(prompts)))


def test_all_positions_and_layer_subset(tiny_c2s, prompts, tmp_path):
    store = collect_activations(tiny_c2s, prompts, tmp_path, layers=[1], positions="all", progress=False)
    assert store.layers == [1] and store.n_rows == sum(len(p.input_ids) for p in prompts)
    with pytest.raises(ValueError, match=r"layers \[0\] are not in the store"):
        next(store.iter_batches(4, [0]))
    with pytest.raises(ValueError, match="positions must be"):
        collect_activations(tiny_c2s, prompts, tmp_path / "x", positions="some")


def test_resume_after_interruption_neither_duplicates_nor_loses(tiny_c2s, prompts, tmp_path, monkeypatch):
    ref = rows_by_index(collect_activations(tiny_c2s, prompts, tmp_path / "ref", shard_rows=30, progress=False))
    partial = interrupted_store(
        lambda d: collect_activations(tiny_c2s, prompts, d, shard_rows=30, progress=False), tmp_path / "s", monkeypatch
    )
    assert not partial.manifest.complete and len(partial.manifest.shards) == 2
    (tmp_path / "s" / "shard_00002.safetensors").write_bytes(b"half-written")  # a stray file is discarded
    resumed = collect_activations(tiny_c2s, prompts, tmp_path / "s", shard_rows=30, progress=False)
    assert resumed.manifest.complete
    got = rows_by_index(resumed)
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key]["L0_out"], ref[key]["L0_out"])


def test_other_prompts_refuse_to_resume(tiny_c2s, prompts, tmp_path):
    collect_activations(tiny_c2s, prompts[:6], tmp_path, progress=False)
    with pytest.raises(ValueError, match="already holds a store of other activations"):
        collect_activations(tiny_c2s, prompts, tmp_path, progress=False)


def test_shuffle_ranks_and_epochs(tiny_c2s, prompts, tmp_path):
    store = collect_activations(tiny_c2s, prompts, tmp_path, shard_rows=15, progress=False)
    n_shards = len(store.manifest.shards)
    assert n_shards >= 4
    a = [b["cell"] for b in store.iter_batches(8, with_index=True, seed=0, buffer_shards=2)]
    b = [b["cell"] for b in store.iter_batches(8, with_index=True, seed=0, buffer_shards=2)]
    c = [b["cell"] for b in store.iter_batches(8, with_index=True, seed=0, epoch=1, buffer_shards=2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # reproducible
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=False))  # a new order each epoch
    plain = torch.cat([b["cell"] for b in store.iter_batches(8, with_index=True, shuffle=False)])
    assert torch.all(plain[1:] >= plain[:-1])  # unshuffled: stored order
    # two ranks read disjoint shards that together cover the store
    r0 = set(rows_by_index_rank(store, 0))
    r1 = set(rows_by_index_rank(store, 1))
    assert not r0 & r1 and len(r0 | r1) == store.n_rows
    sizes = [len(b["L0_in"]) for b in store.iter_batches(8, drop_last=True)]
    assert set(sizes) == {8} and sum(sizes) == store.n_rows - store.n_rows % 8


def rows_by_index_rank(store, rank):
    keys = []
    for batch in store.iter_batches(5, rank=rank, world_size=2, with_index=True):
        keys += list(zip(batch["cell"].tolist(), batch["position"].tolist(), strict=True))
    return keys


def test_damaged_store_errors(tiny_c2s, prompts, tmp_path):
    store = collect_activations(tiny_c2s, prompts, tmp_path, shard_rows=30, progress=False)
    shard = tmp_path / store.manifest.shards[0]["file"]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        store.load_shard(0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format"] = "other/9"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="unknown store format"):
        ActivationStore(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an activation store"):
        ActivationStore(tmp_path / "nothing")
    with pytest.raises(ValueError, match="rank"):
        store.shard_indices(2, 2)


def test_kept_positions_are_gene_tokens_answer_region_and_answer(prompts, tiny_c2s):
    p = prompts[5]
    genes = np.concatenate(p.gene_positions)
    kept = kept_positions(p, "genes+answer", n_answer_tokens=3)
    np.testing.assert_array_equal(kept[: len(genes)], genes)
    region = kept[len(genes) : -3]
    np.testing.assert_array_equal(region, np.arange(genes[-1] + 1, p.answer_position + 1))
    closing = tiny_c2s.tokenizer.decode([p.input_ids[i] for i in region])
    assert closing == ".\nThe cell type corresponding to these genes is:"
    np.testing.assert_array_equal(kept[-3:], len(p.input_ids) + np.arange(3))
    assert genes[0] > 10  # the template's opening text is left out
    np.testing.assert_array_equal(kept_positions(p, "all", 2), np.arange(len(p.input_ids) + 2))
    empty = prompts[3]  # the cell without expressed genes keeps its answer position
    assert kept_positions(empty, "genes+answer").tolist() == [empty.answer_position]


def test_answer_tokens_are_recorded_after_the_prompt(tiny_c2s, prompts, tmp_path):
    from cellcircuits.models import label_token_ids

    labels = label_token_ids(tiny_c2s.tokenizer, tiny_c2s.prompt, tiny_c2s.labels)
    answers = [labels[i % len(labels)] for i in range(len(prompts))]
    store = collect_activations(tiny_c2s, prompts, tmp_path, answers=answers, progress=False)
    rows = rows_by_index(store)
    n_plain = sum(len(kept_positions(p, "genes+answer")) for p in prompts)
    assert store.n_rows == n_plain + sum(len(a) for a in answers)
    cell = 4
    full = prompts[cell].input_ids + answers[cell]
    point = tiny_c2s.adapter.mlp_out(0)
    with torch.no_grad(), record(tiny_c2s.model, [point]) as rec:
        tiny_c2s.model(input_ids=torch.tensor([full]))
    for pos in range(len(prompts[cell].input_ids), len(full)):
        expected = rec[point][0][0, pos].half().float()  # stored as float16 by default
        torch.testing.assert_close(rows[cell, pos]["L0_out"], expected, atol=1e-3, rtol=1e-3)
    # other answers are other activations: no resuming into this store
    with pytest.raises(ValueError, match="other activations"):
        collect_activations(tiny_c2s, prompts, tmp_path, answers=answers[::-1], progress=False)
    with pytest.raises(ValueError, match="answers has 2 entries"):
        collect_activations(tiny_c2s, prompts, tmp_path / "b", answers=answers[:2], progress=False)


def test_rank_without_batches_raises(tiny_c2s, prompts, tmp_path):
    from cellcircuits.transcoders import TranscoderConfig, train_on_store

    store = collect_activations(tiny_c2s, prompts[:2], tmp_path, shard_rows=10**6, progress=False)
    assert len(store.manifest.shards) == 1
    cfg = TranscoderConfig(d_in=32, d_out=32, n_features=16, k=2)
    with pytest.raises(ValueError, match="rank 1 of 2 has no full batch"):
        train_on_store(store, cfg, n_layers_model=2, n_tokens=100, batch_size=8, rank=1, world_size=2, progress=False)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_collection_runs_the_transformer_of_every_architecture(arch, tiny_tokenizer, prompts, tmp_path):
    """Collection and transcoding call the model without its unembedding; the hooks still see every layer."""
    from cellcircuits.models import C2SModel, ModelAdapter
    from cellcircuits.transcoders import Transcoder, TranscoderConfig, TranscoderSet
    from cellcircuits.transcoders._features import cell_and_gene_features

    from ..helpers import LABELS, make_tiny

    model = make_tiny(arch, len(tiny_tokenizer))  # eager attention: Gemma-2's softcap needs it
    c2s = C2SModel(
        model=model, tokenizer=tiny_tokenizer, adapter=ModelAdapter(model), name=arch,
        prompt=cc.pp.PromptConfig(n_genes=8, labels=LABELS, append_eos=True),
    )  # fmt: skip
    store = collect_activations(c2s, prompts, tmp_path / "s", batch_size=5, dtype=torch.float32, progress=False)
    rows = rows_by_index(store)
    tc = Transcoder(TranscoderConfig(d_in=32, d_out=32, n_features=16, activation="relu", layer=1))
    genes = [np.arange(len(p.genes)) for p in prompts]
    features, _ = cell_and_gene_features(
        c2s, TranscoderSet({1: tc}, n_layers_model=2), prompts, genes, 8, layers=[1], progress=False
    )
    points = [c2s.adapter.mlp_in(1), c2s.adapter.mlp_out(1)]
    for cell in (0, 5):
        p = prompts[cell]
        with torch.no_grad(), record(model, points) as rec:
            model(input_ids=torch.tensor([p.input_ids]))
        for pos in kept_positions(p, "genes+answer"):
            torch.testing.assert_close(rows[cell, int(pos)]["L1_out"], rec[points[1]][0][0, pos], atol=1e-5, rtol=1e-5)
        gene_tokens = np.concatenate(p.gene_positions)
        expected = tc.encode(rec[points[0]][0][0, gene_tokens]).amax(0).detach().numpy()
        np.testing.assert_allclose(features[1].pooled[cell], expected, atol=1e-5)


def test_layers_above_the_highest_recorded_one_do_not_run(tiny_c2s, prompts, tmp_path):
    calls = []
    hook = tiny_c2s.model.gpt_neox.layers[1].attention.register_forward_hook(lambda *_: calls.append(1))
    low = collect_activations(tiny_c2s, prompts, tmp_path / "low", layers=[0], dtype=torch.float32, progress=False)
    assert calls == []
    both = collect_activations(tiny_c2s, prompts, tmp_path / "both", dtype=torch.float32, progress=False)
    hook.remove()
    assert len(calls) > 0
    got, ref = rows_by_index(low), rows_by_index(both)
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key]["L0_out"], ref[key]["L0_out"])
