"""Checks that need CUDA, skipped elsewhere: mixed-precision training and sparse feature edits on the GPU."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.testing import assert_close

import cellcircuits as cc
from cellcircuits.circuits import clean_run, run_edits, run_feature_edits
from cellcircuits.models import C2SModel, ModelAdapter
from cellcircuits.transcoders import ActivationStore

from .helpers import random_feature_edits, replacement_case

pytestmark = pytest.mark.gpu


def _on_cuda(c2s: C2SModel) -> C2SModel:
    model = copy.deepcopy(c2s.model).cuda()
    return C2SModel(model=model, tokenizer=c2s.tokenizer, adapter=ModelAdapter(model), prompt=c2s.prompt, name=c2s.name)


def test_mixed_precision_training_on_cuda(toy_adata, tiny_c2s, tmp_path):
    model = _on_cuda(tiny_c2s)
    store = cc.tl.collect_activations(toy_adata, model, tmp_path / "store", progress=False)
    small = {"n_features": 64, "k": 4, "n_tokens": 6000, "batch_size": 64, "lr": 5e-3, "dead_after_tokens": 2000}
    mixed = cc.tl.train_transcoders(toy_adata, model, store=store, progress=False, **small)  # bf16 by default here
    full = cc.tl.train_transcoders(toy_adata, model, store=store, matmul_dtype="float32", progress=False, **small)
    batch = next(ActivationStore(tmp_path / "store").iter_batches(store.n_rows, mixed.layers, shuffle=False))
    for layer in mixed.layers:
        tc = mixed[layer]
        assert tc.selection_dtype == torch.bfloat16 and tc.W_enc.dtype == torch.float32 and tc.W_enc.is_cuda
        x, y = batch[f"L{layer}_in"].cuda(), batch[f"L{layer}_out"].cuda()
        fvu_mixed, fvu_full = float(tc.loss(x, y).fvu), float(full[layer].loss(x, y).fvu)
        assert fvu_mixed == pytest.approx(fvu_full, abs=0.03)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gemma2"])
def test_feature_edits_on_cuda_equal_the_dense_edits(arch):
    case = replacement_case(arch)
    generator = torch.Generator().manual_seed(0)
    on_cpu = clean_run(case.model, case.transcoders, case.ids)  # the edits are drawn on the CPU
    edits = {m: random_feature_edits(on_cpu, case.transcoders[m], m, 4, generator) for m in case.transcoders.layers}
    edits = {m: e._replace(**{f: getattr(e, f).cuda() for f in e._fields}) for m, e in edits.items()}
    model, tset = copy.deepcopy(case.model).cuda(), copy.deepcopy(case.transcoders).cuda()
    run = clean_run(model, tset, case.ids.cuda())
    T = len(run.input_ids)
    dense = {m: e.dense(T, tset[m].cfg.n_features) for m, e in edits.items()}
    want = run_edits(model, tset, run, {m: d[0] for m, d in dense.items()}, {m: d[1] for m, d in dense.items()})
    assert_close(run_feature_edits(model, tset, run, edits), want, rtol=1e-3, atol=1e-3)


def test_a_topk_training_step_on_cuda_waits_for_the_device_at_most_once():
    # the one wait left is the dead-feature count, which sizes the auxiliary loss's tensors
    from cellcircuits.transcoders import Transcoder, TranscoderConfig
    from cellcircuits.transcoders._loop import TrainingLoop

    torch.manual_seed(0)
    cfg = TranscoderConfig(d_in=64, d_out=64, n_features=1024, activation="topk", k=16, dead_after_tokens=10**9)
    tc = Transcoder(cfg, device="cuda")
    batch = {"L0_in": torch.randn(512, 64, device="cuda"), "L0_out": torch.randn(512, 64, device="cuda")}
    tc.set_scales_from(batch["L0_in"], batch["L0_out"])
    loop = TrainingLoop({0: tc}, lr=1e-3, total_steps=10, warmup_steps=2, matmul_dtype="bfloat16")
    loop.train_step(batch)  # first-call set-up (lazy initialisation) may wait
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(waits) <= 1, waits
