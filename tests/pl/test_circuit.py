from __future__ import annotations

import anndata as ad
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.colors import to_hex

import cellcircuits as cc
from cellcircuits.pl._circuit_layout import _crossings, _layout

from ..helpers import TARGET, make_circuit_adata

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _nodes(ax) -> dict[str, np.ndarray]:
    """Drawn node positions by legend name of their scatter."""
    return {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)}


def _edges(ax) -> LineCollection:
    (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    return lines


def test_circuit_plot(circ, tmp_path):
    fig = cc.pl.circuit(circ, "t", "mono", return_fig=True, save=tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000
    ax = fig.axes[0]
    nodes = _nodes(ax)
    assert set(nodes) == {"marker gene", "gene", "prompt token", "feature", "error", "target"}
    assert sum(len(p) for p in nodes.values()) == 15
    y = {name: p[:, 1] for name, p in nodes.items()}
    lowest, highest = min(v.min() for v in y.values()), max(v.max() for v in y.values())
    assert np.all(y["marker gene"] == lowest) and np.all(y["gene"] == lowest) and np.all(y["prompt token"] == lowest)
    assert y["target"].tolist() == [highest] and np.all(y["feature"] < highest) and np.all(y["feature"] > lowest)
    assert len(nodes["marker gene"]) == 3 and len(nodes["gene"]) == 2  # is_marker: LYZ, CD14, MS4A1
    assert [t.get_text() for t in ax.get_yticklabels()] == ["genes", "layer 0", "layer 1", "layer 2", "target"]
    assert ax.get_title() == f"circuit of {TARGET} in cell_type: mono (5 cells)"

    # edges: the nonzero ones, coloured by sign on a symmetric scale, widths growing with |weight|
    edges = cc.get.circuit_df(circ, "t", "mono", kind="edges")
    nonzero = edges[edges["weight"] != 0]
    lines = _edges(ax)
    weights = np.asarray(lines.get_array())
    np.testing.assert_allclose(np.sort(weights), np.sort(nonzero["weight"]))
    assert lines.norm.vmin == -lines.norm.vmax == pytest.approx(-nonzero["weight"].abs().max())
    colours = lines.get_colors()
    assert np.all(colours[weights > 0, 0] > colours[weights > 0, 2])  # RdBu_r: positive red
    assert np.all(colours[weights < 0, 0] < colours[weights < 0, 2])  # negative blue
    widths = np.asarray(lines.get_linewidths())
    assert np.all(np.diff(widths[np.argsort(np.abs(weights))]) >= 0)
    assert any(a.get_label() == "<colorbar>" and a.get_ylabel() == "attribution" for a in fig.axes)

    texts = {t.get_text() for t in ax.texts}
    assert {"LYZ", "CD14", "“template”", TARGET, "L2 F1", "err L1 @LYZ"} <= texts
    assert "go_bp_2023:\nneutrophil deg…" in texts  # the stored label, shortened and wrapped
    texts = {t.get_text() for t in cc.pl.circuit(circ, "t", "mono", label="feature", show=False).texts}
    assert {"L0 F3", "L2 F7", "LYZ"} <= texts and not any("go_bp" in t for t in texts)
    assert not cc.pl.circuit(circ, "t", "mono", label="none", show=False).texts


def test_circuit_plot_filters(circ):
    table = cc.get.circuit_df(circ, "t", "B")
    ax = cc.pl.circuit(circ, "t", "B", max_nodes=6, label="node", show=False)
    nodes = _nodes(ax)
    assert sum(len(p) for p in nodes.values()) == 6 and len(nodes["target"]) == 1
    assert {t.get_text() for t in ax.texts} == set(table["node"].head(6))  # the target is the most influential
    kept = set(table["node"].head(6))
    edges = cc.get.circuit_df(circ, "t", "B", kind="edges")
    among = edges[edges["source"].isin(kept) & edges["target"].isin(kept) & (edges["weight"] != 0)]
    np.testing.assert_allclose(np.sort(_edges(ax).get_array()), np.sort(among["weight"]))

    ax = cc.pl.circuit(circ, "t", "B", min_frequency=0.6, show=False)
    frequent = table[(table["frequency"] >= 0.6) | (table["kind"] == "target")]
    assert sum(len(p) for p in _nodes(ax).values()) == len(frequent) < 15
    # traced for each group's own label: no target in params, the title names the group's target node
    circ.uns["circuits"]["t"]["params"].update(target="", groupby="")
    assert cc.pl.circuit(circ, "t", "B", show=False).get_title() == f"circuit of {TARGET} in B (5 cells)"
    assert cc.pl.circuit_genes(circ, "t", "B", show=False).get_title() == f"genes driving {TARGET} (B)"
    own = make_circuit_adata((TARGET,))  # the group is its own target
    assert cc.pl.circuit(own, "t", show=False).get_title() == f"circuit of {TARGET} (5 cells)"
    with pytest.raises(ValueError, match="no node"):
        cc.pl.circuit(circ, "t", "B", max_nodes=1)
    with pytest.raises(ValueError, match="no node"):
        cc.pl.circuit(circ, "t", "B", min_frequency=1.5)
    with pytest.raises(ValueError, match="2 groups"):
        cc.pl.circuit(circ, "t")
    with pytest.raises(ValueError, match="label must be"):
        cc.pl.circuit(circ, "t", "B", label="genes")


def test_layout_uncrosses():
    # gene a feeds feature A, gene b feeds feature B; the starting order (by influence) crosses them
    rows = [["a", "b"], ["B", "A"]]
    row_of = {"a": 0, "b": 0, "A": 1, "B": 1}
    edges = [("a", "A", 1.0), ("b", "B", 1.0)]
    x, width = _layout(rows, edges, row_of)
    assert width == 2
    assert (x["a"] < x["b"]) == (x["A"] < x["B"])
    assert _crossings(np.array([[0, 0, 1, 1], [1, 0, 0, 1]], float), np.array([2.0, 3.0])) == 6.0
    assert _crossings(np.array([[0, 0, 0, 1], [1, 0, 1, 1]], float), np.array([2.0, 3.0])) == 0.0


def test_circuit_genes(circ, tmp_path):
    ax = cc.pl.circuit_genes(circ, "t", "mono", n_genes=4, show=False, save=tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 5_000
    genes = cc.get.circuit_df(circ, "t", "mono").query("kind == 'gene'").head(4)
    widths = [bar.get_width() for bar in ax.patches]
    np.testing.assert_allclose(widths, genes["influence"])
    assert [t.get_text() for t in ax.get_yticklabels()] == genes["gene"].tolist()
    colours = [to_hex(bar.get_facecolor()) for bar in ax.patches]
    assert colours == ["#d55e00" if m else "#a6a6a6" for m in genes["is_marker"]]
    assert genes["is_marker"].nunique() == 2  # both kinds among the four, so the legend names both
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["known marker", "other"]
    notes = [t.get_text() for t in ax.texts]
    assert notes == [s.replace(";", ", ") for s in genes["marker_sets"] if s]
    fig = cc.pl.circuit_genes(circ, "t", "B", return_fig=True)
    assert len(fig.axes[0].patches) == 5
    nodes = circ.uns["circuits"]["t"]["nodes"]
    circ.uns["circuits"]["t"]["nodes"] = nodes[nodes["kind"] != "gene"]
    with pytest.raises(ValueError, match="no gene node"):
        cc.pl.circuit_genes(circ, "t", "B")


def test_plots_after_h5ad(circ, tmp_path):
    circ.write_h5ad(tmp_path / "c.h5ad")
    back = ad.read_h5ad(tmp_path / "c.h5ad")
    ax = cc.pl.circuit(back, "t", "B", show=False, save=tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert len(_nodes(ax)["marker gene"]) == 3
    ax = cc.pl.circuit_genes(back, "t", "B", show=False)
    genes = cc.get.circuit_df(circ, "t", "B").query("kind == 'gene'")
    np.testing.assert_allclose([bar.get_width() for bar in ax.patches], genes["influence"])
