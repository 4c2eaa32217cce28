"""Interventions on transcoder features in the replacement model, with everything downstream recomputed.

Each covered MLP is replaced by its transcoder plus that MLP's error on the clean prompt (true output minus the
transcoder's), so without an edit the model's logits are reproduced exactly. An edit scales or overrides feature
activations at chosen positions; the edited features change the residual stream, and attention, norms and every
later transcoder's features respond as the model would. Many edits run side by side as one batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..models._adapter import ModelAdapter
from ..models._hooks import input_tensor, model_lock, one_at_a_time, output_tensor, record
from ..transcoders._splice import replace_output

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

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
    override = override or {}

    def edited(tc: Transcoder, x: torch.Tensor, m: int) -> torch.Tensor:
        return _dense_output(tc, x, scale.get(m), override.get(m))

    with _replaced(model, transcoders, errors, edited):
        yield


def _dense_output(
    tc: Transcoder, x: torch.Tensor, scale: torch.Tensor | None, override: torch.Tensor | None
) -> torch.Tensor:
    """The transcoder's output with its activations times ``scale``, then ``override`` where that is not NaN."""
    acts = tc.encode(x).float()
    if scale is not None:
        acts = acts * scale.to(acts.device)
    if override is not None:
        acts = torch.where(torch.isnan(override), acts, override.to(acts.device))
    return tc.decode(acts.to(tc.W_dec.dtype), x).float()


@contextmanager
def _replaced(
    model: C2SModel | PreTrainedModel,
    transcoders: TranscoderSet,
    errors: dict[int, torch.Tensor],
    output: Callable[[Transcoder, torch.Tensor, int], torch.Tensor],
) -> Iterator[None]:
    """Replace each covered MLP ``m`` by ``output(transcoder, x, m)`` plus the clean error while the block runs."""
    hf, adapter = _parts(model)
    handles = []
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
                out: object,
                _m: int = m,
                _tc: Transcoder = tc,
                _stash: dict = stash,
                _own: bool = mlp_module is out_module,
            ) -> object:
                x = (input_tensor(args, kwargs) if _own else _stash.pop("x")).to(_tc.W_enc.device)
                ref = output_tensor(out)
                y = output(_tc, x, _m) + errors[_m].to(x.device)
                return replace_output(out, y.to(device=ref.device, dtype=ref.dtype))

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


class FeatureEdits(NamedTuple):
    """Edits of one layer's features in ``B`` runs side by side, as lists of ``(run, position, feature)`` entries.

    The sparse form of :func:`run_edits`' ``scale`` and ``override``: an activation is multiplied by its entry in
    ``scale`` when listed there, else by its run's ``default``; then an entry of ``value`` replaces it. Memory grows
    with the entries, not with ``B * n_positions * n_features``.
    """

    default: torch.Tensor
    """``(B,)`` factor of every activation not in ``scale_at`` (1 keeps, 0 ablates)."""
    scale_at: torch.Tensor
    """``(S, 3)`` long: run, position and feature of each listed factor (no entry twice)."""
    scale: torch.Tensor
    """``(S,)`` the listed factors."""
    set_at: torch.Tensor
    """``(O, 3)`` long: run, position and feature of each set value (no entry twice)."""
    value: torch.Tensor
    """``(O,)`` values that replace the (scaled) activations, e.g. a feature's mean activation."""

    def dense(self, n_positions: int, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same edits as :func:`run_edits` takes them: ``(B, T, F)`` scale and override (NaN: not set)."""
        B = len(self.default)
        scale = self.default.float()[:, None, None].repeat(1, n_positions, n_features)
        scale[tuple(self.scale_at.T)] = self.scale.float()
        override = torch.full((B, n_positions, n_features), float("nan"), device=self.default.device)
        override[tuple(self.set_at.T)] = self.value.float()
        return scale, override


def _keys(at: torch.Tensor, n_positions: int, n_features: int) -> torch.Tensor:
    return (at[:, 0] * n_positions + at[:, 1]) * n_features + at[:, 2]


def _lookup(keys: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of ``keys``, whether it is in ``table`` (distinct keys) and where; as boolean mask and indices."""
    if len(table) == 0:
        return torch.zeros_like(keys, dtype=torch.bool), torch.zeros_like(keys)
    order = torch.argsort(table)
    where = torch.searchsorted(table[order], keys).clamp(max=len(table) - 1)
    hit = table[order][where] == keys
    return hit, order[where]


def _sparse_output(tc: Transcoder, x: torch.Tensor, edits: FeatureEdits) -> torch.Tensor:
    """A TopK transcoder's ``(B, T, d)`` output with ``edits`` applied, from its ``k`` active features per row."""
    B, T = x.shape[:2]
    F = tc.cfg.n_features
    acts, idx = tc.encode_topk(x)
    acts = acts.float()
    device = acts.device
    rows = torch.arange(B, device=device)[:, None, None]
    keys = (rows * T + torch.arange(T, device=device)[None, :, None]) * F + idx
    factor = edits.default.to(device).float()[:, None, None].expand_as(acts).clone()
    hit, at = _lookup(keys, _keys(edits.scale_at.to(device), T, F))
    factor[hit] = edits.scale.to(device).float()[at[hit]]
    acts = acts * factor
    set_at, value = edits.set_at.to(device), edits.value.to(device).float()
    hit, at = _lookup(keys, _keys(set_at, T, F))
    acts[hit] = value[at[hit]]
    y = tc.decode_topk(acts, idx, x).float()
    placed = torch.zeros(len(set_at), dtype=torch.bool, device=device)
    placed[at[hit]] = True
    if not bool(placed.all()):  # values set on features that are not active in this run: add their decoder rows
        r, t, f = set_at[~placed].T
        rows_of = (value[~placed, None] * tc.W_dec[f].float()) / tc.output_scale
        y.view(B * T, -1).index_add_(0, r * T + t, rows_of.to(y.dtype))
    return y


@one_at_a_time
@torch.no_grad()
def run_feature_edits(
    model: C2SModel | PreTrainedModel, transcoders: TranscoderSet, run: CleanRun, edits: dict[int, FeatureEdits]
) -> torch.Tensor:
    """Logits of a prompt under ``B`` edits at once, given as lists of entries (:class:`FeatureEdits`).

    The same logits as :func:`run_edits` with the edits' dense form. A TopK transcoder is read and edited at its
    ``k`` active features per position, so neither the edits nor the activations take ``B * T * n_features``
    memory; other transcoders take the dense path.

    Parameters
    ----------
    model
        The model of the clean run.
    transcoders
        Its transcoders.
    run
        The prompt's clean run (:func:`clean_run`), whose errors are added back.
    edits
        Per layer, the edits of its features; every layer's edits have the same ``B``. A covered layer without
        edits keeps its features.

    Returns
    -------
    ``(B, T, vocab)`` logits.
    """
    batch = max([len(e.default) for e in edits.values()] + [1])
    T = len(run.input_ids)

    def edited(tc: Transcoder, x: torch.Tensor, m: int) -> torch.Tensor:
        if m not in edits:
            return _dense_output(tc, x, None, None)
        if tc.cfg.activation == "topk":
            return _sparse_output(tc, x, edits[m])
        return _dense_output(tc, x, *edits[m].dense(T, tc.cfg.n_features))

    hf, _ = _parts(model)
    ids = run.input_ids[None].expand(batch, -1)
    with _replaced(model, transcoders, run.errors, edited):
        return hf(input_ids=ids, use_cache=False).logits.float()
