from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import normalize

from cellcircuits.transcoders import Transcoder, TranscoderConfig, TranscoderSet
from cellcircuits.transcoders._kernels import sparse_rows

ACTIVATIONS = ["relu", "topk", "jumprelu"]


def make(activation="topk", *, d_in=8, d_out=8, n_features=16, **kw):
    kw.setdefault("k", 4)
    return Transcoder(TranscoderConfig(d_in=d_in, d_out=d_out, n_features=n_features, activation=activation, **kw))


def randomise_(tc: Transcoder) -> Transcoder:
    """Give every bias and the skip weights non-zero values, so that tests see them."""
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.05)
        tc.b_dec.normal_()
        if tc.W_skip is not None:
            tc.W_skip.normal_(0, 0.1)
    return tc


# config
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"d_in": 0}, "d_in must be a positive integer"),
        ({"n_features": -3}, "n_features must be a positive integer"),
        ({"activation": "gelu"}, "unknown activation 'gelu'"),
        ({"k": 17}, r"k \(17\) must not exceed n_features \(16\)"),
        ({"aux_k": 17}, "aux_k must be an integer"),
        ({"l1_coefficient": -1.0}, "l1_coefficient must be non-negative"),
        ({"jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth must be positive"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"hook_in": "gpt_neox.layers.0.mlp"}, "hook_in must look like"),
    ],
)
def test_config_checks(kw, match):
    args = {"d_in": 8, "d_out": 8, "n_features": 16, "k": 4, **kw}
    with pytest.raises(ValueError, match=match):
        TranscoderConfig(**args)


def test_config_json_round_trip():
    cfg = TranscoderConfig(
        d_in=8,
        d_out=6,
        n_features=600,
        k=8,
        activation="jumprelu",
        skip=True,
        model_name="tiny",
        layer=3,
        hook_in="gpt_neox.layers.3.mlp:input",
        hook_out="gpt_neox.layers.3.mlp:output",
        architecture="gpt_neox",
    )
    assert cfg.aux_k == 256  # min(256, n_features // 2)
    assert TranscoderConfig(d_in=8, d_out=8, n_features=16, k=4).aux_k == 8
    data = cfg.to_dict()
    assert data["format"] == TranscoderConfig.format == "cellcircuits.transcoder/1"
    assert TranscoderConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match=r"unknown transcoder settings \['color'\]"):
        TranscoderConfig.from_dict({**data, "color": "red"})
    with pytest.raises(ValueError, match="unsupported transcoder format 'sae/9'"):
        TranscoderConfig.from_dict({**data, "format": "sae/9"})


@pytest.mark.parametrize("skip", [False, True])
def test_topk_encode_and_decode_equal_the_dense_ones(skip):
    tc = make("topk", d_in=8, d_out=5, n_features=32, skip=skip)
    with torch.no_grad():
        tc.input_scale.fill_(1.7)
        tc.output_scale.fill_(0.6)
        tc.b_dec.normal_()
    x = torch.randn(2, 3, 8)
    acts, indices = tc.encode_topk(x)
    assert acts.shape == indices.shape == (2, 3, tc.cfg.k)
    dense = torch.zeros(2, 3, 32).scatter(-1, indices, acts)
    torch.testing.assert_close(dense, tc.encode(x))
    torch.testing.assert_close(tc.decode_topk(acts, indices, x), tc.decode(dense, x))
    torch.testing.assert_close(tc.decode_topk(acts * 2, indices), tc.decode(dense * 2))
    with pytest.raises(ValueError, match="needs a TopK transcoder"):
        make("relu", d_in=8, d_out=5, n_features=16).encode_topk(x)


def test_bfloat16_selection_keeps_full_precision_activations_and_gradients():
    torch.manual_seed(0)
    tc = make("topk", d_in=16, d_out=16, n_features=256, skip=False)
    x, y = torch.randn(512, 16), torch.randn(512, 16)
    full = tc.loss(x, y).features.to_dense()
    tc.selection_dtype = torch.bfloat16
    out = tc.loss(x, y)
    out.total.backward()
    features = out.features.to_dense()
    rows, cols = features.nonzero(as_tuple=True)
    exact = torch.relu(tc.pre_acts(x))[rows, cols]
    torch.testing.assert_close(features[rows, cols], exact, rtol=1e-6, atol=1e-6)  # values in float32
    same = ((full != 0) & (features != 0)).sum() / (full != 0).sum()
    assert 0.95 <= float(same) < 1.0  # bfloat16 rounding moves a few near-ties, no more
    assert tc.W_enc.grad is not None and tc.W_enc.grad.dtype == torch.float32


