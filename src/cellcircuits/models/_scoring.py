"""Scoring candidate answers by their log-likelihood under a causal LM."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ._hooks import one_at_a_time

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

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


#: Attention implementations that take the 4D masks scoring builds (``None``: transformers' default).
MASKABLE_ATTENTION = (None, "eager", "sdpa")


@contextmanager
def maskable_attention(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block the model's attention takes a 4D mask: others (flash attention) switch to SDPA for it.

    The same weights give the same scores under any implementation; models whose attention scores are soft-capped
    (Gemma-2) switch to eager attention, which applies the cap.
    """
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None)
    if config is None or old in MASKABLE_ATTENTION:
        yield
        return
    config._attn_implementation = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = old


@dataclass(frozen=True)
class ContinuationBlock:
    """Every continuation laid out as a prefix tree of the tokens fed after the prompt.

    A continuation ``c`` is scored by the prompt's last logits at ``c[0]`` and by feeding ``c[:-1]`` after the
    prompt: the logits after ``c[:t + 1]`` give ``c[t + 1]``. Continuations sharing their first tokens share the
    fed tokens of that prefix (a node each), so every distinct prefix runs once.
    """

    first: torch.Tensor
    """``(L,)`` first token of each continuation."""
    fed: torch.Tensor
    """``(E,)`` token of each node (the last token of a distinct prefix ``c[:t + 1]``, ``t < len(c) - 1``)."""
    depth: torch.Tensor
    """``(E,)`` position of each node after the prompt (``t``)."""
    sees: torch.Tensor
    """``(E, E)`` whether node ``q`` attends to node ``k`` (``k`` is ``q`` or one of its ancestors)."""
    node: torch.Tensor
    """``(R,)`` node whose logits give each scored token after the first."""
    target: torch.Tensor
    """``(R,)`` each scored token after the first."""
    owner: torch.Tensor
    """``(R,)`` continuation of each scored token."""

    @property
    def n_extra(self) -> int:
        """Tokens fed after each prompt."""
        return len(self.fed)

    @classmethod
    def build(cls, continuations: Sequence[Sequence[int]]) -> ContinuationBlock:
        """Lay out ``continuations`` (each at least one token)."""
        nodes: dict[tuple[int, ...], int] = {}
        parent: list[int] = []
        node, target, owner = [], [], []
        for j, c in enumerate(continuations):
            c = [int(t) for t in c]
            for t in range(len(c) - 1):
                key = tuple(c[: t + 1])
                if key not in nodes:
                    parent.append(nodes[key[:-1]] if t else -1)
                    nodes[key] = len(nodes)
                node.append(nodes[key])
                target.append(c[t + 1])
                owner.append(j)
        sees = torch.eye(len(nodes), dtype=torch.bool)
        for i in range(len(nodes)):
            up = parent[i]
            while up >= 0:
                sees[i, up] = True
                up = parent[up]
        keys = list(nodes)

        def long(values: list[int]) -> torch.Tensor:
            return torch.as_tensor(values, dtype=torch.long).reshape(-1)

        first = long([int(c[0]) for c in continuations])
        fed, depth = long([k[-1] for k in keys]), long([len(k) - 1 for k in keys])
        return cls(first, fed, depth, sees, long(node), long(target), long(owner))

    def to(self, device: torch.device) -> ContinuationBlock:
        """The block on ``device``."""
        fields = (self.first, self.fed, self.depth, self.sees, self.node, self.target, self.owner)
        return ContinuationBlock(*(t.to(device) for t in fields))


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


def continuation_mask(
    prompt_mask: torch.Tensor,
    labels: ContinuationBlock,
    pos: torch.Tensor,
    dtype: torch.dtype,
    window: int | None = None,
) -> torch.Tensor:
    """``(B, 1, E, P + E)`` mask of the fed tokens over the prompt's cache and themselves.

    Each fed token attends to the real prompt tokens and to its own prefix (:attr:`ContinuationBlock.sees`).

    Parameters
    ----------
    prompt_mask
        ``(B, P)`` attention mask of the prompts (1 for real tokens).
    labels
        The continuations.
    pos
        ``(B, P + E)`` position ids of the prompt tokens and the fed tokens.
    dtype
        ``torch.bool`` for a mask that is true where attention goes (what SDPA takes), else the model's dtype for an
        additive mask (eager attention).
    window
        Sliding attention window (a key ``window`` or more positions back is masked); ``None``: none.
    """
    b, p = prompt_mask.shape
    e = labels.n_extra
    allowed = torch.cat([prompt_mask.bool()[:, None, :].expand(b, e, p), labels.sees[None].expand(b, e, e)], dim=2)
    if window is not None:
        allowed = allowed & ((pos[:, p:, None] - pos[:, None, :]) < window)
    if dtype == torch.bool:
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _forward_parameters(model: torch.nn.Module) -> tuple[str, bool]:
    """The name the forward takes its key/value cache by, and whether it takes ``logits_to_keep``."""
    parameters = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "logits_to_keep" in parameters


