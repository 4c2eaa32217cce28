"""Causal-LM loading, architecture adapters, hooks, gene <-> token alignment, gene spelling and the shipped model."""

from ._adapter import AttentionWeights, HookPoint, ModelAdapter, spec_for
from ._answer_check import compare_answer_formats
from ._gene_vocab import gene_token_ids
from ._generate import generate_answers
from ._hooks import record
from ._load import SHIPPED_MODELS, C2SModel, ModelLoadError, load, shipped_model_path
from ._presets import PRESETS, Preset, get_preset
from ._scoring import score_continuations
from ._spelling import distinguishing_tokens, identifying_offsets
from ._tokens import TokenizedPrompt, end_of_answer_id, gene_token_positions, label_token_ids, tokenize_prompts
from ._train import train_c2s, train_tokenizer

__all__ = [
    "PRESETS",
    "SHIPPED_MODELS",
    "AttentionWeights",
    "C2SModel",
    "HookPoint",
    "ModelAdapter",
    "ModelLoadError",
    "Preset",
    "TokenizedPrompt",
    "compare_answer_formats",
    "distinguishing_tokens",
    "end_of_answer_id",
    "gene_token_ids",
    "gene_token_positions",
    "generate_answers",
    "get_preset",
    "identifying_offsets",
    "label_token_ids",
    "load",
    "record",
    "score_continuations",
    "shipped_model_path",
    "spec_for",
    "tokenize_prompts",
    "train_c2s",
    "train_tokenizer",
]
