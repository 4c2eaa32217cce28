"""Scoring candidate answers by their log-likelihood under a causal LM."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ._hooks import one_at_a_time

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import PreTrainedModel


def pad(
    seqs: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"] = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into ``(input_ids, attention_mask)`` tensors."""
    if side not in ("left", "right"):
        msg = f"padding side must be 'left' or 'right', got {side!r}"
        raise ValueError(msg)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so padding on either side leaves positions unchanged."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


#: Attention implementations that take the 4D block mask scoring builds (``None``: transformers' default).
MASKABLE_ATTENTION = (None, "eager", "sdpa")


def check_attention(model: torch.nn.Module) -> None:
    """Refuse, before any work, a model whose attention cannot take a custom 4D mask (e.g. flash attention)."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in MASKABLE_ATTENTION:
        msg = (
            f"scoring needs attention that takes a 4D mask ('eager' or 'sdpa'), but the model uses "
            f"{implementation!r}; load it with attn_implementation='sdpa'."
        )
        raise ValueError(msg)


@dataclass(frozen=True)
class ContinuationBlock:
    """Every continuation laid out for one pass: first tokens, and the tokens fed after the prompt.

    A continuation ``c`` is scored by the prompt's last logits at ``c[0]`` and by feeding ``c[:-1]`` after the
    prompt: its token ``t`` predicts ``c[t + 1]``. The fed tokens of all continuations are concatenated.
    """

    first: torch.Tensor
    """``(L,)`` first token of each continuation."""
    fed: torch.Tensor
    """``(E,)`` tokens fed after the prompt, ``c[:-1]`` of each continuation in turn."""
    target: torch.Tensor
    """``(E,)`` token each fed token predicts, ``c[1:]``."""
    owner: torch.Tensor
    """``(E,)`` continuation each fed token belongs to."""
    offset: torch.Tensor
    """``(E,)`` position of each fed token within its continuation."""

    @property
    def n_extra(self) -> int:
        """Tokens appended after each prompt."""
        return len(self.fed)

    @classmethod
    def build(cls, continuations: Sequence[Sequence[int]]) -> ContinuationBlock:
        """Lay out ``continuations`` (each at least one token)."""
        conts = [list(c) for c in continuations]
        fed = [t for c in conts for t in c[:-1]]
        target = [t for c in conts for t in c[1:]]
        owner = [j for j, c in enumerate(conts) for _ in c[1:]]
        offset = [t for c in conts for t in range(len(c) - 1)]

        def long(values: list[int]) -> torch.Tensor:
            return torch.as_tensor(values, dtype=torch.long).reshape(-1)

        return cls(long([c[0] for c in conts]), long(fed), long(target), long(owner), long(offset))

    def to(self, device: torch.device) -> ContinuationBlock:
        """The block on ``device``."""
        return ContinuationBlock(*(t.to(device) for t in (self.first, self.fed, self.target, self.owner, self.offset)))


def token_batches(
    lengths: Sequence[int], *, batch_size: int | None, max_batch_tokens: int | None, extra: int = 0
) -> list[np.ndarray]:
    """Batches of indices, prompts sorted by length, each within ``batch_size`` rows and ``max_batch_tokens``.

    A batch costs ``rows * (longest prompt + extra)`` tokens (padding included); a prompt over the budget on its
    own forms a batch of one.

    Parameters
    ----------
    lengths
        Token length of each prompt.
    batch_size
        Most rows per batch (``None``: no limit).
    max_batch_tokens
        Most tokens per batch (``None``: no limit).
    extra
        Tokens appended to every row.

    Returns
    -------
    Index arrays covering every prompt once, shortest prompts first.
    """
    if batch_size is None and max_batch_tokens is None:
        msg = "pass batch_size or max_batch_tokens (or both)"
        raise ValueError(msg)
    for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
        if value is not None and int(value) < 1:
            msg = f"{name} must be positive, got {value!r}"
            raise ValueError(msg)
    rows = int(batch_size) if batch_size is not None else len(lengths)
    budget = int(max_batch_tokens) if max_batch_tokens is not None else None
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order):
            batches.append(order[start:i])
            break
        # lengths ascend, so the next prompt is the longest of the batch it would join
        width = int(lengths[order[i]]) + extra
        if i - start >= rows or (budget is not None and (i - start + 1) * width > budget):
            batches.append(order[start:i])
            start = i
    return [b for b in batches if len(b)]


def block_mask(
    real: torch.Tensor, pos: torch.Tensor, group: torch.Tensor, dtype: torch.dtype, window: int | None = None
) -> torch.Tensor:
    """Additive ``(B, 1, T, T)`` mask: causal, no padding keys, continuations seeing the prompt and themselves.

    Parameters
    ----------
    real
        ``(B, T)`` whether each column is a real token.
    pos
        ``(B, T)`` position ids.
    group
        ``(T,)`` 0 for prompt columns, ``j + 1`` for the tokens of continuation ``j``.
    dtype
        Dtype of an additive mask (the model's), or ``torch.bool`` for a mask that is true where attention goes
        (what SDPA takes fastest).
    window
        Sliding attention window (a key more than ``window - 1`` positions back is masked); ``None``: none.
    """
    t = group.shape[0]
    col = torch.arange(t, device=group.device)
    allowed = (col[None, :] <= col[:, None]) & ((group[None, :] == 0) | (group[None, :] == group[:, None]))
    allowed = allowed[None] & real[:, None, :]
    if window is not None:
        allowed &= (pos[:, :, None] - pos[:, None, :]) < window
    allowed |= torch.eye(t, dtype=torch.bool, device=group.device)[None]  # padding rows attend to themselves
    if dtype == torch.bool:
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=group.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _keeps_logits(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def score_batch(
    model: PreTrainedModel,
    batch: Sequence[Sequence[int]],
    labels: ContinuationBlock,
    pad_token_id: int,
    padding_side: Literal["left", "right"],
    device: torch.device,
) -> torch.Tensor:
    """``(len(batch), L)`` float32 log-likelihoods of every continuation after each prompt, in one forward pass."""
    labels = labels.to(device)
    prompt_ids, prompt_mask = pad(batch, pad_token_id, padding_side)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    b, width = prompt_ids.shape
    e = labels.n_extra
    n = prompt_mask.sum(-1)
    ids = torch.cat([prompt_ids, labels.fed[None].expand(b, -1)], dim=1)
    real = torch.cat([prompt_mask.bool(), torch.ones((b, e), dtype=torch.bool, device=device)], dim=1)
    pos = torch.cat([position_ids(prompt_mask), n[:, None] + labels.offset[None]], dim=1)
    group = torch.cat([torch.zeros(width, dtype=torch.long, device=device), labels.owner + 1])
    config = model.config
    # SDPA takes a boolean mask (its fused kernels read it directly); eager attention adds the mask to its scores
    sdpa = getattr(config, "_attn_implementation", None) == "sdpa"
    dtype = torch.bool if sdpa else next(model.parameters()).dtype
    full = block_mask(real, pos, group, dtype)
    mask: torch.Tensor | dict[str, torch.Tensor] = full
    window = getattr(config, "sliding_window", None)
    if window is not None and "sliding_attention" in (getattr(config, "layer_types", None) or []):
        mask = {"full_attention": full, "sliding_attention": block_mask(real, pos, group, dtype, int(window))}
    # logits only where they are read: each prompt's last token and the fed continuation tokens
    last = torch.full_like(n, width - 1) if padding_side == "left" else n - 1
    ends, end_index = torch.unique(last, return_inverse=True)
    keep = torch.cat([ends, torch.arange(width, width + e, device=device)])
    kwargs: dict[str, Any] = {"logits_to_keep": keep} if _keeps_logits(model) else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs)
    logits = out.logits if kwargs else out.logits[:, keep]
    rows = torch.arange(b, device=device)
    first = torch.log_softmax(logits[rows, end_index].float(), -1)[:, labels.first]
    if e:
        logp = torch.log_softmax(logits[:, len(ends) :].float(), -1)
        rest = logp.gather(-1, labels.target[None, :, None].expand(b, -1, 1))[..., 0]
        first = first.index_add(1, labels.owner, rest)
    return first


@one_at_a_time
@torch.no_grad()
def score_continuations(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int | None = 16,
    max_batch_tokens: int | None = None,
    padding_side: Literal["left", "right"] = "left",
    progress: bool = True,
    desc: str = "scoring",
) -> np.ndarray:
    """Log-likelihood of every continuation after every prompt.

    Each batch of prompts runs in one forward pass together with every continuation: the continuations' tokens
    follow the prompt in the same sequence, each attending to the prompt and to its own earlier tokens only (a
    block attention mask), at the positions it would have right after the prompt. Scoring ``L`` labels thus costs
    one pass over ``prompt + sum(len(label) - 1)`` tokens per cell, without a Python loop over labels or a copy of
    the key/value cache, and logits are computed only where they are read. Position ids are computed from the
    attention mask, so left and right padding give the same scores. Log-probabilities are taken in float32
    whatever the model's dtype.

    Parameters
    ----------
    model
        A Hugging Face causal LM whose attention takes a 4D mask (``"eager"`` or ``"sdpa"`` attention).
    prompts
        Token ids of each prompt.
    continuations
        Token ids of each candidate continuation (the same candidates for every prompt).
    pad_token_id
        Id used for padding (always masked out).
    batch_size
        Most prompts per forward pass (``None``: no limit but ``max_batch_tokens``).
    max_batch_tokens
        Most tokens per forward pass, padding and continuations included; prompts are sorted by length and
        batched up to this budget (a prompt longer than the budget runs alone). ``None``: batches of
        ``batch_size`` prompts.
    padding_side
        Pad prompts on the left or the right.
    progress
        Show a progress bar.
    desc
        Progress-bar label.

    Returns
    -------
    ``(n_prompts, n_continuations)`` array of summed log-probabilities (float64).

    Raises
    ------
    ValueError
        For an empty prompt or continuation, a ``batch_size`` or ``max_batch_tokens`` below 1 (or both ``None``),
        or a model whose attention implementation cannot take a 4D mask.
    """
    if any(len(c) == 0 for c in continuations):
        msg = "every continuation needs at least one token"
        raise ValueError(msg)
    if any(len(p) == 0 for p in prompts):
        msg = "every prompt needs at least one token"
        raise ValueError(msg)
    if padding_side not in ("left", "right"):
        msg = f"padding side must be 'left' or 'right', got {padding_side!r}"
        raise ValueError(msg)
    check_attention(model)
    labels = ContinuationBlock.build(continuations)
    lengths = [len(p) for p in prompts]
    batches = token_batches(lengths, batch_size=batch_size, max_batch_tokens=max_batch_tokens, extra=labels.n_extra)
    device = next(model.parameters()).device
    scores = np.zeros((len(prompts), len(continuations)), dtype=np.float64)
    with tqdm(total=len(prompts), desc=desc, disable=not progress, unit="cell") as bar:
        for idx in batches:
            logp = score_batch(model, [prompts[i] for i in idx], labels, pad_token_id, padding_side, device)
            scores[idx] = logp.double().cpu().numpy()
            bar.update(len(idx))
    return scores
