"""How genes are spelled in tokens: which of a gene's tokens tell it apart from every other gene."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import PreTrainedTokenizerFast


def _first_own_token(tokenizer: PreTrainedTokenizerFast, genes: Sequence[str]) -> list[tuple[tuple[int, ...], int]]:
    """Per gene, its spelling in a cell sentence (after a space) and the index of its first own token.

    The first token whose prefix no other gene shares; the last token for a gene whose whole spelling prefixes
    another's.
    """
    spelled = [tuple(tokenizer(" " + g, add_special_tokens=False)["input_ids"]) for g in genes]
    prefix_count: dict[tuple[int, ...], int] = {}
    for ids in set(spelled):
        for j in range(1, len(ids) + 1):
            prefix_count[ids[:j]] = prefix_count.get(ids[:j], 0) + 1
    return [
        (ids, next((j for j in range(len(ids)) if prefix_count[ids[: j + 1]] == 1), len(ids) - 1)) for ids in spelled
    ]


def distinguishing_tokens(tokenizer: PreTrainedTokenizerFast, genes: Sequence[str]) -> list[list[int]]:
    """Per gene, the tokens that tell it apart: from the first one whose prefix no other gene shares, to the end.

    Genes are spelled as in a cell sentence (after a space). Many genes share their first tokens (" HLA", " RPL",
    " CD"), and those say nothing about which gene is named; from the first position at which the gene's token
    prefix is its own, its tokens name it. A small vocabulary reuses single letters across genes, so one token
    alone ("D" in "ID2", "HSPD1", "MED28") would not tell genes apart; the rest of the spelling does. A gene whose
    whole spelling prefixes another's (``CD3`` and ``CD3E``) gets its last token.

    Parameters
    ----------
    tokenizer
        The model's tokenizer.
    genes
        Gene names, spelled against each other (a gene's tokens are its own only among these).

    Returns
    -------
    Per gene, its distinguishing token ids.
    """
    return [list(ids[j:]) for ids, j in _first_own_token(tokenizer, genes)]


def identifying_offsets(tokenizer: PreTrainedTokenizerFast, genes: Sequence[str]) -> dict[str, int]:
    """Per gene, how many of its leading tokens other genes share: the tokens before the model can know the gene.

    A causal model reading ``" FOS"`` as ``" F" "OS"`` has seen, at ``" F"``, only a prefix that ``FDX1``, ``FGR``
    and every other F-gene share; from the first token whose prefix is the gene's own it can represent the gene.
    The tokens from the offset on are the gene's :func:`distinguishing_tokens`.

    Parameters
    ----------
    tokenizer
        The model's tokenizer.
    genes
        Gene names, spelled against each other; repeats count once.

    Returns
    -------
    Per gene, the number of its leading tokens that other genes share.
    """
    genes = list(dict.fromkeys(genes))
    return {g: j for g, (_, j) in zip(genes, _first_own_token(tokenizer, genes), strict=True)}


def unspellable_genes(tokenizer: PreTrainedTokenizerFast, genes: Sequence[str]) -> list[str]:
    """Genes whose spelling in a cell sentence holds the tokenizer's unknown token (never for byte-level BPE)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    return [g for g in genes if unk in tokenizer(" " + g, add_special_tokens=False)["input_ids"]]
