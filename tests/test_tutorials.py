from __future__ import annotations

import ast
import inspect
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

import cellcircuits as cc

from .helpers import public_object

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.py"))


def check_predict_cell_types(namespace: dict, out: str) -> None:
    assert "held-out accuracy" in out
    assert namespace["accuracy"] >= 0.70


def check_features_and_circuits(namespace: dict, out: str) -> None:
    # one summary row per layer of the model, with enriched features to plot
    summary = namespace["summary"]
    n_layers = namespace["model"].adapter.n_layers
    assert summary["layer"].tolist() == list(range(n_layers))
    assert (summary["n_enriched_live"] > 0).any()
    assert (namespace["quality"]["layer"] == "all").any()
    # the CD14+ Monocyte circuit names at least one shipped marker gene among its top genes
    markers = {g for genes in cc.ds.gene_sets("markers_immune").values() for g in genes}
    top_genes = set(namespace["mono_genes"]["gene"])
    assert top_genes & markers, f"no marker among the circuit's top genes {sorted(top_genes)}"
    # a validation row per traced group, with finite faithfulness
    validation = namespace["validation"]
    assert set(validation["group"]) == {"CD14+ Monocyte", "CD19+ B"}
    assert np.isfinite(validation["faithfulness"].to_numpy(dtype=float)).all()
    assert namespace["graph"].number_of_nodes() > 0
    assert "bulk_labels" in namespace["saved"].uns["circuits"]
    assert "faithfulness" in out


CHECKS = {
    "01_predict_cell_types.py": check_predict_cell_types,
    "02_features_and_circuits.py": check_features_and_circuits,
}


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs(path, capsys):
    import matplotlib.pyplot as plt

    threads = torch.get_num_threads()
    try:
        namespace = runpy.run_path(str(path), run_name="__main__")
    finally:
        # scanpy's numba code can change the OpenMP thread count torch uses; later tests keep the one set for them
        torch.set_num_threads(threads)
        plt.close("all")
    CHECKS[path.name](namespace, capsys.readouterr().out)


def test_there_are_tutorials():
    assert TUTORIALS


def test_every_tutorial_is_checked():
    assert {p.name for p in TUTORIALS} == set(CHECKS)


def _dotted(node: ast.expr) -> str | None:
    """``"tl.trace_circuit"`` for the expression ``cc.tl.trace_circuit``, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join(reversed(parts)) if isinstance(node, ast.Name) and node.id == "cc" and parts else None


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_calls_the_api_as_it_is(path):
    """Fast counterpart of running the tutorials: every ``cc.`` name exists and takes the keywords it is given."""
    tree = ast.parse(path.read_text(), filename=str(path))
    used = [node for node in ast.walk(tree) if _dotted(node) is not None]
    assert used
    for node in used:
        public_object(_dotted(node))
    for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call) and _dotted(node.func)):
        params = inspect.signature(public_object(_dotted(call.func))).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        for keyword in call.keywords:
            assert keyword.arg is None or keyword.arg in params, f"{_dotted(call.func)}() takes no {keyword.arg!r}"
