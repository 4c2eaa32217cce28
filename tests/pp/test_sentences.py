from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import cellcircuits as cc
from cellcircuits.pp._sentences import rank_genes, tiebreak_keys


def test_sentences_rank_by_descending_expression(toy_adata):
    cc.pp.cell_sentences(toy_adata)
    X = toy_adata.X.toarray()
    for i, sentence in enumerate(toy_adata.obs["cell_sentence"]):
        genes = sentence.split()
        idx = [list(toy_adata.var_names).index(g) for g in genes]
        values = X[i, idx]
        assert np.all(np.diff(values) <= 0), sentence
        assert sorted(idx) == sorted(np.flatnonzero(X[i]).tolist())  # every expressed gene, nothing else
    # cell 5 has known values: 3 first, then the four 2s, then the three 1s
    genes5 = toy_adata.obs["cell_sentence"].iloc[5].split()
    assert genes5[0] == "S100A8"
    assert set(genes5[1:5]) == {"CD14", "LYZ", "HLA-DRA", "MS4A1"}
    assert set(genes5[5:]) == {"GNLY", "CD3E", "IL7R"}
    assert toy_adata.uns["cell_sentence"]["params"]["random_state"] == 0


def test_ties_reproducible_and_seed_dependent(toy_adata):
    a = cc.pp.cell_sentences(toy_adata, copy=True).obs["cell_sentence"]
    b = cc.pp.cell_sentences(toy_adata, copy=True).obs["cell_sentence"]
    assert a.equals(b)
    orders = {cc.pp.cell_sentences(toy_adata, random_state=s, copy=True).obs["cell_sentence"].iloc[5] for s in range(8)}
    assert len(orders) > 1  # ties really are broken differently for other seeds
    assert all(set(o.split()) == set(a.iloc[5].split()) for o in orders)


def test_tie_order_independent_of_subsetting_and_gene_order(toy_adata):
    full = cc.pp.cell_sentences(toy_adata, copy=True).obs["cell_sentence"]
    sub = cc.pp.cell_sentences(toy_adata[[7, 5, 2]].copy(), copy=True).obs["cell_sentence"]
    assert sub.tolist() == full.iloc[[7, 5, 2]].tolist()
    shuffled = toy_adata[:, toy_adata.var_names[::-1]].copy()
    assert cc.pp.cell_sentences(shuffled, copy=True).obs["cell_sentence"].tolist() == full.tolist()


def test_tiebreak_keys_are_pure():
    cells = np.array([1, 2, 3], dtype=np.uint64)
    genes = np.array([9, 9, 9], dtype=np.uint64)
    k1 = tiebreak_keys(0, cells, genes)
    assert np.array_equal(k1, tiebreak_keys(0, cells, genes))
    assert not np.array_equal(k1, tiebreak_keys(1, cells, genes))
    assert len(set(k1.tolist())) == 3


def test_rank_genes_n_genes_cut():
    X = sparse.csr_matrix(np.array([[0, 5, 1, 3, 0]], dtype=float))
    ids = np.array([0], dtype=np.uint64)
    assert rank_genes(X, ids, np.arange(5, dtype=np.uint64), None, 0)[0].tolist() == [1, 3, 2]
    assert rank_genes(X, ids, np.arange(5, dtype=np.uint64), 2, 0)[0].tolist() == [1, 3]


def test_n_genes_and_uppercase(toy_adata):
    toy_adata.var_names = [g.lower() for g in toy_adata.var_names]
    cc.pp.cell_sentences(toy_adata, n_genes=2, key_added="s2")
    lengths = toy_adata.obs["s2"].str.split().str.len().fillna(0)
    assert lengths.max() == 2
    assert all(g.isupper() or not g.isalpha() for s in toy_adata.obs["s2"] for g in s.split())


def test_dense_sparse_backed_agree(toy_adata, tmp_path):
    sparse_res = cc.pp.cell_sentences(toy_adata, copy=True).obs["cell_sentence"]
    dense = toy_adata.copy()
    dense.X = dense.X.toarray()
    assert cc.pp.cell_sentences(dense, copy=True).obs["cell_sentence"].equals(sparse_res)
    for X in (toy_adata.X, toy_adata.X.toarray()):
        path = tmp_path / "backed.h5ad"
        ad.AnnData(X, obs=toy_adata.obs, var=toy_adata.var).write_h5ad(path)
        backed = ad.read_h5ad(path, backed="r")
        with pytest.warns(UserWarning, match="express no gene"):
            cc.pp.cell_sentences(backed)
        assert backed.obs["cell_sentence"].tolist() == sparse_res.tolist()
        backed.file.close()


