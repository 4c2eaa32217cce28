"""benchmarks/scale.py runs on a CPU and prints every row and ratio."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def test_scale_benchmark_prints_its_table(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("scale_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    tracing = ["--trace-nodes", "8", "--trace-genes", "6"]
    module.main(["--tiny", "--cells", "4", "--genes", "12", "--batch-size", "2", *tracing])
    out = capsys.readouterr().out
    rows = {n: v for n, _, v in re.findall(r"^\| (\w[\w ]*?) +\| (\w+) +\| +([\d.]+) \|", out, re.MULTILINE)}
    for name in ("predict_cell_types", "bare forward", "collect_activations"):
        assert name in rows and float(rows[name]) > 0
    for ratio in ("collection / bare forward (float32)", "predict bfloat16 / float32", "predict / bare forward"):
        assert re.search(re.escape(ratio) + r".* [\d.]+x", out)
    assert "4 cells of 12 genes" in out
    traced = re.search(r"^\| +8 \| +6 \| +(\d+) \| +([\d.]+) \|", out, re.MULTILINE)
    assert traced and int(traced.group(1)) > 6 and float(traced.group(2)) > 0
