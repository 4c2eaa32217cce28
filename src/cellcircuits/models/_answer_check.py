"""Which answer format a checkpoint was trained on: the likelihood of known cells' true labels under each candidate."""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..pp._prompts import PromptConfig, answer_text, build_prompt
from ._hooks import one_at_a_time
from ._scoring import score_continuations
from ._tokens import label_token_ids

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from transformers import PreTrainedTokenizerFast

    from ._load import C2SModel

#: The prompt settings that make an answer format.
ANSWER_FIELDS = ("answer_prefix", "answer_suffix", "append_eos", "eos_token", "answer_tokenization")
#: Gemma's end-of-turn control token, a candidate end of answer for Gemma-based checkpoints.
END_OF_TURN = "<end_of_turn>"

#: The Cell2Sentence format: " {cell_type}." + EOS, prompt and answer tokenized as one text.
_C2S: dict[str, Any] = {
    "answer_prefix": " ",
    "answer_suffix": ".",
    "append_eos": True,
    "eos_token": None,
    "answer_tokenization": "joint",
}


def default_formats(tokenizer: PreTrainedTokenizerFast) -> list[dict[str, Any]]:
    """The candidate answer formats checked by default.

    The C2S format (``" {label}." + EOS``, joint tokenization), it without the end token, without the ``"."``, and
    without either; without the leading space; the label tokenized on its own after the prompt, with and without the
    ``"."`` (cell2sentence's ``tokenize_loss_on_response`` and the 2023 cell2sentence-ft recipe); and, when the
    tokenizer has it, the C2S format ended by ``<end_of_turn>`` in place of EOS.

    Parameters
    ----------
    tokenizer
        The model's tokenizer.

    Returns
    -------
    One dict of :data:`ANSWER_FIELDS` per format.
    """
    grid = [
        _C2S,
        {**_C2S, "append_eos": False},
        {**_C2S, "answer_suffix": ""},
        {**_C2S, "answer_suffix": "", "append_eos": False},
        {**_C2S, "answer_prefix": ""},
        {**_C2S, "answer_prefix": "", "answer_tokenization": "separate"},
        {**_C2S, "answer_prefix": "", "answer_suffix": "", "answer_tokenization": "separate"},
    ]
    if END_OF_TURN in tokenizer.get_vocab():
        grid.append({**_C2S, "eos_token": END_OF_TURN})
    return [dict(f) for f in grid]


def _answer_settings(config: PromptConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in ANSWER_FIELDS}


def _candidate_configs(
    model: C2SModel, formats: Sequence[Mapping[str, Any] | PromptConfig] | None
) -> tuple[list[PromptConfig], list[bool]]:
    """The settings of each candidate and whether they are the model's own (default grid: the model's added first)."""
    known = set(PromptConfig.__dataclass_fields__)
    if formats is None:
        overrides: list[Mapping[str, Any] | PromptConfig] = list(default_formats(model.tokenizer))
        own = _answer_settings(model.prompt)
        if own not in overrides:
            overrides.insert(0, own)
    else:
        overrides = list(formats)
        if not overrides:
            msg = "formats is empty; pass None for the default candidates"
            raise ValueError(msg)
    configs = []
    for f in overrides:
        if isinstance(f, PromptConfig):
            configs.append(f)
            continue
        unknown = sorted(set(f) - known)
        if unknown:
            msg = f"unknown prompt settings {unknown} in formats; settings are {sorted(known)}"
            raise ValueError(msg)
        # a copy per format: no format shares the model's labels or metadata
        configs.append(dataclasses.replace(copy.deepcopy(model.prompt), **dict(f)))
    current = [_same_format(c, model.prompt) for c in configs]
    return configs, current


def _same_format(a: PromptConfig, b: PromptConfig) -> bool:
    ignore = {"labels", "extra"}
    return all(getattr(a, f) == getattr(b, f) for f in PromptConfig.__dataclass_fields__ if f not in ignore)


