from __future__ import annotations

import gzip
import subprocess
import sys

import pytest

import cellcircuits as cc
from cellcircuits.ds import gene_sets, list_gene_sets, read_gmt

SHIPPED = ["markers_immune", "markers_heart"]
IMMUNE_TYPES = [
    "CD14+ Monocyte",
    "CD16+ Monocyte",
    "Conventional Dendritic Cell",
    "Plasmacytoid Dendritic Cell",
    "B Cell",
    "Plasma Cell",
    "Naive CD4 T Cell",
    "Memory CD4 T Cell",
    "Regulatory T Cell",
    "CD8 T Cell",
    "NK Cell",
    "Megakaryocyte/Platelet",
    "Erythrocyte",
    "Hematopoietic Progenitor (CD34+)",
]
HEART_TYPES = [
    "Atrial Cardiomyocyte",
    "Ventricular Cardiomyocyte",
    "Fibroblast",
    "Endothelial Cell",
    "Pericyte",
    "Smooth Muscle Cell",
    "Macrophage",
    "Mast Cell",
    "Lymphoid Cell",
    "Adipocyte",
    "Neuronal Cell",
    "Mesothelial Cell",
]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_collections_are_clean(name):
    sets = gene_sets(name)
    assert len(sets) > 0
    for set_name, genes in sets.items():
        assert set_name and set_name == set_name.strip()
        assert 8 <= len(genes) <= 25, set_name
        assert len(genes) == len(set(genes)), set_name
        for g in genes:
            assert g == g.upper() and g == g.strip() and not any(c.isspace() for c in g), (set_name, g)


def test_marker_collections_cover_the_cell_types():
    assert list(gene_sets("markers_immune")) == IMMUNE_TYPES
    assert list(gene_sets("markers_heart")) == HEART_TYPES


def test_known_memberships():
    immune = gene_sets("markers_immune")
    assert {"CD14", "LYZ", "S100A8", "S100A9", "FCN1", "VCAN"} <= set(immune["CD14+ Monocyte"])
    assert {"FCGR3A", "MS4A7", "LST1", "CDKN1C"} <= set(immune["CD16+ Monocyte"])
    assert {"FCER1A", "CD1C", "CLEC10A", "CLEC9A"} <= set(immune["Conventional Dendritic Cell"])
    assert {"LILRA4", "CLEC4C", "IL3RA"} <= set(immune["Plasmacytoid Dendritic Cell"])
    assert {"MS4A1", "CD79A", "CD79B", "CD19", "BANK1"} <= set(immune["B Cell"])
    assert {"MZB1", "JCHAIN", "TNFRSF17"} <= set(immune["Plasma Cell"])
    assert {"CCR7", "LEF1", "TCF7", "CD4"} <= set(immune["Naive CD4 T Cell"])
    assert {"IL7R", "S100A4", "CD4"} <= set(immune["Memory CD4 T Cell"])
    assert {"FOXP3", "IL2RA", "CTLA4"} <= set(immune["Regulatory T Cell"])
    assert {"CD8A", "CD8B", "GZMK"} <= set(immune["CD8 T Cell"])
    assert {"NKG7", "GNLY", "KLRD1", "KLRF1", "NCAM1", "PRF1"} <= set(immune["NK Cell"])
    assert {"PPBP", "PF4", "GP9", "ITGA2B"} <= set(immune["Megakaryocyte/Platelet"])
    assert {"HBB", "HBA1"} <= set(immune["Erythrocyte"])
    assert "CD34" in immune["Hematopoietic Progenitor (CD34+)"]
    assert immune["CD14+ Monocyte"][:3] == ["CD14", "LYZ", "S100A8"]  # file order kept

    heart = gene_sets("markers_heart")
    assert {"NPPA", "MYL7", "MYL4"} <= set(heart["Atrial Cardiomyocyte"])
    assert {"MYL2", "MYH7"} <= set(heart["Ventricular Cardiomyocyte"])
    assert {"DCN", "GSN", "PDGFRA"} <= set(heart["Fibroblast"])
    assert {"PECAM1", "VWF", "CDH5"} <= set(heart["Endothelial Cell"])
    assert {"RGS5", "ABCC9", "KCNJ8"} <= set(heart["Pericyte"])
    assert {"MYH11", "ACTA2"} <= set(heart["Smooth Muscle Cell"])
    assert {"CD163", "CD68"} <= set(heart["Macrophage"])
    assert {"ADIPOQ", "PLIN1"} <= set(heart["Adipocyte"])
    assert {"PLP1", "NRXN1"} <= set(heart["Neuronal Cell"])
    assert {"MSLN", "WT1", "BNC1"} <= set(heart["Mesothelial Cell"])


