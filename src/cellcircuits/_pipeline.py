"""The whole analysis in one call, as ``cellcircuits run`` does it: cells to circuits, with every result on disk."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ._keys import INTERPRET, TRANSCODER_QUALITY

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
        for suffix in (".json", ".graphml"):
            get.write_circuit(adata, key, directory / f"{safe_name(str(g))}{suffix}", group=str(g))


def train_for(
    adata: AnnData, model: C2SModel, *, layers: Sequence[int] | None, n_tokens: int, progress: bool
) -> TranscoderSet:
    """Transcoders trained on ``adata``'s ``train`` split when it has one, else on all of it."""
    from . import tl

    train = adata[adata.obs["split"] == "train"].copy() if "split" in adata.obs.columns else adata
    return tl.train_transcoders(train, model, layers, n_tokens=n_tokens, progress=progress)


def run_pipeline(
    adata: AnnData,
    model: C2SModel,
    out: Path,
    *,
    groupby: str,
    layers: Sequence[int] | None = None,
    transcoders: TranscoderSet | None = None,
    n_tokens: int = 4_000_000,
    n_cells: int = 2,
    groups: Sequence[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Predict, train and evaluate transcoders, transcode, interpret, trace and validate; write everything.

    Writes into ``out``: ``transcoders/``, ``circuits/<group>.json`` and ``.graphml``, ``figures/`` (PNG and SVG),
    ``tables/`` (CSV), ``adata.h5ad`` holding every result and ``report.html`` (self-contained). Returns a summary
    of the run (also written as ``summary.json``).
    """
    import matplotlib

    from . import pl, tl

    matplotlib.use("Agg")
    timings: dict[str, float] = {}

    def step(name: str) -> Callable[[], None]:
        start = time.perf_counter()
        log(f"{name} ...")
        return lambda: timings.__setitem__(name, round(time.perf_counter() - start, 1))

    for sub in ("circuits", "figures", "tables"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    done = step("predict cell types")
    tl.predict_cell_types(adata, model, progress=progress)
    accuracy = float((adata.obs["c2s_cell_type"].astype(str) == adata.obs[groupby].astype(str)).mean())
    done()
    if transcoders is None:
        done = step("train transcoders")
        transcoders = train_for(adata, model, layers=layers, n_tokens=n_tokens, progress=progress)
        done()
    transcoders.save(out / "transcoders")
    done = step("evaluate transcoders")
    test = adata[adata.obs["split"] == "test"].copy() if "split" in adata.obs.columns else adata
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
    labels = set(model.prompt.labels or [])
    present = [str(g) for g in adata.obs[groupby].dropna().astype(str).unique()]
    chosen = [g for g in (groups or present) if g in labels]
    skipped = sorted(set(groups or present) - set(chosen))
    if skipped:
        log(f"not traced (not labels the model knows): {skipped}")
    done = step("trace circuits")
    tl.trace_circuit(adata, model, transcoders, groupby=groupby, groups=chosen, n_cells=n_cells, progress=progress)
    done()
    done = step("validate circuits")
    validation = tl.validate_circuit(adata, model, transcoders, groupby, progress=progress)
    validation.to_csv(out / "tables" / "validation.csv", index=False)
    done()
    done = step("write circuits and figures")
    write_circuits(adata, groupby, out / "circuits")
    for g in chosen:
        name = safe_name(g)
        for fmt in ("png", "svg"):
            pl.circuit(adata, groupby, group=g, save=out / "figures" / f"circuit_{name}.{fmt}", show=False)
            pl.circuit_genes(adata, groupby, group=g, save=out / "figures" / f"genes_{name}.{fmt}", show=False)
        import matplotlib.pyplot as plt

        plt.close("all")
    done()
    adata.write_h5ad(out / "adata.h5ad")
    done = step("write report")
    from ._report import write_report

    write_report(adata, groupby, out / "report.html")
    done()
    summary = {
        "n_cells": int(adata.n_obs),
        "groupby": groupby,
        "accuracy": accuracy,
        "groups_traced": chosen,
        "seconds": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