def score_batch(
    model: PreTrainedModel,
    batch: Sequence[Sequence[int]],
    labels: ContinuationBlock,
    pad_token_id: int,
    padding_side: Literal["left", "right"],
    device: torch.device,
    *,
    prompt_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(len(batch), L)`` float32 log-likelihoods of every continuation after each prompt.

    Two forward passes: the prompts (logits only at each one's last token), then every continuation's fed tokens
    at once over the prompts' key/value cache. ``prompt_logits``: the prompt pass keeps its logits at every
    position and returns them too (``(len(batch), width, vocab)``, padded as ``padding_side`` says), for callers
    that need the prompts' own token predictions from the same pass; else the second value is ``None``.
    """
    from transformers import DynamicCache

    labels = labels.to(device)
    ids, prompt_mask = pad(batch, pad_token_id, padding_side)
    ids, prompt_mask = ids.to(device), prompt_mask.to(device)
    b, width = ids.shape
    n = prompt_mask.sum(-1)
    prompt_pos = position_ids(prompt_mask)
    cache_name, keeps = _forward_parameters(model)
    # a cache without the config keeps every layer's keys whole (no sliding-window truncation): the mask below
    # applies the window itself
    cache = DynamicCache()
    last = torch.full_like(n, width - 1) if padding_side == "left" else n - 1
    ends, end_index = torch.unique(last, return_inverse=True)
    out = model(
        input_ids=ids,
        attention_mask=prompt_mask,
        position_ids=prompt_pos,
        use_cache=True,
        **{cache_name: cache},
        **({"logits_to_keep": ends} if keeps and not prompt_logits else {}),
    )
    kept = out.logits if prompt_logits else None
    logits = out.logits if keeps and not prompt_logits else out.logits[:, ends]
    rows = torch.arange(b, device=device)
    scores = torch.log_softmax(logits[rows, end_index].float(), -1)[:, labels.first]
    if not labels.n_extra:
        return scores, kept
    fed_pos = n[:, None] + labels.depth[None]
    pos = torch.cat([prompt_pos, fed_pos], dim=1)
    config = model.config
    # SDPA takes a boolean mask (its fused kernels read it directly); eager attention adds the mask to its scores
    dtype = torch.bool if getattr(config, "_attn_implementation", None) == "sdpa" else next(model.parameters()).dtype
    full = continuation_mask(prompt_mask, labels, pos, dtype)
    mask: torch.Tensor | dict[str, torch.Tensor] = full
    window = getattr(config, "sliding_window", None)
    if window is not None and "sliding_attention" in (getattr(config, "layer_types", None) or []):
        mask = {"full_attention": full, "sliding_attention": continuation_mask(prompt_mask, labels, pos, dtype, window)}
    out = model(
        input_ids=labels.fed[None].expand(b, -1),
        attention_mask=mask,
        position_ids=fed_pos,
        use_cache=True,
        **{cache_name: cache},
    )
    logp = torch.log_softmax(out.logits.float(), -1)
    rest = logp[:, labels.node, labels.target]
    return scores.index_add(1, labels.owner, rest), kept


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

    Each batch of prompts runs once; then every continuation is scored in one more pass over the prompts'
    key/value cache: the continuations' tokens (each distinct prefix once, as a prefix tree) follow the prompt,
    each attending to the prompt and to its own earlier tokens only (a 4D attention mask), at the positions it
    would have right after the prompt. Scoring ``L`` labels thus costs a prompt pass plus a pass over at most
    ``sum(len(label) - 1)`` tokens per cell, without a Python loop over labels or a copy of the cache, and logits
    are computed only where they are read. Position ids are computed from the
    attention mask, so left and right padding give the same scores. Log-probabilities are taken in float32
    whatever the model's dtype.

    Parameters
    ----------
    model
        A Hugging Face causal LM. Attention that cannot take a 4D mask (flash attention) runs as SDPA (eager for
        soft-capped attention) during the call.
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
        For an empty prompt or continuation, or a ``batch_size`` or ``max_batch_tokens`` below 1 (or both
        ``None``).
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
    labels = ContinuationBlock.build(continuations)
    lengths = [len(p) for p in prompts]
    batches = token_batches(lengths, batch_size=batch_size, max_batch_tokens=max_batch_tokens, extra=labels.n_extra)
    device = next(model.parameters()).device
    scores = np.zeros((len(prompts), len(continuations)), dtype=np.float64)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="cell")
    with bar, maskable_attention(model):
        for idx in batches:
            logp, _ = score_batch(model, [prompts[i] for i in idx], labels, pad_token_id, padding_side, device)
            scores[idx] = logp.double().cpu().numpy()
            bar.update(len(idx))
    return scores
