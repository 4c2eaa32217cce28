from __future__ import annotations

import runpy
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.py"))


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs(path, capsys):
    namespace = runpy.run_path(str(path), run_name="__main__")
    if "accuracy" in namespace:
        assert namespace["accuracy"] >= 0.70
    assert "held-out accuracy" in capsys.readouterr().out


def test_there_are_tutorials():
    assert TUTORIALS
