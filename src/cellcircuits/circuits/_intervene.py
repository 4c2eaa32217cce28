"""Interventions on transcoder features in the replacement model, with everything downstream recomputed.

Each covered MLP is replaced by its transcoder plus that MLP's error on the clean prompt (true output minus the
transcoder's), so without an edit the model's logits are reproduced exactly. An edit scales or overrides feature
activations at chosen positions; the edited features change the residual stream, and attention, norms and every
later transcoder's features respond as the model would. Many edits run side by side as one batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..models._adapter import ModelAdapter
from ..models._hooks import input_tensor, model_lock, one_at_a_time, output_tensor, record
from ..transcoders._splice import replace_output

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from torch import nn
    from transformers import PreTrainedModel

    from ..models._load import C2SModel
    from ..transcoders._transcoder import Transcoder
    from ..transcoders._transcoder_set import TranscoderSet


@dataclass(eq=False)
class CleanRun:
    """One prompt through the replacement model without edits."""

    input_ids: torch.Tensor
    """``(T,)``"""
    errors: dict[int, torch.Tensor]
    """Per covered layer, ``(T, d_model)`` true MLP output minus the transcoder's."""
    activations: dict[int, torch.Tensor]
    """Per covered layer, ``(T, n_features)`` feature activations."""
    logits: torch.Tensor
    """``(T, vocab)``"""


def _parts(model: C2SModel | PreTrainedModel) -> tuple[PreTrainedModel, ModelAdapter]:
    """The Hugging Face model and its adapter, from a C2S model or a bare causal LM."""
    if isinstance(model, torch.nn.Module):
        return model, ModelAdapter(model)
    return model.model, model.adapter


@one_at_a_time
@torch.no_grad()
def clean_run(
    model: C2SModel | PreTrainedModel, transcoders: TranscoderSet, input_ids: Sequence[int] | torch.Tensor
) -> CleanRun:
    """Run a prompt once, keeping each covered layer's feature activations and transcoder error.

    Parameters
    ----------
    model
        A :class:`~cellcircuits.models.C2SModel` or a Hugging Face causal LM.
    transcoders
        Transcoders of some or all of its MLPs.
    input_ids
        ``(T,)`` token ids of one prompt.

    Returns
    -------
    The clean run: ids, per covered layer the errors and activations, and the logits.
    """
    hf, adapter = _parts(model)
    device = next(hf.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(-1)
    points = {m: (adapter.mlp_in(m), adapter.mlp_out(m)) for m in transcoders.layers}
    with record(hf, [p for pair in points.values() for p in pair]) as rec:
        logits = hf(input_ids=ids[None], use_cache=False).logits[0].float()
    errors, acts = {}, {}
    for m, (p_in, p_out) in points.items():
        tc = transcoders[m]
        x, y = rec[p_in][0][0], rec[p_out][0][0]
        out = tc(x.to(tc.W_enc.device))
        acts[m] = out.features.float()
        errors[m] = y.float() - out.output.float().to(y.device)
    return CleanRun(ids, errors, acts, logits)


@contextmanager
def edited_features(
    model: C2SModel | PreTrainedModel,
    transcoders: TranscoderSet,
    errors: dict[int, torch.Tensor],
    scale: dict[int, torch.Tensor],
    override: dict[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Replace each covered MLP by its transcoder (+ error) with edited activations while the block runs.

    Parameters
    ----------
    model
        The model.
    transcoders
        The transcoders; layers they do not cover keep their MLPs.
    errors
        Per covered layer, the ``(T, d)`` error of the clean prompt, added back to the transcoder's output.
    scale
        Per layer, ``(B, T, n_features)`` multipliers of the recomputed activations (1 keeps, 0 ablates); a layer
        without one is left unedited.
    override
        Per layer, ``(B, T, n_features)`` values that replace the activations where they are not NaN (applied after
        ``scale``), e.g. a feature's mean activation.
    """
    hf, adapter = _parts(model)
    handles = []
    override = override or {}
    lock = model_lock(hf)
    lock.acquire()  # no other thread runs the model edited, nor hooks it meanwhile
    try:
        for m in transcoders.layers:
            tc = transcoders[m]
            out_module = hf.get_submodule(adapter.mlp_out(m).module)
            mlp_module: nn.Module = adapter.module(m, "mlp")
            stash: dict[str, torch.Tensor] = {}
            if mlp_module is not out_module:  # Gemma-2: the output comes from the post-feedforward norm

                def keep(_mod: nn.Module, args: tuple, kwargs: dict, _stash: dict = stash) -> None:
                    _stash["x"] = input_tensor(args, kwargs)

                handles.append(mlp_module.register_forward_pre_hook(keep, with_kwargs=True))

            def replace(
                _mod: nn.Module,
                args: tuple,
                kwargs: dict,
                output: object,
                _m: int = m,
                _tc: Transcoder = tc,
                _stash: dict = stash,
                _own: bool = mlp_module is out_module,
            ) -> object:
                x = (input_tensor(args, kwargs) if _own else _stash.pop("x")).to(_tc.W_enc.device)
                ref = output_tensor(output)
                acts = _tc.encode(x).float()
                if _m in scale:
                    acts = acts * scale[_m].to(acts.device)
                if _m in override:
                    acts = torch.where(torch.isnan(override[_m]), acts, override[_m].to(acts.device))
                y = _tc.decode(acts.to(_tc.W_dec.dtype), x).float() + errors[_m].to(x.device)
                return replace_output(output, y.to(device=ref.device, dtype=ref.dtype))

            handles.append(out_module.register_forward_hook(replace, with_kwargs=True, prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()
        lock.release()


@one_at_a_time
@torch.no_grad()
def run_edits(
    model: C2SModel | PreTrainedModel,
    transcoders: TranscoderSet,
    run: CleanRun,
    scale: dict[int, torch.Tensor],
    override: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits of a prompt under ``B`` edits at once.

    Parameters
    ----------
    model
        The model of the clean run.
    transcoders
        Its transcoders.
    run
        The prompt's clean run (:func:`clean_run`), whose errors are added back.
    scale, override
        Per layer, ``(B, T, n_features)`` edits (see :func:`edited_features`).

    Returns
    -------
    ``(B, T, vocab)`` logits.
    """
    batch = max([s.shape[0] for s in scale.values()] + [o.shape[0] for o in (override or {}).values()] + [1])
    ids = run.input_ids[None].expand(batch, -1)
    hf, _ = _parts(model)
    with edited_features(model, transcoders, run.errors, scale, override):
        return hf(input_ids=ids, use_cache=False).logits.float()
