"""Transcoders: sparse, wide stand-ins for MLP blocks, their sets per model, and their files on disk."""

from ._activations import collect_activations
from ._config import TranscoderConfig
from ._evaluate import evaluate
from ._io import load_transcoders, save_transcoders
from ._splice import splice
from ._store import ActivationStore, StoreManifest, StoreWriter
from ._stream import ActivationStream, train_on_stream
from ._training import train_on_store
from ._transcoder import LossOutput, Transcoder, TranscoderOutput
from ._transcoder_set import TranscoderSet

__all__ = [
    "ActivationStore",
    "ActivationStream",
    "LossOutput",
    "StoreManifest",
    "StoreWriter",
    "Transcoder",
    "TranscoderConfig",
    "TranscoderOutput",
    "TranscoderSet",
    "collect_activations",
    "evaluate",
    "load_transcoders",
    "save_transcoders",
    "splice",
    "train_on_store",
    "train_on_stream",
]
