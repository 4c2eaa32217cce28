"""Command line: ``cellcircuits run`` for the whole analysis, and one subcommand per step.

Exit status: 0 on success, 2 for bad arguments (a missing file, a column not in ``.obs``, an output that exists
without ``--overwrite``), 1 when the model or transcoders cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _predict(args: argparse.Namespace) -> int:
    import cellcircuits as cc

    _threads(args)
    adata = _read_adata(args.adata, split=args.split)
    label_key = args.label_key or ("bulk_labels" if args.adata is None else None)
    _check_column(adata, label_key)
    out = Path(args.out)
    _check_out(out, args.overwrite)
    model = _load_model(args)
    from ._keys import PREDICTION

    cc.tl.predict_cell_types(adata, model, batch_size=args.batch_size, progress=not args.quiet)
    if label_key is not None:
        truth = adata.obs[label_key].astype(str)
        accuracy = float((adata.obs[PREDICTION].astype(str) == truth).mean())
        adata.uns[PREDICTION]["accuracy"] = accuracy
        print(f"accuracy vs {label_key!r} on {adata.n_obs} cells: {accuracy:.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    print(f"wrote {out}")
    return 0


class CliError(Exception):
    """A problem with the arguments: printed as ``error: ...`` and exit status 2."""


class LoadError(Exception):
    """A model or transcoders that cannot be loaded: printed as ``error: ...`` and exit status 1."""


def _read_adata(path: str | None, *, split: str = "all"):
    """The .h5ad at ``path``, or the embedded pbmc68k data (its ``split`` cells, or all)."""
    import anndata as ad

    import cellcircuits as cc

    if path is None:
        adata = cc.ds.pbmc68k()
        return adata if split == "all" else adata[adata.obs["split"] == split].copy()
    file = Path(path)
    if not file.is_file():
        msg = f"no such file: {file}"
        raise CliError(msg)
    return ad.read_h5ad(file)


def _check_column(adata, column: str | None) -> None:
    if column is not None and column not in adata.obs.columns:
        msg = f"{column!r} is not a column of .obs ({list(adata.obs.columns)})"
        raise CliError(msg)


def _out_and_data(args: argparse.Namespace) -> tuple:
    """The output path (refused when it exists, unless ``--overwrite``) and the input data."""
    out = Path(args.out)
    _check_out(out, args.overwrite)
    return out, _read_adata(args.adata)


def _check_out(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        msg = f"{path} exists; pass --overwrite to replace it"
        raise CliError(msg)


def _load_model(args: argparse.Namespace):
    import cellcircuits as cc

    try:
        return cc.models.load(args.model, device=args.device)
    except (OSError, ValueError) as err:
        raise LoadError(str(err)) from err


def _load_transcoders(path: str):
    import cellcircuits as cc

    if not Path(path).is_dir():
        msg = f"no such transcoder directory: {path}"
        raise CliError(msg)
    try:
        return cc.load_transcoders(path)
    except (OSError, ValueError, KeyError) as err:
        msg = f"cannot load transcoders from {path}: {err}"
        raise LoadError(msg) from err


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)


def _sentences(args: argparse.Namespace) -> int:
    import cellcircuits as cc

    out, adata = _out_and_data(args)
    cc.pp.cell_sentences(adata, args.n_genes, layer=args.layer, gene_symbols=args.gene_symbols)
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    print(f"wrote {adata.n_obs} cell sentences to {out}")
    return 0


def _train_transcoders(args: argparse.Namespace) -> int:
    from ._pipeline import train_for

    out, adata = _out_and_data(args)
    _threads(args)
    model = _load_model(args)
    tset = train_for(adata, model, layers=args.layers, n_tokens=args.n_tokens, progress=not args.quiet)
    tset.save(out)
    print(f"wrote transcoders for layers {tset.layers} to {out}")
    return 0


def _step_inputs(args: argparse.Namespace) -> tuple:
    """Output path, data, transcoders and model of a step that reads all three, each checked before any work."""
    out, adata = _out_and_data(args)
    _check_column(adata, args.groupby)
    _threads(args)
    tset = _load_transcoders(args.transcoders)
    return out, adata, tset, _load_model(args)


def _transcode(args: argparse.Namespace) -> int:
    import cellcircuits as cc

    from ._keys import INTERPRET

    out, adata, tset, model = _step_inputs(args)
    cc.tl.transcode(adata, model, tset, layers=args.layers, gene_tokens=args.gene_tokens, progress=not args.quiet)
    if args.groupby:
        cc.tl.interpret_features(adata, groupby=args.groupby)
        print(adata.uns[INTERPRET]["summary"].to_string(index=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    print(f"wrote {out}")
    return 0


def _trace(args: argparse.Namespace) -> int:
    import cellcircuits as cc

    from ._pipeline import write_circuits

    out, adata, tset, model = _step_inputs(args)
    cc.tl.trace_circuit(
        adata, model, tset, args.target, groupby=args.groupby, groups=args.groups, n_cells=args.n_cells,
        progress=not args.quiet, key_added="circuit",
    )  # fmt: skip
    validation = cc.tl.validate_circuit(adata, model, tset, "circuit", progress=not args.quiet)
    print(validation[["group", "faithfulness", "zero_drop", "random_zero_drop", "replacement_score"]].to_string())
    write_circuits(adata, "circuit", out / "circuits")
    adata.write_h5ad(out / "adata.h5ad")
    print(f"wrote {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from ._pipeline import run_pipeline

    out, adata = _out_and_data(args)
    groupby = args.groupby or ("bulk_labels" if args.adata is None else None)
    if groupby is None:
        msg = "--groupby is needed with --adata: the .obs column of cell types to trace circuits for"
        raise CliError(msg)
    _check_column(adata, groupby)
    _threads(args)
    tset = _load_transcoders(args.transcoders) if args.transcoders else None
    model = _load_model(args)
    summary = run_pipeline(
        adata, model, out, groupby=groupby, layers=args.layers, transcoders=tset, n_tokens=args.n_tokens,
        n_cells=args.n_cells, groups=args.groups, progress=not args.quiet,
        log=(lambda _msg: None) if args.quiet else print,
    )  # fmt: skip
    print(f"accuracy vs {groupby!r}: {summary['accuracy']:.3f}; circuits of {len(summary['groups_traced'])} groups")
    print(f"wrote {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    import anndata as ad

    from ._keys import circuit_keys
    from ._report import write_report

    out = Path(args.out)
    _check_out(out, args.overwrite)
    if not Path(args.adata).is_file():
        msg = f"no such file: {args.adata}"
        raise CliError(msg)
    adata = ad.read_h5ad(args.adata)
    circuits = circuit_keys(adata)
    key = args.key or (circuits[0] if len(circuits) == 1 else None)
    if key not in circuits:
        msg = f"no circuit {args.key!r} in {args.adata}; it holds {circuits} (run `cellcircuits trace` first)"
        raise CliError(msg)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(adata, key, out)
    print(f"wrote {out}")
    return 0


def _common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    p.add_argument("--adata", help=".h5ad file (default: the embedded pbmc68k data)")
    if model:
        p.add_argument("--model", default="pbmc68k-tiny", help="shipped model, local directory or hub id")
        p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


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

    p = sub.add_parser("sentences", help="write cell sentences into .obs['cell_sentence']")
    _common(p, model=False)
    p.add_argument("--n-genes", type=int, default=None, help="genes kept per sentence (default: all expressed)")
    p.add_argument("--layer", help="AnnData layer with expression (default: .raw when present, else .X)")
    p.add_argument("--gene-symbols", help="column of .var with gene symbols")
    p.add_argument("--out", default="cellcircuits_sentences.h5ad", help="output .h5ad")
    p.set_defaults(func=_sentences)

    p = sub.add_parser("train-transcoders", help="train one transcoder per MLP layer and save them")
    _common(p)
    p.add_argument("--layers", type=int, nargs="+", help="model layers (default: all)")
    p.add_argument("--n-tokens", type=int, default=4_000_000, help="training tokens per layer")
    p.add_argument("--out", default="cellcircuits_transcoders", help="output directory")
    p.set_defaults(func=_train_transcoders)

    p = sub.add_parser("transcode", help="put transcoder features (and their interpretation) into the .h5ad")
    _common(p)
    p.add_argument("--transcoders", required=True, help="directory written by train-transcoders")
    p.add_argument("--layers", type=int, nargs="+", help="model layers (default: every layer with a transcoder)")
    p.add_argument("--groupby", help="column of .obs with cell types; also labels the features automatically")
    p.add_argument(
        "--gene-tokens", choices=["all", "identifying"], default="all",
        help="read every token of a gene, or only those from the first its name does not share (default: all)",
    )  # fmt: skip
    p.add_argument("--out", default="cellcircuits_transcoded.h5ad", help="output .h5ad")
    p.set_defaults(func=_transcode)

    p = sub.add_parser("trace", help="trace and validate cell-type circuits; write JSON and GraphML")
    _common(p)
    p.add_argument("--transcoders", required=True, help="directory written by train-transcoders")
    p.add_argument("--groupby", help="column of .obs with cell types (default: bulk_labels of the embedded data)")
    p.add_argument("--groups", nargs="+", help="groups to trace (default: all)")
    p.add_argument("--target", help="one label traced for every group (default: each group's own name)")
    p.add_argument("--n-cells", type=int, default=5, help="cells traced per group")
    p.add_argument("--out", default="cellcircuits_circuits", help="output directory")
    p.set_defaults(func=_trace)

    p = sub.add_parser("report", help="write a self-contained HTML report of traced circuits")
    p.add_argument("--adata", required=True, help=".h5ad written by `run` or `trace`")
    p.add_argument("--key", help="circuit key in .uns['circuits'] (default: the only one)")
    p.add_argument("--out", default="cellcircuits_report.html", help="output .html")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_report)

    p = sub.add_parser("run", help="the whole analysis: predict, transcoders, features, circuits, validation")
    _common(p)
    p.add_argument("--groupby", help="column of .obs with cell types (default: bulk_labels of the embedded data)")
    p.add_argument("--groups", nargs="+", help="groups to trace (default: every group the model has a label for)")
    p.add_argument("--layers", type=int, nargs="+", help="model layers given transcoders (default: all)")
    p.add_argument("--transcoders", help="use these transcoders instead of training them")
    p.add_argument("--n-tokens", type=int, default=4_000_000, help="training tokens per layer")
    p.add_argument("--n-cells", type=int, default=2, help="cells traced per group")
    p.add_argument("--out", default="cellcircuits_out", help="output directory")
    p.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line."""
    args = build_parser().parse_args(argv)
    if args.command == "trace" and args.groupby is None and args.adata is None:
        args.groupby = "bulk_labels"
    try:
        return args.func(args)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except LoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
