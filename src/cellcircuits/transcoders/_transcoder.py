"""The transcoder: a wide, sparse stand-in for one MLP block.

A transcoder reads the MLP's input ``x`` and predicts its output ``y``::

    x_n = x * input_scale
    pre = x_n @ W_enc + b_enc                      (b_dec is not subtracted from the input)
    f = activation(pre)
    y_hat = (f @ W_dec + b_dec + x_n @ W_skip) / output_scale

The scales make training see inputs and targets of mean squared norm ``d_in`` and ``d_out``; callers always get
outputs in the model's units, and :meth:`Transcoder.fold_scales` moves the scales into the weights.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ._config import TranscoderConfig
from ._cpu import cpu_kernels
from ._kernels import GatheredEncode, JumpReLU, SparseDecode, Step, TransposeCache, sparse_rows
from ._select import sparse_topk, sparse_topk_and_columns, topk_indices

#: Norm of each decoder row at initialisation.
DECODER_INIT_NORM = 0.1


class TranscoderOutput(NamedTuple):
    """What a transcoder's forward pass gives."""

    output: torch.Tensor
    """``(..., d_out)`` predicted MLP output, in the model's units."""
    features: torch.Tensor
    """``(..., n_features)`` feature activations."""
    pre_acts: torch.Tensor
    """``(..., n_features)`` pre-activations ``x_n @ W_enc + b_enc``."""


class LossOutput(NamedTuple):
    """The training loss of one batch and its parts."""

    total: torch.Tensor
    """``mse + sparsity + aux``, the value to minimise."""
    mse: torch.Tensor
    """Squared error summed over ``d_out`` and averaged over rows, in normalised units."""
    sparsity: torch.Tensor
    """Weighted L1 (``relu``) or L0 (``jumprelu``) penalty; zero for ``topk``."""
    aux: torch.Tensor
    """Auxiliary loss that fits the residual error with dead features (zero when none is dead)."""
    fvu: torch.Tensor
    """Fraction of the variance of ``y`` left unexplained (no gradient)."""
    l0: torch.Tensor
    """Mean number of active features per row (no gradient)."""
    features: torch.Tensor
    """``(rows, n_features)`` feature activations of the batch, detached (for dead-feature tracking); with ``topk`` a
    sparse CSR tensor holding each row's ``k`` selected features (``.to_dense()`` gives the dense one)."""


