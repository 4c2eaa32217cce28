"""Builders and constants shared by the test modules; the fixtures are in the ``conftest.py`` files.

Test modules import from here (``from ..helpers import make_tiny``), never from one another or from a conftest.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import cellcircuits as cc
from cellcircuits._keys import SentenceSettings
from cellcircuits.circuits import FeatureEdits
from cellcircuits.circuits._replacement import ReplacementModel
from cellcircuits.transcoders import ActivationStore, StoreWriter, Transcoder, TranscoderConfig, TranscoderSet


def public_object(dotted: str):
    """The object ``cellcircuits.<dotted>`` (``"tl.trace_circuit"``); AttributeError when there is none."""
    obj = cc
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# Tiny models: the toy data's genes, the labels of ``tiny_c2s``

GENES = ["CD14", "LYZ", "HLA-DRA", "MS4A1", "CD79A", "NKG7", "GNLY", "CD3E", "IL7R", "S100A8", "FCGR3A", "PPBP"]
LABELS = ["CD14+ Monocyte", "CD19+ B", "CD56+ NK"]


def make_tiny(arch: str, vocab_size: int, *, seed: int = 0, attn: str = "eager"):
    """A tiny randomly initialised causal LM of the given architecture."""
    torch.manual_seed(seed)
    common = {"vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    if arch == "gpt_neox":
        cfg = GPTNeoXConfig(**common, intermediate_size=64, max_position_embeddings=256, rotary_pct=0.25)
        model = GPTNeoXForCausalLM(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(**common, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg)
    elif arch == "gemma2":
        cfg = Gemma2Config(
            **common, intermediate_size=64, num_key_value_heads=2, head_dim=8, max_position_embeddings=256
        )
        model = Gemma2ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.config._attn_implementation = attn
    return model.eval()


@contextmanager
def forced_tokens(model: torch.nn.Module, tokens: list[int]):
    """Inside the block, the ``k``-th forward pass of ``model`` puts a huge logit on ``tokens[k]`` at the last position.

    A hook on the unembedding, so greedy decoding emits ``tokens`` in order (whatever the batch); passes after the
    last token are left alone. Yields a list that gets one entry per forward pass.
    """
    passes: list[int] = []

    def hook(_module, _args, output):
        if len(passes) < len(tokens):
            output = output.clone()
            output[:, -1, tokens[len(passes)]] += 1e4
        passes.append(len(passes))
        return output

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield passes
    finally:
        handle.remove()


# Transcoders for ``tiny_c2s`` (tests/tl)


def tiny_tset(layers=(0, 1)) -> TranscoderSet:
    """Seeded TopK transcoders on ``tiny_c2s``'s layers, with weights large enough to give active features."""
    torch.manual_seed(3)
    tcs = {}
    for layer in layers:
        cfg = TranscoderConfig(d_in=32, d_out=32, n_features=48, k=6, activation="topk", layer=layer)
        tc = Transcoder(cfg)
        with torch.no_grad():
            tc.W_enc.mul_(5.0)
            tc.W_dec.mul_(5.0)
        tcs[layer] = tc
    return TranscoderSet(tcs, n_layers_model=2)


# Checkpoints in the Hub's layout (tests/models, tests/tl): weights and tokenizer saved by ``save_pretrained``, no
# cellcircuits.json, as a public C2S checkpoint comes. Each pairs a tiny random model with its family's tokenizer
# type, trained here on C2S training texts: GPT-NeoX with a byte-level BPE (Pythia's: <|endoftext|>, no BOS),
# Gemma-2 with a Gemma tokenizer (BPE with byte fallback, <bos> added, <eos>, <pad>, <start_of_turn>/<end_of_turn>),
# Llama with a Llama tokenizer (BPE with byte fallback and a prefix space, <s> added, </s>).

