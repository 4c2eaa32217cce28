from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest

from cellcircuits.cli import main

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
    with pytest.raises(SystemExit):
        main([])


def test_python_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "cellcircuits", "--help"], capture_output=True, text=True, check=True)
    assert "predict" in out.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(commands) == 2  # exactly two set-up commands
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == commands[1]
    assert "torch==2.13.0" in commands[0] and "torch==2.13.0" in commands[1]  # CPU build, no CUDA download
