"""API conventions, checked over every public function (after scanpy's test of the same name)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import cellcircuits as cc

NAMESPACES = ["pp", "tl", "pl", "get", "ds", "models", "transcoders", "circuits"]


def public_functions():
    for ns in NAMESPACES:
        mod = getattr(cc, ns)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj):
                yield f"{ns}.{name}", obj


@pytest.mark.parametrize(("name", "func"), list(public_functions()))
def test_docstrings_and_type_hints(name, func):
    doc = inspect.getdoc(func)
    assert doc, f"{name} has no docstring"
    sig = inspect.signature(func)
    params = [p for p in sig.parameters if p not in ("self", "args", "kwargs")]
    if len(params) > 1 and func.__module__.startswith("cellcircuits"):
        assert "Parameters" in doc, f"{name} documents no parameters"
        for p in params:
            assert p in doc, f"{name}: parameter {p!r} undocumented"
    assert sig.return_annotation is not inspect.Signature.empty, f"{name} has no return annotation"


@pytest.mark.parametrize(("name", "func"), [(n, f) for n, f in public_functions() if n.startswith(("pp.", "tl."))])
def test_anndata_signature_conventions(name, func):
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    if params[0].name != "adata":
        pytest.skip(f"{name} does not take adata")
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    # the data, the model and its transcoders, and at most one thing they act on (a circuit's target, its key)
    assert len(positional) <= 4, f"{name}: at most four positional parameters"
    if "AnnData | None" not in str(sig.return_annotation):
        return  # returns a result object (a transcoder set, a table) and writes nothing: no key_added/copy
    by_name = {p.name: p for p in params}
    assert by_name["copy"].kind is inspect.Parameter.KEYWORD_ONLY and by_name["copy"].default is False
    assert "key_added" in by_name, f"{name} lacks key_added"


def test_import_is_light():
    code = "import sys, cellcircuits, cellcircuits.pp, cellcircuits.pl, cellcircuits.get; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_version():
    from importlib.metadata import version

    assert cc.__version__ == version("cellcircuits")


@pytest.mark.parametrize(("name", "func"), list(public_functions()))
def test_layer_is_an_anndata_layer_and_layers_are_model_layers(name, func):
    params = inspect.signature(func).parameters
    if "layer" in params:
        assert str(params["layer"].annotation) == "str | None", f"{name}: layer= names an AnnData layer"
    if "layers" in params:
        assert "int" in str(params["layers"].annotation), f"{name}: layers= are model layers"
