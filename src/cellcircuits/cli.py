"""Command line: ``cellcircuits run`` for the whole analysis, and one subcommand per step.

Exit status: 0 on success; 2 with a one-line ``error: ...`` naming the argument for a bad argument (a number out of
range, a missing or unreadable file, a column, layer or group not in the data, a label or layer the model does not
have, an output that exists without ``--overwrite`` or cannot be written), checked before any work; 1 when the
model or transcoders cannot be loaded; 130 when interrupted. Outputs are written beside their place and moved in
when complete, so a failed or interrupted run leaves no partial output and an old one as it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ._cli_checks import (
    CliError,
    LoadError,
    Parser,
    check_device,
    check_groups_in_data,
    check_labels,
    check_layers,
    check_obs_column,
    check_sentence_source,
    check_traceable,
    layer_number,
    one_line,
    positive_int,
    read_adata,
)
from ._outputs import Kind, check_out, noticing_interrupts, staged

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["CliError", "LoadError", "build_parser", "main"]


def _out(args: argparse.Namespace, kind: Kind) -> Path:
    """The output path, refused when it exists (unless ``--overwrite``) or cannot be written."""
    out = Path(args.out)
    check_out(out, overwrite=args.overwrite, kind=kind)
    return out


def _read_adata(path: str | None, *, split: str = "all") -> AnnData:
    """The .h5ad at ``path``, or the embedded pbmc68k data (its ``split`` cells, or all)."""
    import cellcircuits as cc

    if path is None:
        adata = cc.ds.pbmc68k()
        return adata if split == "all" else adata[adata.obs["split"] == split].copy()
    return read_adata(path)


def _load_model(args: argparse.Namespace):
    from transformers.utils import logging as hf_logging

    import cellcircuits as cc

    quiet = args.quiet and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        model = cc.models.load(args.model, device=args.device, preset=getattr(args, "preset", None))
    except (OSError, ValueError, KeyError) as err:
        raise LoadError(str(err).strip('"')) from err
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    if getattr(args, "organism", None):
        model.prompt.organism = args.organism  # every tool's prompts name the model's organism
    return model


def _load_transcoders(path: str):
    import cellcircuits as cc
    from cellcircuits.transcoders._io import SHIPPED_TRANSCODERS, shipped_transcoders_path

    if not Path(path).is_dir() and shipped_transcoders_path(path) is None:
        shipped = sorted(SHIPPED_TRANSCODERS)
        msg = f"--transcoders: no such transcoder directory, nor a shipped set ({shipped}): {path}"
        raise CliError(msg)
    try:
        return cc.load_transcoders(path)
    except (OSError, ValueError, KeyError) as err:
        msg = f"cannot load transcoders from {path}: {err}"
        raise LoadError(msg) from err


def _check_pair(tset, model, path: str) -> None:
    """Refuse transcoders made for another model."""
    try:
        tset.check_compatible(n_layers=model.adapter.n_layers, d_model=model.adapter.d_model)
    except ValueError as err:
        msg = f"--transcoders {path} do not fit --model {model.name}: {one_line(err)}"
        raise CliError(msg) from None


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _predict(args: argparse.Namespace) -> int:
    import cellcircuits as cc

    from ._keys import PREDICTION

    out = _out(args, "file")
    check_device(args.device)
    adata = _read_adata(args.adata, split=args.split)
    label_key = args.label_key or ("bulk_labels" if args.adata is None else None)
    check_obs_column(adata, label_key, "--label-key")
    model = _load_model(args)
    _threads(args)
    cc.tl.predict_cell_types(
        adata, model, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, progress=not args.quiet
    )
    if label_key is not None:
        truth = adata.obs[label_key].astype(str)
        accuracy = float((adata.obs[PREDICTION].astype(str) == truth).mean())
        adata.uns[PREDICTION]["accuracy"] = accuracy
        print(f"accuracy vs {label_key!r} on {adata.n_obs} cells: {accuracy:.3f}")
    with staged(out, "file") as temp:
        adata.write_h5ad(temp)
    print(f"wrote {out}")
    return 0


def _sentences(args: argparse.Namespace) -> int:
    import cellcircuits as cc

    out = _out(args, "file")
    adata = _read_adata(args.adata)
    check_sentence_source(adata, args.layer, args.gene_symbols)
    cc.pp.cell_sentences(adata, args.n_genes, layer=args.layer, gene_symbols=args.gene_symbols)
    with staged(out, "file") as temp:
        adata.write_h5ad(temp)
    print(f"wrote {adata.n_obs} cell sentences to {out}")
    return 0


def _train_transcoders(args: argparse.Namespace) -> int:
    from ._pipeline import train_for

    out = _out(args, "dir")
    check_device(args.device)
    adata = _read_adata(args.adata)
    model = _load_model(args)
    check_layers(args.layers, model.adapter.n_layers)
    _threads(args)
    tset = train_for(adata, model, layers=args.layers, n_tokens=args.n_tokens, progress=not args.quiet)
    with staged(out, "dir") as temp:
        tset.save(temp)
    print(f"wrote transcoders for layers {tset.layers} to {out}")
    return 0


def _step_inputs(args: argparse.Namespace, kind: Kind) -> tuple:
    """Output path, data, transcoders and model of a step that reads all three, each checked before any work."""
    out = _out(args, kind)
    check_device(args.device)
    adata = _read_adata(args.adata)
    check_obs_column(adata, args.groupby, "--groupby")
    check_groups_in_data(adata, args.groupby, getattr(args, "groups", None))
    tset = _load_transcoders(args.transcoders)
    model = _load_model(args)
    _check_pair(tset, model, args.transcoders)
    _threads(args)
    return out, adata, tset, model


def _transcode(args: argparse.Namespace) -> int:
    import cellcircuits as cc

    from ._keys import INTERPRET

    out, adata, tset, model = _step_inputs(args, "file")
    check_layers(args.layers, model.adapter.n_layers, tset.layers)
    cc.tl.transcode(adata, model, tset, layers=args.layers, gene_tokens=args.gene_tokens, progress=not args.quiet)
    if args.groupby:
        cc.tl.interpret_features(adata, groupby=args.groupby)
        print(adata.uns[INTERPRET]["summary"].to_string(index=False))
    with staged(out, "file") as temp:
        adata.write_h5ad(temp)
    print(f"wrote {out}")
    return 0


def _trace(args: argparse.Namespace) -> int:
    import cellcircuits as cc

    from ._pipeline import write_circuits

    if args.groupby is None and args.adata is None:
        args.groupby = "bulk_labels"
    if args.groupby is None and args.target is None:
        msg = "--groupby is needed with --adata (the .obs column of cell types), unless --target names one label"
        raise CliError(msg)
    out, adata, tset, model = _step_inputs(args, "dir")
    labels = list(model.prompt.labels or [])
    if args.target is not None:
        check_labels([args.target], labels, "--target")
    else:
        check_traceable(adata, args.groupby, args.groups, labels, some=False)
    nodes = {} if args.max_feature_nodes is None else {"max_feature_nodes": args.max_feature_nodes}
    cc.tl.trace_circuit(
        adata, model, tset, args.target, groupby=args.groupby, groups=args.groups, n_cells=args.n_cells,
        progress=not args.quiet, key_added="circuit", **nodes,
    )  # fmt: skip
    validation = cc.tl.validate_circuit(adata, model, tset, "circuit", progress=not args.quiet)
    print(validation[["group", "faithfulness", "zero_drop", "random_zero_drop", "replacement_score"]].to_string())
    with staged(out, "dir") as temp:
        write_circuits(adata, "circuit", temp / "circuits")
        adata.write_h5ad(temp / "adata.h5ad")
    print(f"wrote {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from ._pipeline import run_pipeline

    out = _out(args, "dir")
    groupby = args.groupby or ("bulk_labels" if args.adata is None else None)
    if groupby is None:
        msg = "--groupby is needed with --adata: the .obs column of cell types to trace circuits for"
        raise CliError(msg)
    check_device(args.device)
    adata = _read_adata(args.adata)
    check_obs_column(adata, groupby, "--groupby")
    check_groups_in_data(adata, groupby, args.groups)
    tset = _load_transcoders(args.transcoders) if args.transcoders else None
    model = _load_model(args)
    if tset is not None:
        _check_pair(tset, model, args.transcoders)
    check_layers(args.layers, model.adapter.n_layers)
    check_traceable(adata, groupby, args.groups, list(model.prompt.labels or []), some=True)
    _threads(args)
    with staged(out, "dir") as temp:
        summary = run_pipeline(
            adata, model, temp, groupby=groupby, layers=args.layers, transcoders=tset,
            train_transcoders=args.train_transcoders, n_tokens=args.n_tokens, n_cells=args.n_cells,
            max_feature_nodes=args.max_feature_nodes,
            groups=args.groups, progress=not args.quiet,
            log=(lambda _msg: None) if args.quiet else print,
        )  # fmt: skip
    print(
        f"accuracy vs {groupby!r}: {summary['accuracy']:.3f}; circuits of {len(summary['groups_traced'])} groups; "
        f"transcoders {summary['transcoders']}"
    )
    print(f"wrote {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from ._keys import circuit_keys
    from ._report import write_report

    out = _out(args, "file")
    adata = read_adata(args.adata)
    circuits = circuit_keys(adata)
    key = args.key or (circuits[0] if len(circuits) == 1 else None)
    if key not in circuits:
        msg = f"--key: no circuit {args.key!r} in {args.adata}; it holds {circuits} (run `cellcircuits trace` first)"
        raise CliError(msg)
    with staged(out, "file") as temp:
        write_report(adata, key, temp)
    print(f"wrote {out}")
    return 0


def _common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    p.add_argument("--adata", help=".h5ad file (default: the embedded pbmc68k data)")
    if model:
        p.add_argument("--model", default="pbmc68k-genes", help="shipped model, local directory or hub id")
        p.add_argument("--preset", help="prompt settings of a public C2S checkpoint (cellcircuits.models.PRESETS)")
        p.add_argument("--organism", help="organism named in the prompts (default: the model's)")
        p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
        p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cellcircuits`` command."""
    parser = Parser(prog="cellcircuits", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict cell types with a C2S model and write an annotated .h5ad")
    p.add_argument("--adata", help=".h5ad file (default: the embedded pbmc68k data)")
    p.add_argument("--model", default="pbmc68k-genes", help="shipped model, local directory or hub id")
    p.add_argument("--preset", help="prompt settings of a public C2S checkpoint (cellcircuits.models.PRESETS)")
    p.add_argument("--organism", help="organism named in the prompts (default: the model's)")
    p.add_argument("--label-key", help="column of .obs with true labels, to report accuracy")
    p.add_argument(
        "--split", default="test", choices=["test", "train", "all"], help="cells of the embedded data to use"
    )
    p.add_argument("--out", default="cellcircuits_predicted.h5ad", help="output .h5ad")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--batch-size", type=positive_int, default=16, help="most cells per batch")
    p.add_argument("--max-batch-tokens", type=positive_int, default=16384, help="token budget of a batch")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_predict)

    p = sub.add_parser("sentences", help="write cell sentences into .obs['cell_sentence']")
    _common(p, model=False)
    p.add_argument("--n-genes", type=positive_int, default=None, help="genes per sentence (default: all expressed)")
    p.add_argument("--layer", help="AnnData layer with expression (default: .raw when present, else .X)")
    p.add_argument("--gene-symbols", help="column of .var with gene symbols")
    p.add_argument("--out", default="cellcircuits_sentences.h5ad", help="output .h5ad")
    p.set_defaults(func=_sentences)

    p = sub.add_parser("train-transcoders", help="train one transcoder per MLP layer and save them")
    _common(p)
    p.add_argument("--layers", type=layer_number, nargs="+", help="model layers (default: all)")
    p.add_argument("--n-tokens", type=positive_int, default=4_000_000, help="training tokens per layer")
    p.add_argument("--out", default="cellcircuits_transcoders", help="output directory")
    p.set_defaults(func=_train_transcoders)

    p = sub.add_parser("transcode", help="put transcoder features (and their interpretation) into the .h5ad")
    _common(p)
    p.add_argument("--transcoders", required=True, help="directory written by train-transcoders")
    p.add_argument("--layers", type=layer_number, nargs="+", help="model layers (default: all with a transcoder)")
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
    p.add_argument("--n-cells", type=positive_int, default=5, help="cells traced per group")
    p.add_argument(
        "--max-feature-nodes", type=positive_int,
        help="features per cell given attribution rows (default: trace_circuit's, 1024; fewer trace faster)",
    )  # fmt: skip
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
    p.add_argument("--layers", type=layer_number, nargs="+", help="model layers given transcoders (default: all)")
    p.add_argument(
        "--transcoders",
        help="transcoders to use: a directory, or a shipped set by model name (default: shipped, else trained)",
    )
    p.add_argument(
        "--train-transcoders", action="store_true",
        help="train transcoders even when a set ships for the model (the embedded default has one)",
    )  # fmt: skip
    p.add_argument("--n-tokens", type=positive_int, default=4_000_000, help="training tokens per layer")
    p.add_argument("--n-cells", type=positive_int, default=2, help="cells traced per group")
    p.add_argument(
        "--max-feature-nodes", type=positive_int,
        help="features per cell given attribution rows (default: trace_circuit's, 1024; fewer trace faster)",
    )  # fmt: skip
    p.add_argument("--out", default="cellcircuits_out", help="output directory")
    p.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; the exit status (argparse exits with 2 itself for an argument it refuses)."""
    args = build_parser().parse_args(argv)
    try:
        with noticing_interrupts() as interrupted:
            status = args.func(args)
        if interrupted.is_set():  # an interrupt some library swallowed
            raise KeyboardInterrupt
    except CliError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except LoadError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; outputs not complete were removed", file=sys.stderr)
        return 130
    return status
