"""Held-out cell-type accuracy of a shipped model (``pbmc68k-tiny``, ``pbmc68k-genes``) beside simple baselines.

All methods train on the ``train`` split of ``cc.ds.pbmc68k()`` and are scored on its ``test`` split (142 cells),
using the same 765 genes (``.raw``, log-normalised):

- logistic regression on the expression values (the reference the model should be within 10 points of);
- logistic regression on the same top-``n_genes`` cell sentences the model reads, as a bag of genes (the reference
  of ``pbmc68k-genes``, which should be within 5 points of it);
- the majority class.

    python benchmarks/accuracy.py --model pbmc68k-genes
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

import cellcircuits as cc
from cellcircuits.pp._sentences import iter_ranked_genes


def bag_of_sentence_genes(adata, n_genes: int) -> np.ndarray:
    X = np.zeros((adata.n_obs, adata.raw.n_vars), dtype=np.float32)
    for i, genes in enumerate(iter_ranked_genes(adata, n_genes=n_genes)):
        X[i, genes] = 1.0
    return X


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pbmc68k-genes", help="shipped model name or checkpoint directory")
    args = parser.parse_args()
    torch.set_num_threads(2)
    adata = cc.ds.pbmc68k()
    train, test = adata.obs["split"] == "train", adata.obs["split"] == "test"
    y = adata.obs["bulk_labels"].astype(str).to_numpy()
    rows = []

    start = time.perf_counter()
    model = cc.models.load(args.model, device="cpu")
    load_s = time.perf_counter() - start
    held = adata[test].copy()
    start = time.perf_counter()
    cc.tl.predict_cell_types(held, model, progress=False)
    pred_s = time.perf_counter() - start
    rows.append((f"C2S {args.model} (log-likelihood of labels)", held.obs["c2s_cell_type"].astype(str).to_numpy()))

    X = adata.raw.X.toarray()
    lr = LogisticRegression(max_iter=5000, C=0.1).fit(X[train], y[train])
    rows.append(("logistic regression, expression (765 genes)", lr.predict(X[test])))
    B = bag_of_sentence_genes(adata, model.prompt.n_genes)
    lr_bag = LogisticRegression(max_iter=5000, C=0.1).fit(B[train], y[train])
    rows.append((f"logistic regression, bag of top-{model.prompt.n_genes} sentence genes", lr_bag.predict(B[test])))
    majority = adata.obs.loc[train, "bulk_labels"].astype(str).value_counts().idxmax()
    rows.append(("majority class", np.full(int(test.sum()), majority)))

    truth = y[test]
    print(f"held-out cells: {int(test.sum())}  train cells: {int(train.sum())}  labels: {len(model.labels)}")
    print(f"model load: {load_s:.2f} s   prediction: {pred_s:.2f} s ({pred_s / test.sum() * 1e3:.1f} ms/cell)\n")
    print(f"{'method':<58} {'accuracy':>9} {'macro-F1':>9}")
    accs = {}
    for name, pred in rows:
        accs[name] = accuracy_score(truth, pred)
        print(f"{name:<58} {accs[name]:>9.3f} {f1_score(truth, pred, average='macro'):>9.3f}")
    gap = accs[rows[1][0]] - accs[rows[0][0]]
    side = "behind" if gap >= 0 else "ahead of"
    print(f"\nmodel is {abs(gap) * 100:.1f} points {side} logistic regression on expression (target: within 10)")
    gap = accs[rows[2][0]] - accs[rows[0][0]]
    side = "behind" if gap >= 0 else "ahead of"
    print(f"model is {abs(gap) * 100:.1f} points {side} logistic regression on the bag of sentence genes")


if __name__ == "__main__":
    main()
