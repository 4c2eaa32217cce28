"""What a circuit is traced to: a feature's pre-activation, a logit (difference), a cell-type label's logit.

Each target is a linear readout of one point of the residual stream (:class:`Readout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch


@dataclass(frozen=True)
class FeatureTarget:
    """The pre-activation of one transcoder feature at one position (read at its layer's MLP input)."""

    layer: int
    position: int
    feature: int


@dataclass(frozen=True)
class LogitTarget:
    """``logit[token] - mean(logit[competitors])`` at one position, before any final logit softcap.

    With no competitors it is the plain logit of ``token``.
    """

    position: int
    token: int
    competitors: tuple[int, ...] = ()


Target = FeatureTarget | LogitTarget


class Readout(NamedTuple):
    """``K`` targets as linear readouts: ``weight[k] · point[layer[k]][position[k]] + const[k]``.

    ``layer[k]`` is a layer index for a feature target (its MLP input) or ``n_layers`` for a logit target (the
    final norm's output).
    """

    layer: torch.Tensor
    position: torch.Tensor
    weight: torch.Tensor
    const: torch.Tensor
    by_layer: dict[int, torch.Tensor]
    """The readouts of each layer that has any (``layer`` values: indices on the device), found once on the host,
    so that no step waits for the device to tell which readouts a layer has."""
    last_position: int
    """``max(position)``, on the host."""


class LabelTarget(NamedTuple):
    """Where a label's logit target is read, given every label's answer tokens."""

    prefix: list[int]
    """Answer tokens teacher-forced after the prompt (the part the label shares with others)."""
    token: int
    """The label's token at the read position."""
    competitors: tuple[int, ...]
    """Tokens other labels sharing ``prefix`` have there; the target is ``logit[token] - mean(logit[competitors])``."""


def label_target(
    label_ids: Sequence[Sequence[int]], index: int, mode: Literal["distinguishing", "first_token"] = "distinguishing"
) -> LabelTarget:
    """The logit target of label ``index``.

    Labels often share their first tokens ("CD14+ Monocyte", "CD19+ B" and "CD4+/CD25 T Reg" may all start with
    " CD"), and then the first token says nothing about which one the model picks. With ``"distinguishing"`` the
    target is read at the first token where the label's tokenization parts from every other label's: the shared
    prefix is teacher-forced, and the target is the label's token's logit minus the mean logit of the tokens that
    the labels still sharing the prefix have there. A label whose first token is its own competes with every other
    label's first token. ``"first_token"`` gives the plain logit of the first token.

    Parameters
    ----------
    label_ids
        Every label's answer token ids (:func:`cellcircuits.models.label_token_ids`).
    index
        The label traced.
    mode
        ``"distinguishing"`` or ``"first_token"``.

    Returns
    -------
    The teacher-forced prefix, the token and its competitors.

    Raises
    ------
    ValueError
        When two labels tokenize identically, when the label's tokens are the start of another label's (answers
        without a terminator), or for an unknown mode.
    """
    ids = list(label_ids[index])
    if mode == "first_token":
        return LabelTarget([], ids[0], ())
    if mode != "distinguishing":
        msg = f"mode must be 'distinguishing' or 'first_token', got {mode!r}"
        raise ValueError(msg)
    others = [list(o) for k, o in enumerate(label_ids) if k != index]
    for j in range(len(ids)):
        sharing = [o for o in others if o[:j] == ids[:j] and len(o) > j]
        if all(o[j] != ids[j] for o in sharing):
            return LabelTarget(ids[:j], ids[j], tuple(sorted({o[j] for o in sharing})))
    if any(o == ids for o in others):
        msg = f"label {index} tokenizes exactly like another label; their logits cannot be told apart"
        raise ValueError(msg)
    msg = (
        f"label {index}'s answer tokens are the start of another label's, so no token of its answer tells it apart; "
        "a model trained with an answer suffix or an end-of-answer token (the C2S format, label + '.' + EOS) needs "
        "them in its prompt settings (answer_suffix, append_eos), which make that token the distinguishing one"
    )
    raise ValueError(msg)
