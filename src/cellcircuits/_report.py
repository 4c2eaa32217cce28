"""A self-contained HTML report of an analysis, built from what the AnnData holds."""

from __future__ import annotations

import base64
import html
import io
import json
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._keys import INTERPRET, TRANSCODER_QUALITY, circuit_result

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from anndata import AnnData

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .85em; margin: .6em 0 1.2em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; } .figs { display: flex; flex-wrap: wrap; gap: 1em; }
.figs > div { flex: 1 1 40%; } .figs > div.wide { flex: 1 1 100%; }
.note { color: #555; font-size: .9em; }
nav a { margin-right: 1em; }
"""


def _svg(fig) -> bytes:
    """A figure as SVG bytes (the figure is closed): sharp at any zoom, and a fraction of a PNG's size here."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _data_uri(svg: bytes) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg).decode()


def _table(df: pd.DataFrame, digits: int = 3) -> str:
    """An HTML table; floats rounded to ``digits`` significant places, integers kept, text left-aligned."""
    kinds = {c: ("int" if pd.api.types.is_integer_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])
                 else "float" if pd.api.types.is_float_dtype(df[c]) else "text") for c in df}  # fmt: skip
    head = "".join(f'<th class="{"text" if kinds[c] == "text" else ""}">{html.escape(str(c))}</th>' for c in df)
    rows = []
    for values in zip(*(df[c].tolist() for c in df.columns), strict=True):
        cells = []
        for c, v in zip(df.columns, values, strict=True):
            if kinds[c] == "float":
                cells.append(f"<td>{_fmt(float(v), digits)}</td>")
            elif kinds[c] == "int":
                cells.append(f"<td>{v}</td>")
            else:
                cells.append(f'<td class="text">{html.escape(str(v))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if not np.isfinite(value) else f"{value:.{digits}g}"


def report_data(adata: AnnData, key: str, n_genes: int = 10, n_features: int = 8) -> dict:
    """The numbers the report shows, per group and overall, taken from ``adata`` (JSON-ready)."""
    circuit = circuit_result(adata, key)
    nodes, validation = pd.DataFrame(circuit["nodes"]), pd.DataFrame(circuit.get("validation", pd.DataFrame()))
    paths = pd.DataFrame(circuit.get("paths", pd.DataFrame()))
    groups = [str(g) for g in circuit["params"]["groups"]]
    out: dict = {"key": key, "groups": {}, "n_cells": int(adata.n_obs)}
    if INTERPRET in adata.uns:
        summary = pd.DataFrame(adata.uns[INTERPRET]["summary"])
        out["interpretation"] = summary.drop(columns=["enrichment_key"], errors="ignore").to_dict("records")
    if TRANSCODER_QUALITY in adata.uns:
        out["transcoder_quality"] = pd.DataFrame(adata.uns[TRANSCODER_QUALITY]).to_dict("records")
    enrichment = None
    if INTERPRET in adata.uns:
        table = pd.DataFrame(adata.uns[INTERPRET]["features"])
        enrichment = table.set_index(["layer", "feature"])[["best_term", "enrichment_fdr"]]
    for g in groups:
        n = nodes[nodes["group"] == g]
        genes = n[n["kind"] == "gene"].head(n_genes)[["gene", "influence", "attribution", "is_marker", "marker_sets"]]
        feats = n[n["kind"] == "feature"].head(n_features)
        feats = feats[["node", "layer", "feature", "label", "influence", "attribution", "frequency"]].copy()
        if enrichment is not None:
            # the feature's best gene-set term and its FDR, whether or not it made the label
            found = enrichment.reindex(list(zip(feats["layer"], feats["feature"], strict=True)))
            feats["best_term"] = found["best_term"].fillna("").to_numpy()
            feats["enrichment_fdr"] = found["enrichment_fdr"].to_numpy(dtype=float)
        feats = feats.drop(columns=["layer", "feature"])
        entry = {"genes": genes.to_dict("records"), "features": feats.to_dict("records")}
        if len(validation):
            row = validation[validation["group"] == g]
            if len(row):
                entry["validation"] = {k: _plain(v) for k, v in row.iloc[0].items() if k != "group"}
        if len(paths):
            entry["paths"] = paths[paths["group"] == g][["path", "score", "sign"]].to_dict("records")
        out["groups"][g] = entry
    return json.loads(json.dumps(out, default=_plain))


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


VALIDATION_SHOWN = [
    ("faithfulness", "faithfulness (circuit alone vs the whole model; 1 = all of it)"),
    ("zero_drop", "target drop, circuit zero-ablated"),
    ("random_zero_drop", "… as many random features"),
    ("support_drop", "target drop, supporting features zero-ablated"),
    ("random_support_drop", "… as many random features"),
    ("zero_prob_drop", "probability drop, circuit zero-ablated"),
    ("clamp_shift", "shift, strongest feature clamped ×2"),
    ("clamp_shift_predicted", "… as the graph predicts"),
    ("replacement_score", "replacement score"),
    ("completeness_score", "completeness score"),
]


def write_report(
    adata: AnnData,
    key: str,
    path: str | Path,
    *,
    title: str = "cellcircuits report",
    figures: Mapping[str, tuple[bytes, bytes]] | None = None,
) -> None:
    """Write the HTML report of the circuits under ``.uns["circuits"][key]`` (figures embedded, no other files).

    Parameters
    ----------
    adata
        Annotated data matrix with traced (and ideally validated) circuits, interpreted features and
        ``.uns["transcoder_quality"]``.
    key
        The circuits' key.
    path
        Output ``.html`` file.
    title
        Page title.
    figures
        Per group, the SVG bytes of its circuit and gene figures when they are drawn already (as ``cellcircuits run``
        does); the groups not in it are drawn here.
    """
    import matplotlib

    matplotlib.use("Agg")
    from . import pl

    data = report_data(adata, key)
    params = circuit_result(adata, key)["params"]
    parts = [f"<h1>{html.escape(title)}</h1>"]
    meta = {
        "model": params.get("model", ""),
        "cells": adata.n_obs,
        "groups by": params.get("groupby", ""),
        "cells traced per group": params.get("n_cells", ""),
    }
    if "c2s_cell_type" in adata.obs and params.get("groupby") in adata.obs:
        truth = adata.obs[params["groupby"]].astype(str)
        meta["cell-type accuracy"] = _fmt(float((adata.obs["c2s_cell_type"].astype(str) == truth).mean()))
    parts.append(_table(pd.DataFrame([meta]).astype(str)))
    parts.append("<nav>" + "".join(f'<a href="#g{i}">{html.escape(g)}</a>' for i, g in enumerate(data["groups"])))
    parts.append("</nav>")
    if "transcoder_quality" in data:
        parts.append("<h2>Transcoders</h2>")
        parts.append(_table(pd.DataFrame(data["transcoder_quality"])))
    if "interpretation" in data:
        parts.append("<h2>Automatic interpretation of features</h2>")
        parts.append(
            '<p class="note">Fraction of features with a gene-set enrichment at FDR &lt; 0.05, among the 20 most '
            "active and among all live features, per layer.</p>"
        )
        parts.append(_table(pd.DataFrame(data["interpretation"])))
    for i, (g, entry) in enumerate(data["groups"].items()):
        parts.append(f'<h2 id="g{i}">{html.escape(g)}</h2>')
        if figures is not None and g in figures:
            circuit_svg, genes_svg = figures[g]
        else:
            circuit_svg = _svg(pl.circuit(adata, key, group=g, return_fig=True))
            genes_svg = _svg(pl.circuit_genes(adata, key, group=g, return_fig=True))
        name = html.escape(g)
        parts.append(
            f'<div class="figs"><div class="wide"><img alt="circuit of {name}" src="{_data_uri(circuit_svg)}"></div>'
            f'<div><img alt="genes of {name}" src="{_data_uri(genes_svg)}"></div></div>'
        )
        if "validation" in entry:
            v = entry["validation"]
            rows = [{"measure": label, "value": v.get(k)} for k, label in VALIDATION_SHOWN if k in v]
            parts.append("<h3>Validation by intervention</h3>")
            parts.append(_table(pd.DataFrame(rows).astype({"value": float})))
        parts.append("<h3>Genes</h3>")
        genes = pd.DataFrame(entry["genes"])
        if len(genes):
            genes["marker"] = [m.replace(";", ", ") if m else "" for m in genes.pop("marker_sets")]
            genes = genes.drop(columns="is_marker")
        parts.append(_table(genes))
        parts.append("<h3>Features</h3>")
        parts.append(_table(pd.DataFrame(entry["features"])))
        if entry.get("paths"):
            parts.append("<h3>Strongest paths to the target</h3>")
            parts.append(_table(pd.DataFrame(entry["paths"])))
    payload = json.dumps(data).replace("</", "<\\/")  # raw text in <script>: only "</" needs care
    body = "\n".join(parts)
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}"
        f'<script type="application/json" id="report-data">{payload}</script></body></html>'
    )
    from pathlib import Path as _Path

    _Path(path).write_text(page, encoding="utf-8")
