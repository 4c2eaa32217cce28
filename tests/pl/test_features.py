from __future__ import annotations

import anndata as ad
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import cellcircuits as cc

matplotlib.use("Agg")


@pytest.fixture
def featured() -> ad.AnnData:
    rng = np.random.default_rng(0)
    groups = np.repeat(["a", "b", "c"], 20)
    F = rng.exponential(0.2, size=(60, 20)) * (rng.random((60, 20)) < 0.5)
    F[:, 7] = 0.0
    F[groups == "b", 7] = rng.uniform(1, 2, 20)
    adata = ad.AnnData(np.zeros((60, 30)), obs=pd.DataFrame({"type": groups}, index=[f"c{i}" for i in range(60)]))
    adata.var_names = [f"G{i}" for i in range(30)]
    adata.obsm["X_transcoder_L2"] = sparse.csr_matrix(F)
    adata.obsm["X_umap"] = rng.normal(size=(60, 2))
    adata.varm["transcoder_L2_in"] = rng.random((30, 20))
    adata.varm["transcoder_L2_out"] = rng.normal(size=(30, 20))
    return adata


def test_feature_embedding(featured, tmp_path):
    fig = cc.pl.feature_embedding(featured, [7, 3], layers=2, return_fig=True, save=tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 10_000
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>"][:2]
    colours = axes[0].collections[0].get_array()
    values = featured.obsm["X_transcoder_L2"][:, 7].toarray().ravel()
    np.testing.assert_allclose(np.sort(colours), np.sort(values))
    assert np.all(np.diff(colours) >= 0)  # most active cells drawn last, on top
    top = featured.var_names[np.argsort(-featured.varm["transcoder_L2_in"][:, 7])[:3]]
    assert axes[0].get_title() == "L2 F7: " + ", ".join(top)
    ax = cc.pl.feature_embedding(featured, 7, layers=2, show=False)
    assert ax.get_title().startswith("L2 F7")
    with pytest.raises(KeyError, match="X_tsne"):
        cc.pl.feature_embedding(featured, 7, layers=2, basis="tsne")
    with pytest.raises(IndexError, match="out of range"):
        cc.pl.feature_embedding(featured, 99, layers=2)
    with pytest.raises(ValueError, match="one panel"):
        cc.pl.feature_embedding(featured, [1, 2], layers=2, ax=ax)


@pytest.mark.parametrize("kind", ["dotplot", "heatmap"])
def test_rank_features_groups_plot(featured, tmp_path, kind):
    cc.tl.rank_features_groups(featured, "type", layers=2, method="auroc")
    ax = cc.pl.rank_features_groups(featured, n_features=1, kind=kind, show=False, save=tmp_path / "r.pdf")
    assert (tmp_path / "r.pdf").stat().st_size > 1000
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[1].startswith("L2 F7")  # group b's top feature, in group order
    X = featured.obsm["X_transcoder_L2"].toarray()
    b = (featured.obs["type"] == "b").to_numpy()
    if kind == "dotplot":
        dots = ax.collections[0]
        colours = np.asarray(dots.get_array()).reshape(len(labels), 3)
        means = np.array([X[(featured.obs["type"] == g).to_numpy(), 7].mean() for g in "abc"])
        np.testing.assert_allclose(colours[1], means / means.max())
        sizes = np.asarray(dots.get_sizes()).reshape(len(labels), 3)
        assert sizes[1, 1] == pytest.approx((X[b, 7] > 0).mean() * 220 + 2)
    with pytest.raises(KeyError, match="were not ranked"):
        cc.pl.rank_features_groups(featured, groups=["zz"])
    with pytest.raises(KeyError, match="No ranking"):
        cc.pl.rank_features_groups(featured, key="none")


def test_feature_genes(featured, tmp_path):
    axes = cc.pl.feature_genes(featured, 7, layers=2, n_genes=4, show=False, save=tmp_path / "g.svg")
    assert (tmp_path / "g.svg").read_text().startswith("<?xml")
    for axis, side in zip(axes, ("in", "out"), strict=True):
        column = featured.varm[f"transcoder_L2_{side}"][:, 7]
        heights = [bar.get_width() for bar in axis.patches]
        np.testing.assert_allclose(heights, np.sort(column)[::-1][:4])
        assert [t.get_text() for t in axis.get_yticklabels()] == list(featured.var_names[np.argsort(-column)[:4]])
    with pytest.raises(KeyError, match="transcoder_L5_in"):
        cc.pl.feature_genes(featured, 7, layers=5)


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba()).copy()
    plt.close(fig)
    return pixels


def test_feature_embedding_layer_is_the_old_name_of_layers(featured):
    new = cc.pl.feature_embedding(featured, [7, 3], layers=2, return_fig=True)
    with pytest.warns(FutureWarning, match="layers="):
        old = cc.pl.feature_embedding(featured, [7, 3], layer=2, return_fig=True)
    assert [a.get_title() for a in old.axes] == [a.get_title() for a in new.axes]
    np.testing.assert_array_equal(_pixels(old), _pixels(new))


def test_feature_genes_layer_is_the_old_name_of_layers(featured):
    new = cc.pl.feature_genes(featured, 7, layers=2, return_fig=True)
    with pytest.warns(FutureWarning, match="layers="):
        old = cc.pl.feature_genes(featured, 7, layer=2, return_fig=True)
    assert old.get_suptitle() == new.get_suptitle() == "layer 2, feature 7"
    np.testing.assert_array_equal(_pixels(old), _pixels(new))
