"""Plain torch forward hooks, registered inside a context manager and always removed."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import torch
    from torch import nn

    from ._adapter import HookPoint


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    # Llama and Gemma-2 call their attention with hidden_states=... as a keyword
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if hasattr(v, "shape"))


def _output_tensor(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


@contextmanager
def record(model: nn.Module, points: Sequence[HookPoint], *, detach: bool = True) -> Iterator[dict[HookPoint, list]]:
    """Record the activations at ``points`` during the forward passes run inside the block.

    Parameters
    ----------
    model
        The model whose modules are hooked.
    points
        Hook points (module name and side) to record, e.g. from :meth:`ModelAdapter.mlp_in`; a point named twice
        is recorded once.
    detach
        Detach recorded tensors from the autograd graph.

    Yields
    ------
    A dict from each hook point to the list of tensors it saw, one per forward call.
    """
    store: dict[HookPoint, list] = {p: [] for p in points}
    handles = []
    try:
        for point in store:
            module = model.get_submodule(point.module)

            def hook(_mod: nn.Module, args: tuple, kwargs: dict, output: object, _point: HookPoint = point) -> None:
                t = _input_tensor(args, kwargs) if _point.side == "input" else _output_tensor(output)
                store[_point].append(t.detach() if detach else t)

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield store
    finally:
        for h in handles:
            h.remove()
