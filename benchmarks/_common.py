"""What several benchmark scripts share."""

from __future__ import annotations

import tempfile

import cellcircuits as cc


def transcoders(adata, model, path: str | None, **train_kwargs):
    """Transcoders loaded from ``path``, or trained on the ``train`` cells (default settings unless given)."""
    if path:
        return cc.load_transcoders(path)
    train = adata[adata.obs["split"] == "train"].copy()
    with tempfile.TemporaryDirectory() as tmp:
        store = cc.tl.collect_activations(train, model, tmp, progress=False)
        return cc.tl.train_transcoders(train, model, store=store, progress=False, **train_kwargs)
