"""Calls on one model from several threads run one at a time: their results are those of sequential calls."""

from __future__ import annotations

import threading

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse

import cellcircuits as cc

from ..helpers import GENES, LABELS, tiny_tset


def many_cells(seed: int, n: int = 24) -> ad.AnnData:
    """``n`` cells of the toy genes, each expressing a few of them, with sentences built."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 4, size=(n, len(GENES))).astype(np.float32)
    X[:, 0] += 1  # every cell expresses a gene
    obs = pd.DataFrame({"label": [LABELS[i % 3] for i in range(n)]}, index=[f"s{seed}c{i}" for i in range(n)])
    adata = ad.AnnData(sparse.csr_matrix(X), obs=obs, var=pd.DataFrame(index=GENES))
    cc.pp.cell_sentences(adata)
    return adata


def run_in_threads(*calls):
    """Run the calls in threads started together; the exceptions they raised, in order (``None`` for none)."""
    barrier = threading.Barrier(len(calls))
    errors: list[BaseException | None] = [None] * len(calls)

    def target(i: int) -> None:
        barrier.wait()
        try:
            calls[i]()
        except BaseException as err:  # reported to the test
            errors[i] = err

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_transcode_equals_sequential(tiny_c2s):
    tset = tiny_tset()
    one, two = many_cells(1), many_cells(2)
    ref_one, ref_two = one.copy(), two.copy()
    cc.tl.transcode(ref_one, tiny_c2s, tset, batch_size=1, progress=False)
    cc.tl.transcode(ref_two, tiny_c2s, tset, batch_size=1, progress=False)
    for _ in range(3):
        a, b = one.copy(), two.copy()
        errors = run_in_threads(
            lambda a=a: cc.tl.transcode(a, tiny_c2s, tset, batch_size=1, progress=False),
            lambda b=b: cc.tl.transcode(b, tiny_c2s, tset, batch_size=1, progress=False),
        )
        assert errors == [None, None]
        for got, ref in ((a, ref_one), (b, ref_two)):
            for layer in tset.layers:
                key = f"X_transcoder_L{layer}"
                np.testing.assert_array_equal(got.obsm[key].toarray(), ref.obsm[key].toarray())
                np.testing.assert_array_equal(got.varm[f"transcoder_L{layer}_in"], ref.varm[f"transcoder_L{layer}_in"])
    assert tiny_c2s.model.config._attn_implementation == "sdpa"


def trace(adata, model, tset):
    cc.tl.trace_circuit(adata, model, tset, groupby="label", n_cells=2, max_feature_nodes=8, progress=False)


def test_concurrent_trace_circuit_equals_sequential_and_restores_attention(tiny_c2s):
    tset = tiny_tset()
    one, two = many_cells(3, n=6), many_cells(4, n=6)
    ref_one, ref_two = one.copy(), two.copy()
    trace(ref_one, tiny_c2s, tset)
    trace(ref_two, tiny_c2s, tset)
    assert tiny_c2s.model.config._attn_implementation == "sdpa"
    for _ in range(2):
        a, b = one.copy(), two.copy()
        errors = run_in_threads(lambda a=a: trace(a, tiny_c2s, tset), lambda b=b: trace(b, tiny_c2s, tset))
        assert errors == [None, None]
        assert tiny_c2s.model.config._attn_implementation == "sdpa"
        for got, ref in ((a, ref_one), (b, ref_two)):
            g, r = got.uns["circuits"]["label"], ref.uns["circuits"]["label"]
            pd.testing.assert_frame_equal(g["nodes"], r["nodes"])
            pd.testing.assert_frame_equal(g["edges"], r["edges"])
            pd.testing.assert_frame_equal(g["cells"], r["cells"])


def test_attention_is_restored_after_an_exception_inside_a_traced_call(tiny_c2s):
    tset = tiny_tset()
    one, two = many_cells(5, n=6), many_cells(6, n=6)
    ref_two = two.copy()
    trace(ref_two, tiny_c2s, tset)
    calls = {"n": 0}

    def fail_once_in_eager(_module, _args, _output):
        # only the traced (eager) pass of the first thread to get here fails
        if tiny_c2s.model.config._attn_implementation == "eager" and calls["n"] == 0:
            calls["n"] += 1
            msg = "failure inside a traced call"
            raise RuntimeError(msg)

    handle = tiny_c2s.adapter.module(0, "mlp").register_forward_hook(fail_once_in_eager)
    try:
        errors = run_in_threads(lambda: trace(one, tiny_c2s, tset), lambda: trace(two, tiny_c2s, tset))
    finally:
        handle.remove()
    assert tiny_c2s.model.config._attn_implementation == "sdpa"
    assert sum(isinstance(e, RuntimeError) for e in errors) == 1
    assert sum(e is None for e in errors) == 1
    done = one if errors[0] is None else two
    if done is two:
        pd.testing.assert_frame_equal(two.uns["circuits"]["label"]["nodes"], ref_two.uns["circuits"]["label"]["nodes"])
    # and the model still traces alone
    trace(ref_two.copy(), tiny_c2s, tset)
    assert tiny_c2s.model.config._attn_implementation == "sdpa"


def test_exclusive_is_reentrant_and_blocks_other_threads(tiny_c2s):
    entered = threading.Event()
    with tiny_c2s.exclusive(), tiny_c2s.exclusive():  # the same thread enters again
        t = threading.Thread(target=lambda: (tiny_c2s.exclusive().__enter__(), entered.set()))
        t.daemon = True
        t.start()
        assert not entered.wait(0.3)  # another thread waits while the model is held
    assert entered.wait(5)


def test_concurrent_predict_and_splice_do_not_mix(tiny_c2s):
    """A prediction running while another thread splices transcoders in sees the original MLPs."""
    tset = tiny_tset()
    adata = many_cells(7)
    ref = adata.copy()
    cc.tl.predict_cell_types(ref, tiny_c2s, batch_size=1, progress=False)
    stop = threading.Event()

    def splice_repeatedly():
        ids = torch.tensor([tiny_c2s.tokenizer("CD14 LYZ")["input_ids"]])
        while not stop.is_set():
            with cc.transcoders.splice(tiny_c2s, tset, mode="zero"), torch.no_grad():
                tiny_c2s.model(input_ids=ids)

    worker = threading.Thread(target=splice_repeatedly)
    worker.start()
    try:
        got = adata.copy()
        cc.tl.predict_cell_types(got, tiny_c2s, batch_size=1, progress=False)
    finally:
        stop.set()
        worker.join()
    np.testing.assert_array_equal(got.obsm["c2s_cell_type_logprob"], ref.obsm["c2s_cell_type_logprob"])


def test_hooks_wait_for_the_holder(tiny_c2s):
    """``record`` on a model held by another thread waits until it is released."""
    point = tiny_c2s.adapter.mlp_in(0)
    entered = threading.Event()

    def record_once():
        with cc.models.record(tiny_c2s.model, [point]):
            entered.set()

    with tiny_c2s.exclusive():
        t = threading.Thread(target=record_once)
        t.start()
        assert not entered.wait(0.3)
    t.join(5)
    assert entered.is_set()
