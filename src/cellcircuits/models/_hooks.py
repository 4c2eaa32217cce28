"""Plain torch forward hooks, registered inside a context manager and always removed."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import torch
    from torch import nn

    from ._adapter import HookPoint


def input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a module was called with, from a forward hook's ``args`` and ``kwargs``.

    Parameters
    ----------
    args
        The positional arguments of the call.
    kwargs
        The keyword arguments of the call.

    Returns
    -------
    The first positional argument, else ``hidden_states``, else the first keyword argument that is a tensor.
    """
    if args:
        return args[0]
    # Llama and Gemma-2 call their attention with hidden_states=... as a keyword
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if hasattr(v, "shape"))


def output_tensor(output: object) -> torch.Tensor:
    """The hidden states in a module's output (modules may return a tuple whose first entry they are)."""
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
                t = input_tensor(args, kwargs) if _point.side == "input" else output_tensor(output)
                store[_point].append(t.detach() if detach else t)

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield store
    finally:
        for h in handles:
            h.remove()