@pytest.mark.parametrize("name", SHIPPED)
def test_every_marker_set_cites_its_source(name):
    descriptions = gene_sets(name, format="dataframe").attrs["descriptions"]
    assert set(descriptions) == set(gene_sets(name))
    for set_name, text in descriptions.items():
        assert "doi:10." in text, set_name
    if name == "markers_heart":
        assert all("10.1038/s41586-020-2797-4" in t for t in descriptions.values())
    else:
        assert "10.1016/j.cell.2021.04.048" in descriptions["CD14+ Monocyte"]


def test_immune_markers_overlap_pbmc68k():
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    genes = set(adata.raw.var_names.str.upper())
    found = {k: len(set(v) & genes) for k, v in gene_sets("markers_immune").items()}
    # 12 of the 14 sets have >= 3 of their genes among pbmc68k_reduced's 765 genes; platelet and erythrocyte
    # markers are absent from that gene selection.
    assert sum(n >= 3 for n in found.values()) >= 12
    assert found["CD14+ Monocyte"] >= 8 and found["NK Cell"] >= 8 and found["CD8 T Cell"] >= 8
    assert found["B Cell"] >= 5


@pytest.mark.parametrize("name", SHIPPED)
def test_dataframe_matches_dict(name):
    sets = gene_sets(name)
    df = gene_sets(name, format="dataframe")
    assert list(df.columns) == ["source", "target", "weight"]
    assert (df["weight"] == 1.0).all()
    assert len(df) == sum(len(v) for v in sets.values())
    assert {k: list(g["target"]) for k, g in df.groupby("source", sort=False)} == sets
    assert df.attrs["collection"] == name


def test_list_gene_sets():
    table = list_gene_sets()
    assert list(table.columns) == ["name", "n_sets", "n_genes", "source", "license"]
    assert table["name"].tolist()[: len(SHIPPED)] == SHIPPED
    assert set(table["name"]) <= {*SHIPPED, "go_bp_2023", "wikipathways_2023_human"}
    immune = table.set_index("name").loc["markers_immune"]
    assert immune["n_sets"] == 14
    assert immune["n_genes"] == len({g for v in gene_sets("markers_immune").values() for g in v})
    assert table["license"].str.len().gt(0).all()


def test_size_filter():
    sets = gene_sets("markers_immune")
    small = gene_sets("markers_immune", max_size=12)
    assert small and all(len(v) <= 12 for v in small.values())
    assert set(small) == {k for k, v in sets.items() if len(v) <= 12}
    big = gene_sets("markers_immune", min_size=15, format="dataframe")
    assert set(big["source"]) == {k for k, v in sets.items() if len(v) >= 15}
    assert set(big.attrs["descriptions"]) == set(big["source"])


def test_errors():
    with pytest.raises(ValueError, match="markers_immune, markers_heart, go_bp_2023"):
        gene_sets("go_bp")
    with pytest.raises(ValueError, match="No gene set"):
        gene_sets("markers_immune", min_size=100)
    with pytest.raises(ValueError, match="No gene set"):
        gene_sets("markers_heart", min_size=13, max_size=12)
    with pytest.raises(ValueError, match="format"):
        gene_sets("markers_heart", format="long")
    with pytest.raises(ValueError, match="non-negative"):
        gene_sets("markers_heart", min_size=-1)
    with pytest.raises(FileNotFoundError):
        gene_sets("does/not/exist.gmt")