#: Cell Ontology names as CELLxGENE gives them: the first is the start of the second.
ONTOLOGY_LABELS = [
    "CD8-positive, alpha-beta memory T cell",
    "CD8-positive, alpha-beta memory T cell, CD45RO-positive",
    "classical monocyte",
    "naive B cell",
]
HUB_KINDS = {"pythia": "gpt_neox", "gemma2": "gemma2", "llama": "llama"}  # checkpoint kind: architecture
#: Tokenizer class of each kind, as transformers names it (v5 drops the "Fast" of v4's names).
HUB_TOKENIZER_CLASSES = {"pythia": "GPTNeoXTokenizer", "gemma2": "GemmaTokenizer", "llama": "LlamaTokenizer"}


def c2s_training_texts(n: int = 300, seed: int = 0, labels=ONTOLOGY_LABELS) -> list[str]:
    """Full C2S training texts (default prompt settings) without the end token: prompt + " " + label + "."."""
    rng = np.random.default_rng(seed)
    config = cc.pp.PromptConfig()
    texts = []
    for i in range(n):
        genes = list(rng.permutation(GENES)[: rng.integers(3, 9)])
        texts.append(cc.pp.build_prompt(genes, config).text + " " + labels[i % len(labels)] + ".")
    return texts


def _sentencepiece_like_vocab(texts, specials, n_trained: int, prefix_space: bool):
    """Vocabulary (specials, 256 byte-fallback tokens, BPE pieces) and merges of a SentencePiece-style BPE.

    Pieces are learnt within words ("\u2581" starts a word, punctuation stands alone), so the family tokenizer, which
    merges over the whole text, tokenizes as the training did.
    """
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\u2581", "merged_with_next"), pre_tokenizers.Punctuation("isolated")]
    )
    trainer = trainers.BpeTrainer(vocab_size=n_trained, min_frequency=2, show_progress=False)
    tok.train_from_iterator((" " + t if prefix_space else t for t in texts), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges


def hub_tokenizer(kind: str, texts):
    """The tokenizer type of a checkpoint kind (``HUB_KINDS``), trained on ``texts``."""
    from transformers import GemmaTokenizer, GPTNeoXTokenizer, LlamaTokenizer

    if kind == "pythia":
        return GPTNeoXTokenizer().train_new_from_iterator(texts, vocab_size=400)
    if kind == "gemma2":
        turns = ["<start_of_turn>", "<end_of_turn>"]
        vocab, merges = _sentencepiece_like_vocab(
            texts, ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *turns], 200, prefix_space=False
        )
        return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, extra_special_tokens=turns)
    if kind == "llama":
        vocab, merges = _sentencepiece_like_vocab(texts, ["<unk>", "<s>", "</s>"], 200, prefix_space=True)
        return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    raise ValueError(kind)


def save_hub_checkpoint(kind: str, directory, texts=None):
    """Save a tiny random model of ``kind`` and its trained tokenizer to ``directory``, without cellcircuits.json."""
    tokenizer = hub_tokenizer(kind, c2s_training_texts() if texts is None else texts)
    model = make_tiny(HUB_KINDS[kind], len(tokenizer), attn="sdpa" if kind != "gemma2" else "eager")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# Replacement-model cases (tests/circuits): tiny random models of each architecture, and the shipped model.
# Tiny random models (norms and biases perturbed, weights large enough that attention is far from uniform and
# Gemma-2's softcaps bite) get random transcoders on some layers, the middle layer left uncovered. Cases are built
# once per session and shared by the test modules.

VOCAB, SEQ, N_LAYERS, D = 100, 20, 3, 32
COVERED = (0, 2)  # layer 1 stays an error node
ARCHS = ["gpt_neox", "gpt_neox_sequential", "llama", "gemma2"]
# transcoder flavour per architecture: (activation, skip connection)
FLAVOUR = {
    "gpt_neox": ("topk", False),
    "gpt_neox_sequential": ("relu", True),
    "llama": ("jumprelu", True),
    "gemma2": ("topk", True),
    "shipped": ("topk", False),
}