# shapes and initialisation
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_shapes(activation, skip):
    tc = make(activation, d_in=8, d_out=5, n_features=16, skip=skip)
    assert tc.W_enc.shape == (8, 16) and tc.b_enc.shape == (16,)
    assert tc.W_dec.shape == (16, 5) and tc.b_dec.shape == (5,)
    assert (tc.W_skip is not None) == skip and (tc.log_threshold is not None) == (activation == "jumprelu")
    assert tc.tokens_since_fired.dtype == torch.long and tc.input_scale.shape == ()
    x = torch.randn(2, 3, 8)
    out = tc(x)
    assert out.output.shape == (2, 3, 5)
    assert out.features.shape == out.pre_acts.shape == (2, 3, 16)
    torch.testing.assert_close(tc.encode(x), out.features)
    torch.testing.assert_close(tc.pre_acts(x), out.pre_acts)
    torch.testing.assert_close(tc.decode(out.features, x), out.output)


def test_init_is_seeded_tied_and_scaled():
    torch.manual_seed(3)
    a = make("relu")
    torch.manual_seed(3)
    b = make("relu")
    torch.testing.assert_close(a.W_dec, b.W_dec, atol=0, rtol=0)
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.full((16,), 0.1))
    torch.testing.assert_close(a.W_enc, a.W_dec.T, atol=0, rtol=0)
    assert a.W_enc.is_contiguous()
    assert not a.b_enc.any() and not a.b_dec.any()
    untied = make("relu", d_in=8, d_out=5)
    torch.testing.assert_close(untied.W_enc.norm(dim=0), torch.full((16,), 0.1))
    assert not make("relu", skip=True).W_skip.any()
    jr = make("jumprelu", jumprelu_init_threshold=0.02)
    torch.testing.assert_close(jr.threshold, torch.full((16,), 0.02))


