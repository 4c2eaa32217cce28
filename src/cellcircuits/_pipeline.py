"""The whole analysis in one call, as ``cellcircuits run`` does it: cells to circuits, with every result on disk."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ._keys import INTERPRET, PREDICTION, TRANSCODER_QUALITY

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from anndata import AnnData

    from .models._load import C2SModel
    from .transcoders._transcoder_set import TranscoderSet


def safe_name(text: str) -> str:
    """A file name for a group: letters, digits, ``-``, ``_`` and ``.`` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "group"


def write_circuits(adata: AnnData, key: str, directory: Path) -> None:
    """Each group's circuit under ``key`` as ``<group>.json`` (node-link) and ``<group>.graphml`` in ``directory``."""
    from . import get
    from ._keys import circuit_result

    directory.mkdir(parents=True, exist_ok=True)
    for g in circuit_result(adata, key)["params"]["groups"]:
        graph = get.circuit(adata, key, str(g))
        for suffix in (".json", ".graphml"):
            get.write_graph(graph, directory / f"{safe_name(str(g))}{suffix}")


def write_figures(adata: AnnData, key: str, group: str, directory: Path) -> tuple[bytes, bytes]:
    """``group``'s circuit and gene figures as PNG and SVG in ``directory``; the SVG bytes, for the report.

    Each figure is drawn once and saved in both formats, as ``pl.circuit(..., save=...)`` saves it; the PNG with
    zlib's fastest level (the large circuit figures encode in half the time, in files about a fifth larger).
    """
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from . import pl

    svgs = []
    for kind, draw in (("circuit", pl.circuit), ("genes", pl.circuit_genes)):
        fig = cast("Figure", draw(adata, key, group=group, return_fig=True))  # return_fig gives the figure
        stem = f"{kind}_{safe_name(group)}"  # not Path.with_suffix: a group's name may hold a dot
        fig.savefig(directory / f"{stem}.png", bbox_inches="tight", pil_kwargs={"compress_level": 1})
        fig.savefig(directory / f"{stem}.svg", bbox_inches="tight")
        plt.close(fig)
        svgs.append((directory / f"{stem}.svg").read_bytes())
    return svgs[0], svgs[1]


def split_cells(adata: AnnData, name: str) -> AnnData:
    """The cells of ``adata``'s ``name`` split when ``.obs["split"]`` holds some, else all of ``adata``."""
    if "split" in adata.obs.columns:
        mask = (adata.obs["split"].astype(str) == name).to_numpy()
        if mask.any():
            return adata[mask].copy()
    return adata


def train_for(
    adata: AnnData, model: C2SModel, *, layers: Sequence[int] | None, n_tokens: int, progress: bool
) -> TranscoderSet:
    """Transcoders trained on ``adata``'s ``train`` split when it has one, else on all of it."""
    from . import tl

    return tl.train_transcoders(split_cells(adata, "train"), model, layers, n_tokens=n_tokens, progress=progress)


def groups_of(adata: AnnData, groupby: str) -> list[str]:
    """The groups of ``.obs[groupby]`` that have cells, in order of appearance."""
    return [str(g) for g in adata.obs[groupby].dropna().astype(str).unique()]


