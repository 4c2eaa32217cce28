"""The package type-checks: mypy over ``src/cellcircuits`` with the configuration in ``pyproject.toml``."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_reports_no_errors(monkeypatch):
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install 'cellcircuits[test]')")
    if not (ROOT / "src" / "cellcircuits").is_dir() or not (ROOT / "pyproject.toml").is_file():
        pytest.skip("needs the source checkout (src/cellcircuits and pyproject.toml)")
    monkeypatch.chdir(ROOT)  # the configured `files` are relative to the repository root
    stdout, stderr, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), "--no-error-summary"])
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    assert status == 0 and not errors, f"mypy exited with {status} and {len(errors)} error(s):\n{stdout}{stderr}"


def test_package_ships_py_typed():
    from importlib import resources

    assert resources.files("cellcircuits").joinpath("py.typed").is_file()
