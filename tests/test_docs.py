"""The documentation builds offline without a single warning, with the API reference and the tutorials."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    out = tmp_path / "html"
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", str(ROOT / "docs"), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for tutorial in sorted((ROOT / "tutorials").glob("*.py")):
        title = tutorial.read_text().split("\n# # ", 1)[1].split("\n", 1)[0]  # the notebook's first heading
        page = (out / "tutorials" / f"{tutorial.stem}.html").read_text()
        assert title.replace("&", "&amp;") in page
        assert 'class="cell_input' in page  # rendered as a notebook
    assert "Your own data and a real C2S checkpoint" in (out / "tutorials" / "03_your_own_checkpoint.html").read_text()
    # every public function has its page, with its docstring
    page = (out / "generated" / "cellcircuits.tl.trace_circuit.html").read_text()
    assert "Trace the circuit" in page and "node_threshold" in page
    assert (out / "generated" / "cellcircuits.pl.circuit.html").exists()
