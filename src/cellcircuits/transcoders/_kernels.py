"""The transcoder's autograd kernels, made for the CPU.

JumpReLU's straight-through gradients, and sparse gradients of the encoder and decoder: each gives what the plain
dense formulation would (up to float rounding), with less work where only a few features of a row are active.
"""

from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from ._cpu import cpu_kernels, in_parts


def _floor_div(values: torch.Tensor, n: int) -> torch.Tensor:
    """``values // n`` for non-negative integers; a shift when ``n`` is a power of two (several times faster)."""
    return values >> (n.bit_length() - 1) if n & (n - 1) == 0 else values // n


def sparse_rows(values: torch.Tensor, indices: torch.Tensor, n: int, *, ascending: bool = False) -> torch.Tensor:
    """``(rows, n)`` sparse CSR tensor with ``values[i]`` at columns ``indices[i]`` of row ``i`` (``(rows, k)``).

    ``ascending=True`` says each row's indices are already in ascending order (as :func:`.topk_indices` gives them),
    and spares their sort.
    """
    rows, k = indices.shape
    crow = torch.arange(0, rows * k + 1, k, device=indices.device)
    if not ascending:
        indices, order = indices.sort(-1)
        values = values.gather(-1, order)
    return _csr(crow, indices.reshape(-1), values.reshape(-1), (rows, n))


