"""The set of transcoders that stands in for the MLPs of one model (all of its layers or some), ordered by layer."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal, cast

from torch import nn

from ._format import write_set

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping
    from pathlib import Path

    from ..models._load import C2SModel
    from ._transcoder import Transcoder


class TranscoderSet(nn.Module):
    """Transcoders for the MLPs of one model, ordered by layer.

    Parameters
    ----------
    transcoders
        Transcoder of each layer; every one reads and writes ``d_model`` wide vectors and has its layer in
        ``cfg.layer``.
    n_layers_model
        Number of layers of the model (the set may cover only some).
    model_name
        Name of the model; by default the first transcoder's ``cfg.model_name``.
    architecture
        Architecture tag of the model; by default the first transcoder's ``cfg.architecture``.
    d_model
        Residual width of the model; by default the first transcoder's ``cfg.d_in``.
    """

    def __init__(
        self,
        transcoders: Mapping[int, Transcoder],
        *,
        n_layers_model: int,
        model_name: str | None = None,
        architecture: str | None = None,
        d_model: int | None = None,
    ) -> None:
        super().__init__()
        if not transcoders:
            msg = "a TranscoderSet needs at least one transcoder"
            raise ValueError(msg)
        first = next(iter(transcoders.values())).cfg
        self.model_name = first.model_name if model_name is None else model_name
        self.architecture = first.architecture if architecture is None else architecture
        self.n_layers_model = int(n_layers_model)
        self.d_model = first.d_in if d_model is None else int(d_model)
        self.transcoders = nn.ModuleDict()
        for layer in sorted(transcoders):
            tc = transcoders[layer]
            cfg = tc.cfg
            if not 0 <= layer < self.n_layers_model:
                msg = f"layer {layer} out of range for a model with {self.n_layers_model} layers"
                raise ValueError(msg)
            if cfg.layer != layer:
                msg = f"the transcoder given for layer {layer} was made for layer {cfg.layer} (cfg.layer)"
                raise ValueError(msg)
            if (cfg.d_in, cfg.d_out) != (self.d_model, self.d_model):
                msg = f"layer {layer}: d_in={cfg.d_in}, d_out={cfg.d_out}, but d_model is {self.d_model}"
                raise ValueError(msg)
            if cfg.model_name and self.model_name and cfg.model_name != self.model_name:
                msg = f"layer {layer} was trained on {cfg.model_name!r}, not {self.model_name!r}"
                raise ValueError(msg)
            self.transcoders[str(layer)] = tc

    def extra_repr(self) -> str:
        return (
            f"model_name={self.model_name!r}, architecture={self.architecture!r}, "
            f"n_layers_model={self.n_layers_model}, d_model={self.d_model}, layers={self.layers}"
        )

    @property
    def layers(self) -> list[int]:
        """The covered layers, ascending."""
        return [int(key) for key in self.transcoders]

    def __getitem__(self, layer: int) -> Transcoder:
        key = str(int(layer))
        if key not in self.transcoders:
            msg = f"no transcoder for layer {layer}; the set covers layers {self.layers}"
            raise KeyError(msg)
        return cast("Transcoder", self.transcoders[key])  # nn.ModuleDict is not generic; it holds only Transcoders

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.transcoders)

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and str(layer) in self.transcoders

    def items(self) -> Iterator[tuple[int, Transcoder]]:
        """``(layer, transcoder)`` pairs, ascending by layer."""
        return ((int(key), cast("Transcoder", tc)) for key, tc in self.transcoders.items())

    def select(self, layers: Iterable[int]) -> TranscoderSet:
        """The set of the transcoders of ``layers`` only (the same modules, not copies); error for a missing one."""
        wanted = sorted({int(layer) for layer in layers})
        missing = [layer for layer in wanted if layer not in self]
        if missing:
            msg = f"no transcoder for layer(s) {missing}; this set covers {self.layers}"
            raise ValueError(msg)
        return TranscoderSet(
            {layer: self[layer] for layer in wanted},
            n_layers_model=self.n_layers_model,
            model_name=self.model_name,
            architecture=self.architecture,
            d_model=self.d_model,
        )

    def check_model(self, model: C2SModel) -> None:
        """Check this set against the model a tool runs it with.

        A different depth or width raises a ValueError; another model name warns (see :meth:`check_compatible`).
        """
        self.check_compatible(model.name, model.adapter.n_layers, model.adapter.d_model, name_mismatch="warn")

    def check_compatible(
        self,
        model_name: str | None = None,
        n_layers: int | None = None,
        d_model: int | None = None,
        *,
        name_mismatch: Literal["raise", "warn"] = "raise",
    ) -> None:
        """Raise a ValueError naming every difference between this set's model and the given one.

        Parameters
        ----------
        model_name
            The model's name; not compared when ``None``, nor when the set records no model name.
        n_layers
            The model's number of layers; not compared when ``None``.
        d_model
            The model's residual width; not compared when ``None``.
        name_mismatch
            What another model name does: ``"raise"`` counts it as a difference; ``"warn"`` gives a UserWarning
            naming both models (a model of the same shape may be the one the set was trained on, loaded from
            another path). The tools check a set against the model they run with ``"warn"``.
        """
        trained, given = [], []
        other_name = bool(self.model_name) and model_name is not None and model_name != self.model_name
        if other_name and name_mismatch == "warn":
            # attributed to this line, so the default filter shows it once per pair of names, not once per call
            warnings.warn(
                f"transcoders were trained on {self.model_name!r}, but this model is {model_name!r}: check that "
                "the set was made for it (a model of the same shape may read it as noise)",
                UserWarning,
                stacklevel=1,
            )
        elif other_name:
            trained.append(f"name {self.model_name!r}")
            given.append(f"name {model_name!r}")
        if n_layers is not None and int(n_layers) != self.n_layers_model:
            trained.append(f"{self.n_layers_model} layers")
            given.append(f"{n_layers} layers")
        if d_model is not None and int(d_model) != self.d_model:
            trained.append(f"d_model {self.d_model}")
            given.append(f"d_model {d_model}")
        if trained:
            msg = (
                f"transcoders were trained for a model with {' and '.join(trained)}; "
                f"this model has {' and '.join(given)}"
            )
            raise ValueError(msg)

    def save(self, directory: str | Path) -> None:
        """Write the set to ``directory`` (see :func:`cellcircuits.transcoders.load_transcoders` for the layout).

        Scales are folded into a copy of each transcoder first, so the files hold weights in model units; the
        live modules are left as they are.
        """
        meta = {
            "model_name": self.model_name,
            "architecture": self.architecture,
            "n_layers_model": self.n_layers_model,
            "d_model": self.d_model,
            "layers": self.layers,
        }
        write_set(directory, meta, self.items())
