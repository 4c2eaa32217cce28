"""Tokenized prompts and the alignment of token positions to genes and to the answer."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..pp._prompts import PromptConfig, answer_text

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import PreTrainedTokenizerFast

    from ..pp._prompts import Prompt


class TokenizedPrompt(NamedTuple):
    """A prompt's token ids and where each gene and the answer stand among them."""

    input_ids: list[int]
    """Token ids of the prompt (with the tokenizer's special tokens, e.g. BOS)."""
    genes: list[str]
    """Genes of the prompt, in order."""
    gene_positions: list[np.ndarray]
    """Per gene, the positions of the tokens that spell it (BPE splits ``HLA-DRA`` into several)."""
    answer_position: int
    """Position of the last prompt token, whose next-token logits give the answer's first token."""


def gene_token_positions(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Tokens overlapping each character span.

    Parameters
    ----------
    offsets
        ``(n_tokens, 2)`` character offsets ``[start, end)`` of each token; special tokens have ``start == end``.
    spans
        Character span ``[start, end)`` of each gene.

    Returns
    -------
    Per span, the sorted positions of the non-empty tokens that overlap it.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    real = np.flatnonzero(offsets[:, 1] > offsets[:, 0])
    starts, ends = offsets[real, 0], offsets[real, 1]
    out = []
    for s, e in spans:
        # tokens are in text order: the first one ending after s up to the last one starting before e
        lo = np.searchsorted(ends, s, side="right")
        hi = np.searchsorted(starts, e, side="left")
        out.append(real[lo:hi])
    return out


def tokenize_prompts(tokenizer: PreTrainedTokenizerFast, prompts: Sequence[Prompt]) -> list[TokenizedPrompt]:
    """Tokenize prompts and locate the tokens of each gene and of the answer.

    Parameters
    ----------
    tokenizer
        A fast tokenizer (it must return character offsets).
    prompts
        Prompts from :func:`cellcircuits.pp.build_prompt`.

    Returns
    -------
    One :class:`TokenizedPrompt` per prompt.

    Raises
    ------
    ValueError
        When a gene is spelled by no token (e.g. the tokenizer dropped it).
    """
    enc = tokenizer([p.text for p in prompts], return_offsets_mapping=True)
    out = []
    for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"], strict=True):
        positions = gene_token_positions(np.asarray(offsets), prompt.gene_spans)
        missing = [g for g, pos in zip(prompt.genes, positions, strict=True) if len(pos) == 0]
        if missing:
            msg = f"The tokenizer spells no token for the gene(s) {missing[:5]} in a prompt."
            raise ValueError(msg)
        out.append(TokenizedPrompt(list(ids), prompt.genes, positions, len(ids) - 1))
    return out


def end_of_answer_id(tokenizer: PreTrainedTokenizerFast, config: PromptConfig) -> int:
    """Id of the token that ends an answer: ``config.eos_token``, or the tokenizer's EOS token.

    Parameters
    ----------
    tokenizer
        The model's tokenizer.
    config
        The model's prompt settings.

    Returns
    -------
    The token id.

    Raises
    ------
    ValueError
        When the tokenizer has no EOS token, or does not know ``config.eos_token`` as a single token.
    """
    if config.eos_token is None:
        if tokenizer.eos_token_id is None:
            msg = "the tokenizer has no EOS token; set the prompt settings' eos_token (or append_eos=False)"
            raise ValueError(msg)
        return int(tokenizer.eos_token_id)
    token_id = tokenizer.get_vocab().get(config.eos_token)  # added and special tokens included
    if token_id is None:
        msg = f"the tokenizer has no token {config.eos_token!r} (the prompt settings' eos_token)"
        raise ValueError(msg)
    return int(token_id)


def label_token_ids(tokenizer: PreTrainedTokenizerFast, config: PromptConfig, labels: Sequence[str]) -> list[list[int]]:
    """Token ids of each label's answer as the model was trained on it, end-of-answer token included.

    With ``config.answer_tokenization == "joint"`` (cell2sentence's ``tokenize_all``: prompt and answer tokenized
    as one text) the answer ``answer_prefix + label + answer_suffix`` is tokenized in context, after the template's
    closing text, and kept only when that context tokenizes the same with and without it, so the ids equal those
    of the full training text. With ``"separate"`` (cell2sentence's ``tokenize_loss_on_response``) the answer is
    tokenized on its own, with the tokenizer's special tokens, as the training did. The end-of-answer token
    (:func:`end_of_answer_id`) follows when ``config.append_eos``.

    Parameters
    ----------
    tokenizer
        The model's tokenizer.
    config
        The model's prompt settings (template and answer format).
    labels
        Cell-type labels.

    Returns
    -------
    Per label, the token ids that follow the prompt when the model answers it.

    Raises
    ------
    ValueError
        When a label would merge with the prompt's last token, or tokenizes to nothing.
    """
    end = [end_of_answer_id(tokenizer, config)] if config.append_eos else []
    context = config.template.split("{cell_sentence}")[-1]
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    out = []
    for label in labels:
        text = answer_text(label, config)
        if config.answer_tokenization == "separate":
            ids = list(tokenizer(text)["input_ids"])
            if not ids:
                msg = f"Label {label!r} tokenizes to nothing."
                raise ValueError(msg)
        else:
            full = tokenizer(context + text, add_special_tokens=False)["input_ids"]
            if full[: len(base)] != base or len(full) == len(base):
                msg = (
                    f"Label {label!r} does not tokenize as a clean continuation of the prompt; adjust the prompt "
                    "settings' answer_prefix, or use answer_tokenization='separate' if the model was trained so."
                )
                raise ValueError(msg)
            ids = full[len(base) :]
        out.append([*ids, *end])
    return out
