"""The transcoders shipped for the embedded ``pbmc68k-genes`` model: loadable by name, made by their recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from safetensors.torch import load_file

import cellcircuits as cc
from cellcircuits.transcoders._io import SHIPPED_TRANSCODERS, shipped_transcoders_path

ROOT = Path(__file__).resolve().parents[2]
NAME = "pbmc68k-genes"


def _shipped() -> Path:
    path = shipped_transcoders_path(NAME)
    assert path is not None
    return path


def test_shipped_set_loads_by_name_and_fits_its_model():
    assert SHIPPED_TRANSCODERS == {NAME: NAME}
    assert _shipped() == Path(str(resources.files("cellcircuits.transcoders") / "_data" / NAME))
    model = cc.models.load(NAME, device="cpu")
    tset = cc.load_transcoders(NAME)
    assert tset.layers == list(range(model.adapter.n_layers)) and tset.model_name == NAME
    tset.check_model(model)
    # the defaults of cc.tl.train_transcoders
    for _, tc in tset.items():
        cfg = tc.cfg
        assert (cfg.activation, cfg.k, cfg.n_features, cfg.skip) == ("topk", 32, 1024, False)
    recipe = json.loads((_shipped() / "recipe.json").read_text())
    assert recipe["script"] == "scripts/train_shipped_transcoders.py" and recipe["model"] == NAME


def test_shipped_set_replaces_the_mlps_on_held_out_cells():
    """A computed check on a few held-out cells: each transcoder reconstructs its MLP far better than zero."""
    model = cc.models.load(NAME, device="cpu")
    tset = cc.load_transcoders(NAME)
    adata = cc.ds.pbmc68k()
    test = adata[adata.obs["split"] == "test"][:8].copy()
    table = cc.tl.evaluate_transcoders(test, model, tset, label_key="bulk_labels", progress=False)
    recipe = json.loads((_shipped() / "recipe.json").read_text())
    per_layer = table[table["layer"] != "all"]
    assert (per_layer["fvu"] < 0.15).all() and (per_layer["l0"] <= 32).all()
    recorded = {str(row["layer"]): row["fvu"] for row in recipe["evaluation"]}
    # the recorded 142-cell FVUs and these 8 cells' agree in size (same transcoders, fewer cells)
    for row in per_layer.itertuples():
        assert row.fvu < max(5 * recorded[str(row.layer)], 0.01)


@pytest.mark.slow
def test_recipe_reproduces_the_shipped_transcoders(tmp_path):
    out = tmp_path / "tc"
    script = ROOT / "scripts" / "train_shipped_transcoders.py"
    subprocess.run([sys.executable, str(script), "--model", NAME, "--out", str(out)], check=True, timeout=3000)
    shipped = cc.load_transcoders(NAME)
    again = cc.load_transcoders(out)
    assert again.layers == shipped.layers
    for layer in shipped.layers:
        a = load_file(_shipped() / f"layer_{layer}" / "transcoder.safetensors")
        b = load_file(out / f"layer_{layer}" / "transcoder.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            diff = float((a[key] - b[key]).abs().max())
            scale = float(a[key].abs().max())
            assert diff <= 1e-4 * max(scale, 1.0), (layer, key, diff)
