"""The documentation builds offline without a single warning, with the API reference and the tutorials."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cellcircuits as cc

from .helpers import public_object

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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


def test_api_reference_lists_every_public_function_and_class():
    """Fast counterpart of the build's check that each public function has its page."""
    listed = set(re.findall(r"^   ([\w.]+)$", (ROOT / "docs" / "api.rst").read_text(), re.M))
    public = set()
    for ns in (name for name in cc.__all__ if inspect.ismodule(getattr(cc, name))):
        module = getattr(cc, ns)
        objects = {name: getattr(module, name) for name in module.__all__}
        public |= {f"{ns}.{name}" for name, obj in objects.items() if inspect.isfunction(obj) or inspect.isclass(obj)}
    assert public - listed == set()
    for name in listed:
        public_object(name)  # no entry names something that is not there


def test_every_tutorial_is_in_the_toctree_and_reads_as_a_notebook():
    """Fast counterpart of the build's check that each tutorial is rendered as a notebook under its title."""
    import jupytext

    index = (ROOT / "docs" / "index.rst").read_text()
    tutorials = sorted((ROOT / "tutorials").glob("*.py")) + sorted((ROOT / "tutorials").glob("*.md"))
    assert tutorials
    for tutorial in tutorials:
        assert f"tutorials/{tutorial.stem}\n" in index, f"{tutorial.name} is not in docs/index.rst"
        if tutorial.suffix == ".py":
            notebook = jupytext.reads(tutorial.read_text(), fmt="py:percent")
            first = notebook.cells[0]
            assert first.cell_type == "markdown" and first.source.startswith("# "), tutorial.name
            assert any(cell.cell_type == "code" for cell in notebook.cells)