def test_layer_and_raw(toy_adata):
    base = cc.pp.cell_sentences(toy_adata, copy=True).obs["cell_sentence"]
    scaled = toy_adata.copy()
    scaled.layers["norm"] = scaled.X.copy()
    scaled.raw = scaled.copy()
    scaled.X = scaled.X.toarray() - 1.5  # scaled-looking .X with negatives
    # default use_raw=None picks .raw when present, like scanpy
    assert cc.pp.cell_sentences(scaled, copy=True).obs["cell_sentence"].equals(base)
    assert cc.pp.cell_sentences(scaled, layer="norm", copy=True).obs["cell_sentence"].equals(base)
    with pytest.raises(ValueError, match="negative values"):
        cc.pp.cell_sentences(scaled, use_raw=False)
    with pytest.raises(KeyError, match="Layer 'nope' not found"):
        cc.pp.cell_sentences(scaled, layer="nope")
    with pytest.raises(ValueError, match="either layer or use_raw"):
        cc.pp.cell_sentences(scaled, layer="norm", use_raw=True)
    with pytest.raises(ValueError, match=r"adata\.raw is None"):
        cc.pp.cell_sentences(toy_adata, use_raw=True)


def test_bad_values_raise(toy_adata):
    X = toy_adata.X.toarray()
    X[2, 3] = np.nan
    bad = ad.AnnData(X, obs=toy_adata.obs, var=toy_adata.var)
    with pytest.raises(ValueError, match="NaN or infinite"):
        cc.pp.cell_sentences(bad)
    X[2, 3] = -1.0
    with pytest.raises(ValueError, match=r"negative values.*use_raw=True"):
        cc.pp.cell_sentences(ad.AnnData(X, obs=toy_adata.obs, var=toy_adata.var))


def test_no_var_names_and_gene_symbols(toy_adata):
    anon = ad.AnnData(toy_adata.X, obs=toy_adata.obs)  # default var_names "0", "1", ...
    with pytest.raises(ValueError, match="default integer index"):
        cc.pp.cell_sentences(anon)
    anon.var["symbol"] = list(toy_adata.var_names)
    got = cc.pp.cell_sentences(anon, gene_symbols="symbol", copy=True).obs["cell_sentence"]
    assert got.tolist() == cc.pp.cell_sentences(toy_adata, copy=True).obs["cell_sentence"].tolist()
    with pytest.raises(KeyError, match="gene_symbols='nope'"):
        cc.pp.cell_sentences(anon, gene_symbols="nope")
    spaced = toy_adata.copy()
    spaced.var_names = ["A B", *spaced.var_names[1:]]
    with pytest.raises(ValueError, match="whitespace"):
        cc.pp.cell_sentences(spaced)


def test_empty_cell_warns_and_keeps_empty_sentence(toy_adata):
    with pytest.warns(UserWarning, match=r"1 cell\(s\) express no gene.*cell3"):
        cc.pp.cell_sentences(toy_adata)
    assert toy_adata.obs["cell_sentence"].iloc[3] == ""


def test_copy_semantics_leave_input_untouched(toy_adata):
    before = toy_adata.copy()
    out = cc.pp.cell_sentences(toy_adata, copy=True)
    assert "cell_sentence" not in toy_adata.obs and "cell_sentence" not in toy_adata.uns
    assert isinstance(out, ad.AnnData) and "cell_sentence" in out.obs
    assert cc.pp.cell_sentences(toy_adata) is None
    assert (toy_adata.X != before.X).nnz == 0
    pd.testing.assert_frame_equal(toy_adata.obs.drop(columns="cell_sentence"), before.obs)


def test_bad_n_genes(toy_adata):
    with pytest.raises(ValueError, match="n_genes"):
        cc.pp.cell_sentences(toy_adata, n_genes=0)


