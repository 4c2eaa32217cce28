"""Do a circuit's gene scores predict what knocking the genes out does? The shipped model's circuits, gene by gene.

``cc.tl.trace_circuit`` traces ``--n-cells`` cells of each of the ``--groups`` first cell types of ``bulk_labels``
(default 8 cells of all 10) in ``cc.ds.pbmc68k()``, each to its own label, on ``--model`` (default
``pbmc68k-genes``) with the transcoders of ``--transcoders`` (a directory or a shipped set; default the set shipped
for ``pbmc68k-genes``; ``""`` trains them on the ``train`` cells). Then
``cc.tl.validate_circuit_genes`` knocks out, in every traced cell, each circuit gene of its group (the group's
``--n-circuit-genes`` gene nodes of most influence, default 20, that the cell's sentence holds; a traced graph keeps
most genes of its sentence, so all its gene nodes would be nearly the whole sentence) and ``--n-other-genes`` other
genes of its sentence (drawn at random): deleted from the sentence (prompt rebuilt), and
masked (token embeddings replaced by the mean input embedding, positions kept). Per group it prints the Spearman
correlation, over the group's (cell, gene) pairs, of each gene score with the deletion effects and with the masking
effects (the drop of the label's logit difference):

- ``circuit``: the gene's signed attribution in the cell's attribution graph (the frozen-attention linearisation
  through transcoders);
- ``expression``: minus its rank in the cell sentence;
- ``de_score``: its Wilcoxon score for the group (``sc.tl.rank_genes_groups`` on ``.raw``, group against the rest);
- ``gradient_x_input``: the real model's gradient at the gene's token embeddings times (embedding - mean
  embedding), the first-order estimate of the masking effect;

with the correlation of masking and deletion effects, the share of the deletion effects' variance a straight line
on the masking effects leaves unexplained (``1 - R^2``: how much of deletion works through the shifted positions and
the changed attention that neither masking nor the frozen-attention graph sees), the best baseline and whether the
circuit's correlation with deletion beats every baseline's. Last: in how many groups it does, and the times.

    python benchmarks/knockout.py [--transcoders DIR] [--groups 10] [--n-cells 8] [--n-circuit-genes 20]
                                  [--n-other-genes 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
import torch
from _common import transcoders

import cellcircuits as cc

KEY = "bulk_labels"
DEFAULT_TRANSCODERS = "pbmc68k-genes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pbmc68k-genes", help="shipped model name or checkpoint directory")
    parser.add_argument("--transcoders", default=DEFAULT_TRANSCODERS, help="transcoders (directory or shipped set)")
    parser.add_argument("--groups", type=int, default=10, help="cell types traced (the first ones of bulk_labels)")
    parser.add_argument("--n-cells", type=int, default=8, help="cells traced per cell type")
    parser.add_argument("--n-circuit-genes", type=int, default=20, help="circuit genes: the group's top gene nodes")
    parser.add_argument("--n-other-genes", type=int, default=10, help="non-circuit genes knocked out per cell")
    parser.add_argument("--max-feature-nodes", type=int, default=None, help="default: trace_circuit's")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 40)
    start_all = time.perf_counter()

    adata = cc.ds.pbmc68k()
    model = cc.models.load(args.model, device="cpu")
    path = args.transcoders or None
    tset = transcoders(adata, model, path)
    groups = sorted(adata.obs[KEY].astype(str).unique())[: args.groups]

    start, cpu = time.perf_counter(), time.process_time()
    cc.tl.trace_circuit(
        adata, model, tset, groupby=KEY, groups=groups, n_cells=args.n_cells, progress=False,
        **({} if args.max_feature_nodes is None else {"max_feature_nodes": args.max_feature_nodes}),
    )  # fmt: skip
    trace_s, trace_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    summary = cc.tl.validate_circuit_genes(
        adata, model, KEY, n_other_genes=args.n_other_genes, n_circuit_genes=args.n_circuit_genes,
        batch_size=args.batch_size, progress=False,
    )  # fmt: skip
    knockout_s, knockout_cpu = time.perf_counter() - start, time.process_time() - cpu
    result = cc._keys.gene_validation(adata, KEY)
    effects = result["effects"]
    n_cells = effects["obs_name"].nunique()
    n_forward = len(effects) * 2 + n_cells

    print(
        f"{n_cells} cells ({args.n_cells} per cell type, {len(groups)} cell types of {KEY}), each traced to its own "
        f"label ({args.model}, {adata.uns['circuits'][KEY]['params']['max_feature_nodes']} feature nodes) with "
        f"{'the transcoders ' + path if path else 'transcoders trained now'}; "
        f"{len(effects)} (cell, gene) knockouts ({int(effects['in_circuit'].sum())} of circuit genes: the group's top "
        f"{args.n_circuit_genes} gene nodes by influence; up to {args.n_other_genes} other genes per cell)\n"
    )
    shown = summary.set_index("group")
    short = {
        "n_cells": "cells",
        "n_pairs": "pairs",
        "n_circuit_pairs": "circ",
        "deletion_circuit": "del:circuit",
        "deletion_expression": "del:expr",
        "deletion_de_score": "del:DE",
        "deletion_gradient_x_input": "del:gxi",
        "masking_circuit": "mask:circuit",
        "masking_expression": "mask:expr",
        "masking_de_score": "mask:DE",
        "masking_gradient_x_input": "mask:gxi",
        "masking_vs_deletion": "mask~del",
        "deletion_unexplained": "del_unexpl",
        "best_baseline": "best_baseline",
        "circuit_wins": "circuit_wins",
    }
    print("Spearman correlation of each gene score with the knockout effects, per cell type")
    print(shown[list(short)].rename(columns=short).to_string(float_format=lambda x: f"{x:.3f}"), "\n")

    means = summary[[c for c in short if c.startswith(("deletion_", "masking_"))]].mean()
    print("means over cell types:")
    print(means.rename(short).to_frame("mean").T.to_string(float_format=lambda x: f"{x:.3f}"), "\n")
    for mode in ("deletion", "masking"):
        wins = (summary[f"{mode}_circuit"] > summary[[f"{mode}_{b}" for b in ("expression", "de_score",
                "gradient_x_input")]].max(axis=1)).sum()  # fmt: skip
        print(f"cell types where the circuit beats every baseline ({mode}): {int(wins)} of {len(summary)}")
    print(f"best baseline (deletion): {summary['best_baseline'].value_counts().to_dict()}")
    inside = effects.groupby("in_circuit")[["deletion", "masking"]].agg(lambda x: float(np.mean(np.abs(x))))
    print(f"mean |effect| of circuit genes vs other genes:\n{inside.to_string(float_format=lambda x: f'{x:.4f}')}")
    print(
        f"\ntrace_circuit {trace_s:.1f} s ({trace_cpu:.1f} s of CPU time); validate_circuit_genes {knockout_s:.1f} s "
        f"({knockout_cpu:.1f} s of CPU time; {n_forward} prompts run, plus {n_cells} gradients); CPU, "
        f"{args.threads} thread(s); total {time.perf_counter() - start_all:.0f} s"
    )


if __name__ == "__main__":
    main()
