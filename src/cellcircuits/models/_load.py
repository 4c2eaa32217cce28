"""Loading Cell2Sentence-style causal LMs (local directories, hub ids, shipped checkpoints)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from .._compat import warn_at_caller
from ..pp._prompts import PROMPT_CONFIG_NAME, Prompt, PromptConfig, build_prompt
from ._adapter import ModelAdapter
from ._files import give_umask_mode
from ._hooks import model_lock
from ._presets import PRESETS, get_preset, preset_for

if TYPE_CHECKING:
    import threading
    from collections.abc import Sequence

    from transformers import PreTrainedModel, PreTrainedTokenizerFast

#: Checkpoints shipped inside the package, loadable offline by name.
SHIPPED_MODELS = {"pbmc68k-tiny": "pbmc68k-tiny", "pbmc68k-genes": "pbmc68k-genes"}


class ModelLoadError(OSError):
    """A model could not be found or loaded."""


def shipped_model_path(name: str) -> Path:
    """Directory of a checkpoint shipped with the package."""
    if name not in SHIPPED_MODELS:
        msg = f"No shipped model {name!r}; shipped models are {sorted(SHIPPED_MODELS)}."
        raise KeyError(msg)
    return Path(str(resources.files("cellcircuits.models") / "_data" / SHIPPED_MODELS[name]))


@dataclass
class C2SModel:
    """A causal LM that reads cell sentences, with its tokenizer, architecture adapter and prompt settings.

    Create it with :func:`cellcircuits.models.load` or :func:`cellcircuits.models.train_c2s`.

    Calls on one model from several threads run one at a time: every tool that hooks the model, switches its
    attention implementation or runs it (:func:`cellcircuits.tl.transcode`, :func:`cellcircuits.tl.trace_circuit`,
    :func:`cellcircuits.tl.predict_cell_types`, :func:`cellcircuits.tl.generate_cell_types`,
    :func:`cellcircuits.models.record`, :func:`cellcircuits.transcoders.splice`, ...) holds the model's re-entrant
    lock (:meth:`exclusive`) while it does, so concurrent calls give the results of sequential ones. Hold the lock
    yourself around your own forward passes when other threads may hook the model meanwhile.
    """

    model: PreTrainedModel
    """The Hugging Face causal LM (in eval mode)."""
    tokenizer: PreTrainedTokenizerFast
    """Its fast tokenizer (needed for gene <-> token offsets)."""
    adapter: ModelAdapter
    """Where each layer's MLP, attention, norms, embedding and unembedding are."""
    prompt: PromptConfig
    """The prompt settings the model was trained with; every prompt built for it uses them."""
    name: str
    """Hub id, path or shipped name it was loaded from."""

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    @property
    def labels(self) -> list[str] | None:
        """Cell-type labels the model knows (from its prompt settings)."""
        return self.prompt.labels

    def exclusive(self) -> threading.RLock:
        """The model's re-entrant lock, held by every tool that hooks, switches or runs it.

        Returns
        -------
        The lock, to use as ``with model.exclusive(): ...``; other threads' calls on the model wait until the block
        exits, and the holding thread may take it again (tools called inside the block do).
        """
        return model_lock(self.model)

    def build_prompts(self, sentences: Sequence[str], organism: str | None = None) -> list[Prompt]:
        """Prompts for cell sentences, cut to the model's ``n_genes``, with its template.

        Parameters
        ----------
        sentences
            Cell sentences (gene symbols, most expressed first).
        organism
            Organism named in the prompts (``None``: the model's, ``prompt.organism``).
        """
        return [build_prompt(s, self.prompt, organism) for s in sentences]

    def save(self, directory: str | Path) -> None:
        """Save weights (safetensors), tokenizer and prompt settings so :func:`load` reads them back.

        Every file gets the mode of a new file under the umask (0644 under umask 022).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        give_umask_mode(*directory.glob("*.safetensors"))  # safetensors writes them 0600
        self.tokenizer.save_pretrained(directory)
        self.prompt.to_json(directory / PROMPT_CONFIG_NAME)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (
            f"C2SModel({self.name!r}, {self.adapter.spec.name}, {n / 1e6:.2f}M parameters, "
            f"{len(self.labels or [])} labels, n_genes={self.prompt.n_genes}, device={self.device})"
        )


def _offline_help(name: str, err: Exception) -> ModelLoadError:
    msg = (
        f"Could not load model {name!r}: it is neither a shipped model ({sorted(SHIPPED_MODELS)}) nor a local "
        f"directory, and the Hugging Face Hub did not provide it ({type(err).__name__}: {err}). Without network "
        f"access, download it where the Hub is reachable (`hf download {name} --local-dir DIR`), copy DIR here "
        "and pass its path, or point HF_HOME to a cache that holds it."
    )
    return ModelLoadError(msg)


def check_hub_id(name: str, revision: str | None) -> None:
    """Fail at once, with what to do, for a name that is no local directory and no model the Hub can give.

    ``transformers`` retries an unreachable Hub for about 25 s per file (the tokenizer's and the model's), so a
    mistyped path or id cost close to a minute before its error. Here a name that is not a valid Hub id
    (``"name"`` or ``"namespace/name"``) is refused without the network; a valid one passes when the Hub cache
    holds its ``config.json``, else after one request for it, without retries.

    Parameters
    ----------
    name
        The model name, not a shipped model and not an existing path.
    revision
        Hub revision.

    Raises
    ------
    ModelLoadError
        When the name is no Hub id, the Hub has no such repository, revision or ``config.json``, or the Hub cannot
        be reached (offline) and its cache lacks the model.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        validate_repo_id,
    )

    try:
        validate_repo_id(name)
    except HFValidationError:
        msg = (
            f"Could not load model {name!r}: there is no such directory ({Path(name).expanduser().absolute()}), and "
            f'it is not a Hugging Face Hub id ("name" or "namespace/name"). Pass the directory that holds '
            f"config.json and the weights, a Hub id, or a shipped model ({sorted(SHIPPED_MODELS)})."
        )
        raise ModelLoadError(msg) from None
    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return  # transformers reads it from the cache, also offline
    where = f"there is no directory {name!r} here, and"
    try:
        # get_hf_file_metadata makes one request; the download functions retry network errors for ~25 s
        get_hf_file_metadata(hf_hub_url(name, "config.json", revision=revision))
    except RepositoryNotFoundError as err:  # also private and gated repositories
        msg = (
            f"Could not load model {name!r}: {where} the Hugging Face Hub has no repository {name!r} you can read "
            "(check the spelling; for a private or gated model log in with `hf auth login`)."
        )
        raise ModelLoadError(msg) from err
    except RevisionNotFoundError as err:
        msg = f"Could not load model {name!r}: the Hub repository has no revision {revision!r}."
        raise ModelLoadError(msg) from err
    except EntryNotFoundError as err:
        msg = f"Could not load model {name!r}: {where} the Hub repository {name!r} has no config.json."
        raise ModelLoadError(msg) from err
    except Exception as err:  # offline, unreachable, timed out: the cache does not hold it either
        raise _offline_help(name, err) from err


