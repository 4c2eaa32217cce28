from __future__ import annotations

import pytest
import torch

import cellcircuits as cc
from cellcircuits.transcoders import ActivationStore, Transcoder, TranscoderConfig, train_on_store
from cellcircuits.transcoders._loop import resolve_matmul_dtype

SMALL = {"n_features": 64, "k": 4, "n_tokens": 6000, "batch_size": 64, "lr": 5e-3, "dead_after_tokens": 2000}


def fvu_on(store: ActivationStore, tc: Transcoder, layer: int) -> float:
    batch = next(store.iter_batches(store.n_rows, [layer], shuffle=False))
    return float(tc.loss(batch[f"L{layer}_in"], batch[f"L{layer}_out"]).fvu)


def test_train_transcoders_learns_deterministically(toy_adata, tiny_c2s, tmp_path):
    a = cc.tl.train_transcoders(toy_adata, tiny_c2s, store=tmp_path / "store", progress=False, **SMALL)
    assert a.layers == [0, 1] and a.n_layers_model == 2 and a.model_name == "tiny"
    store = ActivationStore(tmp_path / "store")
    assert store.manifest.complete
    for layer, tc in a.items():
        assert tc.cfg.layer == layer and tc.cfg.hook_in == f"gpt_neox.layers.{layer}.mlp:input"
        assert float(tc.input_scale) == 1.0  # scales folded into the weights
        torch.manual_seed(1)
        untrained = Transcoder(tc.cfg)
        untrained.set_scales_from(*next(iter(store.iter_batches(512, [layer]))).values())
        assert fvu_on(store, tc, layer) < 0.5 * fvu_on(store, untrained, layer)
    # the store is reused, not collected again; the same seed gives the same weights
    mtime = (tmp_path / "store" / "manifest.json").stat().st_mtime_ns
    b = cc.tl.train_transcoders(toy_adata, tiny_c2s, store=tmp_path / "store", progress=False, **SMALL)
    assert (tmp_path / "store" / "manifest.json").stat().st_mtime_ns == mtime
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # an opened store and a temporary one work too
    with pytest.raises(ValueError, match="other activations"):
        cc.tl.train_transcoders(toy_adata[:6].copy(), tiny_c2s, store=tmp_path / "store", progress=False, **SMALL)
    c = cc.tl.train_transcoders(toy_adata, tiny_c2s, [1], store=store, progress=False, **SMALL)
    assert c.layers == [1]


def test_train_transcoders_streams_by_default(toy_adata, tiny_c2s, tmp_path, monkeypatch):
    """Without a store nothing is written to disk: the model's forward passes feed a bounded shuffle buffer."""
    import tempfile

    from cellcircuits.transcoders import ActivationStream

    def no_disk(*args, **kwargs):
        raise AssertionError("a temporary directory was made")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", no_disk)
    monkeypatch.setattr(tempfile, "mkdtemp", no_disk)
    streams = []
    original = ActivationStream.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        streams.append(self)

    monkeypatch.setattr(ActivationStream, "__init__", spy)
    d = cc.tl.train_transcoders(toy_adata, tiny_c2s, [0], buffer_rows=1024, progress=False, **SMALL)
    assert d.layers == [0] and d.n_layers_model == 2 and float(d[0].input_scale) == 1.0
    (stream,) = streams
    assert stream.peak_rows <= 1024 and stream.nbytes == 2 * 1024 * 32 * 2  # one layer, in and out, float16
    assert stream.epoch >= 6000 // int(stream.rows_per_cell.sum())  # cycled over the 12 cells
    again = cc.tl.train_transcoders(toy_adata, tiny_c2s, [0], buffer_rows=1024, progress=False, **SMALL)
    torch.testing.assert_close(d[0].W_dec, again[0].W_dec, rtol=0, atol=0)  # deterministic for a seed
    store = cc.tl.collect_activations(toy_adata, tiny_c2s, tmp_path / "held", progress=False)
    torch.manual_seed(1)
    untrained = Transcoder(d[0].cfg)
    untrained.set_scales_from(*next(iter(store.iter_batches(512, [0]))).values())
    assert fvu_on(store, d[0], 0) < 0.5 * fvu_on(store, untrained, 0)


def test_train_transcoders_resumes_from_a_checkpoint(toy_adata, tiny_c2s, tmp_path, monkeypatch):
    from cellcircuits.transcoders._loop import TrainingLoop

    kw = {**SMALL, "n_tokens": 64 * 12, "buffer_rows": 512, "progress": False}
    whole = cc.tl.train_transcoders(toy_adata, tiny_c2s, **kw)
    original = TrainingLoop.train_step

    def killed(self, batch):
        if self.step == 9:
            raise KeyboardInterrupt
        return original(self, batch)

    with monkeypatch.context() as m:
        m.setattr(TrainingLoop, "train_step", killed)
        with pytest.raises(KeyboardInterrupt):
            cc.tl.train_transcoders(toy_adata, tiny_c2s, checkpoint_dir=tmp_path, checkpoint_every=4, **kw)
    resumed = cc.tl.train_transcoders(toy_adata, tiny_c2s, checkpoint_dir=tmp_path, checkpoint_every=4, **kw)
    for (name, p), (_, q) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match=r"other settings.*n_features: 64 in the checkpoint, 32 now"):
        cc.tl.train_transcoders(
            toy_adata, tiny_c2s, checkpoint_dir=tmp_path, checkpoint_every=4, **{**kw, "n_features": 32}
        )
    with pytest.raises(ValueError, match=r"other settings.*n_cells: 12 in the checkpoint, 6 now"):
        cc.tl.train_transcoders(toy_adata[:6].copy(), tiny_c2s, checkpoint_dir=tmp_path, checkpoint_every=4, **kw)
    # the streaming run's checkpoint is not one of a store's: refused before the store is collected
    with pytest.raises(ValueError, match=r"other settings.*data: 'stream"):
        cc.tl.train_transcoders(toy_adata, tiny_c2s, store=tmp_path / "s", checkpoint_dir=tmp_path, **kw)
    assert not (tmp_path / "s").exists()