GMT = "set A\tfirst set\tcd14\tLYZ\tCD14\t s100a8 \t\nset B\t\tGENE1,1.0\tGENE2,0.5\n\n# a comment\nempty\tno genes\n"


def test_read_gmt_plain_and_gzipped(tmp_path):
    plain = tmp_path / "sets.gmt"
    plain.write_text(GMT)
    packed = tmp_path / "sets.gmt.gz"
    with gzip.open(packed, "wt") as fh:
        fh.write(GMT)
    expected = {"set A": ["CD14", "LYZ", "S100A8"], "set B": ["GENE1", "GENE2"], "empty": []}
    assert read_gmt(plain) == expected
    assert read_gmt(str(packed)) == expected
    # gene_sets reads paths the same way; min_size=1 drops the empty set
    assert gene_sets(packed) == {"set A": ["CD14", "LYZ", "S100A8"], "set B": ["GENE1", "GENE2"]}
    df = gene_sets(str(plain), format="dataframe")
    assert df.attrs["descriptions"] == {"set A": "first set", "set B": ""}


def test_gmt_round_trip(tmp_path):
    sets = gene_sets("markers_immune")
    df = gene_sets("markers_immune", format="dataframe")
    path = tmp_path / "immune.gmt"
    path.write_text(
        "".join("\t".join([k, df.attrs["descriptions"][k], *v]) + "\n" for k, v in sets.items()), encoding="utf-8"
    )
    assert read_gmt(path) == sets
    again = gene_sets(path, format="dataframe")
    assert again.to_dict("list") == df.to_dict("list") and (again.dtypes == df.dtypes).all()
    assert again.attrs["descriptions"] == df.attrs["descriptions"]
    assert again.attrs["collection"] == str(path)


def test_bad_gmt(tmp_path):
    path = tmp_path / "bad.gmt"
    path.write_text("only a name\n")
    with pytest.raises(ValueError, match="line 1"):
        read_gmt(path)
    path.write_text("a\tx\tG1\na\ty\tG2\n")
    with pytest.raises(ValueError, match="twice"):
        read_gmt(path)


def test_results_are_copies():
    sets = gene_sets("markers_immune")
    sets["B Cell"].append("NOT_A_GENE")
    del sets["NK Cell"]
    fresh = gene_sets("markers_immune")
    assert "NOT_A_GENE" not in fresh["B Cell"] and "NK Cell" in fresh


def test_gene_sets_do_not_import_torch():
    code = "import sys, cellcircuits.ds as ds; ds.gene_sets(); ds.list_gene_sets(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_exported():
    assert cc.ds.gene_sets is gene_sets and cc.ds.read_gmt is read_gmt and cc.ds.list_gene_sets is list_gene_sets


def test_pathway_collections_from_installed_pyenrichr():
    pytest.importorskip("pyenrichr")  # in the test extra; optional for users
    go = gene_sets("go_bp_2023")
    assert len(go) > 5000
    immune = [k for k in go if "immune response" in k.lower()]
    assert immune and max(len(go[k]) for k in immune) > 50
    assert (
        "HLA-DRA"
        in go["Antigen Processing And Presentation Of Exogenous Peptide Antigen Via MHC Class II (GO:0019886)"]
    )
    wp = gene_sets("wikipathways_2023_human", format="dataframe")
    assert wp["source"].nunique() > 500
    assert wp["target"].str.fullmatch(r"[A-Z0-9][A-Z0-9.\-@_]*").mean() > 0.99
    assert "GPX1" in set(wp.loc[wp["source"] == "Glutathione Metabolism WP100", "target"])
    assert "CC BY 4.0" in list_gene_sets().set_index("name").loc["go_bp_2023", "license"]


def test_missing_optional_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from cellcircuits.ds import _gene_sets

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyenrichr" else real(name, *a))
    _gene_sets._read_installed.cache_clear()
    with pytest.raises(ModuleNotFoundError, match="pip install pyenrichr"):
        gene_sets("wikipathways_2023_human")
    assert "wikipathways_2023_human" not in list_gene_sets()["name"].tolist()
    _gene_sets._read_installed.cache_clear()
