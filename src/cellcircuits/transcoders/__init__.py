"""Transcoders: sparse, wide stand-ins for MLP blocks, their sets per model, and their files on disk."""

from ._config import TranscoderConfig
from ._io import load_transcoders, save_transcoders
from ._transcoder import LossOutput, Transcoder, TranscoderOutput, TranscoderSet

__all__ = [
    "LossOutput",
    "Transcoder",
    "TranscoderConfig",
    "TranscoderOutput",
    "TranscoderSet",
    "load_transcoders",
    "save_transcoders",
]