class Transcoder(nn.Module):
    """A sparse, wide replacement for one MLP block.

    Parameters
    ----------
    cfg
        Sizes, activation and loss settings.
    device
        Device of the parameters.

    Notes
    -----
    Parameters are ``W_enc (d_in, n_features)``, ``b_enc (n_features)``, ``W_dec (n_features, d_out)``,
    ``b_dec (d_out)``, with ``skip`` also ``W_skip (d_in, d_out)`` and with ``jumprelu`` also
    ``log_threshold (n_features)``. Decoder rows start as random directions of norm 0.1; the encoder starts as the
    decoder's transpose when ``d_in == d_out`` (else as independent random directions of the same norm); biases
    and ``W_skip`` start at zero. Initialisation draws from torch's global generator, so ``torch.manual_seed``
    makes it reproducible.

    ``selection_dtype`` (an attribute, not saved; ``None`` by default) sets the dtype of the training step's dense
    encoder product, which only chooses a TopK transcoder's ``k`` features: with ``torch.bfloat16`` that product
    runs in bfloat16, while the chosen features' activations, the gradients and the weights stay in the weights'
    dtype (mixed precision with full-precision master weights).
    """

    W_skip: nn.Parameter | None
    log_threshold: nn.Parameter | None
    # buffers, registered in __init__
    input_scale: torch.Tensor
    output_scale: torch.Tensor
    tokens_since_fired: torch.Tensor

    def __init__(self, cfg: TranscoderConfig, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.selection_dtype: torch.dtype | None = None
        kw = {"device": device, "dtype": getattr(torch, cfg.dtype)}
        W_dec = torch.randn(cfg.n_features, cfg.d_out, **kw)
        W_dec *= DECODER_INIT_NORM / W_dec.norm(dim=1, keepdim=True)
        if cfg.d_in == cfg.d_out:
            W_enc = W_dec.T.contiguous()
        else:
            W_enc = torch.randn(cfg.d_in, cfg.n_features, **kw)
            W_enc *= DECODER_INIT_NORM / W_enc.norm(dim=0, keepdim=True)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_features, **kw))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, **kw))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out, **kw)) if cfg.skip else None
        if cfg.activation == "jumprelu":
            init = math.log(cfg.jumprelu_init_threshold)
            self.log_threshold = nn.Parameter(torch.full((cfg.n_features,), init, **kw))
        else:
            self.log_threshold = None
        self.register_buffer("input_scale", torch.ones((), **kw))
        self.register_buffer("output_scale", torch.ones((), **kw))
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.n_features, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        c = self.cfg
        extra = f", k={c.k}" if c.activation == "topk" else ""
        return f"{c.d_in} -> {c.n_features} -> {c.d_out}, activation={c.activation!r}{extra}, skip={c.skip}"

    @property
    def threshold(self) -> torch.Tensor | None:
        """``(n_features,)`` JumpReLU thresholds ``exp(log_threshold)``; ``None`` for other activations."""
        return None if self.log_threshold is None else self.log_threshold.exp()

    # forward pass
    def _normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_enc.dtype) * self.input_scale

    def _pre_acts(self, x_n: torch.Tensor) -> torch.Tensor:
        # one fused multiply-add instead of a matmul and a broadcast add
        return F.linear(x_n, self.W_enc.T, self.b_enc)

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        act = self.cfg.activation
        if act == "relu":
            return torch.relu(pre)
        if act == "topk":
            acts, indices = self._topk(pre)
            return torch.zeros_like(pre).scatter(-1, indices, acts)
        return JumpReLU.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)

    def _decode_normalised(self, features: torch.Tensor, x_n: torch.Tensor | None) -> torch.Tensor:
        return self._add_skip(features @ self.W_dec + self.b_dec, x_n)

    def _topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, k)`` activations and feature indices of the ``k`` largest pre-activations of each row."""
        indices = topk_indices(pre, self.cfg.k)
        return torch.relu(pre.gather(-1, indices)), indices

    def _decode_sparse(self, acts: torch.Tensor, indices: torch.Tensor, x_n: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_decode_normalised` of ``(rows, k)`` active features: sums ``k`` decoder rows per row.

        Gathering the rows costs ``rows * k * d_out`` instead of ``rows * n_features * d_out``.
        """
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=acts, mode="sum") + self.b_dec
        return self._add_skip(out, x_n)

    def _add_skip(self, out: torch.Tensor, x_n: torch.Tensor | None) -> torch.Tensor:
        """``out`` plus the skip term ``x_n @ W_skip`` (none without ``W_skip`` or ``x_n``)."""
        if self.W_skip is None or x_n is None:
            return out
        if out.dim() == 2:
            return torch.addmm(out, x_n, self.W_skip)  # the product added by the matmul itself
        return out + x_n @ self.W_skip

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The active features of a TopK transcoder: ``(..., k)`` activations and their feature indices.

        The same activations as :meth:`encode` without the ``(..., n_features)`` block of zeros; pass them to
        :meth:`decode_topk`. Raises a ValueError for other activations, whose number of active features varies.
        """
        if self.cfg.activation != "topk":
            msg = f"encode_topk needs a TopK transcoder; this one's activation is {self.cfg.activation!r}"
            raise ValueError(msg)
        pre = self.pre_acts(x)
        acts, indices = self._topk(pre.reshape(-1, pre.shape[-1]))
        return acts.view(*pre.shape[:-1], -1), indices.view(*pre.shape[:-1], -1)

    def decode_topk(self, acts: torch.Tensor, indices: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`decode` of ``(..., k)`` activations at feature ``indices`` (:meth:`encode_topk`'s layout).

        Sums ``k`` decoder rows per row instead of multiplying by the whole decoder.
        """
        k = indices.shape[-1]
        x_n = None if x is None else self._normalise_input(x).reshape(-1, x.shape[-1])
        out = self._decode_sparse(acts.reshape(-1, k).to(self.W_dec.dtype), indices.reshape(-1, k), x_n)
        return (out / self.output_scale).view(*indices.shape[:-1], -1)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., n_features)`` pre-activations of ``x`` (``(..., d_in)``, model units)."""
        return self._pre_acts(self._normalise_input(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., n_features)`` feature activations of ``x`` (``(..., d_in)``, model units)."""
        return self._activate(self.pre_acts(x))

    def decode(self, features: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted MLP output, in model units.

        Parameters
        ----------
        features
            ``(..., n_features)`` feature activations.
        x
            ``(..., d_in)`` the MLP input; with ``skip`` its skip term is added, without ``x`` it is left out.

        Returns
        -------
        ``(..., d_out)`` predicted output.
        """
        x_n = None if x is None else self._normalise_input(x)
        return self._decode_normalised(features, x_n) / self.output_scale

    def forward(self, x: torch.Tensor) -> TranscoderOutput:
        """Predict the MLP's output from its input ``x`` (``(..., d_in)``, model units)."""
        x_n = self._normalise_input(x)
        pre = self._pre_acts(x_n)
        features = self._activate(pre)
        return TranscoderOutput(self._decode_normalised(features, x_n) / self.output_scale, features, pre)

    # training
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> LossOutput:
        """Training loss of a batch.

        Parameters
        ----------
        x
            ``(..., d_in)`` MLP inputs, model units.
        y
            ``(..., d_out)`` MLP outputs, model units.

        Returns
        -------
        The total loss and its parts; ``mse``, ``sparsity`` and ``aux`` are computed in normalised units, ``fvu``
        against ``y``.
        """
        cfg = self.cfg
        x_n = self._normalise_input(x).reshape(-1, cfg.d_in)
        y_n = y.to(x_n.dtype).reshape(-1, cfg.d_out) * self.output_scale
        if cfg.activation == "topk":
            # decode the k active features sparsely, and hand them back sparse: no dense (rows, n_features) tensor
            # takes part in autograd (see GatheredEncode)
            cache = TransposeCache()
            acts, indices, dead = self._topk_train(x_n, cache)
            # AuxK's estimate from every dead feature comes with the decoder's product (one gradient tensor)
            dead_inputs = dead[:2] if dead is not None and dead[2] is None else (None, None)
            out, estimate = SparseDecode.apply(acts, self.W_dec, indices, cache, *dead_inputs)
            # out is this step's own tensor: the bias is added in place, without another (rows, d_out) tensor
            y_hat_n = self._add_skip(out.add_(self.b_dec), x_n)
            if dead is not None:
                dead_acts, dead_index, local = dead
                if local is not None:  # aux_k of the dead features in each row
                    estimate = self._aux_estimate(dead_acts.gather(-1, local), dead_index[local], None)
            with torch.no_grad():
                features = sparse_rows(acts, indices, cfg.n_features, ascending=True)
                l0_mean = torch.count_nonzero(acts).to(x_n.dtype) / len(acts)
        else:
            pre = self._pre_acts(x_n)
            features = self._activate(pre)
            y_hat_n = self._decode_normalised(features, x_n)
            l0_mean = (features.detach() != 0).sum(-1).to(pre.dtype).mean()
        rows = len(y_n)
        # the residual, kept for AuxK; the squared error is its dot product with itself, one pass each way
        residual = y_n - y_hat_n
        flat = residual.view(-1)
        mse = torch.dot(flat, flat) / rows

        if cfg.activation == "relu":
            # weighting by decoder norms stops the L1 penalty from being dodged by shrinking f and growing W_dec
            sparsity = cfg.l1_coefficient * (features * self.W_dec.norm(dim=1)).sum(-1).mean()
        elif cfg.activation == "jumprelu":
            l0 = Step.apply(pre, self.threshold, cfg.jumprelu_bandwidth)
            sparsity = cfg.l0_coefficient * l0.sum(-1).mean()
        else:
            sparsity = mse.new_zeros(())

        if cfg.activation != "topk":
            selected = self._aux_select(pre)
            estimate = None if selected is None else self._aux_estimate(torch.relu(selected[0]), *selected[1:])
        aux = self._aux_loss(estimate, residual.detach())
        with torch.no_grad():
            # in normalised units, where the output scale cancels: the squared error is the mse's sum over rows
            fvu = mse.detach() * rows / _total_variance(y_n)
        return LossOutput(mse + sparsity + aux, mse, sparsity, aux, fvu, l0_mean, features.detach())

    def _topk_train(
        self, x_n: torch.Tensor, cache: TransposeCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None]:
        """TopK activations of ``(rows, d_in)`` inputs for training, and those of AuxK's dead features.

        Gives the ``(rows, k)`` activations and indices, then ``None`` when AuxK is off or nothing is dead, or else
        the ``(rows, n_dead)`` activations of every dead feature, their feature indices and, when AuxK uses only
        ``aux_k < n_dead`` of them per row, the ``(rows, aux_k)`` positions of those (``None`` when it uses all).
        The dense pre-activations are found without autograd; :class:`GatheredEncode` gives the gradient of the
        top-k selection (sharing ``cache`` with the decoder's) and of the dead features' columns of the same
        product.
        """
        k = self.cfg.k
        dead_index = self._aux_dead_index()
        with torch.no_grad():
            low = self.selection_dtype
            if low is None or low == x_n.dtype:
                pre = self._pre_acts(x_n)
                if dead_index is None:
                    values, indices = sparse_topk(pre, k)
                    dead_values = None
                else:  # AuxK's pre-activations: the dead features' columns of the same product, read by the search
                    values, indices, dead_values = sparse_topk_and_columns(pre, k, dead_index)
            else:  # choose in low precision, then compute the chosen pre-activations in full precision
                pre = F.linear(x_n.to(low), self.W_enc.T.to(low), self.b_enc.to(low))
                indices = topk_indices(pre, k)
                columns = self.W_enc.T[indices]  # (rows, k, d_in)
                values = torch.bmm(columns, x_n[:, :, None]).squeeze(-1) + self.b_enc[indices]
                dead_values = None
                if dead_index is not None:
                    W_dead, b_dead = self.W_enc.index_select(1, dead_index), self.b_enc.index_select(0, dead_index)
                    dead_values = F.linear(x_n, W_dead.T, b_dead)
            del pre
        # the decoder reads the same indices: one sort of them serves both weight gradients
        acts, dead_acts = GatheredEncode.apply(
            values, indices, x_n, self.W_enc, self.b_enc, cache, dead_values, dead_index
        )
        if dead_index is None or dead_values is None:
            return acts, indices, None
        aux_k = self.cfg.aux_k
        assert aux_k is not None  # TranscoderConfig.__post_init__ resolves None to its default
        local = dead_values.topk(aux_k, dim=-1, sorted=False).indices if aux_k < len(dead_index) else None
        return acts, indices, (dead_acts, dead_index, local)

    def _aux_dead_index(self) -> torch.Tensor | None:
        """The dead features AuxK reads, or ``None`` when AuxK is off or nothing is dead.

        Read by the host: on a GPU, a training step's one wait for the device.
        """
        cfg = self.cfg
        if cfg.aux_k == 0 or cfg.aux_coefficient == 0:
            return None
        dead_index = self.dead_mask().nonzero().squeeze(1)
        return dead_index if len(dead_index) else None

    def _aux_select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """The dead features' pre-activations that AuxK uses, or ``None`` when AuxK is off or nothing is dead.

        Gives ``(rows, m)`` values and feature indices, then the dead features' indices when all of them are used
        (``m`` is their number) or else ``None``.
        """
        dead_index = self._aux_dead_index()
        if dead_index is None:
            return None
        aux_k, n_dead = self.cfg.aux_k, len(dead_index)
        assert aux_k is not None  # TranscoderConfig.__post_init__ resolves None to its default
        pre_dead = pre.index_select(-1, dead_index)
        if aux_k < n_dead:
            values, indices = pre_dead.topk(aux_k, dim=-1, sorted=False)
            return values, dead_index[indices], None
        return pre_dead, dead_index.expand(pre.shape[0], n_dead), dead_index

    def _aux_estimate(self, acts: torch.Tensor, indices: torch.Tensor, dead_index: torch.Tensor | None) -> torch.Tensor:
        """AuxK's estimate of the residual from ``(rows, m)`` dead-feature activations at feature ``indices``.

        ``dead_index``: the dead features, when every row uses all of them (``indices`` is then it, expanded).
        Only the dead features' decoder rows take part; no ``b_dec``: the residual is what the live features and the
        bias left over.
        """
        if dead_index is None:
            return F.embedding_bag(indices, self.W_dec, per_sample_weights=acts, mode="sum")
        return acts @ self.W_dec.index_select(0, dead_index)

    def _aux_loss(self, estimate: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
        """AuxK: how far the dead features' ``estimate`` is from the (detached) ``residual`` ``y_n - y_hat_n``.

        Zero when there is no estimate (AuxK off, or nothing dead).
        """
        if estimate is None:
            return residual.new_zeros(())
        return self.cfg.aux_coefficient * F.mse_loss(estimate, residual, reduction="sum") / _total_variance(residual)

    @torch.no_grad()
    def fired_mask(self, features: torch.Tensor) -> torch.Tensor:
        """``(n_features,)`` bool, the features with a non-zero activation in any row of ``features``.

        ``features`` is ``(..., n_features)``, dense or a 2-d sparse CSR tensor (as :meth:`loss` gives for ``topk``).
        """
        if features.layout == torch.sparse_csr:
            # as given by loss() for topk: the stored entries are the only candidates; a scatter of their
            # non-zero flags, not a boolean index (which costs a nonzero() and an index_put of every entry)
            values = features.values()
            hit = torch.zeros(self.cfg.n_features, dtype=torch.uint8, device=values.device)
            hit.scatter_reduce_(0, features.col_indices(), (values != 0).to(torch.uint8), "amax")
            return hit > 0
        return (features.reshape(-1, self.cfg.n_features) != 0).any(0)

    @torch.no_grad()
    def update_dead(self, features: torch.Tensor) -> None:
        """Count, per feature, the training tokens since it last fired; call after each step with its features.

        ``features`` is ``(..., n_features)``, dense or a 2-d sparse CSR tensor (as :meth:`loss` gives for ``topk``).
        """
        sparse = features.layout == torch.sparse_csr
        rows = features.shape[0] if sparse else features.numel() // self.cfg.n_features
        since = self.tokens_since_fired
        on_cpu = sparse and since.device.type == "cpu" and features.dtype in (torch.float32, torch.float64)
        kernels = cpu_kernels() if on_cpu else None
        if kernels is not None:  # one pass over the entries (a numba kernel), instead of a few torch ops
            columns, values = features.col_indices(), features.values().detach()
            if kernels.count_since_fired(since.numpy(), columns.numpy(), values.numpy(), rows):
                return
            msg = f"feature columns must lie in 0 .. {self.cfg.n_features - 1}"
            raise IndexError(msg)
        self.tokens_since_fired += rows
        self.tokens_since_fired.masked_fill_(self.fired_mask(features), 0)

    def dead_mask(self) -> torch.Tensor:
        """``(n_features,)`` bool, the features that have not fired in ``cfg.dead_after_tokens`` tokens."""
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    def dead_fraction(self) -> float:
        """Fraction of features that are dead."""
        return float(self.dead_mask().float().mean())

    @torch.no_grad()
    def set_scales_from(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Set the scales so that ``x * input_scale`` and ``y * output_scale`` have mean squared norm d_in, d_out.

        Parameters
        ----------
        x
            ``(..., d_in)`` a sample of MLP inputs, model units.
        y
            ``(..., d_out)`` the matching MLP outputs.
        """
        for name, t, d in (("x", x, self.cfg.d_in), ("y", y, self.cfg.d_out)):
            mean_sq = t.to(self.W_enc.dtype).reshape(-1, d).pow(2).sum(-1).mean()
            if not mean_sq > 0:
                msg = f"cannot scale {name}: its mean squared norm is {float(mean_sq)}"
                raise ValueError(msg)
            getattr(self, "input_scale" if name == "x" else "output_scale").fill_(math.sqrt(d / float(mean_sq)))

    @torch.no_grad()
    def fold_scales(self) -> None:
        """Move the input and output scales into the weights and reset them to 1; outputs stay the same.

        Pre-activations (hence features, top-k choices and JumpReLU thresholds) are unchanged; decoder rows are
        divided by ``output_scale``.
        """
        s_in, s_out = self.input_scale.clone(), self.output_scale.clone()
        self.W_enc.mul_(s_in)
        self.W_dec.div_(s_out)
        self.b_dec.div_(s_out)
        if self.W_skip is not None:
            self.W_skip.mul_(s_in / s_out)
        self.input_scale.fill_(1.0)
        self.output_scale.fill_(1.0)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm, in place (outputs change; meant for use during training)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _total_variance(y: torch.Tensor) -> torch.Tensor:
    """``Σ (y - mean(y, 0))²`` over the ``(rows, d)`` tensor ``y``, without gradient, floored at ``1e-12``."""
    with torch.no_grad():
        return F.mse_loss(y, y.mean(0).expand_as(y), reduction="sum").clamp_min(1e-12)
