"""The suite's own layout: fixtures live in conftest.py files, shared builders in tests/helpers.py."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
            names += [f"{node.module or ''}.{alias.name}" for alias in node.names]  # from . import test_x
    return names


def test_no_module_imports_a_test_module_or_a_conftest():
    offending = []
    for path in sorted(TESTS.rglob("*.py")):
        for name in _imported_modules(ast.parse(path.read_text(), filename=str(path))):
            if any(part == "conftest" or part.startswith("test_") for part in name.split(".")):
                offending.append(f"{path.relative_to(TESTS)}: {name}")
    assert offending == []
