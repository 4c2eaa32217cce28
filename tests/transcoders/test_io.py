from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import cellcircuits as cc
from cellcircuits.transcoders import Transcoder, TranscoderConfig, TranscoderSet, load_transcoders

from ..helpers import random_transcoders

D = 8


def make_set(activation="topk", *, skip=False, layers=(0, 2), n_layers=4) -> TranscoderSet:
    members = {}
    for layer in layers:
        cfg = TranscoderConfig(
            d_in=D,
            d_out=D,
            n_features=16,
            activation=activation,
            k=4,
            skip=skip,
            model_name="tiny",
            layer=layer,
            hook_in=f"gpt_neox.layers.{layer}.mlp:input",
            hook_out=f"gpt_neox.layers.{layer}.mlp:output",
            architecture="gpt_neox",
        )
        tc = Transcoder(cfg)
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.05)
            tc.b_dec.normal_()
            if skip:
                tc.W_skip.normal_(0, 0.1)
            if tc.log_threshold is not None:
                tc.log_threshold.uniform_(-5, -3)
        tc.set_scales_from(4.0 * torch.randn(64, D), 0.5 * torch.randn(64, D))  # non-trivial scales to fold
        members[layer] = tc
    return TranscoderSet(members, n_layers_model=n_layers)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_round_trip_is_exact(tmp_path, activation, skip):
    tset = make_set(activation, skip=skip)
    scales = {layer: (tc.input_scale.item(), tc.output_scale.item()) for layer, tc in tset.items()}
    tset.save(tmp_path)
    # saving folds a copy: the live modules keep their scales
    assert {layer: (tc.input_scale.item(), tc.output_scale.item()) for layer, tc in tset.items()} == scales

    loaded = load_transcoders(tmp_path, n_layers=4, d_model=D, device="cpu")
    assert loaded.layers == [0, 2] and loaded.model_name == "tiny" and loaded.architecture == "gpt_neox"
    assert (loaded.n_layers_model, loaded.d_model) == (4, D)
    x = 4.0 * torch.randn(32, D)
    for layer, tc in tset.items():
        new = loaded[layer]
        assert new.cfg == tc.cfg
        assert new.input_scale.item() == new.output_scale.item() == 1.0
        before, after = tc(x), new(x)
        torch.testing.assert_close(after.features, before.features, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(after.output, before.output, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("activation", "skip"), [("jumprelu", True), ("topk", False)])
def test_files_are_plain_json_and_safetensors(tmp_path, activation, skip):
    tset = make_set(activation, skip=skip)
    tset.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_0", "layer_2", "transcoder_set.json"]
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
    meta = json.loads((tmp_path / "transcoder_set.json").read_text())
    assert meta == {
        "format": "cellcircuits.transcoder_set/1",
        "model_name": "tiny",
        "architecture": "gpt_neox",
        "n_layers_model": 4,
        "d_model": D,
        "layers": [0, 2],
    }
    cfg = json.loads((tmp_path / "layer_2" / "cfg.json").read_text())
    assert cfg["format"] == "cellcircuits.transcoder/1" and cfg["layer"] == 2
    tensors = load_file(tmp_path / "layer_2" / "transcoder.safetensors")
    expected = {"W_enc", "W_dec", "b_enc", "b_dec"}
    expected |= {"W_skip"} if skip else set()
    expected |= {"threshold"} if activation == "jumprelu" else set()
    assert set(tensors) == expected
    tc = tset[2]
    # model units: the scales are folded in, the threshold is stored as is
    torch.testing.assert_close(tensors["W_enc"], tc.W_enc.detach() * tc.input_scale)
    torch.testing.assert_close(tensors["W_dec"], tc.W_dec.detach() / tc.output_scale)
    if activation == "jumprelu":
        torch.testing.assert_close(tensors["threshold"], tc.log_threshold.detach().exp())


def test_top_level_names():
    assert cc.load_transcoders is load_transcoders
    assert cc.Transcoder is Transcoder and cc.TranscoderSet is TranscoderSet
    assert "transcoders" in dir(cc)


def test_incompatible_model(tmp_path):
    make_set().save(tmp_path)
    msg = "transcoders were trained for a model with 4 layers and d_model 8; this model has 2 layers and d_model 16"
    with pytest.raises(ValueError, match=msg):
        load_transcoders(tmp_path, n_layers=2, d_model=16)
    with pytest.raises(ValueError, match=r"this model has d_model 16$"):
        load_transcoders(tmp_path, n_layers=4, d_model=16)


@pytest.fixture
def saved(tmp_path):
    make_set("jumprelu", skip=True).save(tmp_path)
    return tmp_path


def _weights(directory):
    return directory / "layer_2" / "transcoder.safetensors"


def test_truncated_weights(saved):
    data = _weights(saved).read_bytes()
    _weights(saved).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_transcoders(saved)


def test_not_a_safetensors_file(saved):
    _weights(saved).write_text("definitely not tensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_transcoders(saved)


def test_missing_tensor(saved):
    tensors = load_file(_weights(saved))
    del tensors["threshold"]
    save_file(tensors, _weights(saved))
    with pytest.raises(ValueError, match=r"missing tensors \['threshold'\]"):
        load_transcoders(saved)


def test_wrong_shape(saved):
    tensors = load_file(_weights(saved))
    tensors["W_dec"] = tensors["W_dec"][:, :4].contiguous()
    save_file(tensors, _weights(saved))
    with pytest.raises(ValueError, match=r"W_dec has shape \(16, 4\), cfg.json implies \(16, 8\)"):
        load_transcoders(saved)


def test_non_positive_threshold(saved):
    tensors = load_file(_weights(saved))
    tensors["threshold"][3] = 0.0
    save_file(tensors, _weights(saved))
    with pytest.raises(ValueError, match="thresholds must be positive"):
        load_transcoders(saved)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_config_with_unknown_format_or_keys(saved):
    path = saved / "layer_0" / "cfg.json"
    _edit_json(path, format="sparsify/0")
    with pytest.raises(ValueError, match="unsupported transcoder format 'sparsify/0'"):
        load_transcoders(saved)
    _edit_json(path, format="cellcircuits.transcoder/1", colour="red")
    with pytest.raises(ValueError, match=r"layer_0.cfg\.json: unknown transcoder settings \['colour'\]"):
        load_transcoders(saved)


def test_config_that_disagrees_with_the_set(saved):
    _edit_json(saved / "layer_0" / "cfg.json", layer=1)
    with pytest.raises(ValueError, match=r"made for layer 1 \(cfg.layer\)"):
        load_transcoders(saved)


def test_set_file_checks(saved):
    path = saved / "transcoder_set.json"
    _edit_json(path, format="other/1")
    with pytest.raises(ValueError, match="unsupported format tag 'other/1'"):
        load_transcoders(saved)
    _edit_json(path, format="cellcircuits.transcoder_set/1", extra=1)
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        load_transcoders(saved)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_transcoders(saved)


def test_missing_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_transcoders(tmp_path / "nowhere")
    _weights(saved).unlink()
    with pytest.raises(FileNotFoundError, match=r"transcoder\.safetensors not found"):
        load_transcoders(saved)
    (saved / "transcoder_set.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"transcoder_set\.json not found"):
        load_transcoders(saved)


def test_written_files_get_the_umask_mode(tiny_c2s, toy_adata, tmp_path):
    import os
    import stat

    from ..helpers import tiny_tset

    old = os.umask(0o027)
    try:
        tiny_tset().save(tmp_path / "set")
        cc.tl.collect_activations(toy_adata, tiny_c2s, tmp_path / "store", shard_rows=30, progress=False)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "set").rglob("*") if p.is_file()] + list((tmp_path / "store").iterdir())
    assert any(p.suffix == ".safetensors" for p in files) and any(p.name == "manifest.json" for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name


def test_select_keeps_the_same_modules_and_names_a_missing_layer():
    tset = random_transcoders("gpt_neox", 16, [0, 2, 3], 4, n_features=8, k=2)
    sub = tset.select([3, 0])
    assert sub.layers == [0, 3] and sub[3] is tset[3] and sub.n_layers_model == 4 and sub.model_name == tset.model_name
    with pytest.raises(ValueError, match=r"no transcoder for layer\(s\) \[1\]; this set covers \[0, 2, 3\]"):
        tset.select([1, 2])


def test_a_shipped_set_loads_by_model_name_and_a_folder_of_that_name_wins(tmp_path, monkeypatch):
    import cellcircuits.transcoders._io as tc_io

    shipped = tmp_path / "package_data"
    random_transcoders("gpt_neox", 16, [1], 4, n_features=8, k=2).save(shipped)
    monkeypatch.setattr(tc_io, "SHIPPED_TRANSCODERS", {"my-model": "x"})
    monkeypatch.setattr(tc_io, "shipped_transcoders_path", lambda name: shipped if name == "my-model" else None)
    assert cc.load_transcoders("my-model").layers == [1]
    local = tmp_path / "cwd"
    random_transcoders("gpt_neox", 16, [2], 4, n_features=8, k=2).save(local / "my-model")
    monkeypatch.chdir(local)
    assert cc.load_transcoders("my-model").layers == [2]
    with pytest.raises(FileNotFoundError, match="transcoders ship for the models"):
        cc.load_transcoders("other-model")