def choose_groups(
    adata: AnnData, model: C2SModel, groupby: str, groups: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """The groups :func:`run_pipeline` traces and those it skips, checked before any work.

    Of ``groups`` (default: every group of ``.obs[groupby]``), those the model has a label for and ``adata`` has
    cells of are traced. Raises a ValueError when that leaves none.
    """
    labels = set(model.prompt.labels or [])
    present = groups_of(adata, groupby)
    wanted = [str(g) for g in groups] if groups is not None else present
    chosen = [g for g in wanted if g in labels and g in present]
    if not chosen:
        msg = (
            f"no group to trace: none of {wanted} is both a label the model knows and a group of "
            f".obs[{groupby!r}] with cells"
        )
        raise ValueError(msg)
    return chosen, sorted(set(wanted) - set(chosen))


def run_pipeline(
    adata: AnnData,
    model: C2SModel,
    out: Path,
    *,
    groupby: str,
    layers: Sequence[int] | None = None,
    transcoders: TranscoderSet | None = None,
    train_transcoders: bool = False,
    n_tokens: int = 4_000_000,
    n_cells: int = 2,
    max_feature_nodes: int | None = None,
    groups: Sequence[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Predict, train and evaluate transcoders, transcode, interpret, trace and validate; write everything.

    Transcoders: ``transcoders`` when given; else those shipped for the model (the embedded default has a set) unless
    ``train_transcoders``; else trained on the ``train`` split. The groups traced are checked first
    (:func:`choose_groups`), before any work. Writes into ``out``:
    ``transcoders/``, ``circuits/<group>.json`` and ``.graphml``, ``figures/`` (PNG and SVG), ``tables/`` (CSV),
    ``adata.h5ad`` holding every result and ``report.html`` (self-contained). Returns a summary of the run (also
    written as ``summary.json``).
    """
    import matplotlib

    from . import tl

    matplotlib.use("Agg")
    timings: dict[str, float] = {}

    def step(name: str) -> Callable[[], None]:
        start = time.perf_counter()
        log(f"{name} ...")
        return lambda: timings.__setitem__(name, round(time.perf_counter() - start, 1))

    chosen, skipped = choose_groups(adata, model, groupby, groups)
    if skipped:
        log(f"not traced (not labels the model knows, or without cells): {skipped}")
    for sub in ("circuits", "figures", "tables"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    done = step("predict cell types")
    tl.predict_cell_types(adata, model, progress=progress)
    accuracy = float((adata.obs[PREDICTION].astype(str) == adata.obs[groupby].astype(str)).mean())
    done()
    from .transcoders._io import load_transcoders, shipped_transcoders_path

    source = "given"
    shipped = shipped_transcoders_path(model.name) if transcoders is None and not train_transcoders else None
    if shipped is not None:
        log(f"using the transcoders shipped for {model.name} (train new ones with --train-transcoders)")
        transcoders = load_transcoders(shipped)
        transcoders = transcoders.select(layers) if layers is not None else transcoders
        source = "shipped"
    if transcoders is None:
        done = step("train transcoders")
        transcoders = train_for(adata, model, layers=layers, n_tokens=n_tokens, progress=progress)
        source = "trained"
        done()
    transcoders.save(out / "transcoders")
    done = step("evaluate transcoders")
    test = split_cells(adata, "test")
    quality = tl.evaluate_transcoders(test, model, transcoders, label_key=groupby, n_cells=50, progress=progress)
    quality.to_csv(out / "tables" / "transcoder_quality.csv", index=False)
    adata.uns[TRANSCODER_QUALITY] = quality.astype({"layer": str})
    done()
    done = step("transcode")
    tl.transcode(adata, model, transcoders, progress=progress)
    done()
    done = step("interpret features")
    tl.interpret_features(adata, groupby=groupby)
    adata.uns[INTERPRET]["summary"].to_csv(out / "tables" / "interpretation_summary.csv", index=False)
    adata.uns[INTERPRET]["features"].to_csv(out / "tables" / "features.csv", index=False)
    done()
    done = step("trace circuits")
    import torch

    from .circuits._select import DEFAULT_FEATURE_NODES

    # on a CPU, two cells' graphs at a time keep both of a small machine's cores busy
    jobs = 2 if model.device.type == "cpu" and torch.get_num_threads() >= 2 else 1
    tl.trace_circuit(
        adata, model, transcoders, groupby=groupby, groups=chosen, n_cells=n_cells, progress=progress,
        max_feature_nodes=DEFAULT_FEATURE_NODES if max_feature_nodes is None else max_feature_nodes, n_jobs=jobs,
    )  # fmt: skip
    done()
    done = step("validate circuits")
    validation = tl.validate_circuit(adata, model, transcoders, groupby, progress=progress)
    validation.to_csv(out / "tables" / "validation.csv", index=False)
    done()
    done = step("write circuits and figures")
    write_circuits(adata, groupby, out / "circuits")
    figures = {g: write_figures(adata, groupby, g, out / "figures") for g in chosen}
    done()
    adata.write_h5ad(out / "adata.h5ad")
    done = step("write report")
    from ._report import write_report

    write_report(adata, groupby, out / "report.html", figures=figures)
    done()
    summary = {
        "n_cells": int(adata.n_obs),
        "groupby": groupby,
        "accuracy": accuracy,
        "groups_traced": chosen,
        "transcoders": source,
        "seconds": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
