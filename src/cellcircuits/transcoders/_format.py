"""The on-disk layout of a transcoder set: JSON + safetensors folders (never pickle), written and read back checked.

Layout::

    directory/
      transcoder_set.json           format tag, model name, architecture, n_layers_model, d_model, layers
      layer_{L}/cfg.json            TranscoderConfig.to_dict()
      layer_{L}/transcoder.safetensors
          W_enc (d_in, n_features), W_dec (n_features, d_out), b_enc (n_features), b_dec (d_out),
          W_skip (d_in, d_out) with skip, threshold (n_features) with jumprelu

Weights are stored with the input/output scales folded in (model units), and ``threshold`` is the JumpReLU
threshold itself rather than its log, so other tools can read the files without knowing cellcircuits' conventions.
Training state (``tokens_since_fired``) is not stored.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..models._files import give_umask_mode
from ._config import TranscoderConfig

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from ._transcoder import Transcoder

#: Tag of ``transcoder_set.json``.
SET_FORMAT = "cellcircuits.transcoder_set/1"
SET_FILE = "transcoder_set.json"
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "transcoder.safetensors"
_SET_KEYS = {"format", "model_name", "architecture", "n_layers_model", "d_model", "layers"}


def layer_dir(directory: Path, layer: int) -> Path:
    """The folder of one layer's transcoder."""
    return directory / f"layer_{layer}"


def _expected_shapes(cfg: TranscoderConfig) -> dict[str, tuple[int, ...]]:
    shapes = {
        "W_enc": (cfg.d_in, cfg.n_features),
        "W_dec": (cfg.n_features, cfg.d_out),
        "b_enc": (cfg.n_features,),
        "b_dec": (cfg.d_out,),
    }
    if cfg.skip:
        shapes["W_skip"] = (cfg.d_in, cfg.d_out)
    if cfg.activation == "jumprelu":
        shapes["threshold"] = (cfg.n_features,)
    return shapes


def _tensors_to_save(tc: Transcoder) -> dict[str, torch.Tensor]:
    folded = copy.deepcopy(tc)  # the caller's module keeps its scales
    folded.fold_scales()
    tensors: dict[str, torch.Tensor] = {
        "W_enc": folded.W_enc,
        "W_dec": folded.W_dec,
        "b_enc": folded.b_enc,
        "b_dec": folded.b_dec,
    }
    if folded.W_skip is not None:
        tensors["W_skip"] = folded.W_skip
    if folded.threshold is not None:
        tensors["threshold"] = folded.threshold
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def write_set(directory: str | Path, meta: Mapping[str, Any], transcoders: Iterable[tuple[int, Transcoder]]) -> None:
    """Write a transcoder set to ``directory``, one ``layer_{L}`` folder per layer.

    Parameters
    ----------
    directory
        Destination folder, created when missing; files already there are overwritten.
    meta
        What ``transcoder_set.json`` holds besides its format tag: ``model_name``, ``architecture``,
        ``n_layers_model``, ``d_model`` and ``layers``.
    transcoders
        ``(layer, transcoder)`` pairs; the modules are not changed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": SET_FORMAT, **meta}
    for layer, tc in transcoders:
        folder = layer_dir(directory, layer)
        folder.mkdir(exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(tc.cfg.to_dict(), indent=2))
        save_file(_tensors_to_save(tc), str(folder / WEIGHTS_FILE), metadata={"format": TranscoderConfig.format})
        give_umask_mode(folder / WEIGHTS_FILE)  # safetensors writes 0600
    # written last, so a folder whose save was interrupted has no set file and is not mistaken for a complete one
    (directory / SET_FILE).write_text(json.dumps(meta, indent=2))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        msg = f"{path} not found; is this a folder written by TranscoderSet.save?"
        raise FileNotFoundError(msg)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = f"{path} is not valid JSON: {err}"
        raise ValueError(msg) from err
    if not isinstance(data, dict):
        msg = f"{path} should hold a JSON object, found {type(data).__name__}"
        raise ValueError(msg)
    return data


def read_set_meta(path: Path) -> dict[str, Any]:
    """``transcoder_set.json``, checked: its format tag, its keys and its list of layers."""
    meta = _read_json(path)
    if meta.get("format") != SET_FORMAT:
        msg = f"{path}: unsupported format tag {meta.get('format')!r}; this version reads {SET_FORMAT!r}"
        raise ValueError(msg)
    unknown, missing = set(meta) - _SET_KEYS, _SET_KEYS - set(meta)
    if unknown or missing:
        msg = f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}"
        raise ValueError(msg)
    layers = meta["layers"]
    if not isinstance(layers, list) or not layers or not all(isinstance(i, int) for i in layers):
        msg = f"{path}: 'layers' should be a non-empty list of layer indices, found {layers!r}"
        raise ValueError(msg)
    return meta


def read_config(path: Path) -> TranscoderConfig:
    """A layer's ``cfg.json``, checked, as a :class:`TranscoderConfig`."""
    data = _read_json(path)
    if "format" not in data:
        msg = f"{path} has no format tag; expected {TranscoderConfig.format!r}"
        raise ValueError(msg)
    try:
        return TranscoderConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        msg = f"{path}: {err}"
        raise ValueError(msg) from err


def read_tensors(path: Path, cfg: TranscoderConfig) -> dict[str, torch.Tensor]:
    """A layer's weights, checked against its config: names, shapes, finite floats and positive thresholds."""
    if not path.is_file():
        msg = f"{path} not found"
        raise FileNotFoundError(msg)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        msg = f"{path} is not a readable safetensors file (truncated or corrupt?): {err}"
        raise ValueError(msg) from err
    expected = _expected_shapes(cfg)
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        msg = (
            f"{path} does not match its cfg.json (activation={cfg.activation!r}, skip={cfg.skip}): "
            f"missing tensors {sorted(missing)}, unexpected tensors {sorted(unexpected)}"
        )
        raise ValueError(msg)
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            msg = f"{path}: tensor {name} has shape {tuple(t.shape)}, cfg.json implies {shape}"
            raise ValueError(msg)
        if not t.is_floating_point() or not torch.isfinite(t).all():
            msg = f"{path}: tensor {name} is not a finite floating-point tensor"
            raise ValueError(msg)
    if "threshold" in tensors and not (tensors["threshold"] > 0).all():
        msg = f"{path}: JumpReLU thresholds must be positive"
        raise ValueError(msg)
    return tensors
