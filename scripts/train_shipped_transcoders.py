"""Rebuild the transcoders shipped for an embedded model (the recipe of the set in the package).

Default settings of ``cc.tl.train_transcoders`` (every MLP layer, TopK, 1024 features, k 32, 4M tokens per layer,
seed 0), trained on the ``train`` split of ``cc.ds.pbmc68k()`` with 2 CPU threads. The same torch build, thread
count and training step reproduce the shipped weights; others give the same quality within noise (the training step
has changed the order of its sums since the shipped set was made, so the current code gives other weights of the
same quality).

    python scripts/train_shipped_transcoders.py --model pbmc68k-genes \
        --out src/cellcircuits/transcoders/_data/pbmc68k-genes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cellcircuits as cc

RECIPE = {"seed": 0}
"""Arguments of ``cc.tl.train_transcoders`` beyond its defaults."""


def train(model_name: str, threads: int = 2) -> tuple[cc.TranscoderSet, float]:
    """The recipe's transcoders for the shipped model ``model_name``, and the minutes it took."""
    torch.set_num_threads(threads)
    model = cc.models.load(model_name, device="cpu")
    adata = cc.ds.pbmc68k()
    train_cells = adata[adata.obs["split"] == "train"].copy()
    start = time.perf_counter()
    tset = cc.tl.train_transcoders(train_cells, model, progress=False, **RECIPE)
    return tset, (time.perf_counter() - start) / 60


def evaluation(model_name: str, tset: cc.TranscoderSet) -> list[dict]:
    """``cc.tl.evaluate_transcoders`` on the 142 held-out ``test`` cells, as JSON-ready rows."""
    model = cc.models.load(model_name, device="cpu")
    adata = cc.ds.pbmc68k()
    test = adata[adata.obs["split"] == "test"].copy()
    table = cc.tl.evaluate_transcoders(test, model, tset, label_key="bulk_labels", progress=False)
    table["layer"] = table["layer"].astype(str)
    return json.loads(table.to_json(orient="records"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pbmc68k-genes", help="shipped model the transcoders are for")
    parser.add_argument("--out", required=True, help="directory to write the transcoder set to")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tset, minutes = train(args.model, args.threads)
    tset.save(args.out)
    record = {
        "script": "scripts/train_shipped_transcoders.py",
        "model": args.model,
        "data": "cc.ds.pbmc68k(), split == 'train'",
        "arguments": RECIPE,
        "threads": args.threads,
        "torch": torch.__version__,
        "train_minutes": round(minutes, 1),
        "evaluation": evaluation(args.model, tset),
    }
    (Path(args.out) / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("model", "train_minutes")} | {"layers": tset.layers, "out": args.out}))


if __name__ == "__main__":
    main()
