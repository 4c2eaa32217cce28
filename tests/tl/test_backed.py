"""Backed AnnData end to end: sentences and predictions read X in chunks of cells, never whole."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pytest
from anndata._core.sparse_dataset import BaseCompressedSparseDataset

import cellcircuits as cc
import cellcircuits.pp._sentences as sentences_module


@pytest.fixture
def spied_reads(monkeypatch):
    """Rows of every read of a backed matrix; a read of the whole matrix (to_memory) fails."""
    reads: list[int] = []
    sparse_get = BaseCompressedSparseDataset.__getitem__
    dense_get = h5py.Dataset.__getitem__

    def sparse_read(self, key):
        out = sparse_get(self, key)
        reads.append(out.shape[0])
        return out

    def dense_read(self, key):
        out = dense_get(self, key)
        if self.ndim == 2:
            reads.append(out.shape[0])
        return out

    def whole(self, *args, **kwargs):
        raise AssertionError("the whole backed matrix was loaded")

    monkeypatch.setattr(BaseCompressedSparseDataset, "__getitem__", sparse_read)
    monkeypatch.setattr(BaseCompressedSparseDataset, "to_memory", whole)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", dense_read)
    monkeypatch.setattr(sentences_module, "_CHUNK", 5)
    return reads


@pytest.mark.parametrize("dense", [False, True])
def test_backed_sentences_and_predictions_equal_in_memory_ones_reading_chunks(
    toy_adata, tiny_c2s, tmp_path, spied_reads, dense
):
    if dense:
        toy_adata.X = toy_adata.X.toarray()
    toy_adata.write_h5ad(tmp_path / "cells.h5ad")
    memory = toy_adata.copy()
    cc.pp.cell_sentences(memory)
    cc.tl.predict_cell_types(memory, tiny_c2s, progress=False)

    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    assert backed.isbacked
    spied_reads.clear()
    # sentences built on the fly from X, in chunks of 5 cells
    cc.tl.predict_cell_types(backed, tiny_c2s, progress=False, key_added="fly")
    cc.pp.cell_sentences(backed)
    assert spied_reads and max(spied_reads) <= 5 and sum(spied_reads) == 2 * backed.n_obs
    cc.tl.predict_cell_types(backed, tiny_c2s, progress=False)

    assert backed.obs["cell_sentence"].tolist() == memory.obs["cell_sentence"].tolist()
    for key in ("c2s_cell_type", "fly"):
        np.testing.assert_allclose(backed.obsm[f"{key}_logprob"], memory.obsm["c2s_cell_type_logprob"], atol=1e-5)
        assert backed.obs[key].tolist() == memory.obs["c2s_cell_type"].tolist()
    with pytest.raises(ValueError, match="copy=True cannot copy a backed AnnData"):
        cc.tl.predict_cell_types(backed, tiny_c2s, progress=False, copy=True)
    backed.file.close()
