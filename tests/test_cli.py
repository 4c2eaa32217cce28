from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from cellcircuits.cli import main

from .helpers import LABELS, tiny_tset

ROOT = Path(__file__).resolve().parents[1]


def test_predict_on_embedded_default(tmp_path, capsys):
    out = tmp_path / "pred.h5ad"
    assert main(["predict", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    accuracy = float(re.search(r"accuracy vs 'bulk_labels' on 142 cells: ([0-9.]+)", printed).group(1))
    back = ad.read_h5ad(out)
    assert back.n_obs == 142
    computed = (back.obs["c2s_cell_type"].astype(str) == back.obs["bulk_labels"].astype(str)).mean()
    assert accuracy == pytest.approx(computed, abs=1e-3)
    assert back.uns["c2s_cell_type"]["accuracy"] == pytest.approx(computed)
    # an existing output is never silently replaced
    assert main(["predict", "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    assert main(["predict", "--adata", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "o.h5ad")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["predict", "--label-key", "nope", "--out", str(tmp_path / "o.h5ad")]) == 2
    assert "'nope' is not a column of .obs" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path), "--out", str(tmp_path / "o.h5ad")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert main(["predict", "--preset", "nope", "--out", str(tmp_path / "o.h5ad"), "--quiet"]) == 1
    assert "No preset 'nope'; presets are ['c2s-pythia-410m-cell-type-prediction'" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()
    with pytest.raises(SystemExit):
        main([])


def test_organism_option_names_the_organism_in_every_prompt(tmp_path, capsys):
    out = tmp_path / "pred.h5ad"
    options = ["--organism", "Mus musculus", "--max-batch-tokens", "2000"]
    assert main(["predict", *options, "--out", str(out), "--quiet"]) == 0
    assert ad.read_h5ad(out).uns["c2s_cell_type"]["params"]["organism"] == "Mus musculus"


def test_python_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "cellcircuits", "--help"], capture_output=True, text=True, check=True)
    assert "predict" in out.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(commands) == 2  # exactly two set-up commands
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    # its steps one a line (so that `set -e` stops at any failing one), then the slow tests
    assert ci[-3:] == [*commands[1].split(" && "), "python -m pytest -m slow"]
    assert "torch==2.13.0" in commands[0] and "torch==2.13.0" in commands[1]  # CPU build, no CUDA download


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory) -> Path:
    """24 cells of two types from the embedded data, as a user's .h5ad."""
    import numpy as np

    import cellcircuits as cc

    adata = cc.ds.pbmc68k()
    keep = np.concatenate([np.flatnonzero(adata.obs["bulk_labels"] == g)[:12] for g in ("CD14+ Monocyte", "CD19+ B")])
    path = tmp_path_factory.mktemp("data") / "small.h5ad"
    adata[keep].copy().write_h5ad(path)
    return path


