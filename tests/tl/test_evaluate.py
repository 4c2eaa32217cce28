from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import cellcircuits as cc
from cellcircuits.models import C2SModel, record, tokenize_prompts
from cellcircuits.pp import PromptConfig
from cellcircuits.transcoders import Transcoder, TranscoderConfig, TranscoderSet

from ..helpers import LABELS

COLUMNS = [
    "layer",
    "fvu",
    "l0",
    "dead_fraction",
    "dense_fraction",
    "ce_loss_original",
    "ce_loss_spliced",
    "ce_loss_zero_ablated",
    "loss_recovered",
    "accuracy_original",
    "accuracy_spliced",
    "agreement",
]


def random_set(layers=(0, 1), *, d=32, zero=False) -> TranscoderSet:
    tcs = {}
    for layer in layers:
        tc = Transcoder(TranscoderConfig(d_in=d, d_out=d, n_features=64, activation="relu", layer=layer))
        with torch.no_grad():
            if zero:
                for p in tc.parameters():
                    p.zero_()
            else:
                tc.b_enc.normal_(0, 0.05)
                tc.b_dec.normal_(0, 0.1)
        tcs[layer] = tc
    return TranscoderSet(tcs, n_layers_model=2)


def per_cell(c2s, adata):
    """Per cell: token ids, gene-token positions, gene + answer positions (each prompt run alone, no padding)."""
    sentences = adata.obs["cell_sentence"].tolist()
    out = []
    for tp in tokenize_prompts(c2s.tokenizer, c2s.build_prompts(sentences)):
        genes = np.unique(np.concatenate([np.asarray(p) for p in tp.gene_positions] or [[]])).astype(int)
        out.append((torch.tensor([tp.input_ids]), genes, np.union1d(genes, [tp.answer_position]).astype(int)))
    return out


def hand_mlp_stats(c2s, adata, tset):
    """Per layer: stacked MLP outputs y and transcoder outputs/features at gene and answer tokens."""
    a = c2s.adapter
    ys, yhats, feats = ({lay: [] for lay in tset.layers} for _ in range(3))
    points = [p for lay in tset.layers for p in (a.mlp_in(lay), a.mlp_out(lay))]
    for ids, _, read in per_cell(c2s, adata):
        with record(c2s.model, points) as rec, torch.no_grad():
            c2s.model(input_ids=ids)
            for lay, tc in tset.items():
                x = rec[a.mlp_in(lay)][0][0, read]
                ys[lay].append(rec[a.mlp_out(lay)][0][0, read].double())
                out = tc(x)
                yhats[lay].append(out.output.double())
                feats[lay].append(out.features)
    return ({lay: torch.cat(v) for lay, v in d.items()} for d in (ys, yhats, feats))


def hand_ce(c2s, adata) -> float:
    total, count = 0.0, 0
    for ids, genes, _ in per_cell(c2s, adata):
        with torch.no_grad():
            logp = torch.log_softmax(c2s.model(input_ids=ids).logits[0].double(), -1)
        for t in genes:
            total -= logp[t - 1, ids[0, t]].item()
            count += 1
    return total / count


@pytest.fixture
def adata(toy_adata):
    cc.pp.cell_sentences(toy_adata)
    return toy_adata


def test_columns_and_metrics_match_hand_computation(adata, tiny_c2s):
    tset = random_set()
    before_obs, before_uns = adata.obs.copy(), dict(adata.uns)
    df = cc.tl.evaluate_transcoders(adata, tiny_c2s, tset, label_key="label", batch_size=5, progress=False)
    assert list(df.columns) == COLUMNS
    assert df["layer"].tolist() == [0, 1, "all"]
    # nothing written to adata
    pd.testing.assert_frame_equal(adata.obs, before_obs)
    assert adata.uns.keys() == before_uns.keys()
    assert df.attrs["cells"] == adata.obs_names.tolist()

    ys, yhats, feats = hand_mlp_stats(tiny_c2s, adata, tset)
    num = {lay: float((ys[lay] - yhats[lay]).pow(2).sum()) for lay in ys}
    den = {lay: float((ys[lay] - ys[lay].mean(0)).pow(2).sum()) for lay in ys}
    rows = df.set_index("layer")
    for lay in (0, 1):
        assert rows.loc[lay, "fvu"] == pytest.approx(num[lay] / den[lay], rel=1e-6)
        active = feats[lay] != 0
        assert rows.loc[lay, "l0"] == pytest.approx(float(active.sum(1).double().mean()), rel=1e-9)
        assert rows.loc[lay, "dead_fraction"] == pytest.approx(float((~active.any(0)).double().mean()))
        assert rows.loc[lay, "dense_fraction"] == pytest.approx(float((active.double().mean(0) > 0.5).double().mean()))
    assert rows.loc["all", "fvu"] == pytest.approx(sum(num.values()) / sum(den.values()), rel=1e-6)
    assert rows.loc["all", "l0"] == pytest.approx(rows.loc[[0, 1], "l0"].mean(), rel=1e-9)
    assert df.attrs["n_tokens"] == len(ys[0])

    ce = hand_ce(tiny_c2s, adata)
    assert (df["ce_loss_original"] == df["ce_loss_original"].iloc[0]).all()
    assert df["ce_loss_original"].iloc[0] == pytest.approx(ce, abs=1e-5)
    r = df.iloc[0]
    expected = (r.ce_loss_zero_ablated - r.ce_loss_spliced) / (r.ce_loss_zero_ablated - r.ce_loss_original)
    assert r.loss_recovered == pytest.approx(expected)
    # a random transcoder does change the model's loss
    assert (df["ce_loss_spliced"] != df["ce_loss_original"]).all()
    for col in ("accuracy_original", "accuracy_spliced", "agreement"):
        assert df[col].between(0, 1).all()

    # accuracy of the original model, from predict_cell_types
    pred = cc.tl.predict_cell_types(adata, tiny_c2s, progress=False, copy=True).obs["c2s_cell_type"].astype(str)
    assert df["accuracy_original"].iloc[0] == pytest.approx(np.mean(pred == adata.obs["label"]))


