"""Rebuild the shipped ``pbmc68k-tiny`` model from scratch (the recipe of the checkpoint in the package).

Trains on the fixed ``train`` split of ``cc.ds.pbmc68k()`` (scanpy's ``pbmc68k_reduced``, ``bulk_labels``) and
prints the held-out accuracy. On 2 CPU cores this takes about 10-15 minutes.

    python scripts/train_pbmc68k_tiny.py --out src/cellcircuits/models/_data/pbmc68k-tiny
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import cellcircuits as cc

RECIPE = {
    "n_genes": 100,
    "n_layers": 4,
    "d_model": 128,
    "n_heads": 4,
    "vocab_size": 512,
    "epochs": 30,
    "batch_size": 16,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "dropout": 0.1,
    "answer_weight": 10.0,
    "resample_ties": True,
    "seed": 0,
    # the shipped model predates the C2S answer suffix ("label." + EOS): it answers " label" + EOS
    "answer_suffix": "",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = {**RECIPE, "epochs": args.epochs}

    adata = cc.ds.pbmc68k()
    train = adata[adata.obs["split"] == "train"].copy()
    test = adata[adata.obs["split"] == "test"].copy()
    start = time.perf_counter()
    model = cc.tl.train_c2s(train, "bulk_labels", device="cpu", **recipe)
    minutes = (time.perf_counter() - start) / 60
    cc.tl.predict_cell_types(test, model)
    accuracy = float((test.obs["c2s_cell_type"].astype(str) == test.obs["bulk_labels"].astype(str)).mean())
    model.prompt.extra.update(
        {
            "data": "scanpy pbmc68k_reduced via cellcircuits.ds.pbmc68k() (split test_fraction=0.2, seed=0)",
            "recipe": "scripts/train_pbmc68k_tiny.py",
            "train_minutes": round(minutes, 1),
            "heldout_accuracy": round(accuracy, 4),
            "n_test_cells": int(test.n_obs),
        }
    )
    model.save(args.out)
    print(json.dumps({"heldout_accuracy": accuracy, "train_minutes": round(minutes, 1), "out": args.out}))


if __name__ == "__main__":
    main()
