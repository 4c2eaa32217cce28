"""Preprocessing: AnnData to cell sentences and prompts (no torch)."""

from ._prompts import C2S_CELL_TYPE_TEMPLATE, Prompt, PromptConfig, build_prompt
from ._sentences import cell_sentences

__all__ = ["C2S_CELL_TYPE_TEMPLATE", "Prompt", "PromptConfig", "build_prompt", "cell_sentences"]