def random_model(arch: str) -> torch.nn.Module:
    """A tiny random causal LM of ``arch`` (``gpt_neox_sequential``: GPT-NeoX without parallel residual)."""
    torch.manual_seed(0)
    common = {
        "vocab_size": VOCAB,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": 4,
        "hidden_size": D,
        "max_position_embeddings": 64,
    }
    if arch.startswith("gpt_neox"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        cfg = GPTNeoXConfig(
            **common,
            intermediate_size=64,
            rope_parameters=rope,
            use_parallel_residual=arch == "gpt_neox",
            attention_bias=True,
        )
        cls = GPTNeoXForCausalLM
    elif arch == "llama":
        cfg = LlamaConfig(**common, intermediate_size=48, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
        cls = LlamaForCausalLM
    else:
        cfg = Gemma2Config(
            **common,
            intermediate_size=48,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=2.0,
            sliding_window=8,
        )
        cls = Gemma2ForCausalLM
    # sdpa where the model has it: recording must switch to eager attention and back
    cfg._attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    return model


def random_transcoders(arch: str, d: int, layers, n_layers: int, n_features: int = 64, k: int = 4) -> TranscoderSet:
    """Random transcoders of ``arch``'s flavour on ``layers``, their features sized to matter next to the MLPs."""
    activation, skip = FLAVOUR[arch]
    tcs = {}
    for layer in layers:
        cfg = TranscoderConfig(
            d_in=d, d_out=d, n_features=n_features, k=k, activation=activation, skip=skip, layer=layer
        )
        tc = Transcoder(cfg)
        with torch.no_grad():
            # features of a size that matters next to the model's own MLPs (the init is small)
            tc.W_enc.mul_(5.0)
            tc.W_dec.mul_(10.0)
            tc.b_enc.normal_(0, 0.05)
            tc.b_dec.normal_(0, 0.5)
            if skip:
                tc.W_skip.normal_(0, 0.1)
            tc.input_scale.fill_(1.7)
            tc.output_scale.fill_(0.6)
        tcs[layer] = tc
    return TranscoderSet(tcs, n_layers_model=n_layers)


@dataclass
class Case:
    arch: str
    model: torch.nn.Module
    transcoders: TranscoderSet
    ids: torch.Tensor
    rm: ReplacementModel


_CASES: dict[str, Case] = {}


def _tiny_case(arch: str) -> Case:
    model = random_model(arch)
    ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(1))
    transcoders = random_transcoders(arch, D, COVERED, N_LAYERS)
    return Case(arch, model, transcoders, ids, ReplacementModel.record(model, transcoders, ids))


def _shipped_case() -> Case:
    c2s = cc.models.load("pbmc68k-tiny", device="cpu")
    adata = cc.ds.pbmc68k()
    x = adata.raw.X[0]
    x = x.toarray().ravel() if hasattr(x, "toarray") else np.asarray(x).ravel()
    genes = list(adata.raw.var_names[np.argsort(-x, kind="stable")][: c2s.prompt.n_genes])
    ids = torch.tensor(c2s.tokenizer(c2s.build_prompts([genes])[0].text)["input_ids"])
    torch.manual_seed(0)
    transcoders = random_transcoders("shipped", c2s.adapter.d_model, range(4), 4, n_features=256, k=8)
    return Case("shipped", c2s.model, transcoders, ids, ReplacementModel.record(c2s, transcoders, ids))


def replacement_case(name: str) -> Case:
    """The case of an architecture in ``ARCHS`` or of ``"shipped"``, built on first use."""
    if name not in _CASES:
        _CASES[name] = _shipped_case() if name == "shipped" else _tiny_case(name)
    return _CASES[name]


# A synthetic traced circuit (tests/get, tests/pl)

TARGET = "CD14+ Monocyte"
CIRCUIT_GENES = {  # gene: marker sets
    "LYZ": "azimuth_mono;panglao_monocyte",
    "CD14": "azimuth_mono",
    "S100A9": "",
    "MS4A1": "azimuth_b",
    "ACTB": "",
}
CIRCUIT_FEATURES = [  # layer, feature, position gene ("" at the answer), label
    (0, 3, "LYZ", "go_bp_2023: neutrophil degranulation"),
    (0, 9, "CD14", "LYZ, S100A9, FCN1"),
    (1, 5, "LYZ", "monocyte identity program of innate immune cells"),
    (1, 12, "", "CD79A, MS4A1"),
    (2, 7, "", "myeloid answer"),
    (2, 1, "", ""),
]
CIRCUIT_EDGES = [  # source, target, sign
    ("gene:LYZ", "L0.F3@LYZ", 1),
    ("gene:LYZ", "L1.F5@LYZ", 1),
    ("gene:CD14", "L0.F9@CD14", 1),
    ("gene:S100A9", "L0.F3@LYZ", 1),
    ("gene:MS4A1", "L1.F12@answer", 1),
    ("gene:ACTB", "L0.F9@CD14", -1),
    ("token:template", "L1.F12@answer", 1),
    ("L0.F3@LYZ", "L1.F5@LYZ", 1),
    ("L0.F9@CD14", "L1.F5@LYZ", -1),
    ("L0.F9@CD14", "L2.F7@answer", 1),
    ("L1.F5@LYZ", "L2.F7@answer", 1),
    ("L1.F12@answer", "L2.F1@answer", -1),
    ("err L1@LYZ", "L2.F7@answer", 1),
    ("L2.F7@answer", f"target:{TARGET}", 1),
    ("L2.F1@answer", f"target:{TARGET}", -1),
    ("err L2@answer", f"target:{TARGET}", 1),
    ("L1.F5@LYZ", f"target:{TARGET}", 1),
    ("gene:LYZ", f"target:{TARGET}", 0),  # absent in every cell: weight 0
]


def _circuit_group_tables(group: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows = []

    def add(node, kind, layer, *, feature=-1, gene="", role="gene", label="", marker_sets=""):
        rows.append(
            {"group": group, "node": node, "kind": kind, "layer": layer, "feature": feature, "gene": gene,
             "role": role, "label": label, "is_marker": bool(marker_sets), "marker_sets": marker_sets}
        )  # fmt: skip

    for gene, sets in CIRCUIT_GENES.items():
        add(f"gene:{gene}", "gene", -1, gene=gene, marker_sets=sets)
    add("token:template", "token", -1, role="template")
    for layer, feature, gene, label in CIRCUIT_FEATURES:
        add(f"L{layer}.F{feature}@{gene or 'answer'}", "feature", layer, feature=feature, gene=gene,
            role="gene" if gene else "answer", label=label)  # fmt: skip
    add("err L1@LYZ", "error", 1, gene="LYZ")
    add("err L2@answer", "error", 2, role="answer")
    add(f"target:{TARGET}", "target", 3, role="target")
    nodes = pd.DataFrame(rows)
    n = len(nodes)
    influence = rng.permutation(np.linspace(0.05, 0.8, n - 1))  # distinct, known
    nodes["influence"] = [*influence, 1.0]
    nodes["attribution"] = rng.normal(0, 0.3, n)
    nodes.loc[nodes["kind"] == "token", "attribution"] = np.nan
    nodes["activation"] = np.where(nodes["kind"] == "feature", rng.uniform(0.5, 3, n), np.nan)
    nodes["frequency"] = np.round(rng.uniform(0.2, 1.0, n), 3)
    nodes.loc[nodes["kind"] == "target", "frequency"] = 1.0
    nodes = nodes[["group", "node", "kind", "layer", "feature", "gene", "role", "influence", "attribution",
                   "activation", "frequency", "label", "is_marker", "marker_sets"]]  # fmt: skip
    weight = np.array([s for _, _, s in CIRCUIT_EDGES]) * rng.uniform(0.05, 1.0, len(CIRCUIT_EDGES))
    edges = pd.DataFrame(
        {
            "group": group,
            "source": [s for s, _, _ in CIRCUIT_EDGES],
            "target": [t for _, t, _ in CIRCUIT_EDGES],
            "weight": weight,
            "frequency": np.round(rng.uniform(0.1, 1.0, len(CIRCUIT_EDGES)), 3),
            "via": rng.choice(["residual", "L1.H2", "L0.H0"], len(CIRCUIT_EDGES)),
            "via_share": rng.uniform(0.3, 1.0, len(CIRCUIT_EDGES)),
        }
    )
    return nodes, edges


def make_circuit_adata(groups: tuple[str, ...] = ("mono", "B")) -> ad.AnnData:
    """An AnnData holding a synthetic circuit under ``.uns["circuits"]["t"]``, 15 nodes per group."""
    tables = [_circuit_group_tables(g, seed) for seed, g in enumerate(groups)]
    cells = pd.DataFrame(
        {
            "obs_name": [f"c{i}" for i in range(5 * len(groups))],
            "group": np.repeat(list(groups), 5),
            "target_value": np.linspace(1, 3, 5 * len(groups)),
            "replacement_score": 0.9,
            "completeness_score": 0.95,
        }
    )
    adata = ad.AnnData(np.zeros((5 * len(groups), 3), dtype=np.float32))
    adata.obs_names = cells["obs_name"].tolist()
    adata.uns["circuits"] = {
        "t": {
            "nodes": pd.concat([n for n, _ in tables], ignore_index=True),
            "edges": pd.concat([e for _, e in tables], ignore_index=True),
            "params": {
                "target": TARGET,
                "groupby": "cell_type",
                "groups": np.array(groups),
                "n_layers": 3,
                "node_threshold": 0.8,
                "edge_threshold": 0.98,
                "model": "tiny",
                "n_cells": 50,
                "uncovered_layers": np.array([1], dtype=np.int64),
            },
            "cells": cells,
        }
    }
    return adata


def interrupted_store(collect, directory, monkeypatch, *, at_flush: int = 3) -> ActivationStore:
    """The store ``collect(directory)`` leaves when interrupted (KeyboardInterrupt) at its ``at_flush``-th shard."""
    real_flush = StoreWriter.flush
    calls = {"n": 0}

    def failing_flush(self):
        calls["n"] += 1
        if calls["n"] == at_flush:
            raise KeyboardInterrupt
        real_flush(self)

    monkeypatch.setattr(StoreWriter, "flush", failing_flush)
    with pytest.raises(KeyboardInterrupt):
        collect(directory)
    monkeypatch.setattr(StoreWriter, "flush", real_flush)
    return ActivationStore(directory)


def free_port() -> int:
    """A TCP port free on this machine now, for a test's torch.distributed rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A transcoder feature planted on chosen tokens (tests/tl/test_interpret*.py)


def planted_feature_read_tokens(tokenizer, genes, gene_tokens: str = "identifying") -> dict[str, list[int]]:
    """Per gene, the token ids :func:`cellcircuits.tl.transcode` reads for it (its identifying tokens on, or all)."""
    from cellcircuits.models import identifying_offsets

    offset = identifying_offsets(tokenizer, genes)
    spelled = {g: tokenizer(" " + g, add_special_tokens=False)["input_ids"] for g in genes}
    if gene_tokens == "all":
        return spelled
    return {g: ids[min(offset[g], len(ids) - 1) :] for g, ids in spelled.items()}


def planted_feature_tokens(tokenizer, genes, chosen, gene_tokens: str = "identifying") -> set[int]:
    """Tokens read for some gene of ``chosen`` and for no other gene of ``genes``: a feature firing exactly there is
    active on a gene occurrence (at the tokens ``gene_tokens`` reads) if and only if the gene is in ``chosen``."""
    read = planted_feature_read_tokens(tokenizer, genes, gene_tokens)
    inside = {t for g in chosen for t in read[g]}
    outside = {t for g in genes if g not in chosen for t in read[g]}
    tokens = inside - outside
    lacking = [g for g in chosen if not set(read[g]) & tokens]
    if lacking:
        raise ValueError(f"genes {lacking} have no token that only genes of the chosen set have")
    return tokens


def planted_feature_transcoders(c2s, genes, plants: dict[int, set[int]], *, n_features: int = 8) -> TranscoderSet:
    """A ReLU transcoder on layer 0 of ``c2s`` (a parallel-residual GPT-NeoX) whose feature ``f`` has activation 1 at
    exactly the tokens ``plants[f]`` among those spelling ``genes``, and 0 at the others; its other features are
    random.

    With a parallel residual the first MLP reads ``post_attention_layernorm(embedding)``, a function of the token
    alone; those inputs are recorded for every token of the genes' spellings, and each planted encoder row solves
    ``w . x_t + b = +1`` (planted tokens) or ``-1`` (the others) exactly: fewer such tokens than ``d_model + 1``
    lie in general position. The fit is checked, so the activations are what the test says.
    """
    from cellcircuits.models import record

    assert c2s.model.config.use_parallel_residual, "the first MLP's input depends on context"
    tokens = sorted({t for g in genes for t in c2s.tokenizer(" " + g, add_special_tokens=False)["input_ids"]})
    point = c2s.adapter.mlp_in(0)
    with torch.no_grad(), record(c2s.model, [point]) as rec:
        c2s.model(input_ids=torch.tensor(tokens)[:, None])
    X = rec[point][0][:, 0].double()  # (n_tokens, d_model), one token per row
    design = torch.cat([X, torch.ones(len(tokens), 1, dtype=X.dtype)], 1)
    torch.manual_seed(5)
    cfg = TranscoderConfig(d_in=X.shape[1], d_out=X.shape[1], n_features=n_features, activation="relu", layer=0)
    tc = Transcoder(cfg)
    with torch.no_grad():
        tc.W_enc.mul_(5.0)
        for feature, planted in plants.items():
            target = torch.tensor([1.0 if t in planted else -1.0 for t in tokens], dtype=X.dtype)
            solution = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
            fitted = design @ solution
            assert torch.allclose(fitted, target, atol=1e-4), "the planted feature cannot be fitted exactly"
            tc.W_enc[:, feature] = solution[:-1].float()
            tc.b_enc[feature] = solution[-1].float()
    return TranscoderSet({0: tc}, n_layers_model=c2s.adapter.n_layers)


def planted_feature_adata(n_cells: int = 60, seed: int = 0) -> ad.AnnData:
    """``n_cells`` cells over ``GENES`` with distinct random expression (a sentence holds each cell's top genes)."""
    rng = np.random.default_rng(seed)
    X = np.stack([rng.permutation(len(GENES)) for _ in range(n_cells)]).astype(np.float32)
    obs = pd.DataFrame({"split": np.where(np.arange(n_cells) < 2 * n_cells // 3, "train", "test")})
    obs.index = [f"cell{i}" for i in range(n_cells)]
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=GENES))


# A planted circuit (tests/tl/test_validate_genes.py): one gene drives the target, by construction.


def planted_direction(model: torch.nn.Module, token: int, competitors) -> torch.Tensor:
    """Unit vector along ``unembedding[token] - mean unembedding[competitors]``, centred (what a final norm reads)."""
    W = model.get_output_embeddings().weight.detach()
    u = W[token] - W[list(competitors)].mean(0) if competitors else W[token].clone()
    u = u - u.mean()
    return u / u.norm()


def planted_c2s(c2s, planted_tokens, sink_token: int, token: int, competitors, strength: float = 5.0):
    """``c2s`` (a tiny GPT-NeoX C2S model), edited in place so that only ``planted_tokens`` drive the target.

    Attention queries and keys are zeroed (every position attends uniformly to its prefix) and each head's value and
    output maps pass the normalised residual through unchanged; the MLPs write nothing. Every token embedding is
    projected off the direction ``d`` the target reads (:func:`planted_direction`), and the planted tokens get
    ``strength * d`` added: only they put anything along ``d`` into the residual stream. ``sink_token`` (one no
    prompt holds) gets as much along ``-d``, so the mean embedding over the vocabulary (the masking's neutral
    embedding) has nothing along ``d`` either.
    """
    model, adapter = c2s.model, c2s.adapter
    d = planted_direction(model, token, competitors)
    nh, dh, dm = adapter.n_heads, adapter.d_head, adapter.d_model
    with torch.no_grad():
        for layer in range(adapter.n_layers):
            attn = adapter.module(layer, "attn")
            qkv = attn.query_key_value
            w = torch.zeros(nh, 3, dh, dm)
            eye = torch.eye(dm)
            for h in range(nh):
                w[h, 2] = eye[h * dh : (h + 1) * dh]  # values: this head's slice of the residual
            qkv.weight.copy_(w.reshape(-1, dm))
            qkv.bias.zero_()
            attn.dense.weight.copy_(eye)  # outputs: each head's slice back in place
            attn.dense.bias.zero_()
            mlp = adapter.module(layer, "mlp")
            mlp.dense_4h_to_h.weight.zero_()
            mlp.dense_4h_to_h.bias.zero_()
            for norm in ("attn_in_norm", "mlp_in_norm"):
                adapter.module(layer, norm).weight.fill_(1.0)
                adapter.module(layer, norm).bias.zero_()
        E = adapter.embed.weight
        E.sub_((E @ d)[:, None] * d[None])
        E[list(planted_tokens)] += strength * d
        E[sink_token] -= strength * len(planted_tokens) * d
    return c2s


# A synthetic circuit with a per-cell gene table, for cc.tl.rank_circuit_genes (tests/tl, tests/pl)

RANKED_GENES = ["LYZ", "CD14", "MS4A1", "NKG7", *[f"GENE{i}" for i in range(26)]]  # 30 genes, 3 of them markers
RANKED_PLANTED = "LYZ"  # influence beyond its position in group "mono"
RANKED_LEADER = "GENE0"  # always among the first 3 genes: high influence, all of it from its position


def ranked_positional(rank: np.ndarray) -> np.ndarray:
    """The influence ``ranked_circuit_adata`` gives a gene for its sentence position alone."""
    return np.exp(-np.asarray(rank, dtype=float) / 5.0)


def ranked_circuit_adata(
    n_cells: tuple[int, ...] = (30, 30), *, sentence_len: int = 20, bump: float = 0.2, noise: float = 0.01, seed=0
) -> ad.AnnData:
    """An AnnData holding a circuit ``"t"`` with a ``genes`` table as ``trace_circuit`` writes it (no model).

    Groups ``mono``, ``B``, ... (``n_cells`` traced cells each, plus 5 untraced cells each). The expression (``.X``,
    no ``.raw``) is random with a few group-specific genes; each traced cell's sentence is a random order of
    ``sentence_len`` of the 30 genes (not the expression order, so that every gene visits many positions), and a
    gene's influence is ``ranked_positional(rank)`` plus noise, plus ``bump`` for ``RANKED_PLANTED`` in group
    ``mono``; attribution is the influence with a random sign. ``RANKED_LEADER`` is moved to one of the first 3
    positions of every sentence, so its influence is high, yet all of it comes from its position.
    """
    rng = np.random.default_rng(seed)
    groups = ["mono", "B", "NK", "T"][: len(n_cells)]
    sizes = [n + 5 for n in n_cells]
    labels = np.repeat(groups, sizes)
    X = rng.gamma(1.0, 1.0, size=(len(labels), len(RANKED_GENES))) * (
        rng.random((len(labels), len(RANKED_GENES))) > 0.3
    )
    for k, g in enumerate(groups):  # group-specific genes: the k-th gene and a few others up in group k
        X[labels == g, k] += 3.0
        X[labels == g, 4 + 3 * k : 7 + 3 * k] += 1.5
    obs_names = [f"cell{i}" for i in range(len(labels))]
    adata = ad.AnnData(X.astype(np.float32), obs=pd.DataFrame({"cell_type": labels}, index=obs_names))
    adata.var_names = RANKED_GENES
    rows, cells = [], []
    for g, n in zip(groups, n_cells, strict=True):
        members = np.flatnonzero(labels == g)[:n]
        for i in members:
            others = rng.permutation([x for x in RANKED_GENES if x != RANKED_LEADER])[: sentence_len - 1]
            sentence = np.insert(others, rng.integers(0, 3), RANKED_LEADER)
            rank = np.arange(sentence_len)
            influence = ranked_positional(rank) + noise * rng.random(sentence_len)
            if g == "mono":
                influence = influence + bump * (sentence == RANKED_PLANTED)
            sign = rng.choice([-1.0, 1.0], sentence_len)
            rows.append(
                pd.DataFrame(
                    {"obs_name": obs_names[i], "group": g, "gene": sentence, "rank": rank, "n_tokens": 2,
                     "influence": influence, "attribution": sign * influence}
                )
            )  # fmt: skip
            cells.append({"obs_name": obs_names[i], "group": g, "label": g, "target_value": 1.0})
    adata.uns["circuits"] = {
        "t": {
            "nodes": pd.DataFrame({"group": groups, "node": "target:x", "kind": "target", "influence": 1.0}),
            "cells": pd.DataFrame(cells),
            "genes": pd.concat(rows, ignore_index=True),
            "params": {
                "target": "",
                "groupby": "cell_type",
                "groups": np.asarray(groups),
                "sentences": SentenceSettings().to_params(),
            },
        }
    }
    return adata


def ranked_knockouts(adata: ad.AnnData, *, seed: int = 0) -> pd.DataFrame:
    """A synthetic ``effects`` table as ``validate_circuit_genes`` writes it: the first 5 genes of each traced cell."""
    rng = np.random.default_rng(seed)
    genes = pd.DataFrame(adata.uns["circuits"]["t"]["genes"])
    effects = genes[genes["rank"] < 5][["obs_name", "group", "gene"]].reset_index(drop=True)
    effects["deletion"] = rng.normal(0.5, 0.3, len(effects))
    effects["masking"] = rng.normal(0.3, 0.3, len(effects))
    return effects


# Feature edits (tests/circuits/test_intervene.py, tests/test_gpu.py)


def random_feature_edits(run, tc, m: int, batch: int, generator: torch.Generator) -> FeatureEdits:
    """Edits of layer ``m`` on every run: factors and set values at active and at inactive features."""
    T, F = len(run.input_ids), tc.cfg.n_features
    active = run.activations[m].nonzero()
    inactive = (run.activations[m] == 0).nonzero()
    scale_at, set_at = [], []
    for b in range(batch):
        pick = active[torch.randperm(len(active), generator=generator)[: 2 + len(active) // 3]]
        off = inactive[torch.randperm(len(inactive), generator=generator)[:3]]
        both = torch.cat([pick, off])
        half = len(both) // 2
        scale_at.append(torch.cat([torch.full((half, 1), b), both[:half]], 1))
        set_at.append(torch.cat([torch.full((len(both) - half, 1), b), both[half:]], 1))
    scale_at_t, set_at_t = torch.cat(scale_at), torch.cat(set_at)
    assert scale_at_t[:, 1].max() < T and set_at_t[:, 2].max() < F
    default = torch.tensor([1.0, 0.0, 1.0, 0.5])[:batch]
    scale = torch.rand(len(scale_at_t), generator=generator) * 3
    value = torch.rand(len(set_at_t), generator=generator) * 2
    return FeatureEdits(default, scale_at_t, scale, set_at_t, value)
