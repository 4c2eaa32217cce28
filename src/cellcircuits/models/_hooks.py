"""Plain torch forward hooks, registered inside a context manager and always removed; the per-model lock.

Hooks and settings such as the attention implementation belong to the model, not to a call, so two threads that hook
one model would see each other's activations. Every tool that hooks, switches or runs a model holds its re-entrant
lock (:func:`model_lock`) while it does, so calls on one model from several threads run one at a time.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from torch import nn

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import torch

    from ._adapter import HookPoint

P = ParamSpec("P")
R = TypeVar("R")

# one lock per torch module, dropped with the module; the guard makes creating it atomic
_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _module_of(model: object) -> nn.Module | None:
    module = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    return module if isinstance(module, nn.Module) else None


def model_lock(model: object) -> threading.RLock:
    """The re-entrant lock of a model, shared by every tool that hooks, switches or runs it.

    Parameters
    ----------
    model
        A torch module (a Hugging Face causal LM), or an object holding one as ``.model`` (a
        :class:`~cellcircuits.models.C2SModel`); two objects holding the same module share its lock.

    Returns
    -------
    The lock; hold it with ``with model_lock(model): ...``. The thread that holds it may take it again.

    Raises
    ------
    TypeError
        When ``model`` is neither a torch module nor holds one as ``.model``.
    """
    module = _module_of(model)
    if module is None:
        msg = f"expected a torch module or an object holding one as .model, got {type(model).__name__}"
        raise TypeError(msg)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


def one_at_a_time(func: Callable[P, R]) -> Callable[P, R]:
    """Decorate a function with a ``model`` argument so each call holds that model's lock (:func:`model_lock`).

    Parameters
    ----------
    func
        The function; its ``model`` argument is a torch module or holds one as ``.model``.

    Returns
    -------
    The function, whose calls on one model from several threads run one at a time. A call whose ``model`` is
    neither a module nor holds one runs unlocked (and the function reports the bad argument).
    """
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            model = signature.bind_partial(*args, **kwargs).arguments.get("model")
        except TypeError:  # the call itself is wrong: let the function say so
            model = None
        if _module_of(model) is None:
            return func(*args, **kwargs)
        with model_lock(model):
            return func(*args, **kwargs)

    return wrapper


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

    Notes
    -----
    The block holds the model's lock (:func:`model_lock`): another thread that hooks or runs the model through
    cellcircuits waits until the block exits.
    """
    store: dict[HookPoint, list] = {p: [] for p in points}
    handles = []
    lock = model_lock(model)
    lock.acquire()  # another thread's hooks would record this thread's passes, and the other way round
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
        lock.release()