def _unchanged(adata: ad.AnnData, before: ad.AnnData) -> None:
    X, Xb = adata.X, before.X
    assert (sparse.csr_matrix(X) != sparse.csr_matrix(Xb)).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    pd.testing.assert_frame_equal(adata.var, before.var)
    assert set(adata.uns) == set(before.uns)


def test_colliding_gene_symbols_raise_before_any_work(toy_adata):
    from cellcircuits.pp._sentences import gene_names, sentences_from_adata

    clash = toy_adata.copy()
    clash.var_names = ["lyz" if g == "HLA-DRA" else " CD14" if g == "NKG7" else g for g in clash.var_names]
    before = clash.copy()
    with pytest.raises(ValueError, match=r"'LYZ' and 'lyz' both become 'LYZ'") as err:
        cc.pp.cell_sentences(clash)
    msg = str(err.value)
    assert "'CD14' and ' CD14' both become 'CD14'" in msg
    assert "2 gene symbol(s)" in msg and "adata.var_names" in msg
    assert "gene_symbols=" in msg and "var_names_make_unique() only renames exact duplicates" in msg
    _unchanged(clash, before)
    assert "cell_sentence" not in clash.obs
    with pytest.raises(ValueError, match="both become 'LYZ'"):
        sentences_from_adata(clash)
    # var_names_make_unique leaves case collisions as they are, as the message says
    clash.var_names_make_unique()
    with pytest.raises(ValueError, match="both become 'LYZ'"):
        cc.pp.cell_sentences(clash, copy=True)
    # a column of distinct symbols fixes it, with the same sentences as clean names
    clash.var["symbol"] = list(toy_adata.var_names)
    got = cc.pp.cell_sentences(clash, gene_symbols="symbol", copy=True).obs["cell_sentence"]
    assert got.tolist() == cc.pp.cell_sentences(toy_adata, copy=True).obs["cell_sentence"].tolist()
    # exact duplicates in a symbol column, and more than five groups are summarised
    var = pd.DataFrame({"symbol": ["A", "A", *[f"g{i}" for i in range(7)], *[f"G{i}" for i in range(7)]]})
    var.index = [f"v{i}" for i in range(len(var))]
    with pytest.raises(ValueError, match=r"adata\.var\['symbol'\] give 8 gene symbol\(s\).*'A' occurs 2 times") as err:
        gene_names(var, "symbol")
    assert "; and 3 more" in str(err.value) and "'g0' and 'G0' both become 'G0'" in str(err.value)


def test_colliding_raw_symbols_named_as_raw(toy_adata):
    with_raw = toy_adata.copy()
    raw = toy_adata.copy()
    raw.var_names = ["cd14", *raw.var_names[1:-1], "CD14"]
    with_raw.raw = raw
    with pytest.raises(ValueError, match=r"adata\.raw\.var_names give 1 gene symbol\(s\).*'cd14' and 'CD14'"):
        cc.pp.cell_sentences(with_raw)
    assert "cell_sentence" not in with_raw.obs
    # .X's own names are fine
    assert cc.pp.cell_sentences(with_raw, use_raw=False, copy=True) is not None


@pytest.mark.parametrize(
    ("names", "kind"),
    [
        (["715", "687", "211", "5", "9", "12", "33", "41", "LYZ", "CD14", "A1", "B2"], "integers"),
        ([f"ENSG{i:011d}" for i in range(12)], "Ensembl IDs"),
        ([f"ENSG{i:011d}.{i % 3 + 1}" for i in range(12)], "Ensembl IDs"),
        ([f"ensmusg{i:011d}" for i in range(10)] + ["Lyz2", "Cd14"], "Ensembl IDs"),
    ],
)
def test_id_like_var_names_raise(toy_adata, names, kind):
    ids = toy_adata.copy()
    ids.var_names = names
    expected = rf"adata\.var_names are not gene symbols: \d+ of 12 look like {kind}, e\.g\. \['{names[0]}'"
    with pytest.raises(ValueError, match=expected) as err:
        cc.pp.cell_sentences(ids)
    assert "gene_symbols='feature_name'" in str(err.value)
    assert "cell_sentence" not in ids.obs
    # the check applies to the symbols used: a proper symbol column passes
    ids.var["feature_name"] = list(toy_adata.var_names)
    got = cc.pp.cell_sentences(ids, gene_symbols="feature_name", copy=True).obs["cell_sentence"]
    assert got.tolist() == cc.pp.cell_sentences(toy_adata, copy=True).obs["cell_sentence"].tolist()
    ids.var["ids"] = names
    with pytest.raises(ValueError, match=rf"adata\.var\['ids'\] are not gene symbols.*look like {kind}"):
        cc.pp.cell_sentences(ids, gene_symbols="ids")


