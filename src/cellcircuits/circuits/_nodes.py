"""The sources of one prompt's replacement model, indexed: token embeddings, active transcoder features and errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from ._kinds import NodeKind

if TYPE_CHECKING:
    from collections.abc import Mapping

    import pandas as pd

    from ..transcoders._transcoder import Transcoder


@dataclass(frozen=True, eq=False)
class Nodes:
    """The sources of one prompt's replacement model, indexed once: tokens, then features, then errors.

    Features are ordered by layer, then position, then feature id; there is one error node per (layer, position)
    for every layer, covered or not.
    """

    kind: np.ndarray
    """``(n_nodes,)`` ``"token"``, ``"feature"`` or ``"error"`` (:attr:`~cellcircuits.circuits.NodeKind.tag`)."""
    layer: np.ndarray
    """Layer whose MLP writes the node; -1 for tokens."""
    position: np.ndarray
    """Token position."""
    feature: np.ndarray
    """Feature id; -1 for tokens and errors."""
    activation: np.ndarray
    """Feature activation; NaN for tokens and errors."""
    token_slice: slice
    """Where the token nodes are (the first ``n_positions``)."""
    feature_slices: dict[int, slice]
    """Per covered layer, where its feature nodes are."""
    error_slices: dict[int, slice]
    """Per layer, where its ``n_positions`` error nodes are."""
    _lookup: dict[tuple, int] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.kind)

    def index(self, kind: str, layer: int = -1, position: int = 0, feature: int = -1) -> int:
        """Index of a node, e.g. ``nodes.index("feature", 2, 15, 301)``; a KeyError when there is none."""
        if not self._lookup:
            keys = zip(
                self.kind.tolist(), self.layer.tolist(), self.position.tolist(), self.feature.tolist(), strict=True
            )
            self._lookup.update({key: i for i, key in enumerate(keys)})
        key = (kind, int(layer), int(position), int(feature))
        if key not in self._lookup:
            msg = f"no {kind} node at layer {layer}, position {position}, feature {feature} (inactive?)"
            raise KeyError(msg)
        return self._lookup[key]

    def to_frame(self) -> pd.DataFrame:
        """The node table as a ``pandas.DataFrame``."""
        import pandas as pd

        cols = ("kind", "layer", "position", "feature", "activation")
        return pd.DataFrame({c: getattr(self, c) for c in cols})


class ActiveFeatures(NamedTuple):
    """The active features of one layer, sorted by position then feature id."""

    position: torch.Tensor
    feature: torch.Tensor
    activation: torch.Tensor
    pre_activation: torch.Tensor
    offsets: torch.Tensor
    """``(n_positions,)`` index of each position's first entry (bags for ``embedding_bag``)."""


@torch.no_grad()
def active_features(tc: Transcoder, x: torch.Tensor) -> tuple[ActiveFeatures, torch.Tensor]:
    """The active features of ``x`` (``(T, d)`` MLP inputs) and the transcoder's ``(T, d)`` prediction."""
    out = tc(x.to(device=tc.W_enc.device, dtype=tc.W_enc.dtype))
    position, feature = (out.features != 0).nonzero(as_tuple=True)  # row-major: by position, then feature
    dev = x.device
    act = out.features[position, feature].float().to(dev)
    pre = out.pre_acts[position, feature].float().to(dev)
    position, feature = position.to(dev), feature.to(dev)
    offsets = torch.searchsorted(position, torch.arange(x.shape[0], device=dev))
    return ActiveFeatures(position, feature, act, pre, offsets), out.output.float().to(dev)


def build_nodes(features: Mapping[int, ActiveFeatures], n_positions: int, n_layers: int) -> Nodes:
    """The node table of one prompt: its tokens, each covered layer's active features, one error per layer and position.

    Parameters
    ----------
    features
        Per covered layer, its active features.
    n_positions
        Length of the prompt.
    n_layers
        Number of layers of the model.

    Returns
    -------
    The indexed nodes.
    """
    T = n_positions
    token, feature, error = NodeKind.TOKEN.tag, NodeKind.FEATURE.tag, NodeKind.ERROR.tag
    blocks: list[tuple] = [(token, -1, np.arange(T), np.full(T, -1), np.full(T, np.nan))]
    for m, f in features.items():
        blocks.append((feature, m, f.position.cpu().numpy(), f.feature.cpu().numpy(), f.activation.cpu().numpy()))
    blocks += [(error, m, np.arange(T), np.full(T, -1), np.full(T, np.nan)) for m in range(n_layers)]
    sizes = np.array([len(b[2]) for b in blocks])
    starts = np.concatenate([[0], sizes.cumsum()])
    where = {(b[0], b[1]): slice(int(starts[i]), int(starts[i + 1])) for i, b in enumerate(blocks)}
    return Nodes(
        kind=np.concatenate([np.full(n, b[0], dtype=object) for b, n in zip(blocks, sizes, strict=True)]),
        layer=np.concatenate([np.full(n, b[1]) for b, n in zip(blocks, sizes, strict=True)]).astype(np.int64),
        position=np.concatenate([b[2] for b in blocks]).astype(np.int64),
        feature=np.concatenate([b[3] for b in blocks]).astype(np.int64),
        activation=np.concatenate([b[4] for b in blocks]).astype(np.float32),
        token_slice=where[token, -1],
        feature_slices={m: where[feature, m] for m in features},
        error_slices={m: where[error, m] for m in range(n_layers)},
    )
