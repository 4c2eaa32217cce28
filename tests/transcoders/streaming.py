"""Shared pieces of the streaming-training tests: prompts of random cells and small training settings."""

from __future__ import annotations

import numpy as np

from cellcircuits.models import tokenize_prompts
from cellcircuits.transcoders import TranscoderConfig

from ..helpers import GENES

CONFIG = TranscoderConfig(d_in=32, d_out=32, n_features=64, k=4, dead_after_tokens=2000)
TRAIN = {"batch_size": 64, "lr": 5e-3, "progress": False}


def make_prompts(model, n: int, seed: int = 0):
    """Tokenized prompts of ``n`` cells whose sentences are 3 to 8 random genes."""
    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.permutation(GENES)[: rng.integers(3, 9)]) for _ in range(n)]
    return tokenize_prompts(model.tokenizer, model.build_prompts(sentences))