# activations: forward and backward
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_reaches_every_parameter(activation, skip):
    tc = randomise_(make(activation, skip=skip, jumprelu_init_threshold=0.05))
    x, y = torch.randn(64, 8), torch.randn(64, 8)
    tc.set_scales_from(x, y)
    out = tc.loss(x, y)
    torch.testing.assert_close(out.total, out.mse + out.sparsity + out.aux)
    out.total.backward()
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + ["W_skip"] * skip + ["log_threshold"] * (activation == "jumprelu")
    for name in names:
        grad = getattr(tc, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_topk_keeps_exactly_k_largest():
    tc = make("topk", k=4)
    with torch.no_grad():
        tc.b_enc.fill_(10.0)  # every pre-activation positive
    x = torch.randn(32, 8)
    out = tc(x)
    assert (out.pre_acts > 0).all()
    assert ((out.features != 0).sum(-1) == 4).all()
    top = out.pre_acts.topk(4, dim=-1)
    torch.testing.assert_close(out.features.gather(-1, top.indices), top.values)
    # negative pre-activations among the top k are zeroed by the ReLU
    with torch.no_grad():
        tc.b_enc.fill_(-10.0)
    assert not tc.encode(x).any()


def _single(activation="jumprelu", **kw) -> Transcoder:
    """A transcoder whose features are the coordinates of x: W_enc = I, b_enc = 0."""
    tc = make(activation, d_in=3, d_out=2, n_features=3, k=1, dtype="float64", **kw)
    with torch.no_grad():
        tc.W_enc.copy_(torch.eye(3, dtype=torch.float64))
        if tc.log_threshold is not None:
            tc.log_threshold.fill_(math.log(0.5))
    return tc


def test_jumprelu_threshold_applied_once():
    tc = _single()
    x = torch.tensor([[0.51, 0.49, 2.0]], dtype=torch.float64)
    # above θ: passed unchanged (not 0.01 = pre - θ); below θ: zero
    torch.testing.assert_close(tc.encode(x), torch.tensor([[0.51, 0.0, 2.0]], dtype=torch.float64), atol=1e-12, rtol=0)


def test_jumprelu_straight_through_gradients():
    theta, eps = 0.5, 0.1
    tc = _single(jumprelu_bandwidth=eps)
    # pre-activations of feature 0: two within ε/2 of θ (one above, one below), two far from it
    z = torch.tensor([0.52, 0.47, 0.9, 0.1], dtype=torch.float64)
    x = torch.zeros(4, 3, dtype=torch.float64)
    x[:, 0] = z
    tc.encode(x)[:, 0].sum().backward()
    # df/dθ = -(θ/ε) K((z - θ)/ε) for each row in the kernel; dθ/dlogθ = θ
    assert tc.log_threshold.grad[0].item() == pytest.approx(2 * -(theta / eps) * theta)
    assert tc.log_threshold.grad[1:].abs().sum() == 0
    # df/dz = H(z - θ): only rows above θ reach W_enc
    assert tc.W_enc.grad[0, 0].item() == pytest.approx(0.52 + 0.9)

    # L0 penalty: dH/dθ = -(1/ε) K((z - θ)/ε), averaged over the 4 rows; no gradient to the pre-activations
    tc.zero_grad()
    tc.cfg.l0_coefficient = 2.0
    out = tc.loss(x, torch.zeros(4, 2, dtype=torch.float64))
    assert out.sparsity.item() == pytest.approx(2.0 * 2 / 4)  # rows 0.52 and 0.9 are active
    out.sparsity.backward()
    assert tc.log_threshold.grad[0].item() == pytest.approx(2.0 * (2 / 4) * -(1 / eps) * theta)
    assert tc.W_enc.grad is None or not tc.W_enc.grad.any()


def test_relu_sparsity_is_decoder_norm_weighted_l1():
    tc = randomise_(make("relu", l1_coefficient=0.3))
    x, y = torch.randn(10, 8), torch.randn(10, 8)
    out = tc.loss(x, y)
    f = tc.encode(x)
    expected = 0.3 * (f * tc.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(out.sparsity, expected)
    assert make("topk").loss(x, y).sparsity == 0


def test_decoder_bias_is_not_subtracted_from_the_input():
    tc = randomise_(make("relu", skip=True))
    x = torch.randn(10, 8)
    before = tc(x)
    with torch.no_grad():
        tc.b_dec.add_(3.0)
    after = tc(x)
    torch.testing.assert_close(after.pre_acts, before.pre_acts, atol=0, rtol=0)
    torch.testing.assert_close(after.output, before.output + 3.0)


# scales
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_scales_and_folding(activation, skip):
    tc = randomise_(make(activation, skip=skip))
    x, y = 5.0 * torch.randn(64, 8), 0.3 * torch.randn(64, 8) + 1.0
    tc.set_scales_from(x, y)
    assert (x * tc.input_scale).pow(2).sum(-1).mean().item() == pytest.approx(8.0, rel=1e-5)
    assert (y * tc.output_scale).pow(2).sum(-1).mean().item() == pytest.approx(8.0, rel=1e-5)
    before = tc(x)
    # the loss is measured in normalised units, the output in model units
    out = tc.loss(x, y)
    expected = ((y - before.output) * tc.output_scale).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.mse, expected)

    tc.fold_scales()
    assert tc.input_scale.item() == tc.output_scale.item() == 1.0
    after = tc(x)
    torch.testing.assert_close(after.pre_acts, before.pre_acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.features, before.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.output, before.output, atol=1e-5, rtol=1e-5)


def test_set_scales_refuses_zero_data():
    with pytest.raises(ValueError, match="cannot scale x"):
        make().set_scales_from(torch.zeros(4, 8), torch.ones(4, 8))


def test_fvu_is_measured_against_the_mlp_output():
    tc = randomise_(make("relu", skip=True))
    x = 10.0 * torch.randn(50, 8) + 4.0
    y = 0.1 * torch.randn(50, 8) - 2.0
    tc.set_scales_from(x, y)
    y_hat = tc(x).output.detach()
    fvu = tc.loss(x, y).fvu
    vs_y = (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    vs_x = (y - y_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert not fvu.requires_grad
    assert fvu.item() == pytest.approx(vs_y.item(), rel=1e-5)
    assert abs(vs_y - vs_x) > 0.5 * vs_y


# dead features and the auxiliary loss
def test_dead_tracking_counts_tokens():
    tc = make(n_features=4, k=1, dead_after_tokens=10)
    features = torch.zeros(2, 2, 4)  # leading dimensions count as tokens: 4 per update
    features[1, 0, 0] = 0.7
    tc.update_dead(features)
    assert tc.tokens_since_fired.tolist() == [0, 4, 4, 4]
    tc.update_dead(torch.zeros(4, 4))
    features = torch.zeros(4, 4)
    features[3, 2] = 1.0
    tc.update_dead(features)
    assert tc.tokens_since_fired.tolist() == [8, 12, 0, 12]
    assert tc.dead_mask().tolist() == [False, True, False, True]
    assert tc.dead_fraction() == 0.5


def test_aux_loss_fits_the_detached_residual_with_dead_features():
    tc = randomise_(make("topk", n_features=16, k=2, aux_k=3, aux_coefficient=0.5, dead_after_tokens=5))
    x, y = torch.randn(32, 8), torch.randn(32, 8)
    tc.set_scales_from(x, y)
    assert tc.loss(x, y).aux == 0  # nothing dead yet
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:6] = True
    tc.tokens_since_fired[dead] = 5

    out = tc.loss(x, y)
    with torch.no_grad():
        fwd = tc(x)
        e = (y - fwd.output) * tc.output_scale
        pre = fwd.pre_acts.masked_fill(~dead, -torch.inf)
        top = pre.topk(3, dim=-1)
        f_aux = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        expected = 0.5 * (e - f_aux @ tc.W_dec).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    assert out.aux > 0
    torch.testing.assert_close(out.aux, expected)

    out.aux.backward()
    # the residual is a constant: no gradient through it to the bias or the live features' decoder rows
    assert tc.b_dec.grad is None or not tc.b_dec.grad.any()
    assert not tc.W_dec.grad[~dead].any() and tc.W_dec.grad[dead].abs().sum() > 0
    assert not tc.W_enc.grad[:, ~dead].any()


def test_normalize_decoder():
    tc = make()
    with torch.no_grad():
        tc.W_dec.mul_(torch.rand(16, 1) + 0.5)
    tc.normalize_decoder_()
    torch.testing.assert_close(tc.W_dec.norm(dim=1), torch.ones(16))


# a planted sparse problem
def planted_problem(n_planted=16, d=64, rows=4096, active=3):
    g = torch.Generator().manual_seed(0)
    D_in = normalize(torch.randn(n_planted, d, generator=g), dim=1)
    D_out = normalize(torch.randn(n_planted, d, generator=g), dim=1)
    which = torch.rand(rows, n_planted, generator=g).argsort(1)[:, :active]
    codes = torch.zeros(rows, n_planted).scatter(1, which, 0.5 + torch.rand(rows, active, generator=g))
    # different scales for x and y exercise the normalisation
    return 3.0 * codes @ D_in, 0.2 * codes @ D_out, D_out


@pytest.mark.parametrize(
    ("activation", "kw"), [("topk", {"k": 4}), ("relu", {"l1_coefficient": 0.03})], ids=["topk", "relu"]
)
def test_planted_dictionary_is_recovered(activation, kw):
    x, y, D_out = planted_problem()
    cfg = TranscoderConfig(d_in=64, d_out=64, n_features=32, activation=activation, dead_after_tokens=2048, **kw)
    tc = Transcoder(cfg)
    tc.set_scales_from(x, y)
    opt = torch.optim.Adam(tc.parameters(), lr=1e-2)
    for _ in range(300):
        i = torch.randint(0, x.shape[0], (256,))
        out = tc.loss(x[i], y[i])
        opt.zero_grad()
        out.total.backward()
        opt.step()
        tc.update_dead(tc.encode(x[i]).detach())
    with torch.no_grad():
        final = tc.loss(x, y)
        cos = D_out @ normalize(tc.W_dec, dim=1).T
    recovered = (cos.max(1).values > 0.9).float().mean()
    assert final.fvu < 0.1
    assert recovered >= 0.8
    if activation == "topk":
        assert final.l0 <= 4


# sets
def _set_members(layers=(2, 0), d=8, model_name="tiny"):
    return {
        layer: Transcoder(TranscoderConfig(d_in=d, d_out=d, n_features=16, k=4, layer=layer, model_name=model_name))
        for layer in layers
    }


def test_transcoder_set_mapping():
    members = _set_members()
    tset = TranscoderSet(members, n_layers_model=4, architecture="gpt_neox")
    assert tset.layers == [0, 2] and list(tset) == [0, 2] and len(tset) == 2
    assert tset[2] is members[2] and 0 in tset and 1 not in tset
    assert [layer for layer, _ in tset.items()] == [0, 2]
    assert tset.model_name == "tiny" and tset.d_model == 8 and tset.n_layers_model == 4
    assert len(list(tset.parameters())) == 8
    with pytest.raises(KeyError, match=r"no transcoder for layer 1; the set covers layers \[0, 2\]"):
        tset[1]


def test_transcoder_set_checks():
    with pytest.raises(ValueError, match="at least one"):
        TranscoderSet({}, n_layers_model=2)
    with pytest.raises(ValueError, match="layer 2 out of range"):
        TranscoderSet(_set_members(), n_layers_model=2)
    with pytest.raises(ValueError, match=r"was made for layer 0 \(cfg.layer\)"):
        TranscoderSet({1: _set_members((0,))[0]}, n_layers_model=4)
    with pytest.raises(ValueError, match="d_model is 16"):
        TranscoderSet(_set_members(), n_layers_model=4, d_model=16)
    with pytest.raises(ValueError, match="was trained on 'tiny', not 'other'"):
        TranscoderSet(_set_members(), n_layers_model=4, model_name="other")


def test_check_compatible():
    tset = TranscoderSet(_set_members(), n_layers_model=4)
    tset.check_compatible(model_name="tiny", n_layers=4, d_model=8)
    tset.check_compatible()
    msg = "transcoders were trained for a model with 4 layers and d_model 8; this model has 2 layers and d_model 16"
    with pytest.raises(ValueError, match=msg):
        tset.check_compatible(n_layers=2, d_model=16)
    with pytest.raises(ValueError, match="name 'tiny'; this model has name 'big'"):
        tset.check_compatible(model_name="big", d_model=8)


# the sparse top-k path
def _dense_topk_loss(tc: Transcoder, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The topk training loss written densely: dense features, dense decoder product, masked top-k for AuxK."""
    cfg = tc.cfg
    x_n, y_n = x * tc.input_scale, y * tc.output_scale
    pre = x_n @ tc.W_enc + tc.b_enc
    top = pre.topk(cfg.k, dim=-1)
    features = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    y_hat_n = features @ tc.W_dec + tc.b_dec
    if tc.W_skip is not None:
        y_hat_n = y_hat_n + x_n @ tc.W_skip
    mse = (y_n - y_hat_n).pow(2).sum(-1).mean()
    dead = tc.dead_mask()
    if not dead.any():
        return mse
    e = (y_n - y_hat_n).detach()
    aux_top = pre.masked_fill(~dead, -torch.inf).topk(min(cfg.aux_k, int(dead.sum())), dim=-1)
    aux_features = torch.zeros_like(pre).scatter(-1, aux_top.indices, aux_top.values.relu())
    aux = (e - aux_features @ tc.W_dec).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return mse + cfg.aux_coefficient * aux


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("n_dead", [0, 3, 40], ids=["none_dead", "few_dead", "many_dead"])
def test_sparse_topk_loss_matches_dense_loss_and_gradients(skip, n_dead):
    tc = randomise_(make("topk", d_in=16, d_out=16, n_features=64, k=4, aux_k=8, skip=skip, dtype="float64"))
    x, y = torch.randn(128, 16, dtype=torch.float64), torch.randn(128, 16, dtype=torch.float64)
    tc.set_scales_from(x, y)
    tc.tokens_since_fired[torch.randperm(64)[:n_dead]] = tc.cfg.dead_after_tokens

    out = tc.loss(x, y)
    grads = torch.autograd.grad(out.total, list(tc.parameters()))
    expected = _dense_topk_loss(tc, x, y)
    expected_grads = torch.autograd.grad(expected, list(tc.parameters()))
    torch.testing.assert_close(out.total, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    assert (out.aux > 0) == (n_dead > 0)


def test_topk_loss_features_are_sparse_rows_of_the_forward_features():
    tc = randomise_(make("topk", n_features=64, k=4))
    x, y = torch.randn(32, 8), torch.randn(32, 8)
    features = tc.loss(x, y).features
    assert features.layout == torch.sparse_csr
    assert features.shape == (32, 64)
    torch.testing.assert_close(features.to_dense(), tc(x).features)

    dense = make("topk", n_features=64, k=4)
    for t in (tc, dense):
        t.tokens_since_fired.fill_(7)
    tc.update_dead(features)
    dense.update_dead(features.to_dense())
    assert torch.equal(tc.tokens_since_fired, dense.tokens_since_fired)
    assert (tc.tokens_since_fired == 0).any() and (tc.tokens_since_fired == 39).any()


def test_sparse_rows_of_ascending_indices_equal_sorted_rows():
    from cellcircuits.transcoders._select import topk_indices

    pre = torch.randn(300, 512)
    indices = topk_indices(pre, 16)
    assert torch.equal(indices, indices.sort(-1).values)  # ascending within each row
    values = pre.gather(-1, indices)
    shuffled = torch.rand(300, 16).argsort(-1)
    got = sparse_rows(values, indices, 512, ascending=True)
    want = sparse_rows(values.gather(-1, shuffled), indices.gather(-1, shuffled), 512)
    for part in ("crow_indices", "col_indices", "values"):
        assert torch.equal(getattr(got, part)(), getattr(want, part)())
    torch.sparse_csr_tensor(got.crow_indices(), got.col_indices(), got.values(), (300, 512), check_invariants=True)
    assert torch.equal(got.to_dense(), torch.zeros(300, 512).scatter(-1, indices, values))


def test_stored_zero_activations_do_not_count_as_fired():
    # a TopK row may choose a feature whose relu activation is 0: it is stored in the CSR but did not fire
    tc = make("topk", n_features=6, k=2)
    values = torch.tensor([[0.0, 1.5], [2.0, 0.0], [0.0, 0.0]])
    indices = torch.tensor([[1, 4], [0, 4], [2, 5]])
    features = sparse_rows(values, indices, 6)
    assert tc.fired_mask(features).tolist() == [True, False, False, False, True, False]
    assert torch.equal(tc.fired_mask(features), tc.fired_mask(features.to_dense()))
    tc.tokens_since_fired.fill_(10)
    tc.update_dead(features)
    assert tc.tokens_since_fired.tolist() == [0, 13, 13, 13, 0, 13]
    crow, columns = torch.tensor([0, 1]), torch.tensor([6])  # a column past the last feature
    with pytest.raises(IndexError, match=r"feature columns must lie in 0 \.\. 5"):
        tc.update_dead(torch.sparse_csr_tensor(crow, columns, torch.ones(1), (1, 6), check_invariants=False))
    assert tc.tokens_since_fired.tolist() == [0, 13, 13, 13, 0, 13]  # unchanged


@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("n_dead", [0, 5, 12, 150], ids=["none_dead", "few_dead", "all_dead_used", "many_dead"])
def test_topk_gathered_backward_matches_dense_autograd(monkeypatch, backward, skip, n_dead):
    """The sparse-gradient TopK training path against plain dense autograd, parameters and input, in float64."""
    from cellcircuits.transcoders import _kernels as _transcoder

    # force one backward formulation of _GatheredEncode: sparse products or the dense scatter
    monkeypatch.setattr(_transcoder, "_DENSE_BACKWARD_FRACTION", 0 if backward == "sparse" else 10**9)
    torch.manual_seed(n_dead)
    tc = randomise_(make("topk", d_in=12, d_out=10, n_features=256, k=8, aux_k=16, skip=skip, dtype="float64"))
    x = torch.randn(96, 12, dtype=torch.float64)
    y = torch.randn(96, 10, dtype=torch.float64)
    tc.set_scales_from(x, y)
    tc.tokens_since_fired[torch.randperm(256)[:n_dead]] = tc.cfg.dead_after_tokens

    x_got, x_want = x.clone().requires_grad_(), x.clone().requires_grad_()
    params = list(tc.parameters())
    out = tc.loss(x_got, y)
    grads = torch.autograd.grad(out.total, [*params, x_got])
    expected = _dense_topk_loss(tc, x_want, y)
    expected_grads = torch.autograd.grad(expected, [*params, x_want])
    torch.testing.assert_close(out.total, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (out.aux > 0) == (n_dead > 0)
    # without an input gradient only the parameters get one
    tc.zero_grad()
    tc.loss(x, y).total.backward()
    for p, want in zip(params, expected_grads[:-1], strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12)


def test_topk_training_float32_matches_dense_autograd():
    tc = randomise_(make("topk", d_in=16, d_out=16, n_features=512, k=8, aux_k=32))
    x, y = torch.randn(256, 16), torch.randn(256, 16)
    tc.set_scales_from(x, y)
    tc.tokens_since_fired[torch.randperm(512)[:100]] = tc.cfg.dead_after_tokens
    out = tc.loss(x, y)
    grads = torch.autograd.grad(out.total, list(tc.parameters()))
    expected = _dense_topk_loss(tc, x, y)
    expected_grads = torch.autograd.grad(expected, list(tc.parameters()))
    torch.testing.assert_close(out.total, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # forward and encode still give the dense features of the same selection
    torch.testing.assert_close(out.features.to_dense(), tc.encode(x))


def test_check_compatible_can_warn_about_another_model_name(recwarn):
    tset = TranscoderSet(_set_members(), n_layers_model=4)
    with pytest.warns(UserWarning, match=r"trained on 'tiny'.*'big'"):
        tset.check_compatible(model_name="big", n_layers=4, d_model=8, name_mismatch="warn")
    with pytest.raises(ValueError, match="2 layers"):  # a shape mismatch stays an error
        tset.check_compatible(model_name="big", n_layers=2, name_mismatch="warn")
    recwarn.clear()
    unnamed = TranscoderSet(_set_members(model_name=""), n_layers_model=4)
    unnamed.check_compatible(model_name="big", n_layers=4, d_model=8, name_mismatch="warn")
    unnamed.check_compatible(model_name="big", n_layers=4, d_model=8)
    tset.check_compatible(model_name="tiny", name_mismatch="warn")
    assert not [w for w in recwarn if "trained on" in str(w.message)]


def test_transposed_layout_is_the_stable_sort_of_the_columns():
    from cellcircuits.transcoders._kernels import _transposed_layout

    torch.manual_seed(2)
    indices = torch.randint(0, 40, (30, 5))  # repeated columns, within rows and across them
    crow, order, row_of = _transposed_layout(indices, 40)
    want = indices.reshape(-1).argsort(stable=True)
    assert torch.equal(order, want)
    assert torch.equal(row_of, want // 5)
    assert torch.equal(
        crow, torch.cat([torch.zeros(1, dtype=torch.long), indices.reshape(-1).bincount(minlength=40).cumsum(0)])
    )
    with pytest.raises(IndexError, match=r"feature indices must lie in 0 \.\. 39"):
        _transposed_layout(torch.tensor([[0, 40]]), 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 53), (300, 17)])  # sides that are not multiples of the tiles
def test_transposed_copy_is_the_transpose(monkeypatch, dtype, shape):
    from cellcircuits.transcoders import _cpu, _kernels

    a = torch.randn(*shape).to(dtype)
    small = _kernels._transposed_copy(a)  # below the size for the kernel: torch's copy
    monkeypatch.setattr(_kernels, "_TILED_TRANSPOSE_ENTRIES", 1)
    monkeypatch.setattr(_cpu, "_ENTRIES_PER_THREAD", 256)  # rows in parts, on as many threads as torch has
    tiled = _kernels._transposed_copy(a)
    for got in (small, tiled):
        assert got.is_contiguous() and got.dtype == dtype
        assert torch.equal(got, a.T)


@pytest.mark.parametrize("product", ["_bag_sums", "_csr_product"])
def test_transposed_product_is_the_dense_one(product):
    # both formulations (the CPU's and the other devices'), checked here on the CPU against the dense product
    from cellcircuits.transcoders import _kernels
    from cellcircuits.transcoders._kernels import _transposed_layout
    from cellcircuits.transcoders._select import topk_indices

    torch.manual_seed(0)
    indices = topk_indices(torch.randn(50, 64, dtype=torch.float64), 6)
    values, dense = torch.randn(50, 6, dtype=torch.float64), torch.randn(50, 5, dtype=torch.float64)
    crow, order, row_of = _transposed_layout(indices, 64)
    got = getattr(_kernels, product)(crow, row_of, values.reshape(-1)[order], dense)
    S = torch.zeros(50, 64, dtype=torch.float64).scatter(-1, indices, values)
    torch.testing.assert_close(got, S.T @ dense)


@pytest.mark.parametrize("dots", ["_sampled_product", "_bag_weight_grad"])
def test_sampled_dots_are_the_rows_dot_products(dots):
    from cellcircuits.transcoders import _kernels
    from cellcircuits.transcoders._select import topk_indices

    torch.manual_seed(1)
    indices = topk_indices(torch.randn(40, 32, dtype=torch.float64), 4)
    grad, weight = torch.randn(40, 7, dtype=torch.float64), torch.randn(32, 7, dtype=torch.float64)
    got = getattr(_kernels, dots)(grad, weight, indices)
    torch.testing.assert_close(got, (grad[:, None, :] * weight[indices]).sum(-1))