def test_few_id_like_names_pass(toy_adata):
    few = toy_adata.copy()
    few.var_names = ["7", "ENSG00000163220", *few.var_names[2:]]  # a minority is tolerated
    sentences = cc.pp.cell_sentences(few, copy=True).obs["cell_sentence"]
    assert any("ENSG00000163220" in s for s in sentences)


def test_missing_gene_symbols_raise(toy_adata):
    toy_adata.var["symbol"] = [*toy_adata.var_names[:-1], None]
    with pytest.raises(ValueError, match=r"adata\.var\['symbol'\] has 1 missing gene symbol\(s\).*\['PPBP'\]"):
        cc.pp.cell_sentences(toy_adata, gene_symbols="symbol")
    assert "cell_sentence" not in toy_adata.obs


def test_boolean_and_float16_values_rank_like_float32(toy_adata):
    def sentences(X) -> list[str]:
        return (
            cc.pp.cell_sentences(ad.AnnData(X, obs=toy_adata.obs, var=toy_adata.var), copy=True)
            .obs["cell_sentence"]
            .tolist()
        )

    X = toy_adata.X.toarray()
    want = sentences(X.astype(np.float32))
    for dtype in (np.float16, np.uint8, np.int32):
        assert sentences(X.astype(dtype)) == want
    ones = sentences((X > 0).astype(np.float32))
    assert sentences(X > 0) == ones
    assert sentences(sparse.csr_matrix(X > 0)) == ones
    with pytest.raises(TypeError, match="dtype complex64"):
        sentences(X.astype(np.complex64))


def test_backed_copy_refused_before_work(toy_adata, tmp_path):
    toy_adata.write_h5ad(tmp_path / "b.h5ad")
    backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"copy=True cannot copy a backed AnnData.*to_memory\(\)"):
        cc.pp.cell_sentences(backed, copy=True)
    assert "cell_sentence" not in backed.obs
    backed.file.close()


def test_cells_in_any_order_on_backed_data(toy_adata, tmp_path):
    from cellcircuits.pp._sentences import sentences_from_adata

    full = cc.pp.cell_sentences(toy_adata, copy=True).obs["cell_sentence"].tolist()
    rows = [7, 2, 2, 11, 0]  # unsorted, repeated: h5py reads only increasing distinct rows
    for X in (toy_adata.X, toy_adata.X.toarray()):
        ad.AnnData(X, obs=toy_adata.obs, var=toy_adata.var).write_h5ad(tmp_path / "b.h5ad")
        backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
        assert sentences_from_adata(backed, cells=rows) == [full[i] for i in rows]
        assert sentences_from_adata(backed, cells=[]) == []
        backed.file.close()


def test_cells_out_of_range_or_not_integers_raise(toy_adata):
    from cellcircuits.pp._sentences import sentences_from_adata

    for cells in ([-1], [12], [0, 99]):
        with pytest.raises(IndexError, match=r"outside the 12 cells"):
            sentences_from_adata(toy_adata, cells=cells)
    with pytest.raises(TypeError, match="integer row positions"):
        sentences_from_adata(toy_adata, cells=[0.5])


def test_view_of_backed_refused_before_work(toy_adata, tmp_path):
    toy_adata.write_h5ad(tmp_path / "b.h5ad")
    backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    view = backed[:5]
    for copy in (False, True):  # anndata can neither write to nor copy a view of a backed AnnData
        with pytest.raises(ValueError, match=r"a view of a backed AnnData.*adata\.to_memory\(\)"):
            cc.pp.cell_sentences(view, copy=copy)
    assert view.is_view and "cell_sentence" not in view.obs and "cell_sentence" not in backed.obs
    got = cc.pp.cell_sentences(view.to_memory(), copy=True).obs["cell_sentence"]
    assert got.tolist() == cc.pp.cell_sentences(toy_adata, copy=True).obs["cell_sentence"].tolist()[:5]
    backed.file.close()
