from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pytest

import cellcircuits as cc

matplotlib.use("Agg")


@pytest.fixture
def enriched() -> ad.AnnData:
    """Input maps of 8 features over 200 genes: features 0-2 read set S0, feature 3 reads S1."""
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(200)]
    in_map = rng.exponential(0.05, size=(200, 8))
    in_map[:15, :3] += 2.0
    in_map[15:30, 3] += 2.0
    adata = ad.AnnData(np.zeros((5, 200)))
    adata.var_names = genes
    adata.varm["transcoder_L1_in"] = in_map
    sets = {f"S{j}": genes[15 * j : 15 * j + 15] for j in range(10)}
    cc.tl.feature_enrichment(adata, sets, layers=1, n_top_genes=15)
    return adata


def test_enrichment_dot_plot(enriched, tmp_path):
    fig = cc.pl.enrichment(enriched, "transcoder_L1_in_enrichment", return_fig=True, save=tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 10_000
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["S0", "S1"]
    # columns: features 0-2 (S0) and 3 (S1), labelled with their top genes
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert [lab.split(":")[0] for lab in labels] == ["L1 F0", "L1 F1", "L1 F2", "L1 F3"]
    offsets = ax.collections[0].get_offsets()
    assert len(offsets) == 4  # one significant dot per feature
    best = enriched.uns["transcoder_L1_in_enrichment"]["best"].set_index("feature")
    colours = ax.collections[0].get_array()
    np.testing.assert_allclose(np.sort(colours), np.sort(-np.log10(best.loc[[0, 1, 2, 3], "fdr"].to_numpy())))


def test_enrichment_choices_and_errors(enriched):
    ax = cc.pl.enrichment(enriched, "transcoder_L1_in_enrichment", features=[3], show=False)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["S1"]
    with pytest.raises(ValueError, match="no term has FDR"):
        cc.pl.enrichment(enriched, "transcoder_L1_in_enrichment", features=[5, 6])
    with pytest.raises(KeyError, match="feature_enrichment"):
        cc.pl.enrichment(enriched, "nope")
