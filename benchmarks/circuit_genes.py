"""Circuit markers across transcoder seeds: do the genes a circuit ranks top stay the same when the transcoders change?

Transcoders for all MLPs of ``--model`` (default ``pbmc68k-genes``) are trained with three seeds
(``cc.tl.train_transcoders`` with its default settings on the ``train`` cells, as the other benchmarks do;
``--seed0 NAME|DIR`` loads seed 0's, by default the set shipped for the model when one ships, which is seed 0 with
default settings).
With each set, ``cc.tl.trace_circuit`` traces the same ``--n-cells`` cells of each cell type of ``bulk_labels`` (the
cell sampling is seeded apart from the transcoders), each to its own label, and ``cc.tl.rank_circuit_genes`` ranks
the genes of each group by their mean whole-graph influence. Per group this prints:

- ``jaccard``: the Jaccard index of the top-15 genes between seeds (mean over the 3 pairs of seeds); for scale,
  ``chance`` is the expected Jaccard of two random 15-gene sets drawn from the group's genes (``universe``: genes in
  the traced sentences), and the ``expr`` and ``de`` columns tell how much of the ranking is expression or
  group-specificity;
- ``de``: how many of the top-15 are among the group's 15 top differentially expressed genes (Wilcoxon, the tool's
  ``de_rank``), mean over seeds;
- ``expr``: how many of the top-15 are among the group's 15 most expressed genes (``expression_rank``), mean over
  seeds;

and the same three for the ranking by ``position_adjusted`` (influence beyond what the sentence position predicts).

Trained transcoder sets and traced circuits are kept in ``--cache`` (loaded when present), so the script can be
rerun without training or tracing again. ``--quick`` trains small transcoders (20,000 rows) for all three seeds and
traces 2 cells of 3 groups: a check that the script runs, not a result.

    OMP_NUM_THREADS=1 python benchmarks/circuit_genes.py [--seed0 DIR] [--cache DIR] [--n-cells 8] [--threads 1]
    python benchmarks/circuit_genes.py --quick
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from _common import transcoders

import cellcircuits as cc

KEY = "bulk_labels"
SEEDS = (0, 1, 2)
N_TOP = 15
QUICK_TOKENS, QUICK_CELLS, QUICK_GROUPS = 20_000, 2, 3


def transcoder_set(adata, model, seed: int, cache: Path, seed0: str | None, n_tokens: int | None):
    """The seed's transcoders: from ``seed0`` for seed 0 when given, else from the cache, else trained and cached."""
    if seed == 0 and seed0:
        return cc.load_transcoders(seed0), "loaded"
    path = cache / f"transcoders_seed{seed}"
    if (path / "transcoder_set.json").exists():
        return cc.load_transcoders(path), "loaded from the cache"
    kwargs = {"seed": seed} if n_tokens is None else {"seed": seed, "n_tokens": n_tokens}
    start = time.perf_counter()
    tset = transcoders(adata, model, None, **kwargs)
    tset.save(path)
    return tset, f"trained in {time.perf_counter() - start:.0f} s"


