from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from cellcircuits import _keys


def test_key_names():
    assert _keys.features_obsm("transcoder", 2) == "X_transcoder_L2"
    assert _keys.gene_map_varm("tc", np.int64(1), "out") == "tc_L1_out"
    assert _keys.enrichment_uns("tc", 3, "in") == "tc_L3_in_enrichment"
    assert _keys.prediction_obsm("c2s_cell_type", "proba") == "c2s_cell_type_proba"
    assert _keys.embedding_obsm("umap") == "X_umap"


@pytest.mark.parametrize(
    "settings",
    [
        _keys.SentenceSettings(),
        _keys.SentenceSettings("s", "counts", False, "feature_name", 7),
        _keys.SentenceSettings(use_raw=True),
        _keys.SentenceSettings(organism="Mus musculus"),
    ],
)
def test_sentence_settings_round_trip_through_h5ad(settings, tmp_path):
    adata = ad.AnnData(np.zeros((2, 2), dtype=np.float32))
    adata.uns["tool"] = {"params": {"sentences": settings.to_params()}}
    adata.write_h5ad(tmp_path / "a.h5ad")
    stored = ad.read_h5ad(tmp_path / "a.h5ad").uns["tool"]["params"]["sentences"]
    assert _keys.SentenceSettings.from_params(stored) == settings


def test_sentence_settings_of_older_params_and_bad_layer():
    old = {"sentence_key": "cell_sentence", "layer": "", "use_raw": 0, "gene_symbols": ""}  # no random_state
    assert _keys.SentenceSettings.from_params(old, random_state=5) == _keys.SentenceSettings(
        use_raw=False, random_state=5
    )
    with pytest.raises(TypeError, match="names an AnnData layer"):
        _keys.SentenceSettings(layer=2)  # type: ignore[arg-type]


def test_optional_bool_and_h5ad_safe():
    for value in (True, False, None):
        assert _keys.decode_optional_bool(_keys.encode_optional_bool(value)) is value
    assert _keys.decode_optional_bool(np.bool_(True)) is True
    assert _keys.h5ad_safe({"a": None, 1: {"b": None, "c": 2}}) == {"a": "", "1": {"b": "", "c": 2}}


def test_circuits_are_stored_beside_each_other_with_clear_lookups():
    adata = ad.AnnData(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(KeyError, match=r"run cellcircuits\.tl\.trace_circuit first"):
        _keys.circuit_result(adata, "x")
    _keys.store_circuit(adata, "x", {"nodes": 1})
    _keys.store_circuit(adata, "y", {"nodes": 2})
    assert _keys.circuit_keys(adata) == ["x", "y"] and _keys.circuit_result(adata, "x") == {"nodes": 1}
    with pytest.raises(KeyError, match=r"Stored circuits: \['x', 'y'\]"):
        _keys.circuit_result(adata, "z")
    for lookup in (_keys.feature_matrix, _keys.gene_map):
        args = (adata, "tc", 0, "in") if lookup is _keys.gene_map else (adata, "tc", 0)
        with pytest.raises(KeyError, match=r"run cellcircuits\.tl\.transcode"):
            lookup(*args)