def _prompt_config_from_hub(name: str, revision: str | None, local_files_only: bool) -> PromptConfig | None:
    """``cellcircuits.json`` of a Hub model; ``None`` when the repository (or the offline cache) has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(name, PROMPT_CONFIG_NAME, revision=revision, local_files_only=local_files_only)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    return PromptConfig.from_json(path)


def _no_settings_warning(name: str, prompt: PromptConfig) -> None:
    msg = (
        f"Model {name!r} has no {PROMPT_CONFIG_NAME} and is no checkpoint with a preset "
        f"({sorted(PRESETS)}); using the Cell2Sentence defaults: {prompt.describe()}. If the model was trained "
        "otherwise, its predictions and circuits are those of a prompt it never saw: pass preset= (a preset name or "
        "a cellcircuits.pp.PromptConfig), and check the answer format once with "
        "cellcircuits.models.compare_answer_formats."
    )
    warn_at_caller(msg)


def _prompt_settings(
    name: str, local: Path | None, preset: PromptConfig | None, revision: str | None, offline: bool
) -> PromptConfig:
    """The model's prompt settings.

    ``preset=`` when given, else its ``cellcircuits.json``, else its hub id's preset, else the C2S defaults with a
    warning.
    """
    if preset is not None:
        return preset
    stored = PromptConfig.from_dir(local) if local is not None else _prompt_config_from_hub(name, revision, offline)
    if stored is not None:
        return stored
    known = preset_for(name) if local is None else None
    if known is not None:
        return known.config()
    prompt = PromptConfig()
    _no_settings_warning(name, prompt)
    return prompt


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a CUDA device that runs it, else float32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    """The dtype to run a model in on ``device``, after a tiny matmul in it there (before any weights load).

    Parameters
    ----------
    dtype
        A floating torch dtype or its name (``"bfloat16"``); ``None``: :func:`default_dtype` of the device.
    device
        Where the model will run.

    Returns
    -------
    The torch dtype.

    Raises
    ------
    ValueError
        For a name that is no torch dtype, a dtype that is not floating, or one whose matmul fails on ``device``
        (e.g. bfloat16 where the device has no bfloat16 matmul).
    """
    device = torch.device(device)
    if dtype is None:
        return default_dtype(device)
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        msg = f"dtype must be a floating torch dtype such as torch.bfloat16 or 'float32', got {dtype!r}"
        raise ValueError(msg)
    try:
        probe = torch.ones((4, 4), dtype=resolved, device=device)
        torch.matmul(probe, probe).sum().item()
        unsupported = device.type == "cuda" and resolved == torch.bfloat16 and not torch.cuda.is_bf16_supported()
    except (RuntimeError, TypeError, NotImplementedError) as err:
        unsupported, reason = True, f" ({type(err).__name__}: {err})"
    else:
        reason = ""
    if unsupported:
        msg = (
            f"dtype={str(resolved).removeprefix('torch.')} cannot run on {device}{reason}; pass dtype=torch.float32 "
            f"(or dtype=None for the device's default, {str(default_dtype(device)).removeprefix('torch.')})."
        )
        raise ValueError(msg)
    return resolved


def load(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool | None = None,
    revision: str | None = None,
    attn_implementation: str | None = None,
    preset: str | PromptConfig | None = None,
) -> C2SModel:
    """Load a Cell2Sentence-style causal LM with its tokenizer and prompt settings.

    Parameters
    ----------
    name_or_path
        A shipped model (``"pbmc68k-tiny"``), a local directory written by ``save_pretrained``, or a Hugging
        Face Hub id such as ``"vandijklab/C2S-Pythia-410m-cell-type-prediction"``.
    device
        Where to put the model; default CUDA when available, else CPU.
    dtype
        Parameter dtype (``torch.bfloat16``, ``"float32"``, ...). Default ``None``: bfloat16 on a CUDA device that
        supports it (half the memory and several times the speed of float32), else float32. Scores and
        log-probabilities are always computed in float32. A dtype the device cannot run (checked with a tiny
        matmul before the weights load) is refused.
    trust_remote_code
        Allow the checkpoint's own Python code to run. Off unless you ask for it.
    local_files_only
        Do not contact the Hub (default: true for shipped models and local directories).
    revision
        Hub revision (branch, tag or commit).
    attn_implementation
        ``"eager"``, ``"sdpa"``, ...; passed to ``transformers``.
    preset
        Prompt settings to use: a preset name or hub id from :data:`cellcircuits.models.PRESETS`, or a
        :class:`~cellcircuits.pp.PromptConfig`. Default: the model's ``cellcircuits.json``; else, for a public C2S
        checkpoint loaded by its hub id, its preset; else the C2S defaults, with a warning naming them.

    Returns
    -------
    The model, tokenizer, architecture adapter and prompt settings.

    Raises
    ------
    ModelLoadError
        When the model is not shipped, not a directory, and not obtainable from the Hub (e.g. offline). A name that
        is no directory and no Hub id, a repository the Hub does not have, and an unreachable Hub when the cache
        lacks the model fail at once (one request, no retries).
    ValueError
        For an unsupported architecture, a tokenizer without a fast (Rust) implementation, or a ``dtype`` the
        device cannot run (before loading).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = os.fspath(name_or_path)
    local: Path | None = None
    if name in SHIPPED_MODELS:
        local = shipped_model_path(name)
    elif Path(name).expanduser().exists():
        local = Path(name).expanduser()
        if not local.is_dir():
            msg = f"{name!r} is a file; pass the directory that holds config.json and the weights."
            raise ModelLoadError(msg)
        if not (local / "config.json").is_file():
            msg = f"{name!r} has no config.json; is it a Hugging Face model directory?"
            raise ModelLoadError(msg)
    source = str(local) if local is not None else name
    offline = bool(local_files_only) if local_files_only is not None else local is not None
    if local is None and not offline:
        check_hub_id(name, revision)
    if isinstance(preset, str):
        preset = get_preset(preset)  # an unknown preset fails before the model loads
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    run_dtype = check_dtype(dtype, device)  # a dtype the device cannot run fails before the model loads
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": offline, "revision": revision}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model_kwargs = dict(kwargs)
        model_kwargs["dtype"] = run_dtype
        if attn_implementation is not None:
            model_kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except OSError as err:
        if local is not None:
            msg = f"Could not load the model in {source!r}: {err}"
            raise ModelLoadError(msg) from err
        raise _offline_help(name, err) from err
    if not getattr(tokenizer, "is_fast", False):
        msg = f"{name!r} has no fast tokenizer; cellcircuits needs token offsets to map tokens to genes."
        raise ValueError(msg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, any id works
    adapter = ModelAdapter(model)
    prompt = _prompt_settings(name, local, preset, revision, offline)
    module: torch.nn.Module = model  # PreTrainedModel.to is typed through @wraps, which hides its binding
    module.to(device).eval()
    # a fast tokenizer, as checked above (is_fast)
    fast_tokenizer = cast("PreTrainedTokenizerFast", tokenizer)
    return C2SModel(model=model, tokenizer=fast_tokenizer, adapter=adapter, prompt=prompt, name=name)
