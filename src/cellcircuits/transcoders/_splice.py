"""Run a model with some of its MLPs replaced by transcoders, by zeros or by a fixed mean output."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch

from ..models._hooks import input_tensor, model_lock, output_tensor

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from torch import nn

    from ..models._load import C2SModel
    from ._transcoder import Transcoder
    from ._transcoder_set import TranscoderSet

    #: A forward hook registered ``with_kwargs=True``: ``(module, args, kwargs, output) -> new output``.
    OutputHook = Callable[[nn.Module, tuple, dict, object], object]

MODES = ("transcoder", "zero", "mean")


def replace_output(output: object, new: torch.Tensor) -> object:
    """``output`` with its hidden states swapped for ``new`` (modules may return a tuple)."""
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


def _resolve_layers(
    n_layers: int,
    mode: str,
    transcoders: TranscoderSet | None,
    layers: Sequence[int] | None,
    mean_outputs: Mapping[int, torch.Tensor] | None,
) -> list[int]:
    """The layers to splice, checked against the model and against what the mode needs."""
    if layers is None:
        if mode == "mean" and mean_outputs is not None:
            chosen = [int(layer) for layer in mean_outputs]
        elif transcoders is not None:
            chosen = list(transcoders.layers)
        else:
            chosen = list(range(n_layers))
    else:
        chosen = [int(layer) for layer in layers]
    out: list[int] = []
    for layer in chosen:
        if not -n_layers <= layer < n_layers:
            msg = f"layer {layer} out of range for a model with {n_layers} layers"
            raise ValueError(msg)
        layer %= n_layers
        if layer not in out:
            out.append(layer)
    # splice() refuses mode "transcoder" without a set and mode "mean" without mean outputs
    if mode == "transcoder" and transcoders is not None:
        missing = [layer for layer in out if layer not in transcoders]
        if missing:
            msg = f"no transcoder for layer(s) {missing}; the set covers layers {transcoders.layers}"
            raise ValueError(msg)
    if mode == "mean" and mean_outputs is not None:
        means = {int(k) % n_layers: v for k, v in mean_outputs.items()}
        missing = [layer for layer in out if layer not in means]
        if missing:
            msg = f"no mean output for layer(s) {missing}; mean_outputs covers layers {sorted(means)}"
            raise ValueError(msg)
    return sorted(out)


@contextmanager
def splice(
    model: C2SModel,
    transcoders: TranscoderSet | None = None,
    *,
    mode: Literal["transcoder", "zero", "mean"] = "transcoder",
    layers: Sequence[int] | None = None,
    mean_outputs: Mapping[int, torch.Tensor] | None = None,
) -> Iterator[list[int]]:
    """Replace the MLP contribution of some layers while the block runs.

    The module whose output joins the residual stream (:meth:`~cellcircuits.models.ModelAdapter.mlp_out`: the
    MLP itself, or Gemma-2's post-feedforward norm) gets a forward hook that swaps its output for the replacement.
    The original MLP still runs (its output is discarded), and every hook is removed when the block exits, also on
    an exception. The hooks run before any other hook on the same module, so recording
    :meth:`~cellcircuits.models.ModelAdapter.mlp_out` inside the block sees the replacement. The block holds the
    model's lock (:meth:`~cellcircuits.models.C2SModel.exclusive`), so other threads' calls on the model wait.

    Parameters
    ----------
    model
        A loaded model (:func:`cellcircuits.models.load`).
    transcoders
        Transcoders made for this model; needed for ``mode="transcoder"``. For the other modes it only gives the
        default layers.
    mode
        ``"transcoder"``: the transcoder's prediction from the MLP input (for Gemma-2 it predicts the post-norm
        output, so it replaces that); ``"zero"``: nothing (zero ablation); ``"mean"``: a fixed vector per layer,
        from ``mean_outputs``.
    layers
        Layers to splice; default every layer the set covers (for ``"mean"``, every layer of ``mean_outputs``; for
        ``"zero"`` without a set, every layer of the model). Negative indices count from the last layer.
    mean_outputs
        For ``mode="mean"``, the ``(d_model,)`` vector that replaces each layer's MLP contribution, usually its mean
        over a data set (the output of :meth:`~cellcircuits.models.ModelAdapter.mlp_out`).

    Yields
    ------
    The spliced layers, ascending.

    Raises
    ------
    ValueError
        When the set was made for a model of another width or depth, a chosen layer has no transcoder (or mean
        output), a layer is out of range, or the mode lacks what it needs.
    """
    adapter = model.adapter
    if mode not in MODES:
        msg = f"unknown mode {mode!r}; choose one of {list(MODES)}"
        raise ValueError(msg)
    if mode == "transcoder" and transcoders is None:
        msg = 'mode="transcoder" needs a TranscoderSet'
        raise ValueError(msg)
    if mode == "mean" and mean_outputs is None:
        msg = 'mode="mean" needs mean_outputs, a (d_model,) vector per layer'
        raise ValueError(msg)
    if transcoders is not None:
        transcoders.check_model(model)
    chosen = _resolve_layers(adapter.n_layers, mode, transcoders, layers, mean_outputs)
    means: dict[int, torch.Tensor] = {}
    if mode == "mean" and mean_outputs is not None:  # refused above when missing
        for key, value in mean_outputs.items():
            vec = torch.as_tensor(value)
            if vec.shape != (adapter.d_model,):
                msg = f"mean output of layer {key} has shape {tuple(vec.shape)}; expected ({adapter.d_model},)"
                raise ValueError(msg)
            means[int(key) % adapter.n_layers] = vec

    root = model.model
    handles = []
    lock = model_lock(root)
    lock.acquire()  # another thread's passes would run spliced, and this thread's hooks would meet its hooks
    try:
        for layer in chosen:
            out_point = adapter.mlp_out(layer)
            out_module = root.get_submodule(out_point.module)
            replace: OutputHook
            if mode == "transcoder":
                assert transcoders is not None  # refused above when missing
                tc = transcoders[layer]
                # the MLP input, kept until the module that carries the MLP contribution runs; for all but Gemma-2
                # that is the MLP itself, whose forward hook also sees the input
                stash: dict[str, torch.Tensor] = {}
                mlp_module: nn.Module = adapter.module(layer, "mlp")
                if mlp_module is not out_module:

                    def keep_input(_mod: nn.Module, args: tuple, kwargs: dict, _stash: dict = stash) -> None:
                        _stash["x"] = input_tensor(args, kwargs)

                    handles.append(mlp_module.register_forward_pre_hook(keep_input, with_kwargs=True))

                def by_transcoder(
                    _mod: nn.Module,
                    args: tuple,
                    kwargs: dict,
                    output: object,
                    _tc: Transcoder = tc,
                    _stash: dict = stash,
                    _own_input: bool = mlp_module is out_module,
                ) -> object:
                    x = input_tensor(args, kwargs) if _own_input else _stash.pop("x")
                    ref = output_tensor(output)
                    y = _tc(x.to(_tc.W_enc.device)).output
                    return replace_output(output, y.to(device=ref.device, dtype=ref.dtype))

                replace = by_transcoder
            elif mode == "zero":

                def by_zeros(_mod: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
                    return replace_output(output, torch.zeros_like(output_tensor(output)))

                replace = by_zeros
            else:

                def by_mean(
                    _mod: nn.Module, args: tuple, kwargs: dict, output: object, _mean: torch.Tensor = means[layer]
                ) -> object:
                    ref = output_tensor(output)
                    mean = _mean.to(device=ref.device, dtype=ref.dtype)
                    return replace_output(output, mean.expand_as(ref).contiguous())

                replace = by_mean

            handles.append(out_module.register_forward_hook(replace, with_kwargs=True, prepend=True))
        yield chosen
    finally:
        for h in handles:
            h.remove()
        lock.release()