@pytest.mark.slow
def test_run_writes_every_result(small_h5ad, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--adata", str(small_h5ad), "--groupby", "bulk_labels", "--n-tokens", "20000"]
    assert main([*argv, "--n-cells", "1", "--out", str(out), "--quiet"]) == 0
    assert "circuits of 2 groups" in capsys.readouterr().out
    back = ad.read_h5ad(out / "adata.h5ad")
    nodes = back.uns["circuits"]["bulk_labels"]["nodes"]
    assert set(nodes["group"]) == {"CD14+ Monocyte", "CD19+ B"}
    assert "interpret_features" in back.uns and "validation" in back.uns["circuits"]["bulk_labels"]
    for name in ("CD14_Monocyte", "CD19_B"):
        assert (out / "circuits" / f"{name}.json").stat().st_size > 100
        assert (out / "circuits" / f"{name}.graphml").stat().st_size > 100
        assert (out / "figures" / f"circuit_{name}.png").stat().st_size > 10_000
        assert (out / "figures" / f"genes_{name}.svg").exists()
    import json

    import pandas as pd

    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(
        (back.obs["c2s_cell_type"].astype(str) == back.obs["bulk_labels"].astype(str)).mean()
    )
    validation = pd.read_csv(out / "tables" / "validation.csv")
    assert set(validation["group"]) == {"CD14+ Monocyte", "CD19+ B"}
    assert (out / "transcoders" / "transcoder_set.json").exists()
    # the report's numbers are the .h5ad's
    page = (out / "report.html").read_text()
    data = json.loads(
        re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S).group(1)
    )
    stored = back.uns["circuits"]["bulk_labels"]
    assert page.count("<img ") == 4 and page.count("data:image/svg+xml;base64,") == 4
    for g in ("CD14+ Monocyte", "CD19+ B"):
        row = stored["validation"].set_index("group").loc[g]
        assert data["groups"][g]["validation"]["faithfulness"] == pytest.approx(float(row["faithfulness"]))
        assert f"<td>{float(row['faithfulness']):.3g}</td>" in page
        nodes = stored["nodes"]
        genes = nodes[(nodes["group"] == g) & (nodes["kind"] == "gene")]["gene"].head(10).tolist()
        assert [r["gene"] for r in data["groups"][g]["genes"]] == genes
    features = back.uns["interpret_features"]["features"].set_index(["layer", "feature"])
    shown = data["groups"]["CD14+ Monocyte"]["features"][0]
    layer, feature = (int(x) for x in shown["node"].split("@")[0].lstrip("L").split(".F"))
    assert shown["best_term"] == features.loc[(layer, feature), "best_term"]
    quality = back.uns["transcoder_quality"]
    assert [r["fvu"] for r in data["transcoder_quality"]] == pytest.approx(quality["fvu"].tolist())
    rebuilt = tmp_path / "again.html"
    assert main(["report", "--adata", str(out / "adata.h5ad"), "--out", str(rebuilt)]) == 0
    assert main(["report", "--adata", str(out / "adata.h5ad"), "--key", "nope", "--out", str(tmp_path / "x.html")]) == 2
    assert "no circuit 'nope'" in capsys.readouterr().err
    # the step commands, on the transcoders the run wrote
    trans = tmp_path / "t.h5ad"
    assert main(["transcode", "--adata", str(small_h5ad), "--transcoders", str(out / "transcoders"),
                 "--groupby", "bulk_labels", "--out", str(trans), "--quiet"]) == 0  # fmt: skip
    assert "X_transcoder_L0" in ad.read_h5ad(trans).obsm
    strict = tmp_path / "identifying.h5ad"
    assert main(["transcode", "--adata", str(small_h5ad), "--transcoders", str(out / "transcoders"),
                 "--gene-tokens", "identifying", "--out", str(strict), "--quiet"]) == 0  # fmt: skip
    back = ad.read_h5ad(strict)
    assert back.uns["transcoder"]["params"]["gene_tokens"] == "identifying"
    # the embedded model spells every gene in one token, so both readings give the same maps (the multi-token
    # case is covered in tests/tl/test_transcode.py)
    assert np.array_equal(back.varm["transcoder_L0_in"], ad.read_h5ad(trans).varm["transcoder_L0_in"])
    traced = tmp_path / "trace"
    assert main(["trace", "--adata", str(trans), "--transcoders", str(out / "transcoders"), "--groupby", "bulk_labels",
                 "--groups", "CD19+ B", "--n-cells", "1", "--out", str(traced), "--quiet"]) == 0  # fmt: skip
    assert (traced / "circuits" / "CD19_B.graphml").exists()
    # an existing output directory is never silently replaced
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_sentences_and_step_errors(small_h5ad, tmp_path, capsys):
    out = tmp_path / "s.h5ad"
    assert main(["sentences", "--adata", str(small_h5ad), "--n-genes", "10", "--out", str(out)]) == 0
    sentences = ad.read_h5ad(out).obs["cell_sentence"]
    assert sentences.str.split().map(len).max() == 10
    assert main(["run", "--adata", str(small_h5ad), "--out", str(tmp_path / "r")]) == 2
    assert "--groupby is needed" in capsys.readouterr().err
    assert main(["run", "--adata", str(small_h5ad), "--groupby", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "'nope' is not a column of .obs" in capsys.readouterr().err
    assert main(["run", "--adata", str(tmp_path / "missing.h5ad"), "--groupby", "x", "--out", str(tmp_path / "r")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["transcode", "--adata", str(small_h5ad), "--transcoders", str(tmp_path / "none"),
                 "--out", str(tmp_path / "t.h5ad")]) == 2  # fmt: skip
    assert "no such transcoder directory" in capsys.readouterr().err
    bad = tmp_path / "bad_transcoders"
    bad.mkdir()
    assert (
        main(["transcode", "--adata", str(small_h5ad), "--transcoders", str(bad), "--out", str(tmp_path / "t.h5ad")])
        == 1
    )
    assert "cannot load transcoders" in capsys.readouterr().err
    assert (
        main(["train-transcoders", "--adata", str(small_h5ad), "--model", str(tmp_path), "--out", str(tmp_path / "x")])
        == 1
    )


@pytest.fixture
def tiny_inputs(toy_adata, tiny_c2s, tmp_path) -> tuple[Path, Path, Path]:
    """The toy data as a user's .h5ad, and the tiny model and transcoders for it as directories."""
    data = tmp_path / "toy.h5ad"
    toy_adata[[i for i in range(12) if i != 3]].copy().write_h5ad(data)  # cell 3 expresses nothing
    tiny_c2s.save(tmp_path / "model")
    tiny_tset((1,)).save(tmp_path / "transcoders")  # with layer 1 alone, every group's circuit keeps gene nodes
    return data, tmp_path / "model", tmp_path / "transcoders"


@pytest.mark.filterwarnings("ignore:no transcoder for layer:UserWarning")  # layer 0 is left uncovered on purpose
def test_run_and_step_commands_at_toy_scale(tiny_inputs, tmp_path, capsys):
    """`run` and the step commands end to end on the tiny model, in seconds (the slow test runs them on pbmc68k)."""
    data, model, transcoders = tiny_inputs
    common = ["--model", str(model), "--device", "cpu", "--quiet"]
    out = tmp_path / "run"
    argv = ["run", "--adata", str(data), *common, "--groupby", "label", "--transcoders", str(transcoders)]
    assert main([*argv, "--groups", *LABELS[:2], "--n-cells", "1", "--out", str(out)]) == 0
    assert "circuits of 2 groups" in capsys.readouterr().out
    back = ad.read_h5ad(out / "adata.h5ad")
    stored = back.uns["circuits"]["label"]
    assert set(stored["nodes"]["group"]) == set(LABELS[:2])
    assert "interpret_features" in back.uns and "validation" in stored and "transcoder_quality" in back.uns
    for name in ("CD14_Monocyte", "CD19_B"):
        assert (out / "circuits" / f"{name}.json").stat().st_size > 100
        assert (out / "circuits" / f"{name}.graphml").stat().st_size > 100
        assert (out / "figures" / f"circuit_{name}.png").stat().st_size > 1000
        assert (out / "figures" / f"genes_{name}.svg").exists()
    for table in ("transcoder_quality", "interpretation_summary", "features", "validation"):
        assert (out / "tables" / f"{table}.csv").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["groups_traced"] == LABELS[:2] and summary["n_cells"] == back.n_obs
    assert summary["accuracy"] == pytest.approx((back.obs["c2s_cell_type"] == back.obs["label"]).mean())
    assert (out / "transcoders" / "transcoder_set.json").exists()
    # the report's numbers are the .h5ad's
    page = (out / "report.html").read_text()
    report = json.loads(
        re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S).group(1)
    )
    for g, row in stored["validation"].set_index("group").iterrows():
        assert report["groups"][g]["validation"]["faithfulness"] == pytest.approx(float(row["faithfulness"]))
    rebuilt = tmp_path / "again.html"
    assert main(["report", "--adata", str(out / "adata.h5ad"), "--key", "label", "--out", str(rebuilt)]) == 0
    assert 'id="report-data"' in rebuilt.read_text()
    assert main(["report", "--adata", str(out / "adata.h5ad"), "--key", "nope", "--out", str(tmp_path / "x.html")]) == 2
    assert "no circuit 'nope'" in capsys.readouterr().err
    # the step commands, on the transcoders the run wrote
    trained = ["--transcoders", str(out / "transcoders"), *common]
    trans = tmp_path / "t.h5ad"
    transcode = ["transcode", "--adata", str(data), *trained]
    assert main([*transcode, "--groupby", "label", "--out", str(trans)]) == 0
    back = ad.read_h5ad(trans)
    assert "X_transcoder_L1" in back.obsm and "interpret_features" in back.uns
    strict = tmp_path / "identifying.h5ad"
    assert main([*transcode, "--gene-tokens", "identifying", "--out", str(strict)]) == 0
    assert ad.read_h5ad(strict).uns["transcoder"]["params"]["gene_tokens"] == "identifying"
    traced = tmp_path / "trace"
    trace = ["trace", "--adata", str(trans), *trained, "--groupby", "label", "--groups", "CD19+ B", "--n-cells", "1"]
    assert main([*trace, "--out", str(traced)]) == 0
    assert (traced / "circuits" / "CD19_B.graphml").exists()
    assert list(ad.read_h5ad(traced / "adata.h5ad").uns["circuits"]["circuit"]["params"]["groups"]) == ["CD19+ B"]
    # an existing output directory is never silently replaced
    assert main([*argv, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_train_transcoders_at_toy_scale(tiny_inputs, tmp_path):
    import cellcircuits as cc

    data, model, _ = tiny_inputs
    out = tmp_path / "trained"
    argv = ["train-transcoders", "--adata", str(data), "--model", str(model), "--device", "cpu", "--quiet"]
    assert main([*argv, "--layers", "1", "--n-tokens", "2000", "--out", str(out)]) == 0
    assert cc.load_transcoders(out).layers == [1]
    assert main([*argv, "--out", str(out)]) == 2  # never silently replaced


@pytest.mark.filterwarnings("ignore:no transcoder for layer:UserWarning")
def test_run_uses_the_transcoders_shipped_for_the_model_and_trains_only_when_asked(
    tiny_inputs, tmp_path, capsys, monkeypatch
):
    import torch

    import cellcircuits as cc
    import cellcircuits.transcoders._io as tc_io

    data, model, transcoders = tiny_inputs
    loaded = cc.models.load(str(model), device="cpu")
    # the tiny model as if a set shipped for it
    real = tc_io.shipped_transcoders_path
    monkeypatch.setattr(
        tc_io, "shipped_transcoders_path", lambda name: transcoders if name == loaded.name else real(name)
    )
    common = ["--adata", str(data), "--model", str(model), "--device", "cpu", "--quiet", "--groupby", "label"]
    common += ["--groups", LABELS[0], "--n-cells", "1"]
    assert main(["run", *common, "--out", str(tmp_path / "shipped")]) == 0
    assert "transcoders shipped" in capsys.readouterr().out
    summary = json.loads((tmp_path / "shipped" / "summary.json").read_text())
    assert summary["transcoders"] == "shipped" and "train transcoders" not in summary["seconds"]
    used = cc.load_transcoders(tmp_path / "shipped" / "transcoders")
    given = cc.load_transcoders(transcoders)
    assert used.layers == given.layers == [1]
    assert torch.equal(used[1].W_enc, given[1].W_enc)
    assert main(["run", *common, "--train-transcoders", "--n-tokens", "2000", "--out", str(tmp_path / "trained")]) == 0
    summary = json.loads((tmp_path / "trained" / "summary.json").read_text())
    assert summary["transcoders"] == "trained" and "train transcoders" in summary["seconds"]
    assert cc.load_transcoders(tmp_path / "trained" / "transcoders").layers == [0, 1]
