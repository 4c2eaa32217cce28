"""Free-text answers of a C2S model: greedy decoding of each prompt's continuation, as Cell2Sentence predicts."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from .._compat import warn_at_caller
from ._hooks import one_at_a_time
from ._scoring import pad
from ._tokens import end_of_answer_id

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

    from ..pp._prompts import PromptConfig
    from ._load import C2SModel


def check_generation(max_new_tokens: int, batch_size: int) -> None:
    """Refuse a ``max_new_tokens`` or ``batch_size`` below 1, before any work."""
    if int(max_new_tokens) < 1:
        msg = f"max_new_tokens must be at least 1 (tokens generated per answer), got {max_new_tokens!r}"
        raise ValueError(msg)
    if int(batch_size) < 1:
        msg = f"batch_size must be positive, got {batch_size!r}"
        raise ValueError(msg)


def stop_token_ids(tokenizer: PreTrainedTokenizerFast, config: PromptConfig) -> list[int]:
    """Tokens that end an answer: the end-of-answer token (:func:`end_of_answer_id`), then the tokenizer's EOS."""
    stop = [end_of_answer_id(tokenizer, config)]
    if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in stop:
        stop.append(int(tokenizer.eos_token_id))
    return stop


def greedy_config(max_new_tokens: int, stop: Sequence[int], pad_token_id: int) -> GenerationConfig:
    """A generation config for plain greedy decoding of at most ``max_new_tokens`` tokens, ending at ``stop``."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        num_return_sequences=1,
        max_new_tokens=int(max_new_tokens),
        min_new_tokens=0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        eos_token_id=list(stop),
        pad_token_id=int(pad_token_id),
        use_cache=True,
        output_scores=False,
        return_dict_in_generate=False,
    )


@contextmanager
def checkpoint_generation_settings_ignored(model: PreTrainedModel) -> Iterator[None]:
    """Inside the block the model's own ``generation_config`` holds only the library defaults.

    ``generate`` fills every setting its ``generation_config`` argument leaves unset from the model's
    ``generation_config`` (a checkpoint's ``generation_config.json``: sampling, temperature, repetition penalty,
    suppressed or forced tokens), and older ``transformers`` releases also replace the settings that equal the
    defaults; with the defaults in place, only the settings passed apply. The model's own config is restored after.
    """
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@one_at_a_time
@torch.no_grad()
def generate_ids(
    model: C2SModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generating",
) -> list[list[int]]:
    """Greedy continuation of each prompt: its new tokens up to and including the first stop token.

    Parameters
    ----------
    model
        The C2S model.
    prompts
        Token ids of each prompt.
    max_new_tokens
        Most tokens generated per prompt.
    batch_size
        Prompts per call of ``generate``; batches hold prompts of similar length, padded on the left.
    progress
        Show a progress bar.
    desc
        Progress-bar label.

    Returns
    -------
    Per prompt, in input order, the generated token ids: ending with a stop token (:func:`stop_token_ids`) when the
    model emitted one within ``max_new_tokens`` tokens, else all ``max_new_tokens`` of them.
    """
    check_generation(max_new_tokens, batch_size)
    if any(len(p) == 0 for p in prompts):
        msg = "every prompt needs at least one token"
        raise ValueError(msg)
    tokenizer, lm = model.tokenizer, model.model
    stop = stop_token_ids(tokenizer, model.prompt)
    pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else stop[0]
    config = greedy_config(max_new_tokens, stop, pad_id)
    device = model.device
    stops = set(stop)
    generate = cast("Callable[..., torch.Tensor]", lm.generate)  # GenerationMixin.generate, typed loosely
    out: list[list[int]] = [[] for _ in prompts]
    # batches of similar length waste little compute on padding
    order = np.argsort([len(p) for p in prompts], kind="stable")
    with (
        checkpoint_generation_settings_ignored(lm),
        tqdm(total=len(prompts), desc=desc, disable=not progress, unit="cell") as bar,
    ):
        for start in range(0, len(prompts), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad([prompts[i] for i in idx], pad_id, "left")
            # positions come from the attention mask inside generate, so left padding leaves them unchanged
            generated = generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for row, i in enumerate(idx):
                new = generated[row, ids.shape[1] :].tolist()
                end = next((k for k, t in enumerate(new) if t in stops), None)
                out[i] = new if end is None else new[: end + 1]  # a finished row is padded after its stop token
            bar.update(len(idx))
    return out


def decode_answer(tokenizer: PreTrainedTokenizerFast, ids: Sequence[int], config: PromptConfig) -> str:
    """The answer spelled by generated tokens: up to the first stop token, without special tokens, prefix or suffix.

    Parameters
    ----------
    tokenizer
        The model's tokenizer.
    ids
        Generated token ids (from :func:`generate_ids`).
    config
        The model's prompt settings: the end-of-answer token, ``answer_prefix`` and ``answer_suffix``.

    Returns
    -------
    The label, e.g. ``"CD14+ Monocyte"`` for the tokens of ``" CD14+ Monocyte."`` and the end-of-answer token.
    """
    stops = set(stop_token_ids(tokenizer, config))
    end = next((k for k, t in enumerate(ids) if t in stops), len(ids))
    text = str(tokenizer.decode(list(ids[:end]), skip_special_tokens=True, clean_up_tokenization_spaces=False))
    text = text.strip()
    prefix, suffix = config.answer_prefix.strip(), config.answer_suffix.strip()
    if prefix:
        text = text.removeprefix(prefix).strip()
    if suffix:
        text = text.removesuffix(suffix).strip()
    return text


@one_at_a_time
def generate_answers(
    model: C2SModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Answer each prompt in free text by greedy decoding, as Cell2Sentence predicts cell types.

    Like cell2sentence's ``generate_from_prompt_batched``: ``model.generate`` without sampling on left-padded
    batches, each answer decoded from the new tokens only. Batches hold prompts of similar length; the answers come
    back in input order and equal those of one prompt at a time (positions come from the attention mask). Decoding
    ends at the end-of-answer token (:func:`cellcircuits.models.end_of_answer_id`: the prompt settings'
    ``eos_token``, such as ``"<end_of_turn>"``, or the tokenizer's EOS) or at the tokenizer's EOS token, whichever
    comes first; the answer drops the stop token, special tokens, the ``answer_prefix`` and a trailing
    ``answer_suffix`` (C2S answers ``" {cell_type}."``).

    The decoding is plain greedy whatever the checkpoint says: a ``generation_config.json`` shipped with the
    weights (sampling, temperature, top-k/top-p, repetition penalty, suppressed or forced tokens) is ignored, and
    ``model.model.generation_config`` is left as it was. The call holds the model's lock
    (:meth:`~cellcircuits.models.C2SModel.exclusive`).

    Parameters
    ----------
    model
        The C2S model.
    prompts
        Token ids of each prompt, e.g. the ``"input_ids"`` of ``model.tokenizer`` on the texts of
        :meth:`~cellcircuits.models.C2SModel.build_prompts`.
    max_new_tokens
        Most tokens generated per answer; an answer that reaches it without a stop token is kept as generated, with
        a warning (it may be cut short).
    batch_size
        Prompts per call of ``generate``.
    progress
        Show a progress bar (one step per prompt).
    desc
        Progress-bar label.

    Returns
    -------
    The answer to each prompt, in input order (``""`` when the model stops at once).

    Raises
    ------
    ValueError
        For ``max_new_tokens`` or ``batch_size`` below 1, an empty prompt, or a tokenizer without the end-of-answer
        token.
    """
    ids = generate_ids(
        model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, desc=desc
    )
    stops = set(stop_token_ids(model.tokenizer, model.prompt))
    unfinished = sum(1 for new in ids if not new or new[-1] not in stops)
    if unfinished:
        warn_at_caller(
            f"{unfinished} of {len(ids)} answer(s) reached max_new_tokens={max_new_tokens} without the end-of-answer "
            "token and may be cut short; raise max_new_tokens, or check the prompt settings' eos_token."
        )
    return [decode_answer(model.tokenizer, new, model.prompt) for new in ids]
