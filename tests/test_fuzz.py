"""Property-based checks of the data entry points: any AnnData gives the right sentences or a documented error.

Hypothesis draws AnnData inputs (NaN, inf and negative values, empty cells and genes, duplicate, case-colliding,
integer, Ensembl and unicode names, duplicate obs names, dense/sparse/boolean/float16 X, ``.raw``, layers, views and
backed files) and calls :func:`cellcircuits.pp.cell_sentences`, ``sentences_from_adata`` and
:func:`cellcircuits.tl.predict_cell_types`. Each call must either succeed with results equal to a straightforward
reference computed here from plain numpy arrays, or raise a documented error, and must never change its input.

Every check runs on clean inputs (results are compared) and on faulty ones (errors are checked). The default
suite runs 336 examples (6 dtypes x 2 x 15 + 4 wrappers x 2 x 15 + 3 wrappers x 2 x 6), derandomised so that it
is reproducible and fast; ``CELLCIRCUITS_FUZZ_SCALE=10`` runs ten times as many. ``--hypothesis-show-statistics``
shows how often each outcome (success, or which error) was drawn.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy import sparse

import cellcircuits as cc
from cellcircuits.models import C2SModel, ModelAdapter
from cellcircuits.pp import PromptConfig
from cellcircuits.pp._sentences import name_hashes, sentence_matrix, sentences_from_adata, tiebreak_keys

from .helpers import GENES, LABELS, make_tiny

SCALE = int(os.environ.get("CELLCIRCUITS_FUZZ_SCALE", "1"))


def fuzz(max_examples: int) -> settings:
    """Derandomised, no example database, no deadline (h5ad writes vary in time).

    The model fixture is module-scoped; the conftest's autouse seed fixture is function-scoped, which does not
    matter here (nothing drawn depends on torch's seed), hence the suppressed health check.
    """
    return settings(
        max_examples=max_examples * SCALE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# names: clean symbols, and spellings that collide with them or are not symbols at all
SYMBOLS = [*GENES, "CD8A", "Lyz2", "HLA-A", "MT-CO1", "RPL13"]
UNICODE = ["ß", "SS", "é", "É", "ǆ", "Ǆ", "ﬁ", "FI", "\u00a0CD14", "CD14", "Δ-GENE", "基因1", "\u200bLYZ", "A\u2003B"]
NAME_KINDS = ["clean", "case", "space", "exact", "integer", "default", "ensembl", "unicode", "blank"]
# hypothesis does not draw sampled_from evenly in a long composite, so these axes are parametrised
DTYPES = ["float32", "float64", "int32", "uint8", "bool", "float16"]
WRAPPERS = ["memory", "view", "backed", "backed_view"]

# the documented errors: (type, message) per problem of the input
ERRORS: dict[str, tuple[type[Exception], str]] = {
    "no_genes": (ValueError, r"no genes \(n_vars == 0\)"),
    "empty_name": (ValueError, r"empty name\(s\); every gene needs a gene symbol"),
    "id_like": (ValueError, r"are not gene symbols: \d+ of \d+ look like .*gene_symbols="),
    "whitespace": (ValueError, r"must not contain whitespace"),
    "duplicates": (ValueError, r"gene symbol\(s\) to more than one gene .*(both become|all become|occurs \d+ times)"),
    "missing_symbol": (ValueError, r"missing gene symbol\(s\)"),
    "no_symbol_column": (KeyError, r"gene_symbols='nope' is not a column of var"),
    "no_layer": (KeyError, r"Layer '(nope|counts)' not found"),
    "layer_and_raw": (ValueError, r"either layer or use_raw=True"),
    "no_raw": (ValueError, r"use_raw=True but adata\.raw is None"),
    "non_finite": (ValueError, r"contains NaN or infinite values"),
    "negative": (ValueError, r"contains negative values.*use_raw=True"),
    "n_genes": (ValueError, r"n_genes must be a positive integer"),
    "backed_copy": (ValueError, r"copy=True cannot copy a backed AnnData"),
    "backed_view": (ValueError, r"a view of a backed AnnData, which anndata can neither write to nor copy"),
    "cells_range": (IndexError, r"are outside the \d+ cells of adata"),
    "no_cells": (ValueError, r"adata has no cells"),
}
_ID_LIKE = re.compile(r"[+-]?[0-9]+|ENS[A-Z]{0,6}[GTPE][0-9]{6,}(\.[0-9]+)?(_PAR_Y)?")


@dataclass
class Case:
    """A drawn AnnData and the plain arrays it was built from (the truth the reference reads)."""

    adata: ad.AnnData
    parent: ad.AnnData | None
    wrapper: str
    X: np.ndarray  # float64 values as the tools see them, rows of the (possibly viewed) cells
    raw: np.ndarray | None
    layers: dict[str, np.ndarray]
    var_names: list[str]
    symbols: list[str | None]
    obs_names: list[str]
    files: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for f in self.files:
            if isinstance(f, tempfile.TemporaryDirectory):
                f.cleanup()
            else:
                f.close()


def _names(draw: st.DrawFn, kind: str, n: int) -> list[str]:
    base = draw(st.permutations(SYMBOLS))[:n]
    if kind == "clean":  # case and surrounding whitespace vary, but the symbols stay distinct
        styles = draw(st.lists(st.sampled_from(["as is", "lower", "padded"]), min_size=n, max_size=n))
        return [
            g.lower() if s == "lower" else f" {g}\t" if s == "padded" else g for g, s in zip(base, styles, strict=True)
        ]
    if kind in ("case", "space", "exact") and n >= 2:
        i, j = draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
        base[j] = {"case": base[i].lower(), "space": f" {base[i]}", "exact": base[i]}[kind]
        return base
    if kind == "integer":
        ints = draw(st.lists(st.integers(0, 999), min_size=n, max_size=n, unique=True))
        n_symbols = draw(st.integers(0, n // 2))  # a minority of real symbols: still refused when most are ints
        return [*map(str, ints[: n - n_symbols]), *base[:n_symbols]]
    if kind == "default":
        return [str(i) for i in range(n)]
    if kind == "ensembl":
        prefix = draw(st.sampled_from(["ENSG", "ENSMUSG", "ensg"]))
        ids = draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n, unique=True))
        version = draw(st.sampled_from(["", ".1", ".12"]))
        return [f"{prefix}{i:011d}{version}" for i in ids]
    if kind == "unicode":
        return draw(st.lists(st.sampled_from(UNICODE), min_size=n, max_size=n, unique=True))
    if kind == "blank" and n >= 1:
        base[draw(st.integers(0, n - 1))] = draw(st.sampled_from(["", "  "]))
        return base
    return base


def _matrix(draw: st.DrawFn, n_obs: int, n_vars: int, dtype: str, *, corrupt: bool) -> np.ndarray:
    levels = draw(st.lists(st.integers(0, 3), min_size=n_obs * n_vars, max_size=n_obs * n_vars))
    M = np.asarray(levels, dtype=np.float64).reshape(n_obs, n_vars)
    if dtype in ("float32", "float64", "float16"):
        M = M * 0.5  # many ties, exact in every float type
    if corrupt and M.size:
        bad = draw(st.sampled_from(["nan", "inf", "neg"] if dtype != "uint8" and dtype != "bool" else ["none"]))
        if bad != "none" and (bad == "neg" or dtype.startswith("float")):
            M[draw(st.integers(0, n_obs - 1)), draw(st.integers(0, n_vars - 1))] = {
                "nan": np.nan, "inf": np.inf, "neg": -1.0
            }[bad]  # fmt: skip
    return M.astype(dtype)


def _store(M: np.ndarray, fmt: str, draw: st.DrawFn) -> tuple[Any, np.ndarray]:
    """``M`` as dense or sparse, now and then with an explicitly stored zero, and its values as float64."""
    if fmt == "dense" or M.dtype == np.float16:
        return M, M.astype(np.float64)
    S = sparse.csr_matrix(M) if fmt == "csr" else sparse.csc_matrix(M)
    if S.nnz and draw(st.booleans()):  # an explicitly stored zero is not an expressed gene
        S.data[draw(st.integers(0, S.nnz - 1))] = 0
    return S, S.toarray().astype(np.float64)


@st.composite
def cases(
    draw: st.DrawFn,
    *,
    clean: bool,
    dtype: str | None = None,
    wrapper: str | None = None,
    max_obs: int = 5,
    max_vars: int = 7,
) -> Case:
    """An AnnData of ``dtype`` values, in memory, a view, backed or a view of a backed one (drawn when ``None``).

    ``clean`` draws cells, genes, symbols and values the tools accept, with a ``"counts"`` layer; otherwise every
    kind of fault is drawn too. Hypothesis does not draw ``sampled_from`` evenly in a long composite, so weights
    alone would leave too few clean inputs to check results on.
    """
    dtype = dtype or draw(st.sampled_from(DTYPES))
    if clean:
        n_obs, n_vars, where_bad, kind = draw(st.integers(1, max_obs)), draw(st.integers(1, max_vars)), None, "clean"
    else:
        n_obs = draw(st.integers(0, max_obs))
        n_vars = draw(st.integers(0, max_vars))
        where_bad = draw(st.sampled_from([None, "X", "raw", "layer"]))
        kind = draw(st.sampled_from(NAME_KINDS))
    fmt = draw(st.sampled_from(["dense", "csr", "csc"]))
    X = _matrix(draw, n_obs, n_vars, dtype, corrupt=where_bad == "X")
    var_names = _names(draw, kind, n_vars)
    symbols: list[str | None] = list(draw(st.permutations(SYMBOLS))[:n_vars])
    if n_vars and not clean and draw(st.booleans()):
        symbols[draw(st.integers(0, n_vars - 1))] = None
    var = pd.DataFrame({"symbol": pd.Categorical(symbols)}, index=pd.Index(var_names, dtype=object))
    obs_names = [f"c{i}" for i in range(n_obs)]
    if n_obs >= 2 and draw(st.integers(0, 4)) == 0:
        obs_names[-1] = obs_names[0]
    elif n_obs and draw(st.integers(0, 4)) == 0:
        obs_names = [f"zelle-{i}-ü" for i in range(n_obs)]
    obs = pd.DataFrame({"label": [LABELS[i % 3] for i in range(n_obs)]}, index=pd.Index(obs_names, dtype=object))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about duplicate names, which is part of what is drawn
        stored, X = _store(X, fmt, draw)
        adata = ad.AnnData(stored, obs=obs, var=var)
        adata.uns["note"] = {"drawn": np.arange(3), "by": "hypothesis"}
        adata.obsm["X_pca"] = np.arange(n_obs * 2, dtype=np.float64).reshape(n_obs, 2)
        layers = {}
        if clean or draw(st.booleans()):
            counts = _matrix(draw, n_obs, n_vars, dtype, corrupt=where_bad == "layer")
            adata.layers["counts"], layers["counts"] = _store(counts, draw(st.sampled_from(["dense", "csr"])), draw)
        raw = None
        if draw(st.booleans()):
            raw_values = _matrix(draw, n_obs, n_vars, dtype, corrupt=where_bad == "raw")
            stored, raw = _store(raw_values, draw(st.sampled_from(["dense", "csr"])), draw)
            adata.raw = ad.AnnData(stored, obs=obs, var=var.copy())
        wrapper = wrapper or draw(st.sampled_from(WRAPPERS[:3] if clean else WRAPPERS))
        rows = np.arange(n_obs)
        parent, files = None, []
        if wrapper in ("view", "backed_view"):
            least = 1 if clean else 0
            rows = np.asarray(
                draw(st.lists(st.integers(0, max(n_obs - 1, 0)), unique=True, min_size=least, max_size=n_obs)),
                dtype=np.int64,
            )
            if draw(st.booleans()):
                rows = np.arange(draw(st.integers(least, n_obs)))  # a slice, as adata[:5]
        if wrapper.startswith("backed"):
            tmp = tempfile.TemporaryDirectory()
            path = os.path.join(tmp.name, "fuzz.h5ad")
            adata.write_h5ad(path)
            adata = ad.read_h5ad(path, backed="r")
            files += [adata.file, tmp]
        if wrapper.endswith("view"):
            parent, adata = adata, adata[rows]
    return Case(
        adata=adata,
        parent=parent,
        wrapper=wrapper,
        X=X[rows],
        raw=None if raw is None else raw[rows],
        layers={k: v[rows] for k, v in layers.items()},
        var_names=var_names,
        symbols=symbols,
        obs_names=[obs_names[i] for i in rows],
        files=files,
    )


def params(*, clean: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments of the sentence tools; ``clean`` ones are valid for a clean case."""
    if clean:
        layer, use_raw, symbols, n_genes = [None, "counts"], [None, False], [None, "symbol"], [None, 1, 3]
    else:
        layer, use_raw, symbols, n_genes = (
            [None, "counts", "nope"],
            [None, True, False],
            [None, "symbol", "nope"],
            [None, 1, 3, 0],
        )
    return st.fixed_dictionaries(
        {
            "layer": st.sampled_from(layer),
            "use_raw": st.sampled_from(use_raw),
            "gene_symbols": st.sampled_from(symbols),
            "n_genes": st.sampled_from(n_genes),
            "random_state": st.sampled_from([0, 7]),
        }
    )


# the reference: what the documentation says, computed from the drawn arrays
def name_problems(names: list[str]) -> set[str]:
    """Problems of gene names, by the documented rules (upper-cased and stripped, as sentences write them)."""
    norm = [n.strip().upper() for n in names]
    if not norm:
        return {"no_genes"}
    found = set()
    if "" in norm:
        found.add("empty_name")
    if 2 * sum(_ID_LIKE.fullmatch(n) is not None for n in norm) > len(norm):
        found.add("id_like")
    if any(c.isspace() for n in norm for c in n):
        found.add("whitespace")
    if len(set(norm)) < len(norm):
        found.add("duplicates")
    return found


def expected(case: Case, p: dict, cells: list[int] | None = None) -> tuple[set[str], list[str] | None]:
    """The problems the call must report (one of them), or none and the sentences it must return."""
    layer, use_raw, gene_symbols = p["layer"], p["use_raw"], p["gene_symbols"]
    if p["n_genes"] is not None and p["n_genes"] < 1:
        return {"n_genes"}, None
    if layer is not None and use_raw:
        return {"layer_and_raw"}, None
    use_raw = layer is None and case.raw is not None if use_raw is None else use_raw
    if use_raw and case.raw is None:
        return {"no_raw"}, None
    if layer is not None and layer not in case.layers:
        return {"no_layer"}, None
    values = case.raw if use_raw else case.layers[layer] if layer is not None else case.X
    if gene_symbols == "nope":
        return {"no_symbol_column"}, None
    if gene_symbols == "symbol" and any(s is None for s in case.symbols):
        return {"missing_symbol"}, None
    names = case.var_names if gene_symbols is None else [str(s) for s in case.symbols]
    problems = name_problems(names)
    rows = list(range(values.shape[0])) if cells is None else cells
    if any(not 0 <= i < values.shape[0] for i in rows):
        return problems | {"cells_range"}, None
    picked = values[rows]
    if not np.all(np.isfinite(picked)):
        problems.add("non_finite")
    elif picked.size and picked.min() < 0:
        problems.add("negative")
    if problems:
        return problems, None
    symbols = [n.strip().upper() for n in names]
    sentences = [
        reference_sentence(values[i], symbols, case.obs_names[i], p["n_genes"], p["random_state"]) for i in rows
    ]
    return set(), sentences


def reference_sentence(row: np.ndarray, symbols: list[str], obs_name: str, n_genes: int | None, seed: int) -> str:
    """Expressed genes by descending value; ties by the documented key of (seed, obs name, symbol)."""
    expressed = [j for j in range(len(row)) if row[j] != 0]
    cell = np.full(len(expressed), name_hashes([obs_name])[0], dtype=np.uint64)
    keys = tiebreak_keys(seed, cell, name_hashes([symbols[j] for j in expressed]))
    ranked = sorted(range(len(expressed)), key=lambda k: (-row[expressed[k]], int(keys[k])))
    genes = [symbols[expressed[k]] for k in ranked]
    return " ".join(genes if n_genes is None else genes[:n_genes])


def check_error(err: BaseException, problems: set[str]) -> None:
    """``err`` is the documented error of one of ``problems``."""
    for problem in problems:
        kind, pattern = ERRORS[problem]
        if isinstance(err, kind) and re.search(pattern, str(err), flags=re.DOTALL):
            return
    msg = f"{type(err).__name__}: {err} is not the documented error of any of {sorted(problems)}"
    raise AssertionError(msg) from err


# snapshots: the input must not change
def _dense(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    if hasattr(x, "to_memory"):  # a backed sparse matrix
        x = x.to_memory()
    elif isinstance(x, h5py.Dataset):
        x = x[()]
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    return x.astype(np.float64) if x.dtype.kind in "biuf" else x


def snapshot(a: ad.AnnData) -> dict[str, Any]:
    return {
        "shape": a.shape,
        "is_view": a.is_view,
        "X": _dense(a.X),
        "obs": a.obs.copy(),
        "var": a.var.copy(),
        "uns": {k: _copy_uns(v) for k, v in a.uns.items()},
        "obsm": {k: _dense(v) for k, v in a.obsm.items()},
        "layers": {k: _dense(v) for k, v in a.layers.items()},
        "raw": None if a.raw is None else (_dense(a.raw.X), a.raw.var.copy()),
    }


def _copy_uns(v: Any) -> Any:
    return {k: _copy_uns(x) for k, x in v.items()} if hasattr(v, "items") else np.array(v, copy=True)


def assert_same(now: dict[str, Any], before: dict[str, Any], *, written: str | None = None) -> None:
    """``now`` equals ``before``; ``written`` is the obs column and uns key an in-place call adds."""
    assert now["shape"] == before["shape"]
    for key in ("X", "raw"):
        a, b = now[key], before[key]
        assert (a is None) == (b is None)
        if key == "raw" and a is not None:
            pd.testing.assert_frame_equal(a[1], b[1])
            a, b = a[0], b[0]
        if a is not None:
            np.testing.assert_array_equal(a, b)
    obs = now["obs"].drop(columns=[written]) if written else now["obs"]
    pd.testing.assert_frame_equal(obs, before["obs"])
    pd.testing.assert_frame_equal(now["var"], before["var"])
    uns = {k: v for k, v in now["uns"].items() if k != written}
    _assert_uns_equal(uns, before["uns"])
    for key in ("obsm", "layers"):
        assert set(now[key]) == set(before[key])
        for k in now[key]:
            np.testing.assert_array_equal(now[key][k], before[key][k])


def _assert_uns_equal(a: Any, b: Any) -> None:
    if isinstance(b, dict):
        assert isinstance(a, dict) and set(a) == set(b)
        for k in b:
            _assert_uns_equal(a[k], b[k])
    else:
        np.testing.assert_array_equal(a, b)


def _run(fn, *args, **kwargs) -> tuple[Any, BaseException | None, list[warnings.WarningMessage]]:
    """Call ``fn``, returning its result, the documented kind of error it raised (or None), and its warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn(*args, **kwargs)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            event(f"{fn.__name__}: {type(err).__name__} {str(err)[:40]}")  # shown by --hypothesis-show-statistics
            return None, err, caught
    event(f"{fn.__name__}: success")
    return out, None, caught


def _empty_warning(caught: list[warnings.WarningMessage]) -> bool:
    return any("express no gene and get an empty sentence" in str(w.message) for w in caught)


# the checks
@pytest.mark.parametrize("clean", [True, False], ids=["clean", "faulty"])
@pytest.mark.parametrize("dtype", DTYPES)
@fuzz(15)
@given(data=st.data())
def test_cell_sentences_fuzz(dtype: str, clean: bool, data: st.DataObject):
    p = data.draw(params(clean=clean), label="params")
    case = data.draw(cases(clean=clean, dtype=dtype), label="case")
    try:
        copy = data.draw(st.booleans(), label="copy") and not (clean and case.adata.isbacked)
        a = case.adata
        before, parent_before = snapshot(a), case.parent is not None and snapshot(case.parent)
        problems, want = expected(case, p)
        if a.isbacked and a.is_view:
            problems, want = {"backed_view"}, None
        elif copy and a.isbacked:
            problems, want = {"backed_copy"}, None
        out, err, caught = _run(cc.pp.cell_sentences, a, copy=copy, **p)
        if err is not None:
            assert problems, f"unexpected {type(err).__name__}: {err}"
            check_error(err, problems)
            assert_same(snapshot(a), before)  # a failing call changes nothing, a view stays a view
            assert a.is_view == before["is_view"]
        else:
            assert not problems, f"no error, expected one of {sorted(problems)}"
            result = out if copy else a
            assert (out is None) != copy
            assert result.obs["cell_sentence"].tolist() == want
            assert result.uns["cell_sentence"]["params"]["n_genes"] == (p["n_genes"] or -1)
            assert _empty_warning(caught) == ("" in want)
            if copy:
                assert_same(snapshot(a), before)
                assert a.is_view == before["is_view"]
            else:
                assert_same(snapshot(a), before, written="cell_sentence")
        if case.parent is not None:  # a view's parent never changes
            assert_same(snapshot(case.parent), parent_before)
    finally:
        case.close()


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "faulty"])
@pytest.mark.parametrize("wrapper", WRAPPERS)
@fuzz(15)
@given(data=st.data())
def test_sentences_from_adata_fuzz(wrapper: str, clean: bool, data: st.DataObject):
    p = data.draw(params(clean=clean), label="params")
    case = data.draw(cases(clean=clean, wrapper=wrapper), label="case")
    try:
        a = case.adata
        cells = None
        if a.n_obs and (clean or data.draw(st.booleans())):  # any order, repeats, now and then a row outside
            cells = data.draw(st.lists(st.integers(0, a.n_obs - 1), max_size=6), label="cells")
            if not clean and data.draw(st.booleans()):
                cells.insert(data.draw(st.integers(0, len(cells))), data.draw(st.sampled_from([-1, a.n_obs])))
        before, parent_before = snapshot(a), case.parent is not None and snapshot(case.parent)
        problems, want = expected(case, p, cells)
        got, err, caught = _run(sentences_from_adata, a, cells=cells, **p)
        if err is not None:
            assert problems, f"unexpected {type(err).__name__}: {err}"
            check_error(err, problems)
        else:
            assert not problems, f"no error, expected one of {sorted(problems)}"
            assert got == want
            assert _empty_warning(caught) == ("" in want)
            used = sentence_matrix(a, p["layer"], p["use_raw"])[0]
            if isinstance(used, h5py.Dataset) and cells is not None and cells != sorted(set(cells)):
                event("cells out of order or repeated, read from a backed dense matrix")  # h5py reads increasing rows
        assert_same(snapshot(a), before)  # never writes
        assert a.is_view == before["is_view"]
        if case.parent is not None:
            assert_same(snapshot(case.parent), parent_before)
    finally:
        case.close()


@pytest.fixture(scope="module")
def fuzz_model(tiny_tokenizer) -> C2SModel:
    """The conftest's tiny random GPT-NeoX C2S model, built once for the module (hypothesis reruns the test)."""
    model = make_tiny("gpt_neox", len(tiny_tokenizer), attn="sdpa")
    prompt = PromptConfig(n_genes=8, labels=LABELS, append_eos=True)
    return C2SModel(model=model, tokenizer=tiny_tokenizer, adapter=ModelAdapter(model), prompt=prompt, name="tiny")


_REFERENCE: dict[str, np.ndarray] = {}


def reference_proba(model: C2SModel, sentences: list[str]) -> np.ndarray:
    """Label probabilities of each sentence, from an AnnData that holds nothing but the sentences."""
    new = sorted({s for s in sentences if s not in _REFERENCE})
    if new:
        ref = ad.AnnData(obs=pd.DataFrame({"cell_sentence": new}, index=[f"r{i}" for i in range(len(new))]))
        cc.tl.predict_cell_types(ref, model, progress=False, batch_size=64)
        for s, row in zip(new, ref.obsm["c2s_cell_type_proba"], strict=True):
            _REFERENCE[s] = row
    return np.stack([_REFERENCE[s] for s in sentences]) if sentences else np.zeros((0, len(LABELS)))


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "faulty"])
@pytest.mark.parametrize("wrapper", WRAPPERS[:3])  # tl cannot write to a view of a backed AnnData (not drawn)
@fuzz(6)
@given(data=st.data(), stored=st.booleans())
def test_predict_cell_types_fuzz(wrapper: str, clean: bool, data: st.DataObject, stored: bool, fuzz_model: C2SModel):
    p = data.draw(params(clean=clean), label="params")
    case = data.draw(cases(clean=clean, wrapper=wrapper, max_obs=4), label="case")
    try:
        a = case.adata
        before, parent_before = snapshot(a), case.parent is not None and snapshot(case.parent)
        p = {**p, "n_genes": None} if not stored else p  # predict cuts sentences to the model's n_genes itself
        problems, want = expected(case, p)
        written = None
        if stored:  # cc.pp.cell_sentences first, then predict from the stored sentences
            a, err, _ = _run(cc.pp.cell_sentences, a, copy=not a.isbacked, **p)
            if err is None and a is None:  # written in place to the backed AnnData
                a, written = case.adata, "cell_sentence"
            settings_ = {}
        else:  # predict builds the sentences itself
            err = None
            settings_ = {k: p[k] for k in ("layer", "use_raw", "gene_symbols", "random_state")}
        if err is None:
            if a.n_obs == 0:
                problems, want = problems | {"no_cells"}, None
            copy = not a.isbacked
            out, err, _ = _run(cc.tl.predict_cell_types, a, fuzz_model, progress=False, copy=copy, **settings_)
        if err is not None:
            assert problems, f"unexpected {type(err).__name__}: {err}"
            check_error(err, problems)
            assert_same(snapshot(case.adata), before, written=written)
        else:
            assert not problems, f"no error, expected one of {sorted(problems)}"
            result = out if out is not None else a
            np.testing.assert_allclose(
                result.obsm["c2s_cell_type_proba"], reference_proba(fuzz_model, want), rtol=1e-4, atol=1e-5
            )
            if not case.adata.isbacked:  # both steps returned copies
                assert_same(snapshot(case.adata), before)
        if case.parent is not None:
            assert_same(snapshot(case.parent), parent_before)
    finally:
        case.close()
