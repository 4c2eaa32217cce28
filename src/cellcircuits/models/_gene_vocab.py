"""Gene symbols as single tokens: a word-level pre-tokenizer and gene entries added to a byte-level BPE vocabulary.

A byte-level BPE with a small vocabulary spells ``" HLA-DRB1"`` in several tokens. With a gene vocabulary, the
tokenizer pre-tokenizes on whitespace (trailing punctuation split off, so the sentence's final ``"."`` stands
alone), adds one vocabulary entry per gene (its cell-sentence form, after a space) and lets a word that is a
vocabulary entry bypass the merges (the BPE model's ``ignore_merges``). So a gene is one token exactly when the
whole whitespace-delimited word is the gene: ``CD1`` never matches inside ``CD14``, ``HLA-DRB1`` is one token, and a
gene outside the vocabulary (or a label word such as ``"CD14+"``) is spelled by the BPE merges as before.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    from tokenizers import Tokenizer
    from tokenizers.pre_tokenizers import PreTokenizer
    from transformers import PreTrainedTokenizerFast

#: Pre-tokenizer pattern with a gene vocabulary: a word (with its leading space) up to its trailing punctuation,
#: a run of punctuation, newlines and spaces as GPT-2's pattern splits them.
GENE_WORD_PATTERN = r" ?[^\s]*[^\s.,:;!?]|[^\s]+|\s+(?!\S)|\s+"
#: Characters a word's end is split from (a gene symbol must not end with one).
TRAILING_PUNCTUATION = ".,:;!?"


def check_gene_vocab(genes: Iterable[str]) -> list[str]:
    """The distinct gene symbols in order, checked to be spellable as one word of a cell sentence.

    Parameters
    ----------
    genes
        Gene symbols.

    Returns
    -------
    The symbols, repeats dropped.

    Raises
    ------
    ValueError
        When there are no genes, or a symbol is empty, holds whitespace or ends with punctuation that the
        pre-tokenizer splits off (``.,:;!?``).
    """
    out = list(dict.fromkeys(str(g) for g in genes))
    if not out:
        msg = "gene_vocab holds no genes."
        raise ValueError(msg)
    bad = [g for g in out if not g or any(c.isspace() for c in g) or g[-1] in TRAILING_PUNCTUATION]
    if bad:
        msg = (
            f"gene_vocab holds symbols that cannot be single words of a cell sentence (empty, with whitespace, or "
            f"ending in one of {TRAILING_PUNCTUATION!r}): {bad[:5]}"
        )
        raise ValueError(msg)
    return out


def gene_word_pre_tokenizer() -> PreTokenizer:
    """Byte-level pre-tokenizer that keeps whitespace-delimited words whole (:data:`GENE_WORD_PATTERN`)."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GENE_WORD_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def byte_level_word(text: str) -> str:
    """``text`` in the byte-level alphabet, as a byte-level BPE vocabulary writes it (``" CD14"`` -> ``"ĠCD14"``)."""
    from tokenizers import pre_tokenizers

    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    return "".join(piece for piece, _ in pieces)


def words_without_genes(texts: Iterable[str], genes: Sequence[str]) -> Iterator[str]:
    """The words of ``texts`` (as :data:`GENE_WORD_PATTERN` splits them) that are not a gene's sentence word.

    Training the BPE on these spends its merges on the template and the labels: the genes get their own tokens.
    """
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(GENE_WORD_PATTERN), behavior="isolated")
    gene_words = {" " + g for g in genes}
    for text in texts:
        yield from (word for word, _ in split.pre_tokenize_str(text) if word not in gene_words)


def drop_merges_of(merges: Sequence[tuple[str, str]], words: set[str]) -> tuple[list[tuple[str, str]], set[str]]:
    """The BPE merges that neither make one of ``words`` nor use a token only such merges make.

    Parameters
    ----------
    merges
        Merges in rank order, each the pair of tokens it joins.
    words
        Tokens no merge may make.

    Returns
    -------
    The kept merges, in order, and the tokens only the dropped merges made (``words`` among them).
    """
    kept: list[tuple[str, str]] = []
    dropped: set[str] = set()
    for a, b in merges:
        if a + b in words or a in dropped or b in dropped:
            dropped.add(a + b)
        else:
            kept.append((a, b))
            dropped.discard(a + b)
    return kept, dropped


def add_gene_words(tokenizer: Tokenizer, genes: Sequence[str]) -> Tokenizer:
    """A copy of a trained BPE tokenizer whose vocabulary has every gene's sentence word as one entry of its own.

    Each gene's word (``" " + gene`` in the byte-level alphabet) becomes a vocabulary entry that no merge makes, so
    no other word is spelled with it (``" CD1C"`` never holds the token of ``" CD1"``): merges that make a gene's
    word, and merges built on their tokens, are dropped with the tokens only they make, and the ids are renumbered.
    The BPE model is set to ``ignore_merges``, so a pre-tokenized word found whole in the vocabulary is one token.

    Parameters
    ----------
    tokenizer
        A trained byte-level BPE tokenizer whose pre-tokenizer keeps words whole (:func:`gene_word_pre_tokenizer`).
    genes
        Gene symbols (checked by :func:`check_gene_vocab`).

    Returns
    -------
    The new tokenizer.
    """
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.to_str())
    model = data["model"]
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]  # "a b" in older files
    merges = [(str(a), str(b)) for a, b in pairs]
    words = [byte_level_word(" " + gene) for gene in genes]
    kept, dropped = drop_merges_of(merges, set(words))
    old_vocab: dict[str, int] = model["vocab"]
    tokens = [t for t in sorted(old_vocab, key=old_vocab.__getitem__) if t not in dropped or t in words]
    tokens += [w for w in dict.fromkeys(words) if w not in old_vocab]
    vocab = {t: i for i, t in enumerate(tokens)}
    for added in data.get("added_tokens", []):  # the special tokens, trained into the vocabulary's first ids
        added["id"] = vocab[added["content"]]
    model["vocab"] = vocab
    model["merges"] = [list(m) for m in kept]
    model["ignore_merges"] = True
    return Tokenizer.from_str(json.dumps(data))


def gene_token_ids(tokenizer: PreTrainedTokenizerFast, genes: Sequence[str]) -> dict[str, int]:
    """The genes a tokenizer spells as one token in a cell sentence, with that token's id.

    Parameters
    ----------
    tokenizer
        The model's tokenizer.
    genes
        Gene symbols.

    Returns
    -------
    Per gene spelled by a single token after a space (as genes stand in a cell sentence), the token id; genes
    spelled by several tokens are left out.
    """
    out = {}
    for gene in dict.fromkeys(genes):
        ids = tokenizer(" " + gene, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            out[gene] = int(ids[0])
    return out
