from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cellcircuits as cc
from cellcircuits.ds._pbmc import stratified_split


def test_pbmc68k_split_is_fixed_and_stratified():
    adata = cc.ds.pbmc68k()
    assert adata.shape == (700, 765)
    split = adata.obs["split"]
    assert list(split.cat.categories) == ["train", "test"]
    assert (split == "test").sum() == 142
    # every class is in both parts, in proportion
    counts = pd.crosstab(adata.obs["bulk_labels"], split)
    assert (counts["test"] >= 1).all() and (counts["train"] >= 1).all()
    frac = counts["test"] / counts.sum(1)
    assert np.all(np.abs(frac - 0.2) <= 0.07)
    assert split.equals(cc.ds.pbmc68k().obs["split"])
    assert not split.equals(cc.ds.pbmc68k(seed=1).obs["split"])
    assert adata.raw is not None and adata.raw.X.min() >= 0  # sentences come from .raw


def test_stratified_split_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(pd.Series(["a", "b"]), test_fraction=1.0)
