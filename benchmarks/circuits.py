"""Circuits of the cell-type calls of the shipped model: are they faithful, and do they name the right genes?

Transcoders for all MLPs of a shipped model (``--model``, default ``pbmc68k-genes``; default settings of
``cc.tl.train_transcoders`` on the ``train``
cells, or loaded with ``--transcoders``) encode all 700 cells of ``cc.ds.pbmc68k()``, and
``cc.tl.interpret_features`` labels their features. ``cc.tl.trace_circuit`` then traces ``--n-cells`` cells of each of
the 10 cell types of ``bulk_labels`` (default 10, so 100 cells), each to its own label, and
``cc.tl.validate_circuit`` intervenes on every group's circuit. Per group this prints:

- the 8 gene nodes of most influence (``*``: the gene is in a shipped marker set);
- faithfulness, ``(m(circuit only) - m(no feature)) / (m(all) - m(no feature))`` for the target ``m`` (the label's
  logit difference): 1 when the circuit's features alone carry the model's call;
- the drop of the target when the circuit's features are zero-ablated or mean-ablated, against the same number of
  random active non-circuit features (mean +- sd over draws; the excess is given in units of that sd, since random
  drops sit near 0 and a ratio to them is meaningless), and the drop of the label's probability; the same for the
  circuit's supporting features alone (positive attribution), as circuits also hold features that oppose the label;
- the shift of the target when the circuit's most influential feature is clamped to twice its activation, measured
  and as the graph predicts it;
- the graph-level replacement and completeness scores (whole graph and pruned). Reference values for Gemma-2-2B
  graphs in the circuit-tracing paper (Ameisen et al., 2025): replacement ~0.70, completeness ~0.92.

Sanity check on the genes: each group's 20 most influential circuit genes are compared with the group's 50 top
differentially expressed genes (``sc.tl.rank_genes_groups``, Wilcoxon on ``.raw``, upper-case symbols). The overlap is
tested (one-sided hypergeometric) against the universe of genes a circuit could name: those in the sentences of the
traced cells. Baselines: 20 genes drawn at random from that universe (mean over 100 draws); 20 drawn at random from
the genes of the group's own traced sentences; and the group's 20 most expressed genes (highest mean rank in its
traced sentences), which a circuit that merely follows expression would match. Targets: faithfulness near 1,
ablation drops far beyond random, and circuit genes enriched for DE genes beyond the random baselines.

Cost: one cell, and all traced cells, are traced in separate child processes, each reporting wall time and the rise
of its peak resident memory (``ru_maxrss``) over the trace, after the data, model and transcoders are loaded.

With ``--curve`` it prints instead how the graphs grow with their size: the same cells (``--curve-cells`` per cell
type, each traced to its own label) traced at each number of feature nodes given, with the median replacement and
completeness scores (whole graph and pruned) and the seconds per cell.

    python benchmarks/circuits.py [--transcoders DIR] [--threads N] [--n-cells N]
    python benchmarks/circuits.py --curve 128 256 512 1024 2048 4096 8192 [--curve-cells 1] [--n-jobs 1]
        [--transcoders DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch
from _common import transcoders
from scipy.stats import hypergeom

import cellcircuits as cc

KEY = "bulk_labels"
N_TOP_CIRCUIT, N_TOP_DE, N_SHOWN, N_DRAWS = 20, 50, 8, 100
REFERENCE = {"replacement_score": 0.70, "completeness_score": 0.92}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# child process: trace and report cost
def trace_child(
    adata_path: str, tc_path: str, out_path: str, n_cells: int, one: bool, threads: int, model_name: str
) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    adata = ad.read_h5ad(adata_path)
    model = cc.models.load(model_name, device="cpu")
    tset = cc.load_transcoders(tc_path)
    kwargs = {"groups": [str(adata.obs[KEY].iloc[0])], "n_cells": 1} if one else {"n_cells": n_cells}
    before = peak_rss_mb()
    start = time.perf_counter()
    cc.tl.trace_circuit(adata, model, tset, groupby=KEY, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    after = peak_rss_mb()
    result = adata.uns["circuits"][KEY]
    if out_path != "-":
        adata.write_h5ad(out_path)
    print(json.dumps({"cells": len(result["cells"]), "seconds": seconds, "rss_before": before, "rss_peak": after}))


def traced_in_child(
    adata, tc_path: str, n_cells: int, one: bool, threads: int, tmp: str, model_name: str
) -> tuple[dict, dict]:
    adata_path, out_path = Path(tmp) / "adata.h5ad", Path(tmp) / f"circuit_{int(one)}.h5ad"
    if not adata_path.exists():
        adata.write_h5ad(adata_path)
    cmd = [sys.executable, __file__, "--_trace", str(adata_path), tc_path, str(out_path), "--n-cells", str(n_cells)]
    cmd += ["--threads", str(threads), "--model", model_name] + (["--_one"] if one else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        msg = f"tracing child failed with exit status {done.returncode}"
        raise RuntimeError(msg)
    cost = json.loads(done.stdout.strip().splitlines()[-1])
    return ad.read_h5ad(out_path).uns["circuits"][KEY], cost


# gene sets
def traced_sentences(adata, model, obs_names: pd.Series) -> pd.Series:
    """The sentences ``trace_circuit`` built for the traced cells (same ranking, cut to the model's ``n_genes``)."""
    cells = adata[np.asarray(obs_names)]
    sentences = cc.pp.cell_sentences(cells, n_genes=model.prompt.n_genes, copy=True).obs["cell_sentence"]
    return sentences.str.split()


def hyper_p(k: int, universe: int, n_de: int, n_drawn: int) -> float:
    """One-sided hypergeometric p-value of at least ``k`` DE genes among ``n_drawn`` genes of the universe."""
    return float(hypergeom.sf(k - 1, universe, n_de, n_drawn))


def overlap_table(adata, circuits: dict, sentences: pd.Series, groups: list[str], rng) -> pd.DataFrame:
    cells = pd.DataFrame(circuits["cells"])
    universe = sorted({g for genes in sentences for g in genes})
    M = len(universe)
    rows = []
    for g in groups:
        de = sc.get.rank_genes_groups_df(adata, group=g, key="de_wilcoxon")["names"].astype(str).str.upper()
        de = set(de.head(N_TOP_DE)) & set(universe)
        nodes = cc.get.circuit_df(adata, KEY, group=g)
        top = nodes.loc[nodes["kind"] == "gene", "gene"].astype(str).str.upper().head(N_TOP_CIRCUIT).tolist()
        k = len(set(top) & de)
        own = sentences[cells.loc[cells["group"] == g, "obs_name"].to_numpy()]
        own_genes = sorted({x for genes in own for x in genes})
        score: dict[str, float] = {}
        for genes in own:  # rank score: n_genes for the most expressed gene, 1 for the last, 0 when absent
            for r, x in enumerate(genes):
                score[x] = score.get(x, 0.0) + len(genes) - r
        expressed = sorted(score, key=lambda x: -score[x])[:N_TOP_CIRCUIT]
        k_expr = len(set(expressed) & de)
        rand = [len(set(rng.choice(universe, len(top), replace=False)) & de) for _ in range(N_DRAWS)]
        own_rand = [len(set(rng.choice(own_genes, len(top), replace=False)) & de) for _ in range(N_DRAWS)]
        rows.append(
            {
                "group": g,
                "n_circuit_genes": len(top),
                "n_de_in_universe": len(de),
                "circuit_overlap": k,
                "circuit_p": hyper_p(k, M, len(de), len(top)),
                "random_overlap": np.mean(rand),
                "random_p": np.mean([hyper_p(x, M, len(de), len(top)) for x in rand]),
                "group_random_overlap": np.mean(own_rand),
                "top_expressed_overlap": k_expr,
                "top_expressed_p": hyper_p(k_expr, M, len(de), N_TOP_CIRCUIT),
            }
        )
    return pd.DataFrame(rows), M


def feature_node_curve(adata, model, tset, counts: list[int], per_group: int, n_jobs: int = 1) -> None:
    """Trace the same cells at each number of feature nodes; print median scores and seconds per cell.

    ``n_jobs`` cells' graphs are built at once (``trace_prompts``' ``n_jobs``); seconds per cell are wall time over
    all cells.
    """
    picked = adata.obs.groupby(KEY, observed=True).head(per_group)
    cells = adata[picked.index]
    sentences = cc.pp.cell_sentences(cells, copy=True).obs["cell_sentence"].tolist()
    prompts = cc.models.tokenize_prompts(model.tokenizer, model.build_prompts(sentences))
    labels = cells.obs[KEY].astype(str).tolist()
    tokens = np.mean([len(p.input_ids) for p in prompts])
    print(
        f"feature-node curve: {len(prompts)} cells ({per_group} per cell type, mean {tokens:.0f} tokens), "
        f"n_jobs={n_jobs}"
    )
    columns = ["replacement_score", "completeness_score", "replacement_pruned_score", "completeness_pruned_score"]
    print("feature nodes | s/cell | replacement | completeness | replacement (pruned) | completeness (pruned)")
    # the first trace of a process pays one-time costs (lazy imports, thread start-up): an untimed one comes first
    cc.circuits.trace_prompts(model, tset, prompts[:1], labels[:1], max_feature_nodes=64, progress=False)
    for n in counts:
        start = time.perf_counter()
        tables = cc.circuits.trace_prompts(
            model, tset, prompts, labels, labels, max_feature_nodes=n, progress=False, n_jobs=n_jobs
        )
        per_cell = (time.perf_counter() - start) / len(prompts)
        med = tables.cells[columns].median()
        print(f"{n:13d} | {per_cell:6.1f} | " + " | ".join(f"{med[c]:.3f}".rjust(len(h)) for c, h in zip(
            columns, ["replacement", "completeness", "replacement (pruned)", "completeness (pruned)"], strict=True
        )), flush=True)  # fmt: skip
    print(f"reference (circuit-tracer, Gemma-2-2B): replacement ~{REFERENCE['replacement_score']}, "
          f"completeness ~{REFERENCE['completeness_score']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pbmc68k-genes", help="shipped model name or checkpoint directory")
    parser.add_argument("--transcoders", help="load transcoders (a directory or a shipped name) instead of training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-cells", type=int, default=10, help="cells traced per cell type")
    parser.add_argument("--curve", type=int, nargs="+", help="print the feature-node curve at these graph sizes")
    parser.add_argument("--curve-cells", type=int, default=1, help="cells per cell type in the curve")
    parser.add_argument("--n-jobs", type=int, default=1, help="cells traced at once, in the curve")
    parser.add_argument("--_trace", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._trace:
        trace_child(*args._trace, n_cells=args.n_cells, one=args._one, threads=args.threads, model_name=args.model)
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 30)
    start_all = time.perf_counter()

    adata = cc.ds.pbmc68k()
    model = cc.models.load(args.model, device="cpu")
    start = time.perf_counter()
    tset = transcoders(adata, model, args.transcoders)
    train_s = time.perf_counter() - start
    if args.curve:
        how = "loaded" if args.transcoders else "trained"
        print(f"transcoders {how} in {train_s:.1f} s (CPU, {args.threads} threads)")
        feature_node_curve(adata, model, tset, args.curve, args.curve_cells, args.n_jobs)
        return
    start = time.perf_counter()
    cc.tl.transcode(adata, model, tset, progress=False)
    cc.tl.interpret_features(adata, groupby=KEY)
    prep_s = time.perf_counter() - start
    sc.tl.rank_genes_groups(adata, KEY, method="wilcoxon", use_raw=True, key_added="de_wilcoxon")
    print(
        f"{adata.n_obs} cells; transcoders {'loaded' if args.transcoders else 'trained'} in {train_s:.1f} s; "
        f"transcode + interpret_features {prep_s:.1f} s (CPU, {args.threads} threads)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        tc_path = args.transcoders
        if not tc_path:
            tc_path = str(Path(tmp) / "tc")
            tset.save(tc_path)
        _, one_cost = traced_in_child(adata, tc_path, 1, True, args.threads, tmp, args.model)
        circuits, all_cost = traced_in_child(adata, tc_path, args.n_cells, False, args.threads, tmp, args.model)
    adata.uns["circuits"] = {KEY: circuits}
    cells = pd.DataFrame(circuits["cells"])
    groups = [str(g) for g in pd.unique(cells["group"])]
    print(
        f"traced {len(cells)} cells (up to {args.n_cells} per group, {len(groups)} groups), each to its own label, "
        f"in {all_cost['seconds']:.1f} s\n"
    )

    start = time.perf_counter()
    val = cc.tl.validate_circuit(adata, model, tset, KEY, progress=False)
    validate_s = time.perf_counter() - start
    val = val.set_index("group").loc[groups]
    # the random drops sit near 0, so a ratio to them flips sign; the excess in random sd's is what is reported
    val["zero_z"] = (val["zero_drop"] - val["random_zero_drop"]) / val["random_zero_drop_sd"]
    val["mean_z"] = (val["mean_drop"] - val["random_mean_drop"]) / val["random_mean_drop_sd"]

    for g in groups:
        v = val.loc[g]
        nodes = cc.get.circuit_df(adata, KEY, group=g)
        genes = nodes[nodes["kind"] == "gene"].head(N_SHOWN)
        shown = [f"{x}{'*' if m else ''}" for x, m in zip(genes["gene"], genes["is_marker"], strict=True)]
        feats = nodes[nodes["kind"] == "feature"]
        print(
            f"== {g}  ({int(v['n_cells'])} cells, target {v['target_value']:.2f}, p(label) {v['probability']:.2f}, "
            f"{len(feats)} feature nodes, {v['n_circuit_features']:.1f} active per cell)"
        )
        print(f"   top genes: {' '.join(shown)}")
        print(f"   faithfulness {v['faithfulness']:.3f}")
        print(
            f"   zero-ablation drop {v['zero_drop']:.3f} vs random {v['random_zero_drop']:.3f} "
            f"+- {v['random_zero_drop_sd']:.3f}  ({v['zero_z']:.0f} sd); p(label) drop "
            f"{v['zero_prob_drop']:.3f}"
        )
        print(
            f"   supporting features only ({v['n_support_features']:.1f} per cell): drop {v['support_drop']:.3f} vs "
            f"random {v['random_support_drop']:.3f}"
        )
        print(
            f"   mean-ablation drop {v['mean_drop']:.3f} vs random {v['random_mean_drop']:.3f} "
            f"+- {v['random_mean_drop_sd']:.3f}  ({v['mean_z']:.0f} sd); p(label) drop "
            f"{v['mean_prob_drop']:.3f}"
        )
        label = feats.loc[feats["node"] == v["clamp_feature"], "label"]
        label = f" [{label.iloc[0]}]" if len(label) and label.iloc[0] else ""
        print(
            f"   clamp x2 of {v['clamp_feature']}{label}: shift {v['clamp_shift']:.3f}, "
            f"predicted {v['clamp_shift_predicted']:.3f}"
        )
        print(
            f"   replacement {v['replacement_score']:.3f} (pruned {v['replacement_pruned_score']:.3f}), "
            f"completeness {v['completeness_score']:.3f} (pruned {v['completeness_pruned_score']:.3f})\n"
        )

    sentences = traced_sentences(adata, model, cells["obs_name"])
    in_circuits = set(pd.DataFrame(circuits["nodes"]).query("kind == 'gene'")["gene"].astype(str).str.upper())
    universe = {g for genes in sentences for g in genes}
    overlap, M = overlap_table(adata, circuits, sentences, groups, np.random.default_rng(0))
    print(
        f"circuit genes vs the top-{N_TOP_DE} Wilcoxon DE genes of each group; universe: the {M} genes in the traced "
        f"cells' sentences ({len(in_circuits - universe)} circuit genes outside it)"
    )
    print(
        f"overlaps of {N_TOP_CIRCUIT} genes; random: mean over {N_DRAWS} draws from the universe; group_random: from "
        f"the group's own traced sentences; top_expressed: the group's {N_TOP_CIRCUIT} most expressed genes"
    )
    print(overlap.to_string(index=False, float_format=lambda x: f"{x:.3g}"), "\n")

    n = all_cost["cells"]
    cost = pd.DataFrame(
        [
            {"trace": "1 cell", **{k: one_cost[k] for k in ("cells", "seconds")}, "s_per_cell": one_cost["seconds"]},
            {"trace": f"{n} cells", "cells": n, "seconds": all_cost["seconds"], "s_per_cell": all_cost["seconds"] / n},
        ]
    )
    cost["peak_rss_loaded_mb"] = [one_cost["rss_before"], all_cost["rss_before"]]
    cost["peak_rss_after_mb"] = [one_cost["rss_peak"], all_cost["rss_peak"]]
    cost["peak_rss_increase_mb"] = cost["peak_rss_after_mb"] - cost["peak_rss_loaded_mb"]
    print(
        f"cost of trace_circuit (child processes, CPU, {args.threads} threads; peak RSS after loading data, model "
        f"and transcoders, and after the trace); validate_circuit on {n} cells: {validate_s:.1f} s"
    )
    print(cost.to_string(index=False, float_format="%.1f"), "\n")

    summary = val[["n_cells", "faithfulness", "zero_drop", "random_zero_drop", "mean_drop"]].copy()
    summary["support_drop"] = val["support_drop"]
    summary["random_support_drop"] = val["random_support_drop"]
    summary["random_mean_drop"] = val["random_mean_drop"]
    summary["zero_z"] = val["zero_z"]
    summary["prob_drop"] = val["zero_prob_drop"]
    summary["clamp"] = val["clamp_shift"]
    summary["clamp_pred"] = val["clamp_shift_predicted"]
    for c in ("replacement_score", "completeness_score", "replacement_pruned_score", "completeness_pruned_score"):
        summary[c.removesuffix("_score").replace("replacement", "repl").replace("completeness", "compl")] = val[c]
    summary["de_overlap"] = overlap.set_index("group").loc[groups, "circuit_overlap"].to_numpy()
    summary["de_p"] = overlap.set_index("group").loc[groups, "circuit_p"].to_numpy()
    print("summary")
    print(summary.reset_index().to_string(index=False, float_format=lambda x: f"{x:.3g}"), "\n")

    print("overall (means over groups unless marked)")
    lines = [
        ("faithfulness", val["faithfulness"].mean(), "~1"),
        ("faithfulness (median)", val["faithfulness"].median(), "~1"),
        ("zero-ablation drop, circuit (mean)", val["zero_drop"].mean(), ""),
        ("zero-ablation drop, random (mean)", val["random_zero_drop"].mean(), ""),
        ("zero-ablation excess over random, in random sd's", val["zero_z"].median(), "median"),
        ("zero-ablation drop, supporting features (mean)", val["support_drop"].mean(), ""),
        ("zero-ablation drop, as many random features", val["random_support_drop"].mean(), ""),
        ("groups where ablating the supporting features lowers the target", (val["support_drop"] > 0).sum(), "of 10"),
        ("mean-ablation excess over random, in random sd's", val["mean_z"].median(), "median"),
        ("p(label) drop, zero-ablation", val["zero_prob_drop"].mean(), ""),
        ("replacement score", val["replacement_score"].mean(), f"Gemma-2-2B ~{REFERENCE['replacement_score']}"),
        ("replacement score, pruned", val["replacement_pruned_score"].mean(), ""),
        ("completeness score", val["completeness_score"].mean(), f"Gemma-2-2B ~{REFERENCE['completeness_score']}"),
        ("completeness score, pruned", val["completeness_pruned_score"].mean(), ""),
        (f"DE overlap of {N_TOP_CIRCUIT} circuit genes", overlap["circuit_overlap"].mean(), ""),
        ("DE overlap, random from universe", overlap["random_overlap"].mean(), ""),
        ("DE overlap, random from group's sentences", overlap["group_random_overlap"].mean(), ""),
        ("DE overlap, group's top expressed genes", overlap["top_expressed_overlap"].mean(), ""),
        ("groups with circuit DE overlap p < 0.05", float((overlap["circuit_p"] < 0.05).sum()), f"of {len(groups)}"),
    ]
    for name, value, ref in lines:
        print(f"{name:<48} {value:8.3f}  {ref}")
    print(f"\ntotal {time.perf_counter() - start_all:.0f} s")


if __name__ == "__main__":
    main()