def _describe(config: PromptConfig, tokenizer: PreTrainedTokenizerFast) -> str:
    end = f" + {config.eos_token or tokenizer.eos_token}" if config.append_eos else ""
    return f"{answer_text('{label}', config)!r}{end} ({config.answer_tokenization})"


def _has_terminator(config: PromptConfig) -> bool:
    return bool(config.append_eos or config.answer_suffix)


@one_at_a_time
def compare_answer_formats(
    model: C2SModel,
    sentences: Sequence[str],
    labels: Sequence[str],
    *,
    formats: Sequence[Mapping[str, Any] | PromptConfig] | None = None,
    organism: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Check once per checkpoint which answer format it was trained on, from cells whose labels are known.

    A checkpoint from the Hub says nothing of how its answers were written: with or without a space before the
    label, a ``"."`` after it, an end token (EOS, or a control token such as Gemma's ``<end_of_turn>``), the answer
    tokenized with the prompt or on its own. Each candidate format is scored here by the likelihood the model gives
    the true labels of a few cells in that format (each prompt runs once per prompt template; its key/value cache
    serves every format and label).

    How to read it: the format the model was trained on gives its answers clearly the highest likelihood, and above
    all its terminator (the ``"."`` and the end token it always saw after a label), which the model predicts almost
    surely, while a format it never saw leaves the terminator unlikely (``terminator_loglik`` far below 0). Compare
    formats by ``loglik_per_token``, which does not favour answers of fewer tokens as ``loglik_per_answer`` does.
    ``accuracy`` (the most likely of the distinct true labels, per cell) tells whether the format also separates the
    labels. Set the winner with ``cellcircuits.models.load(path, preset=table["config"].iloc[0])``, or save it
    (``model.prompt = ...; model.save(path)``), so every tool prompts the model as it was trained.

    Parameters
    ----------
    model
        The loaded model; its prompt settings give the template, ``n_genes`` and organism of every format.
    sentences
        Cell sentences (gene symbols, most expressed first) of cells whose labels are known; a few dozen suffice.
    labels
        Each cell's true label, as the model spells it.
    formats
        Candidate formats: dicts of :class:`~cellcircuits.pp.PromptConfig` fields overriding the model's settings
        (``{"answer_suffix": "", "eos_token": "<end_of_turn>"}``), or whole settings. Default: the model's current
        format; the C2S format (``" {label}." + EOS``, tokenized with the prompt), it without the end token, without
        the ``"."`` and without both; it without the leading space; the label tokenized on its own after the
        prompt, with and without the ``"."``; and, when the tokenizer has it, the C2S format ended by
        ``<end_of_turn>``.
    organism
        Organism named in the prompts (``None``: each format's ``organism``).
    batch_size
        Cells per forward pass.
    progress
        Show a progress bar.

    Returns
    -------
    One row per format, best first (by ``loglik_per_token``; formats whose labels cannot be tokenized last):

    ``format`` : :class:`str`
        The answer as text (``"' {label}.' + <|endoftext|> (joint)"``).
    ``answer_prefix``, ``answer_suffix``, ``append_eos``, ``eos_token``, ``answer_tokenization``
        The format's settings (``eos_token`` ``None``: the tokenizer's EOS).
    ``n_tokens`` : :class:`float`
        Mean number of answer tokens of the true labels.
    ``loglik_per_token`` : :class:`float`
        Mean over cells of the true label's answer log-likelihood divided by its number of tokens.
    ``loglik_per_answer`` : :class:`float`
        Mean over cells of the true label's answer log-likelihood (summed over its tokens).
    ``terminator_loglik`` : :class:`float`
        Mean over cells of the log-likelihood of the answer's last token given the rest (the end token, else the
        last token of the suffix); NaN for a format without suffix or end token.
    ``accuracy`` : :class:`float`
        Fraction of cells whose true label is the most likely of the distinct true labels; NaN with one label.
    ``current`` : :class:`bool`
        Whether the format is the model's current one.
    ``config`` : :class:`~cellcircuits.pp.PromptConfig`
        The full settings, to pass as ``preset=``.
    ``error`` : :class:`str`
        Why the format could not be scored (its labels do not tokenize in it); empty otherwise.

    Raises
    ------
    ValueError
        When ``sentences`` and ``labels`` differ in length or are empty, ``batch_size`` is not positive, or a format
        names an unknown setting.

    Examples
    --------
    >>> table = cc.models.compare_answer_formats(model, sentences, labels)  # doctest: +SKIP
    >>> model = cc.models.load(path, preset=table["config"].iloc[0])  # doctest: +SKIP
    """
    sentences = [str(s) for s in sentences]
    labels = [str(label) for label in labels]
    if len(sentences) != len(labels):
        msg = f"{len(sentences)} sentences for {len(labels)} labels"
        raise ValueError(msg)
    if not sentences:
        msg = "no cells: pass the sentences and true labels of some cells"
        raise ValueError(msg)
    if batch_size < 1:
        msg = f"batch_size must be positive, got {batch_size!r}"
        raise ValueError(msg)
    configs, current = _candidate_configs(model, formats)
    tok = model.tokenizer
    candidates = list(dict.fromkeys(labels))
    truth = np.array([candidates.index(label) for label in labels])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    answer_ids: dict[int, list[list[int]]] = {}
    errors: dict[int, str] = {}
    for k, config in enumerate(configs):
        try:
            answer_ids[k] = label_token_ids(tok, config, candidates)
        except ValueError as err:
            errors[k] = str(err)
    # formats that share the prompt share one scoring pass
    by_prompt: dict[tuple[str, int, str], list[int]] = {}
    for k in answer_ids:
        c = configs[k]
        by_prompt.setdefault((c.template, int(c.n_genes), c.organism if organism is None else organism), []).append(k)
    full: dict[int, np.ndarray] = {}
    last: dict[int, np.ndarray] = {}
    for ks in by_prompt.values():
        prompts = [build_prompt(s, configs[ks[0]], organism).text for s in sentences]
        conts: dict[tuple[int, ...], int] = {}
        for k in ks:
            for ids in answer_ids[k]:
                conts.setdefault(tuple(ids), len(conts))
                if len(ids) > 1:
                    conts.setdefault(tuple(ids[:-1]), len(conts))
        scores = score_continuations(
            model.model,
            tok(prompts)["input_ids"],
            [list(c) for c in conts],
            pad_token_id=pad_id,
            batch_size=batch_size,
            progress=progress,
            desc="comparing answer formats",
        )
        for k in ks:
            ids_k = answer_ids[k]
            full[k] = scores[:, [conts[tuple(ids)] for ids in ids_k]]
            head = np.stack(
                [scores[:, conts[tuple(ids[:-1])]] if len(ids) > 1 else np.zeros(len(sentences)) for ids in ids_k], 1
            )
            last[k] = full[k] - head

    rows = []
    cells = np.arange(len(sentences))
    for k, config in enumerate(configs):
        row: dict[str, Any] = {"format": _describe(config, tok), **_answer_settings(config)}
        if k in full:
            n_tokens = np.array([len(answer_ids[k][y]) for y in truth], dtype=np.float64)
            loglik = full[k][cells, truth]
            row |= {
                "n_tokens": float(n_tokens.mean()),
                "loglik_per_token": float(np.mean(loglik / n_tokens)),
                "loglik_per_answer": float(loglik.mean()),
                "terminator_loglik": float(last[k][cells, truth].mean()) if _has_terminator(config) else np.nan,
                "accuracy": float(np.mean(full[k].argmax(1) == truth)) if len(candidates) > 1 else np.nan,
            }
        else:
            row |= dict.fromkeys(("n_tokens", "loglik_per_token", "loglik_per_answer", "terminator_loglik"), np.nan)
            row["accuracy"] = np.nan
        row |= {"current": current[k], "config": config, "error": errors.get(k, "")}
        rows.append(row)
    table = pd.DataFrame(rows)
    table = table.sort_values("loglik_per_token", ascending=False, kind="stable", na_position="last")
    return table.reset_index(drop=True)
