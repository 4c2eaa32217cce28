"""Circuit markers as a tidy DataFrame, like ``sc.get.rank_genes_groups_df``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._keys import GENE_RANKING, gene_ranking
from ._circuit import _table

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

SortBy = Literal["influence", "position_adjusted", "attribution", "knockout"]
_SORT_BY = ("influence", "position_adjusted", "attribution", "knockout")


def ranked_groups(ranking: dict) -> list[str]:
    """The ranked groups, in the order the ranking stored them."""
    groups = ranking.get("params", {}).get("groups")
    if groups is None or len(np.atleast_1d(groups)) == 0:
        groups = pd.unique(_table(ranking["table"])["group"].astype(str))
    return [str(g) for g in np.atleast_1d(groups)]


def rank_circuit_genes_df(
    adata: AnnData,
    key: str,
    group: str | Sequence[str] | None = None,
    *,
    sort_by: SortBy = "influence",
    key_added: str = GENE_RANKING,
) -> pd.DataFrame:
    """The circuit markers of :func:`cellcircuits.tl.rank_circuit_genes` as a table: one group, some, or all.

    Parameters
    ----------
    adata
        Annotated data matrix with a circuit ranked by :func:`cellcircuits.tl.rank_circuit_genes`.
    key
        The circuit's key in ``.uns["circuits"]``.
    group
        A group, a list of groups, or ``None`` for all ranked groups.
    sort_by
        Column the genes are sorted by within each group, highest first: ``"influence"`` (the stored ranking),
        ``"position_adjusted"``, ``"attribution"`` or ``"knockout"`` (missing values last).
    key_added
        The ``key_added`` of the ranking.

    Returns
    -------
    The groups' rows of the ranking (columns as in :func:`cellcircuits.tl.rank_circuit_genes`, ``rank`` numbered by
    ``influence``), groups in the ranking's order, genes by ``sort_by`` within each, with a fresh index.

    Raises
    ------
    KeyError
        When the circuit or its ranking is absent, or a group was not ranked.
    ValueError
        For an unknown ``sort_by``.
    """
    if sort_by not in _SORT_BY:
        msg = f"sort_by must be one of {list(_SORT_BY)}, got {sort_by!r}"
        raise ValueError(msg)
    ranking = gene_ranking(adata, key, key_added)
    ranked = ranked_groups(ranking)
    wanted = ranked if group is None else [str(group)] if isinstance(group, str) else [str(g) for g in group]
    unknown = [g for g in wanted if g not in ranked]
    if unknown:
        msg = f"groups {unknown} were not ranked in circuit {key!r}; ranked groups are {ranked}"
        raise KeyError(msg)
    table = _table(ranking["table"])
    table["group"] = table["group"].astype(str)
    table = table[table["group"].isin(wanted)]
    order = pd.Categorical(table["group"], categories=wanted, ordered=True).codes
    score = table[sort_by].to_numpy(dtype=float)
    rows = np.lexsort((-np.nan_to_num(score, nan=-np.inf), order))
    return table.iloc[rows].reset_index(drop=True)
