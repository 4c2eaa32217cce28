"""Validation of traced circuits by intervention: ablate, keep only, or clamp the circuit's features."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .._keys import SentenceSettings, circuit_result
from ..circuits._trace import as_target_mode
from ..circuits._validate import check_validation, validate_prompts
from ..models._hooks import one_at_a_time
from ._cells import cell_prompts, check_unique_obs_names

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models._load import C2SModel
    from ..transcoders._transcoder_set import TranscoderSet


@one_at_a_time
def validate_circuit(
    adata: AnnData,
    model: C2SModel,
    transcoders: TranscoderSet,
    key: str,
    *,
    min_frequency: float = 0.0,
    n_random: int = 5,
    clamp_factor: float = 2.0,
    random_state: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Check a traced circuit by intervening on its features in the replacement model.

    On each traced cell, every covered MLP is replaced by its transcoder plus its error on that cell, so the
    model's output is unchanged until a feature is edited; an edit then propagates through attention, norms and all
    later features. Per group, the circuit's features (feature nodes of its graph, named by layer, feature and the
    gene or prompt role where they fire) are:

    - zero-ablated, and separately mean-ablated (set to the feature's mean activation over all positions of the
      traced cells), measuring the drop of the target (the label's logit difference) and of the label's probability
      among the competing tokens; the same number of random active non-circuit features, ``n_random`` draws, gives
      the baseline. A circuit holds the features of most *absolute* influence, those that push against the label
      too, so the features that support it (positive mean attribution) are also ablated on their own;
    - kept alone (every other feature zeroed): faithfulness is ``(m(circuit) - m(none)) / (m(all) - m(none))``
      over the cells, with ``m`` the target and ``none`` every feature zeroed;
    - the most influential circuit feature is clamped to ``clamp_factor`` times its activation, and the shift of
      the target compared with the one the graph predicts (``(clamp_factor - 1)`` times its mean attribution).

    The graph-level replacement and completeness scores of the traced graphs are reported beside them.

    Parameters
    ----------
    adata
        Annotated data matrix with a circuit from :func:`cellcircuits.tl.trace_circuit`.
    model
        The model the circuit was traced on.
    transcoders
        The transcoders the circuit was traced with.
    key
        The circuit's key in ``.uns["circuits"]``.
    min_frequency
        Circuit features are the group's feature nodes present in at least this fraction of its traced cells.
    n_random
        Draws of random features for the baseline.
    clamp_factor
        Factor the clamped feature's activation is multiplied by.
    random_state
        Seed of the random draws.
    progress
        Show a progress bar.

    Returns
    -------
    One row per group: ``n_cells``, ``n_circuit_features`` (mean active circuit feature instances per cell),
    ``target_value``, ``probability``, ``zero_drop``, ``zero_prob_drop``, ``random_zero_drop`` (and ``_sd`` over
    draws), ``n_support_features``, ``support_drop`` (zero-ablating the supporting features),
    ``random_support_drop`` (as many random features), ``mean_drop``, ``mean_prob_drop``, ``random_mean_drop``
    (and ``_sd``), ``faithfulness``, ``clamp_feature``, ``clamp_shift``, ``clamp_shift_predicted``,
    ``replacement_score``, ``completeness_score`` and their ``*_pruned`` forms. Drops are means over cells of
    (clean - edited). Also stored as
    ``.uns["circuits"][key]["validation"]``.

    Raises
    ------
    KeyError
        When there is no circuit under ``key`` or a traced cell is no longer in ``adata``.
    ValueError
        For ``n_random < 1`` or a ``min_frequency`` outside ``[0, 1]``.
    """
    result = circuit_result(adata, key)
    check_validation(n_random, min_frequency)
    params = result["params"]
    transcoders.check_model(model)
    cells = pd.DataFrame(result["cells"])
    missing = [c for c in cells["obs_name"] if c not in adata.obs_names]
    if missing:
        msg = f"traced cells {missing[:5]} are not in adata"
        raise KeyError(msg)
    settings = SentenceSettings.from_params(params.get("sentences", {}), random_state=params.get("random_state", 0))
    check_unique_obs_names(adata, "validate_circuit")
    prompts = cell_prompts(adata, model, settings, adata.obs_names.get_indexer(cells["obs_name"]))
    validation = validate_prompts(
        model, transcoders, prompts, cells, pd.DataFrame(result["nodes"]),
        target_mode=as_target_mode(str(params.get("target_mode", "distinguishing"))), min_frequency=min_frequency,
        n_random=n_random, clamp_factor=clamp_factor, random_state=random_state, progress=progress,
    )  # fmt: skip
    result["validation"] = validation
    return validation
