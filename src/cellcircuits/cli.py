"""Command line: ``cellcircuits predict`` (more subcommands arrive with the transcoder and circuit tools)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _predict(args: argparse.Namespace) -> int:
    import anndata as ad
    import torch

    import cellcircuits as cc

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.adata is None:
        adata = cc.ds.pbmc68k()
        label_key = args.label_key or "bulk_labels"
        if args.split != "all":
            adata = adata[adata.obs["split"] == args.split].copy()
    else:
        path = Path(args.adata)
        if not path.is_file():
            print(f"error: no such file: {path}", file=sys.stderr)
            return 2
        adata = ad.read_h5ad(path)
        label_key = args.label_key
    if label_key is not None and label_key not in adata.obs.columns:
        print(f"error: {label_key!r} is not a column of .obs ({list(adata.obs.columns)})", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        model = cc.models.load(args.model, device=args.device)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    cc.tl.predict_cell_types(adata, model, batch_size=args.batch_size, progress=not args.quiet)
    if label_key is not None:
        truth = adata.obs[label_key].astype(str)
        accuracy = float((adata.obs["c2s_cell_type"].astype(str) == truth).mean())
        adata.uns["c2s_cell_type"]["accuracy"] = accuracy
        print(f"accuracy vs {label_key!r} on {adata.n_obs} cells: {accuracy:.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cellcircuits`` command."""
    parser = argparse.ArgumentParser(prog="cellcircuits", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict cell types with a C2S model and write an annotated .h5ad")
    p.add_argument("--adata", help=".h5ad file (default: the embedded pbmc68k data)")
    p.add_argument("--model", default="pbmc68k-tiny", help="shipped model, local directory or hub id")
    p.add_argument("--label-key", help="column of .obs with true labels, to report accuracy")
    p.add_argument(
        "--split", default="test", choices=["test", "train", "all"], help="cells of the embedded data to use"
    )
    p.add_argument("--out", default="cellcircuits_predicted.h5ad", help="output .h5ad")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line."""
    args = build_parser().parse_args(argv)
    return args.func(args)