def test_train_transcoders_activations_and_save(toy_adata, tiny_c2s, tmp_path):
    for activation, extra in [("relu", {"l1_coefficient": 1e-4}), ("jumprelu", {"l0_coefficient": 1e-4})]:
        ts = cc.tl.train_transcoders(
            toy_adata, tiny_c2s, [0], activation=activation, skip=True, progress=False, **SMALL, **extra
        )
        assert ts[0].cfg.activation == activation and ts[0].W_skip is not None
        ts.save(tmp_path / activation)
        back = cc.load_transcoders(tmp_path / activation, n_layers=2, d_model=32)
        x = torch.randn(5, 32)
        torch.testing.assert_close(back[0](x).output, ts[0](x).output, atol=1e-5, rtol=1e-5)


def test_train_transcoders_errors(toy_adata, tiny_c2s):
    with pytest.raises(TypeError, match="model layers are chosen with layers"):
        cc.tl.train_transcoders(toy_adata, tiny_c2s, layer=1, progress=False)
    with pytest.raises(IndexError, match="out of range"):
        cc.tl.train_transcoders(toy_adata, tiny_c2s, [5], progress=False)
    with pytest.raises(ValueError, match="no cells"):
        cc.tl.train_transcoders(toy_adata[:0].copy(), tiny_c2s, progress=False)


def test_collection_rotates_label_tokens(toy_adata, tiny_c2s, tmp_path):
    from cellcircuits.transcoders._activations import rotating_answers

    answers = rotating_answers(tiny_c2s, 7)
    ids = cc.models.label_token_ids(tiny_c2s.tokenizer, tiny_c2s.prompt, tiny_c2s.labels)
    assert answers == [ids[i % 3] for i in range(7)]
    with_answers = cc.tl.collect_activations(toy_adata, tiny_c2s, tmp_path / "a", progress=False)
    without = cc.tl.collect_activations(toy_adata, tiny_c2s, tmp_path / "b", answer_tokens=False, progress=False)
    assert with_answers.n_rows - without.n_rows == sum(len(ids[i % 3]) for i in range(toy_adata.n_obs))
    tiny_c2s.prompt.labels = None
    assert rotating_answers(tiny_c2s, 3) is None
    with pytest.raises(ValueError, match="dtype"):
        cc.tl.collect_activations(toy_adata, tiny_c2s, tmp_path / "c", dtype="int8")


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ({"n_tokens": -5}, "n_tokens"),
        ({"n_tokens": 0}, "n_tokens"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"matmul_dtype": "float16"}, "matmul_dtype"),
    ],
)
def test_training_settings_are_refused_before_any_work(toy_adata, tiny_c2s, tmp_path, setting, match):
    kwargs = {**SMALL, **setting}
    with pytest.raises(ValueError, match=match):
        cc.tl.train_transcoders(toy_adata, tiny_c2s, store=tmp_path / "store", progress=False, **kwargs)
    assert not (tmp_path / "store").exists()  # nothing was collected
    store = cc.tl.collect_activations(toy_adata, tiny_c2s, tmp_path / "ok", progress=False)
    config = TranscoderConfig(d_in=32, d_out=32, n_features=16, k=2)
    train = {"n_tokens": 64, "batch_size": 16, "lr": 1e-3, **setting}
    with pytest.raises(ValueError, match=match):
        train_on_store(store, config, n_layers_model=2, progress=False, **train)


def test_bfloat16_selection_trains_as_well_as_float32(toy_adata, tiny_c2s, tmp_path):
    """Mixed precision: the features are chosen by a bfloat16 product, the weights stay float32 and learn as well."""
    store = cc.tl.collect_activations(toy_adata, tiny_c2s, tmp_path / "store", progress=False)
    runs = {
        dtype: cc.tl.train_transcoders(toy_adata, tiny_c2s, store=store, matmul_dtype=dtype, progress=False, **SMALL)
        for dtype in ("float32", "bfloat16")
    }
    for layer in (0, 1):
        full, mixed = runs["float32"][layer], runs["bfloat16"][layer]
        assert mixed.W_enc.dtype == torch.float32 and mixed.selection_dtype == torch.bfloat16
        assert full.selection_dtype == torch.float32
        assert not torch.equal(full.W_enc, mixed.W_enc)  # the selection did change
        assert fvu_on(store, mixed, layer) == pytest.approx(fvu_on(store, full, layer), abs=0.03)
    assert resolve_matmul_dtype(None, "cpu") == "float32"
