"""Saving and loading transcoder sets as JSON + safetensors folders (never pickle).

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

from ._config import TranscoderConfig
from ._transcoder import Transcoder, TranscoderSet

if TYPE_CHECKING:
    from collections.abc import Mapping

#: Tag of ``transcoder_set.json``.
SET_FORMAT = "cellcircuits.transcoder_set/1"
SET_FILE = "transcoder_set.json"
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "transcoder.safetensors"
_SET_KEYS = {"format", "model_name", "architecture", "n_layers_model", "d_model", "layers"}


def _layer_dir(directory: Path, layer: int) -> Path:
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
    tensors = {"W_enc": folded.W_enc, "W_dec": folded.W_dec, "b_enc": folded.b_enc, "b_dec": folded.b_dec}
    if folded.W_skip is not None:
        tensors["W_skip"] = folded.W_skip
    if folded.threshold is not None:
        tensors["threshold"] = folded.threshold
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def save_transcoders(transcoders: TranscoderSet, directory: str | Path) -> None:
    """Write a transcoder set to ``directory``, one ``layer_{L}`` folder per layer.

    Parameters
    ----------
    transcoders
        The set to save; its modules are not changed.
    directory
        Destination folder, created when missing; files already there are overwritten.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": SET_FORMAT,
        "model_name": transcoders.model_name,
        "architecture": transcoders.architecture,
        "n_layers_model": transcoders.n_layers_model,
        "d_model": transcoders.d_model,
        "layers": transcoders.layers,
    }
    for layer, tc in transcoders.items():
        folder = _layer_dir(directory, layer)
        folder.mkdir(exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(tc.cfg.to_dict(), indent=2))
        save_file(_tensors_to_save(tc), str(folder / WEIGHTS_FILE), metadata={"format": TranscoderConfig.format})
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


def _read_set_meta(path: Path) -> dict[str, Any]:
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


def _read_config(path: Path) -> TranscoderConfig:
    data = _read_json(path)
    if "format" not in data:
        msg = f"{path} has no format tag; expected {TranscoderConfig.format!r}"
        raise ValueError(msg)
    try:
        return TranscoderConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        msg = f"{path}: {err}"
        raise ValueError(msg) from err


def _read_tensors(path: Path, cfg: TranscoderConfig) -> dict[str, torch.Tensor]:
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


def _build(cfg: TranscoderConfig, tensors: Mapping[str, torch.Tensor]) -> Transcoder:
    tc = Transcoder(cfg)
    with torch.no_grad():
        for name, t in tensors.items():
            if name == "threshold":
                tc.log_threshold.copy_(t.log())
            else:
                getattr(tc, name).copy_(t)
    return tc


def load_transcoders(
    directory: str | Path,
    *,
    n_layers: int | None = None,
    d_model: int | None = None,
    device: torch.device | str | None = None,
) -> TranscoderSet:
    """Load a transcoder set written by :meth:`TranscoderSet.save`.

    Parameters
    ----------
    directory
        Folder holding ``transcoder_set.json`` and one ``layer_{L}`` folder per layer.
    n_layers
        Number of layers of the model the transcoders will be used with; a mismatch is an error.
    d_model
        Residual width of that model; a mismatch is an error.
    device
        Device to move the transcoders to.

    Returns
    -------
    The transcoder set, with scales of 1 (the files hold folded weights) and no dead-feature history.
    """
    directory = Path(directory)
    if not directory.is_dir():
        msg = f"{directory} is not a directory"
        raise FileNotFoundError(msg)
    meta = _read_set_meta(directory / SET_FILE)
    transcoders = {}
    for layer in meta["layers"]:
        folder = _layer_dir(directory, layer)
        cfg = _read_config(folder / CONFIG_FILE)
        transcoders[layer] = _build(cfg, _read_tensors(folder / WEIGHTS_FILE, cfg))
    try:
        tset = TranscoderSet(
            transcoders,
            n_layers_model=meta["n_layers_model"],
            model_name=meta["model_name"],
            architecture=meta["architecture"],
            d_model=meta["d_model"],
        )
    except ValueError as err:
        msg = f"{directory}: {err}"
        raise ValueError(msg) from err
    tset.check_compatible(n_layers=n_layers, d_model=d_model)
    return tset.to(device) if device is not None else tset