def _csr(crow: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR tensor of these parts (not checked: the callers build them valid)."""
    with warnings.catch_warnings():
        # torch warns once that sparse CSR is beta; only its documented accessors are used here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow, columns, values, size=size, check_invariants=False)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # the threshold is broadcast over leading batch dimensions; its gradient sums over them
    return grad.reshape(-1, *shape).sum(0) if grad.shape != shape else grad


class JumpReLU(torch.autograd.Function):
    """``pre * H(pre - threshold)``; the threshold's gradient through a rectangle-kernel straight-through estimator."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        """``pre`` where it exceeds the threshold, else 0; ``bandwidth`` is the kernel's width ``ε``."""
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Gradients of ``pre`` (exact) and of the threshold (straight-through)."""
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        # d/dθ [z H(z - θ)] = -z δ(z - θ) ≈ -(θ / ε) K((z - θ) / ε)
        grad_threshold = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return grad_pre, _sum_to(grad_threshold, threshold.shape), None


class Step(torch.autograd.Function):
    """``H(pre - threshold)``; only the threshold gets a (straight-through) gradient."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        """1 where ``pre`` exceeds the threshold, else 0; ``bandwidth`` is the kernel's width ``ε``."""
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        """The threshold's straight-through gradient."""
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        # d/dθ H(z - θ) = -δ(z - θ) ≈ -(1 / ε) K((z - θ) / ε)
        grad_threshold = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return None, _sum_to(grad_threshold, threshold.shape), None


class TransposeCache:
    """The layout of the transposed sparse rows of one ``(rows, k)`` index tensor, found once for two products.

    The decoder's and the encoder's weight gradients read the same top-k indices; passing one cache to
    :class:`SparseDecode` and :class:`GatheredEncode` sorts them once per step instead of twice.
    """

    def __init__(self) -> None:
        self.layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def of(self, indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layout of ``indices`` (``(rows, k)`` columns of ``n``), found on the first call.

        The transpose's row pointers, the entries in column order and each of those entries' row.
        """
        if self.layout is None:
            self.layout = _transposed_layout(indices, n)
        return self.layout


def _index_dtype(n: int) -> torch.dtype:
    """The narrowest integer dtype that holds the indices ``0 .. n - 1``."""
    return torch.int16 if n <= torch.iinfo(torch.int16).max + 1 else torch.int32


def _transposed_layout(indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(n, rows)`` transpose of ``(rows, k)`` column ``indices``: row pointers, entries, their rows.

    The entries are in column order (a stable sort: rows ascending within a column). On the CPU a counting sort (a
    numba kernel), several times faster there than a sort; elsewhere, or without numba, a stable sort.
    """
    k = indices.shape[1]
    flat = indices.reshape(-1)
    kernels = cpu_kernels() if flat.device.type == "cpu" else None
    if kernels is not None:
        crow = torch.empty(n + 1, dtype=torch.long)
        order, row_of = torch.empty_like(flat), torch.empty_like(flat)
        if not kernels.transposed_layout(indices.contiguous().numpy(), crow.numpy(), order.numpy(), row_of.numpy()):
            msg = f"feature indices must lie in 0 .. {n - 1}"
            raise IndexError(msg)
        return crow, order, row_of
    # the same stable order from narrower keys, which sort faster
    order = flat.to(_index_dtype(n)).argsort(stable=True)
    # a scatter, not bincount: on a GPU, bincount reads its maximum back to the host and waits for the device
    counts = torch.zeros(n, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return F.pad(counts.cumsum(0), (1, 0)), order, _floor_div(order, k)


#: Entries from which :func:`_transposed_copy` takes the tiled kernel: below, torch's copy is as fast (it is about
#: half as fast at 16384 x 1024, 57 against 21 ms on 2 threads).
_TILED_TRANSPOSE_ENTRIES = 1 << 20


def _transposed_copy(a: torch.Tensor) -> torch.Tensor:
    """``a.T.contiguous()`` of the 2-d ``a``; a large float CPU block by a tiled numba kernel, the rows in parts."""
    big = a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64) and a.numel() >= _TILED_TRANSPOSE_ENTRIES
    kernels = cpu_kernels() if big else None
    if kernels is None:
        return a.T.contiguous()
    n, m = a.shape
    out = a.new_empty(m, n)
    in_parts(kernels.transpose_rows, n, m, a.contiguous().numpy(), out.numpy())
    return out


def _transposed_product(
    values: torch.Tensor, indices: torch.Tensor, n: int, dense: torch.Tensor, cache: TransposeCache | None = None
) -> torch.Tensor:
    """``S.T @ dense`` (``(n, d)``) for the ``(rows, n)`` row-sparse ``S`` with ``values[i]`` at ``indices[i]``.

    The gradient of a weight read at ``indices`` (encoder columns, decoder rows). A stable sort of the column
    indices gives the transpose's rows, and the product then costs one pass over ``rows * k`` entries; with
    ``cache`` the sort is done once for every product on the same indices. On the CPU the transpose's rows are
    summed by ``embedding_bag``, a few times faster there than torch's sparse CSR product, which the other devices
    use.
    """
    crow, order, row_of = cache.of(indices, n) if cache is not None else _transposed_layout(indices, n)
    entries = values.reshape(-1).index_select(0, order)
    product = _bag_sums if dense.device.type == "cpu" else _csr_product
    return product(crow, row_of, entries, dense)


def _bag_sums(crow: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``S @ dense`` for the CSR ``S`` (``crow``, ``columns``, ``values``), as weighted ``embedding_bag`` sums."""
    return F.embedding_bag(columns, dense, crow[:-1], mode="sum", per_sample_weights=values)


def _csr_product(crow: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``S @ dense`` for the CSR ``S`` (``crow``, ``columns``, ``values``), by torch's sparse CSR product."""
    return _csr(crow, columns, values, (len(crow) - 1, dense.shape[0])) @ dense


def _sampled_dots(grad: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``(rows, k)`` dot products ``grad[r] · weight[indices[r, j]]``: the gradient of ``embedding_bag``'s weights.

    On the CPU a sampled product at the CSR pattern of ``indices`` (ascending within each row, as
    :func:`.topk_indices` gives them), a few times faster there than ``embedding_bag``'s own backward, which the
    other devices use.
    """
    return (_sampled_product if grad.device.type == "cpu" else _bag_weight_grad)(grad, weight, indices)


def _sampled_product(grad: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """:func:`_sampled_dots` by ``torch.sparse.sampled_addmm`` at the CSR pattern of ``indices``."""
    pattern = sparse_rows(grad.new_zeros(indices.shape), indices, weight.shape[0], ascending=True)
    return torch.sparse.sampled_addmm(pattern, grad, weight.T, beta=0.0).values().view(indices.shape)


def _bag_weight_grad(grad: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """:func:`_sampled_dots` by ``embedding_bag``'s own backward for its per-sample weights."""
    with torch.enable_grad():
        acts = grad.new_ones(indices.shape, requires_grad=True)
        out = F.embedding_bag(indices, weight.detach(), per_sample_weights=acts, mode="sum")
        return torch.autograd.grad(out, acts, grad)[0]


class SparseDecode(torch.autograd.Function):
    """``out[r] = Σ_j acts[r, j] · W_dec[indices[r, j]]``: a TopK decoder's product, with sparse gradients.

    ``embedding_bag`` forward; backward, ``acts`` get the dot products of the output gradient with the decoder rows
    they read (:func:`_sampled_dots`), and ``W_dec`` the transposed sparse product ``S.T @ grad``
    (:func:`_transposed_product`, ``S`` holding ``acts`` at ``indices``), whose layout ``cache`` shares with the
    encoder's gradient (:class:`GatheredEncode`).

    With ``dead_acts`` (``(rows, m)``, the activations of the features ``dead_index`` in every row, as AuxK reads
    the dead features) it also gives their estimate ``dead_acts @ W_dec[dead_index]`` (else ``None``), whose
    decoder gradient is added into the same gradient tensor.
    """

    @staticmethod
    def forward(
        ctx,
        acts: torch.Tensor,
        W_dec: torch.Tensor,
        indices: torch.Tensor,
        cache: TransposeCache | None = None,
        dead_acts: torch.Tensor | None = None,
        dead_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder rows at ``indices`` (``(rows, k)``) summed with weights ``acts``; the dead features' estimate."""
        ctx.save_for_backward(acts, W_dec, indices, dead_acts, dead_index)
        ctx.cache = cache
        # detached, embedding_bag takes its forward-only kernel (no bookkeeping for its own backward)
        out = F.embedding_bag(indices, W_dec.detach(), per_sample_weights=acts.detach(), mode="sum")
        if dead_acts is None or dead_index is None:
            return out, None
        return out, dead_acts.detach() @ W_dec.detach().index_select(0, dead_index)

    @staticmethod
    @once_differentiable
    def backward(
        ctx, grad: torch.Tensor, grad_estimate: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, torch.Tensor | None, None]:
        """Gradients of ``acts``, ``W_dec`` and ``dead_acts``."""
        acts, W_dec, indices, dead_acts, dead_index = ctx.saved_tensors
        need_acts, need_W = ctx.needs_input_grad[:2]
        grad_acts = _sampled_dots(grad, W_dec, indices) if need_acts else None
        grad_W = _transposed_product(acts, indices, W_dec.shape[0], grad, ctx.cache) if need_W else None
        grad_dead = None
        if grad_estimate is not None and dead_acts is not None:
            if ctx.needs_input_grad[4]:
                grad_dead = grad_estimate @ W_dec.index_select(0, dead_index).T
            if grad_W is not None:
                grad_W.index_add_(0, dead_index, dead_acts.T @ grad_estimate)
        return grad_acts, grad_W, None, None, grad_dead, None


#: :class:`GatheredEncode` takes the dense backward when a row holds more than ``n_features / 16`` entries, about
#: where a sparse product stopped being faster than the dense one on CPU (1024 rows, ``d_in`` 128, measured roughly).
_DENSE_BACKWARD_FRACTION = 16


class GatheredEncode(torch.autograd.Function):
    """``relu(values)`` for ``values = (x_n @ W_enc + b_enc).gather(-1, indices)``, computed by the caller.

    The pre-activations are found without autograd (they are only needed to choose ``indices``); this function puts
    back the gradient of the gathered entries alone. With ``m`` indices per row the weight gradient
    ``x_n.T @ G`` (``G`` the ``(rows, n_features)`` gradient of the pre-activations, ``m`` non-zero entries per
    row) is a sparse product of ``rows * m * d_in`` multiply-adds instead of a dense one of
    ``rows * n_features * d_in``. Repeated indices in a row add up, as they would through ``gather``.

    With ``dead_values`` (``(x_n @ W_enc + b_enc)[:, dead_index]``, the columns AuxK reads for the dead features)
    it also gives ``relu(dead_values)`` (else ``None``); their weight gradient, a dense product over those columns,
    is added into the same gradient tensors.
    """

    @staticmethod
    def forward(
        ctx,
        values: torch.Tensor,
        indices: torch.Tensor,
        x_n: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        cache: TransposeCache | None = None,
        dead_values: torch.Tensor | None = None,
        dead_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``relu(values)`` and ``relu(dead_values)``; ``x_n``, ``W_enc`` and ``b_enc`` only for their gradients.

        ``cache`` is shared with the :class:`SparseDecode` of the same ``indices``.
        """
        acts = torch.relu(values)
        dead_acts = None if dead_values is None or dead_index is None else torch.relu(dead_values)
        ctx.save_for_backward(acts, indices, x_n, W_enc, dead_acts, dead_index)
        ctx.cache = cache
        return acts, dead_acts

    @staticmethod
    @once_differentiable
    def backward(
        ctx, grad: torch.Tensor, grad_dead: torch.Tensor | None
    ) -> tuple[None, None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None, None]:
        """Gradients of ``x_n``, ``W_enc`` and ``b_enc`` through the gathered entries alone."""
        acts, indices, x_n, W_enc, dead_acts, dead_index = ctx.saved_tensors
        need_x, need_W, need_b = ctx.needs_input_grad[2:5]
        n = W_enc.shape[1]
        rows, m = indices.shape
        # relu's gradient (zero where the activation is zero), by the kernel relu's own backward uses
        g = torch.ops.aten.threshold_backward(grad, acts, 0)
        g_dead = None
        if grad_dead is not None and dead_acts is not None:
            g_dead = torch.ops.aten.threshold_backward(grad_dead, dead_acts, 0)
        grad_x = grad_W = grad_b = None
        if m * _DENSE_BACKWARD_FRACTION > n:
            dense = g.new_zeros(rows, n).scatter_add_(-1, indices, g)
            if g_dead is not None:
                dense.index_add_(1, dead_index, g_dead)
            if need_W:
                grad_W = x_n.T @ dense
            if need_b:
                grad_b = dense.sum(0)
            if need_x:
                grad_x = dense @ W_enc.T
            return None, None, grad_x, grad_W, grad_b, None, None, None
        if need_W:
            # feature-major from the product; W_enc is (d_in, n_features)
            grad_W = _transposed_copy(_transposed_product(g, indices, n, x_n, ctx.cache))
            if g_dead is not None:
                grad_W.index_add_(1, dead_index, x_n.T @ g_dead)
        if need_b:
            grad_b = g.new_zeros(n).index_add_(0, indices.reshape(-1), g.reshape(-1))
            if g_dead is not None:
                grad_b.index_add_(0, dead_index, g_dead.sum(0))
        if need_x:
            grad_x = F.embedding_bag(indices, W_enc.T.contiguous(), per_sample_weights=g, mode="sum")
            if g_dead is not None:
                grad_x += g_dead @ W_enc.index_select(1, dead_index).T
        return None, None, grad_x, grad_W, grad_b, None, None, None
