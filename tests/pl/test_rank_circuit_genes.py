from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.colors import to_hex

import cellcircuits as cc

from ..helpers import ranked_circuit_adata, ranked_knockouts

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def ranked_plot_base():
    adata = ranked_circuit_adata((20, 20, 20))
    adata.uns["circuits"]["t"]["gene_validation"] = {"effects": ranked_knockouts(adata)}
    cc.tl.rank_circuit_genes(adata, "t", n_bootstrap=200)
    return adata


@pytest.fixture
def ranked_plot(ranked_plot_base):
    return ranked_plot_base.copy()


def _dots(ax) -> PathCollection:
    (dots,) = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_label() == "mean influence"]
    return dots


def test_one_panel_per_group_with_intervals(ranked_plot, tmp_path):
    fig = cc.pl.rank_circuit_genes(ranked_plot, "t", n_genes=8, return_fig=True, save=tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 20_000
    axes = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in axes] == ["mono (20 cells)", "B (20 cells)", "NK (20 cells)"]
    for ax, group in zip(axes, ["mono", "B", "NK"], strict=True):
        top = cc.get.rank_circuit_genes_df(ranked_plot, "t", group).head(8)
        names = [t.get_text().removesuffix(" *") for t in ax.get_yticklabels()]
        assert names == top["gene"].tolist()
        offsets = np.asarray(_dots(ax).get_offsets())
        np.testing.assert_allclose(offsets[:, 0], top["influence"])
        np.testing.assert_allclose(offsets[:, 1], np.arange(8))
        # the error bars run from the interval's low to high end
        (bars,) = [c for c in ax.collections if isinstance(c, LineCollection)]
        ends = np.array([[seg[0, 0], seg[1, 0]] for seg in bars.get_segments()])
        np.testing.assert_allclose(np.sort(ends, axis=1), top[["influence_lo", "influence_hi"]].to_numpy())
        # the positional expectation as hollow diamonds
        (diamonds,) = [c for c in ax.collections if c.get_label() == "expected from position"]
        np.testing.assert_allclose(np.asarray(diamonds.get_offsets())[:, 0], top["positional"])
        # markers bold and coloured, top-8 DE genes starred
        for tick, (_, row) in zip(ax.get_yticklabels(), top.iterrows(), strict=True):
            assert (tick.get_fontweight() == "bold") == bool(row["is_marker"])
            assert tick.get_text().endswith(" *") == (row["de_rank"] <= 8)
        colours = [to_hex(c) for c in _dots(ax).get_facecolors()]
        assert [c == "#d55e00" for c in colours] == top["is_marker"].tolist()
        assert ax.get_xlabel() == "mean influence on the target"
    assert any(t.get_text().endswith(" *") for a in axes for t in a.get_yticklabels())  # some DE genes shown
    assert any(t.get_fontweight() == "bold" for a in axes for t in a.get_yticklabels())  # and some markers
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == [
        "marker gene (bold)", "other gene", "95% bootstrap interval", "expected from position", "top-8 DE gene"
    ]  # fmt: skip


def test_choices_and_axes(ranked_plot):
    ax = cc.pl.rank_circuit_genes(ranked_plot, "t", "B", n_genes=5, sort_by="position_adjusted", show=False)
    top = cc.get.rank_circuit_genes_df(ranked_plot, "t", "B", sort_by="position_adjusted").head(5)
    assert [t.get_text().removesuffix(" *") for t in ax.get_yticklabels()] == top["gene"].tolist()
    _, given = plt.subplots()
    assert cc.pl.rank_circuit_genes(ranked_plot, "t", ["NK"], ax=given, show=False) is given
    assert len(given.get_yticklabels()) == 15
    axes = cc.pl.rank_circuit_genes(ranked_plot, "t", ["NK", "mono"], n_de=0, show=False)
    assert isinstance(axes, list) and [a.get_title() for a in axes] == ["NK (20 cells)", "mono (20 cells)"]
    assert not any(t.get_text().endswith(" *") for a in axes for t in a.get_yticklabels())
    with pytest.raises(ValueError, match="ax can hold one panel"):
        cc.pl.rank_circuit_genes(ranked_plot, "t", ax=given, show=False)
    with pytest.raises(KeyError, match="not ranked"):
        cc.pl.rank_circuit_genes(ranked_plot, "t", "T", show=False)
    with pytest.raises(ValueError, match="n_genes"):
        cc.pl.rank_circuit_genes(ranked_plot, "t", n_genes=0, show=False)
    with pytest.raises(ValueError, match="sort_by"):
        cc.pl.rank_circuit_genes(ranked_plot, "t", sort_by="gene", show=False)
    del ranked_plot.uns["circuits"]["t"]["gene_ranking"]
    with pytest.raises(KeyError, match="rank_circuit_genes first"):
        cc.pl.rank_circuit_genes(ranked_plot, "t", show=False)
