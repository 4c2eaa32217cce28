"""The embedded data set: scanpy's bundled ``pbmc68k_reduced`` with a fixed train/test split."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..pp._sentences import name_hashes

if TYPE_CHECKING:
    from anndata import AnnData


def stratified_split(
    labels: pd.Series, test_fraction: float = 0.2, seed: int = 0, names: pd.Index | None = None
) -> pd.Categorical:
    """A ``train``/``test`` split stratified by ``labels``, fixed by ``seed`` and the cells' names.

    Within each label, cells are ordered by a hash of ``(seed, name)`` and the first ``round(test_fraction * n)``
    (at least one when the label has two or more cells) go to ``test``. The split depends on no random-number
    generator version, so it is the same on every machine.
    """
    if not 0 < test_fraction < 1:
        msg = f"test_fraction must be in (0, 1), got {test_fraction!r}"
        raise ValueError(msg)
    names = labels.index if names is None else names
    keys = name_hashes([f"{seed}:{n}" for n in names])
    split = np.full(len(labels), "train", dtype=object)
    values = labels.astype(str).to_numpy()
    for label in np.unique(values):
        members = np.flatnonzero(values == label)
        n_test = round(test_fraction * len(members))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        split[members[np.argsort(keys[members], kind="stable")[:n_test]]] = "test"
    return pd.Categorical(split, categories=["train", "test"])


def pbmc68k(*, test_fraction: float = 0.2, seed: int = 0) -> AnnData:
    """Scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs, 765 genes), with a fixed train/test split.

    ``.X`` is scaled; ``.raw`` holds the log-normalised values that cell sentences are built from. The split the
    shipped models (``pbmc68k-genes``, ``pbmc68k-tiny``) were trained with is the default one.

    Parameters
    ----------
    test_fraction
        Share of each ``bulk_labels`` class held out.
    seed
        Seed of the split.

    Returns
    -------
    The data, with ``.obs['split']`` (``'train'``/``'test'``, stratified by ``.obs['bulk_labels']``).
    """
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    adata.obs["split"] = stratified_split(adata.obs["bulk_labels"], test_fraction, seed, adata.obs_names)
    adata.uns["split"] = {"params": {"test_fraction": test_fraction, "seed": seed, "stratify": "bulk_labels"}}
    return adata
