from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cellcircuits as cc
from cellcircuits.circuits._intervene import clean_run
from cellcircuits.circuits._targets import label_target
from cellcircuits.circuits._validate import active_names, cell_edits
from cellcircuits.models import label_token_ids
from cellcircuits.tl._cells import cell_prompts

from ..helpers import LABELS, tiny_tset


@pytest.fixture
def traced(toy_adata, tiny_c2s):
    cells = toy_adata[[i for i in range(12) if i != 3]].copy()
    tset = tiny_tset()
    cc.tl.trace_circuit(cells, tiny_c2s, tset, groupby="label", n_cells=2, max_feature_nodes=8, progress=False)
    return cells, tset


def test_validation_table(traced, tiny_c2s):
    cells, tset = traced
    table = cc.tl.validate_circuit(cells, tiny_c2s, tset, "label", n_random=3, progress=False)
    assert table is cells.uns["circuits"]["label"]["validation"]
    assert list(table["group"]) == list(pd.unique(cells.obs["label"]))
    traced_cells = cells.uns["circuits"]["label"]["cells"]
    for row in table.itertuples():
        mine = traced_cells[traced_cells["group"] == row.group]
        # the unedited replacement model gives the traced target value back
        assert row.target_value == pytest.approx(mine["target_value"].mean(), rel=1e-4, abs=1e-4)
        assert row.n_cells == 2 and row.n_circuit_features > 0
        assert 0 <= row.probability <= 1 and row.random_zero_drop_sd >= 0
        assert np.isfinite([row.zero_drop, row.mean_drop, row.clamp_shift, row.faithfulness]).all()
        nodes = cells.uns["circuits"]["label"]["nodes"]
        feats = nodes[(nodes["group"] == row.group) & (nodes["kind"] == "feature")]
        assert row.clamp_feature == feats.sort_values("influence", ascending=False)["node"].iloc[0]
        assert row.replacement_score == pytest.approx(mine["replacement_score"].mean())


def test_edits_with_known_outcomes(traced, tiny_c2s):
    cells, tset = traced
    ids = label_token_ids(tiny_c2s.tokenizer, tiny_c2s.prompt, LABELS)
    lt = label_target(ids, 1)
    prompt = cell_prompts(cells, tiny_c2s, cells=np.array([0]))[0]
    inputs = list(prompt.input_ids) + lt.prefix
    run = clean_run(tiny_c2s, tset, inputs)
    named = active_names(run.activations, prompt, LABELS[1])
    everything = {n for m in named for n in named[m][2]}
    means = {m: run.activations[m].mean(0) for m in tset.layers}
    rng = np.random.default_rng(0)
    pos = len(inputs) - 1
    # a circuit of every active feature: keeping only it changes nothing
    full = cell_edits(tiny_c2s, tset, run, named, everything, "", means, lt, pos, 2, 2.0, rng)
    assert full["only"] == pytest.approx(full["full"], abs=1e-4)
    # an empty circuit: ablating it changes nothing, and no random feature is drawn to match it
    empty = cell_edits(tiny_c2s, tset, run, named, set(), "", means, lt, pos, 2, 2.0, rng)
    assert empty["zero"] == pytest.approx(empty["full"], abs=1e-5) and empty["n_circuit"] == 0
    np.testing.assert_allclose(empty["random_zero"], 0.0, atol=1e-5)
    assert empty["clamp"] == pytest.approx(0.0, abs=1e-5)


def test_bad_input(traced, tiny_c2s):
    cells, tset = traced
    with pytest.raises(KeyError, match="trace_circuit"):
        cc.tl.validate_circuit(cells, tiny_c2s, tset, "nope")
    with pytest.raises(ValueError, match="n_random"):
        cc.tl.validate_circuit(cells, tiny_c2s, tset, "label", n_random=0)
    with pytest.raises(ValueError, match="min_frequency"):
        cc.tl.validate_circuit(cells, tiny_c2s, tset, "label", min_frequency=1.5)
    with pytest.raises(KeyError, match="not in adata"):
        cc.tl.validate_circuit(cells[:2].copy(), tiny_c2s, tset, "label")
