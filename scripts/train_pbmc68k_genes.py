"""Rebuild the shipped ``pbmc68k-genes`` model from scratch (the recipe of the checkpoint in the package).

Like ``scripts/train_pbmc68k_tiny.py``, but every gene of the data is one token of the tokenizer
(``cc.tl.train_c2s(..., gene_tokens=True)``), the sentences hold 200 genes, the model is 6 layers deep and it
answers in the Cell2Sentence format (``" label."`` + EOS). Trains on the fixed ``train`` split of
``cc.ds.pbmc68k()`` (scanpy's ``pbmc68k_reduced``, ``bulk_labels``) and prints the held-out accuracy.

    python scripts/train_pbmc68k_genes.py --out src/cellcircuits/models/_data/pbmc68k-genes --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import cellcircuits as cc

RECIPE = {
    "n_genes": 200,
    "gene_tokens": True,
    "n_layers": 6,
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
    "answer_suffix": ".",  # the Cell2Sentence answer: " label." + EOS
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
    start, cpu_start = time.perf_counter(), time.process_time()
    model = cc.tl.train_c2s(train, "bulk_labels", device="cpu", **recipe)
    minutes = (time.perf_counter() - start) / 60
    cpu_minutes = (time.process_time() - cpu_start) / 60  # all threads together: wall time if they had the cores
    cc.tl.predict_cell_types(test, model)
    accuracy = float((test.obs["c2s_cell_type"].astype(str) == test.obs["bulk_labels"].astype(str)).mean())
    sentences = cc.pp.cell_sentences(test, n_genes=model.prompt.n_genes, copy=True).obs["cell_sentence"]
    prompts = model.build_prompts(list(sentences))
    tokens = [len(ids) for ids in model.tokenizer([p.text for p in prompts])["input_ids"]]
    model.prompt.extra.update(
        {
            "data": "scanpy pbmc68k_reduced via cellcircuits.ds.pbmc68k() (split test_fraction=0.2, seed=0)",
            "recipe": "scripts/train_pbmc68k_genes.py",
            "train_minutes": round(minutes, 1),
            "train_threads": args.threads,
            "train_cpu_minutes": round(cpu_minutes, 1),
            "heldout_accuracy": round(accuracy, 4),
            "n_test_cells": int(test.n_obs),
            "mean_prompt_tokens": round(float(np.mean(tokens)), 1),
        }
    )
    model.save(args.out)
    print(
        json.dumps(
            {
                "heldout_accuracy": accuracy,
                "train_minutes": round(minutes, 1),
                "train_cpu_minutes": round(cpu_minutes, 1),
                "vocab": len(model.tokenizer),
                "mean_prompt_tokens": round(float(np.mean(tokens)), 1),
                "loss_history": [round(x, 3) for x in model.prompt.extra["loss_history"]],
                "out": args.out,
            }
        )
    )


if __name__ == "__main__":
    main()