def test_spliced_ce_matches_splice_by_hand(adata, tiny_c2s):
    tset = random_set()
    df = cc.tl.evaluate_transcoders(adata, tiny_c2s, tset, progress=False).set_index("layer")
    with cc.transcoders.splice(tiny_c2s, tset, layers=[1]):
        spliced = hand_ce(tiny_c2s, adata)
    with cc.transcoders.splice(tiny_c2s, mode="zero"):
        zero_all = hand_ce(tiny_c2s, adata)
    assert df.loc[1, "ce_loss_spliced"] == pytest.approx(spliced, abs=1e-5)
    assert df.loc["all", "ce_loss_zero_ablated"] == pytest.approx(zero_all, abs=1e-5)
    assert "accuracy_original" not in df.columns


def test_zero_transcoders_are_zero_ablation(adata, tiny_c2s):
    df = cc.tl.evaluate_transcoders(adata, tiny_c2s, random_set(zero=True), progress=False)
    np.testing.assert_array_equal(df["ce_loss_spliced"], df["ce_loss_zero_ablated"])
    np.testing.assert_array_equal(df["loss_recovered"], 0.0)
    np.testing.assert_array_equal(df["l0"], 0.0)
    np.testing.assert_array_equal(df["dead_fraction"], 1.0)
    np.testing.assert_array_equal(df["dense_fraction"], 0.0)
    # with y_hat = 0, fvu = sum ||y||² / sum ||y - mean y||² (> 1)
    ys, _, _ = hand_mlp_stats(tiny_c2s, adata, random_set(zero=True))
    num = {lay: float(y.pow(2).sum()) for lay, y in ys.items()}
    den = {lay: float((y - y.mean(0)).pow(2).sum()) for lay, y in ys.items()}
    rows = df.set_index("layer")
    for lay in (0, 1):
        assert rows.loc[lay, "fvu"] == pytest.approx(num[lay] / den[lay], rel=1e-6)
        assert rows.loc[lay, "fvu"] > 1
    assert rows.loc["all", "fvu"] == pytest.approx(sum(num.values()) / sum(den.values()), rel=1e-6)


def test_exact_transcoder_of_a_removed_mlp(adata, tiny_c2s):
    # with layer 0's MLP writing zeros, a zero transcoder replaces it exactly
    mlp = tiny_c2s.adapter.module(0, "mlp").dense_4h_to_h
    with torch.no_grad():
        mlp.weight.zero_()
        mlp.bias.zero_()
    df = cc.tl.evaluate_transcoders(adata, tiny_c2s, random_set(layers=(0,), zero=True), label_key="label")
    assert df["layer"].tolist() == [0, "all"]
    for _, r in df.iterrows():
        assert r.ce_loss_spliced == r.ce_loss_original == r.ce_loss_zero_ablated
        assert r.agreement == 1.0
        assert r.accuracy_spliced == r.accuracy_original
        # 0 / 0: y does not vary, and removing the MLP does not change the loss
        assert math.isnan(r.fvu) and math.isnan(r.loss_recovered)


def test_subsample_is_reproducible_and_sentences_built_on_the_fly(toy_adata, tiny_c2s):
    tset = random_set()
    a = cc.tl.evaluate_transcoders(toy_adata, tiny_c2s, tset, n_cells=5, random_state=3, progress=False)
    b = cc.tl.evaluate_transcoders(toy_adata, tiny_c2s, tset, n_cells=5, random_state=3, progress=False)
    pd.testing.assert_frame_equal(a, b)
    cells = a.attrs["cells"]
    assert len(cells) == 5 and "cell_sentence" not in toy_adata.obs.columns
    # the same cells, with stored sentences (same tie-break seed), give the same numbers
    sub = cc.pp.cell_sentences(toy_adata[cells].copy(), random_state=3, copy=True)
    c = cc.tl.evaluate_transcoders(sub, tiny_c2s, tset, progress=False)
    pd.testing.assert_frame_equal(a, c, rtol=1e-6)


def test_errors(adata, tiny_c2s):
    tset = random_set()
    no_labels = C2SModel(
        model=tiny_c2s.model,
        tokenizer=tiny_c2s.tokenizer,
        adapter=tiny_c2s.adapter,
        prompt=PromptConfig(n_genes=8),
        name="x",
    )
    with pytest.raises(ValueError, match="No candidate labels"):
        cc.tl.evaluate_transcoders(adata, no_labels, tset)
    with pytest.raises(ValueError, match="d_model 16"):
        cc.tl.evaluate_transcoders(adata, tiny_c2s, random_set(d=16))
    with pytest.raises(KeyError, match="'truth' is not a column"):
        cc.tl.evaluate_transcoders(adata, tiny_c2s, tset, label_key="truth")
    with pytest.raises(ValueError, match="n_cells must be a positive integer"):
        cc.tl.evaluate_transcoders(adata, tiny_c2s, tset, n_cells=0)
    # explicit labels serve a model that records none
    df = cc.tl.evaluate_transcoders(adata, no_labels, tset, labels=LABELS, n_cells=2, progress=False)
    assert len(df) == 3
