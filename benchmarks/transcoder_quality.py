"""Quality of transcoders trained with default settings on a shipped model (``pbmc68k-genes`` by default).

Transcoders for all the model's MLPs train on the ``train`` cells of ``cc.ds.pbmc68k()`` (default settings of
``cc.tl.train_transcoders``) and are evaluated on the 142 held-out ``test`` cells with
``cc.tl.evaluate_transcoders``. Targets: per-layer FVU < 0.15 at mean L0 <= 32, dead features < 10%, and cell-type
agreement with the original model >= 90% with all layers' transcoders spliced in at once.

``--transcoders NAME|DIR`` evaluates a set instead of training one (``pbmc68k-genes``: the shipped set).

    python benchmarks/transcoder_quality.py [--model NAME] [--transcoders NAME|DIR] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pandas as pd
import torch

import cellcircuits as cc


def train_default(train, model):
    """Transcoders of default settings trained on ``train`` from stored activations, with the rows and timings."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = cc.tl.collect_activations(train, model, tmp, progress=False)
        collect_s = time.perf_counter() - start
        start = time.perf_counter()
        tset = cc.tl.train_transcoders(train, model, store=store, progress=False)
        return tset, store.n_rows, collect_s, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pbmc68k-genes", help="shipped model name or checkpoint directory")
    parser.add_argument("--transcoders", help="evaluate this set (a directory or a shipped name) instead of training")
    parser.add_argument("--out", help="save the trained transcoders here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adata = cc.ds.pbmc68k()
    train = adata[adata.obs["split"] == "train"].copy()
    test = adata[adata.obs["split"] == "test"].copy()
    model = cc.models.load(args.model, device="cpu")
    collect_s = train_s = 0.0
    rows = 0
    if args.transcoders:
        tset = cc.load_transcoders(args.transcoders)
    else:
        tset, rows, collect_s, train_s = train_default(train, model)
    if args.out:
        tset.save(args.out)
    start = time.perf_counter()
    table = cc.tl.evaluate_transcoders(test, model, tset, label_key="bulk_labels", progress=False)
    eval_s = time.perf_counter() - start

    cfg = tset[tset.layers[0]].cfg
    print(
        f"transcoders: {cfg.activation} k={cfg.k}, {cfg.n_features} features x {len(tset)} layers; "
        f"{rows or 'given'} training rows from {train.n_obs} cells"
    )
    print(f"collect {collect_s:.1f} s, train {train_s:.1f} s, evaluate {eval_s:.1f} s (CPU, {args.threads} threads)\n")
    cols = [
        "layer",
        "fvu",
        "l0",
        "dead_fraction",
        "dense_fraction",
        "ce_loss_original",
        "ce_loss_spliced",
        "ce_loss_zero_ablated",
        "loss_recovered",
        "accuracy_original",
        "accuracy_spliced",
        "agreement",
    ]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        print(table[cols].to_string(index=False))
    per_layer = table[table["layer"] != "all"]
    all_row = table[table["layer"] == "all"].iloc[0]
    fvu, l0, dead = per_layer["fvu"].max(), per_layer["l0"].max(), per_layer["dead_fraction"].max()
    checks = [
        ("max per-layer FVU < 0.15", fvu, fvu < 0.15),
        ("max per-layer mean L0 <= 32", l0, l0 <= 32),
        ("max per-layer dead fraction < 0.10", dead, dead < 0.1),
        ("agreement, all layers spliced >= 0.90", all_row["agreement"], all_row["agreement"] >= 0.9),
    ]
    print()
    for name, value, ok in checks:
        print(f"{name:<40} {value:8.3f}  {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
