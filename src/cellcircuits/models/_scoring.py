"""Scoring candidate answers by their log-likelihood under a causal LM."""

from __future__ import annotations

import copy
import inspect
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


def _cache_argument(model: torch.nn.Module) -> str:
    """The name a causal LM's forward takes its key/value cache by.

    ``cache`` in the transformers releases whose forward names it (there ``past_key_values`` is deprecated with a
    FutureWarning), ``past_key_values`` in earlier ones.
    """
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The key/value cache of a forward pass's output, read by its current name (``cache``) when it has one."""
    fields = out.keys() if hasattr(out, "keys") else ()
    return out["cache"] if "cache" in fields else out.past_key_values


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so padding on either side leaves positions unchanged."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@one_at_a_time
@torch.no_grad()
def score_continuations(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
    padding_side: Literal["left", "right"] = "left",
    progress: bool = True,
    desc: str = "scoring",
) -> np.ndarray:
    """Log-likelihood of every continuation after every prompt.

    Each prompt runs once; its key/value cache is then reused for each continuation, so scoring ``L`` labels
    costs one prompt pass plus ``L`` short passes. Position ids are computed from the attention mask, so left and
    right padding give the same scores.

    Parameters
    ----------
    model
        A Hugging Face causal LM.
    prompts
        Token ids of each prompt.
    continuations
        Token ids of each candidate continuation (the same candidates for every prompt).
    pad_token_id
        Id used for padding (always masked out).
    batch_size
        Prompts per forward pass.
    padding_side
        Pad prompts on the left or the right.
    progress
        Show a progress bar.
    desc
        Progress-bar label.

    Returns
    -------
    ``(n_prompts, n_continuations)`` array of summed log-probabilities (float64).
    """
    if any(len(c) == 0 for c in continuations):
        msg = "every continuation needs at least one token"
        raise ValueError(msg)
    if any(len(p) == 0 for p in prompts):
        msg = "every prompt needs at least one token"
        raise ValueError(msg)
    device = next(model.parameters()).device
    n, n_cont = len(prompts), len(continuations)
    scores = np.zeros((n, n_cont), dtype=np.float64)
    # batches of similar length waste little compute on padding
    order = np.argsort([len(p) for p in prompts], kind="stable")
    cont = [torch.as_tensor(list(c), dtype=torch.long, device=device) for c in continuations]
    cache_name = _cache_argument(model)
    with tqdm(total=n, desc=desc, disable=not progress, unit="cell") as bar:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad([prompts[i] for i in idx], pad_token_id, padding_side)
            ids, mask = ids.to(device), mask.to(device)
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True)
            lengths = mask.sum(-1)
            rows = torch.arange(len(idx), device=device)
            last = ids.shape[1] - 1 if padding_side == "left" else lengths - 1
            first_logp = torch.log_softmax(out.logits[rows, last].float(), -1)
            for j, c in enumerate(cont):
                total = first_logp[:, c[0]].clone()
                if len(c) > 1:
                    # feed c[:-1] after each prompt's last real token; the cache holds the prompt
                    step = c[:-1].expand(len(idx), -1)
                    cont_mask = torch.cat([mask, torch.ones_like(step)], dim=1)
                    pos = lengths[:, None] + torch.arange(len(c) - 1, device=device)
                    nxt = model(
                        input_ids=step,
                        attention_mask=cont_mask,
                        position_ids=pos,
                        use_cache=True,
                        **{cache_name: copy.deepcopy(output_cache(out))},
                    )
                    logp = torch.log_softmax(nxt.logits.float(), -1)
                    total += logp.gather(-1, c[1:].expand(len(idx), -1)[..., None])[..., 0].sum(-1)
                scores[idx, j] = total.double().cpu().numpy()
            bar.update(len(idx))
    return scores