def traced(adata, model, tset, seed: int, cache: Path, n_cells: int, groups: list[str] | None) -> ad.AnnData:
    """The cells traced with this seed's transcoders (cached as .h5ad): same cells for every seed."""
    path = cache / f"circuit_seed{seed}_{n_cells}cells.h5ad"
    if path.exists():
        return ad.read_h5ad(path)
    start = time.perf_counter()
    cc.tl.trace_circuit(
        adata, model, tset, groupby=KEY, groups=groups, n_cells=n_cells, random_state=0, key_added=KEY, progress=False
    )
    adata.write_h5ad(path)
    print(f"  seed {seed}: traced {len(pd.DataFrame(adata.uns['circuits'][KEY]['cells']))} cells in "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    return adata


def top_genes(table: pd.DataFrame, group: str, by: str) -> list[str]:
    rows = table[table["group"] == group].sort_values(by, ascending=False, kind="stable")
    return rows["gene"].astype(str).head(N_TOP).tolist()


def jaccard(a: list[str], b: list[str]) -> float:
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else float("nan")


def chance_jaccard(universe: int, k: int = N_TOP) -> float:
    """Expected Jaccard of two independent uniform ``k``-subsets of ``universe`` items (hypergeometric overlap)."""
    from scipy.stats import hypergeom

    k = min(k, universe)
    overlap = np.arange(k + 1)
    p = hypergeom.pmf(overlap, universe, k, k)
    return float(np.sum(p * overlap / (2 * k - overlap)))


def stability(tables: dict[int, pd.DataFrame], by: str) -> pd.DataFrame:
    first = next(iter(tables.values()))
    rows = []
    for group in pd.unique(first["group"]):
        tops = {s: top_genes(t, group, by) for s, t in tables.items()}
        pairs = [jaccard(tops[a], tops[b]) for a, b in itertools.combinations(tops, 2)]
        de = [set(t.loc[(t["group"] == group) & (t["de_rank"] <= N_TOP), "gene"]) for t in tables.values()]
        expr = [set(t.loc[(t["group"] == group) & (t["expression_rank"] <= N_TOP), "gene"]) for t in tables.values()]
        universe = int(np.mean([(t["group"] == group).sum() for t in tables.values()]))
        rows.append(
            {
                "group": group,
                "universe": universe,
                "jaccard": float(np.mean(pairs)),
                "chance": chance_jaccard(universe),
                "de": float(np.mean([len(set(tops[s]) & d) for s, d in zip(tops, de, strict=True)])),
                "expr": float(np.mean([len(set(tops[s]) & e) for s, e in zip(tops, expr, strict=True)])),
            }
        )
    out = pd.DataFrame(rows)
    mean = out.drop(columns="group").mean().to_dict()
    return pd.concat([out, pd.DataFrame([{"group": "mean", **mean}])], ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pbmc68k-genes", help="shipped model name or checkpoint directory")
    parser.add_argument("--seed0", default=None, help="transcoders of seed 0 (default: the shipped set; '' trains)")
    cache = str(Path(tempfile.gettempdir()) / "cellcircuits_circuit_genes")
    parser.add_argument("--cache", default=cache, help="where trained sets and traced circuits are kept")
    parser.add_argument("--n-cells", type=int, default=8, help="cells traced per cell type")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny transcoders, 2 cells of 3 groups: a smoke test")
    parser.add_argument("--train-only", action="store_true", help="train and cache the transcoder sets, then stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    pd.set_option("display.width", 160)

    cache = Path(args.cache) / Path(args.model).name / ("quick" if args.quick else "full")
    cache.mkdir(parents=True, exist_ok=True)
    adata = cc.ds.pbmc68k()
    model = cc.models.load(args.model, device="cpu")
    if args.seed0 is None:
        from cellcircuits.transcoders._io import shipped_transcoders_path

        shipped = shipped_transcoders_path(args.model)
        args.seed0 = str(shipped) if shipped is not None else ""
    seed0 = None if args.quick or not args.seed0 else args.seed0
    n_tokens = QUICK_TOKENS if args.quick else None
    n_cells = QUICK_CELLS if args.quick else args.n_cells
    groups = list(pd.unique(adata.obs[KEY].astype(str)))[:QUICK_GROUPS] if args.quick else None
    tables: dict[int, pd.DataFrame] = {}
    for seed in SEEDS:
        tset, how = transcoder_set(adata, model, seed, cache, seed0, n_tokens)
        print(f"seed {seed}: transcoders {how}", flush=True)
        if args.train_only:
            continue
        circuit = traced(adata.copy(), model, tset, seed, cache, n_cells, groups)
        start = time.perf_counter()
        cc.tl.rank_circuit_genes(circuit, KEY, random_state=seed)
        print(f"  rank_circuit_genes {time.perf_counter() - start:.1f} s", flush=True)
        tables[seed] = cc.get.rank_circuit_genes_df(circuit, KEY)
    if args.train_only:
        return
    cells = pd.DataFrame(circuit.uns["circuits"][KEY]["cells"])
    print(f"\n{len(cells)} traced cells ({n_cells} per group), the same for seeds {list(SEEDS)}")
    for by, name in (("influence", "mean influence"), ("position_adjusted", "position-adjusted influence")):
        print(f"\ntop-{N_TOP} genes by {name}: Jaccard between seeds, overlap with the top-{N_TOP} DE and expressed")
        print(stability(tables, by).to_string(index=False, float_format="%.2f"))


if __name__ == "__main__":
    main()
