"""Settings of one transcoder: its sizes, activation, training penalties and where in a model it sits."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

ACTIVATIONS = ("relu", "topk", "jumprelu")
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass
class TranscoderConfig:
    """Sizes, activation, loss settings and provenance of one transcoder.

    A transcoder reads the input ``x`` of an MLP block (``d_in`` wide) and predicts the block's output ``y``
    (``d_out`` wide) through ``n_features`` sparse features. Stored as ``cfg.json`` beside the weights.
    """

    format: ClassVar[str] = "cellcircuits.transcoder/1"
    """Tag written to ``cfg.json``; a file with another tag is refused."""

    d_in: int
    """Width of the MLP input the encoder reads."""
    d_out: int
    """Width of the MLP output the decoder writes."""
    n_features: int
    """Number of features (the width of the sparse hidden layer)."""
    activation: Literal["relu", "topk", "jumprelu"] = "topk"
    """``relu`` (L1-penalised), ``topk`` (the ``k`` largest pre-activations per row) or ``jumprelu``."""
    k: int = 32
    """Active features per row for ``topk``."""
    l1_coefficient: float = 1e-3
    """Weight of the decoder-norm-weighted L1 penalty (``relu``)."""
    l0_coefficient: float = 1e-3
    """Weight of the L0 penalty (``jumprelu``)."""
    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of the threshold's straight-through gradient, in normalised units."""
    jumprelu_init_threshold: float = 0.01
    """Threshold every feature starts from (``jumprelu``), in normalised units."""
    skip: bool = False
    """Add a linear skip connection ``x @ W_skip`` to the output (skip transcoders, Paulo et al. 2025)."""
    aux_k: int | None = None
    """Dead features the auxiliary loss may use per row; ``None`` means ``min(256, n_features // 2)``, 0 none."""
    aux_coefficient: float = 1 / 32
    """Weight of the auxiliary loss that revives dead features."""
    dead_after_tokens: int = 1_000_000
    """A feature that has not fired in this many training tokens counts as dead."""
    model_name: str = ""
    """Name or path of the model whose MLP the transcoder replaces."""
    layer: int = 0
    """Index of the replaced MLP's layer."""
    hook_in: str = ""
    """Where ``x`` is read, as ``"module.name:side"`` (e.g. ``"gpt_neox.layers.0.mlp:input"``)."""
    hook_out: str = ""
    """Where ``y`` is read, as ``"module.name:side"``."""
    architecture: str = ""
    """Architecture tag of the model (``gpt_neox``, ``llama``, ``gemma2``)."""
    dtype: str = "float32"
    """Torch dtype of the parameters, by name."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_out", "n_features", "k", "dead_after_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{name} must be a positive integer, got {value!r}"
                raise ValueError(msg)
        if self.activation not in ACTIVATIONS:
            msg = f"unknown activation {self.activation!r}; choose one of {list(ACTIVATIONS)}"
            raise ValueError(msg)
        if self.activation == "topk" and self.k > self.n_features:
            msg = f"k ({self.k}) must not exceed n_features ({self.n_features})"
            raise ValueError(msg)
        if self.aux_k is None:
            self.aux_k = min(256, self.n_features // 2)
        if isinstance(self.aux_k, bool) or not isinstance(self.aux_k, int) or not 0 <= self.aux_k <= self.n_features:
            msg = f"aux_k must be an integer in [0, n_features={self.n_features}], got {self.aux_k!r}"
            raise ValueError(msg)
        for name in ("l1_coefficient", "l0_coefficient", "aux_coefficient"):
            if not float(getattr(self, name)) >= 0:  # also refuses NaN
                msg = f"{name} must be non-negative, got {getattr(self, name)!r}"
                raise ValueError(msg)
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            if not float(getattr(self, name)) > 0:
                msg = f"{name} must be positive, got {getattr(self, name)!r}"
                raise ValueError(msg)
        if self.dtype not in DTYPES:
            msg = f"unknown dtype {self.dtype!r}; choose one of {list(DTYPES)}"
            raise ValueError(msg)
        for name in ("hook_in", "hook_out"):
            hook = getattr(self, name)
            if hook and hook.rpartition(":")[2] not in ("input", "output"):
                msg = f'{name} must look like "module.name:input" or "module.name:output", got {hook!r}'
                raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict, led by the format tag."""
        return {"format": self.format, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TranscoderConfig:
        """Settings from :meth:`to_dict`'s output; another format tag or an unknown key is an error."""
        data = dict(data)
        tag = data.pop("format", cls.format)
        if tag != cls.format:
            msg = f"unsupported transcoder format {tag!r}; this version reads {cls.format!r}"
            raise ValueError(msg)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            msg = f"unknown transcoder settings {sorted(unknown)}"
            raise ValueError(msg)
        missing = {"d_in", "d_out", "n_features"} - set(data)
        if missing:
            msg = f"transcoder settings lack {sorted(missing)}"
            raise ValueError(msg)
        return cls(**data)
