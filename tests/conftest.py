from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from cellcircuits.models import C2SModel, ModelAdapter, train_tokenizer
from cellcircuits.pp import PromptConfig, build_prompt

from .helpers import GENES, HUB_KINDS, LABELS, make_circuit_adata, make_tiny, save_hub_checkpoint


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def toy_adata() -> ad.AnnData:
    """12 cells x 12 genes of non-negative values with planted ties and one empty cell."""
    rng = np.random.default_rng(0)
    X = rng.integers(0, 4, size=(12, len(GENES))).astype(np.float32)
    X[3] = 0.0  # a cell with no expressed gene
    X[5] = [2, 2, 2, 2, 0, 0, 1, 1, 1, 3, 0, 0]  # ties
    obs = pd.DataFrame({"label": [LABELS[i % 3] for i in range(12)]}, index=[f"cell{i}" for i in range(12)])
    return ad.AnnData(sparse.csr_matrix(X), obs=obs, var=pd.DataFrame(index=GENES))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    rng = np.random.default_rng(1)
    config = PromptConfig(n_genes=8, labels=LABELS)
    texts = []
    for i in range(200):
        genes = list(rng.permutation(GENES)[: rng.integers(3, 9)])
        texts.append(build_prompt(genes, config).text + " " + LABELS[i % 3])
    return train_tokenizer(texts, vocab_size=320)


@pytest.fixture
def tiny_c2s(tiny_tokenizer) -> C2SModel:
    """A tiny random GPT-NeoX C2S model with the BPE tokenizer and three labels."""
    model = make_tiny("gpt_neox", len(tiny_tokenizer), attn="sdpa")
    prompt = PromptConfig(n_genes=8, labels=LABELS, append_eos=True)
    return C2SModel(model=model, tokenizer=tiny_tokenizer, adapter=ModelAdapter(model), prompt=prompt, name="tiny")


@pytest.fixture(scope="session")
def hub_checkpoints(tmp_path_factory) -> dict:
    """Per kind of ``helpers.HUB_KINDS``, a directory holding a tiny checkpoint as the Hub gives it (no settings)."""
    root = tmp_path_factory.mktemp("hub")
    return {kind: save_hub_checkpoint(kind, root / kind) for kind in HUB_KINDS}


@pytest.fixture
def circ() -> ad.AnnData:
    """A synthetic traced circuit of two groups (see ``helpers.make_circuit_adata``)."""
    return make_circuit_adata()
