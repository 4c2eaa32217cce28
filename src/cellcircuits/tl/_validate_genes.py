"""Gene-level validation of a traced circuit: knock its genes out of the traced cells and compare with baselines."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._keys import GENE_VALIDATION, SentenceSettings, circuit_genes, circuit_result
from ..circuits._knockout import knockout_genes
from ..circuits._targets import label_target
from ..circuits._trace import as_target_mode, label_index
from ..models._hooks import one_at_a_time
from ..models._tokens import label_token_ids
from ..pp._sentences import gene_names, sentence_matrix, var_where
from ._cells import cell_prompts, check_unique_obs_names

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models._load import C2SModel

#: Gene scores compared with the knockout effects: the circuit's and the baselines'.
SCORES = ("circuit", "expression", "de_score", "gradient_x_input")
BASELINES = SCORES[1:]
MODES = ("deletion", "masking")
#: Columns of the stored effects table.
EFFECT_COLUMNS = [
    "obs_name", "group", "gene", "rank", "in_circuit", "attribution", "influence", "deletion", "masking",
    "gradient_x_input", "expression", "de_score",
]  # fmt: skip
_SCORE_COLUMN = {"circuit": "attribution", "expression": "expression", "de_score": "de_score"}


# checks
def check_gene_validation(
    n_other_genes: int, min_frequency: float, batch_size: int, n_circuit_genes: int | None = None
) -> None:
    """Refuse negative gene counts, a ``min_frequency`` outside ``[0, 1]`` or a non-positive batch size."""
    for name, value in (("n_other_genes", n_other_genes), ("n_circuit_genes", n_circuit_genes)):
        if value is None and name == "n_circuit_genes":
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            msg = f"{name} must be a non-negative integer, got {value!r}"
            raise ValueError(msg)
    if not 0 <= min_frequency <= 1:
        msg = f"min_frequency must be in [0, 1], got {min_frequency}"
        raise ValueError(msg)
    if batch_size < 1:
        msg = f"batch_size must be positive, got {batch_size!r}"
        raise ValueError(msg)


def check_traced_model(params: dict, model: C2SModel, key: str) -> None:
    """Refuse a model other than the one the circuit was traced on (by name)."""
    traced = str(params.get("model", ""))
    if traced and traced != model.name:
        msg = f"the circuit {key!r} was traced on the model {traced!r}, not on {model.name!r}; pass that model"
        raise ValueError(msg)


def de_column(adata: AnnData, params: dict, groupby_de: str | None) -> str | None:
    """The ``.obs`` column the DE baseline compares groups of (``None``: no baseline); a clear error if absent."""
    column = groupby_de if groupby_de is not None else (str(params.get("groupby", "")) or None)
    if column is not None and column not in adata.obs.columns:
        msg = f"groupby_de {column!r} is not a column of .obs; columns are {list(adata.obs.columns)}"
        raise KeyError(msg)
    return column


# baselines
def de_scores(adata: AnnData, settings: SentenceSettings, column: str, groups: list[str]) -> dict[str, pd.Series]:
    """Per group of ``.obs[column]`` (of at least 2 cells, with other cells to compare with): Wilcoxon DE scores.

    ``sc.tl.rank_genes_groups`` (method ``"wilcoxon"``, each group against the rest) runs on a new AnnData holding
    only the matrix the sentences were built from (``settings``: ``.raw`` when present, else ``.X``, or the layer)
    and the group column, with the genes named as in the sentences; ``adata`` is not touched. Groups it cannot
    score are left out.
    """
    import anndata as ad
    import scanpy as sc

    X, var, where = sentence_matrix(adata, settings.layer, settings.use_raw)
    labels = adata.obs[column].astype("object").where(adata.obs[column].notna(), "nan").astype(str)
    counts = labels.value_counts()
    scorable = [g for g in dict.fromkeys(groups) if counts.get(g, 0) >= 2 and counts.get(g, 0) < len(labels)]
    if not scorable:
        return {}
    slim = ad.AnnData(X, obs=pd.DataFrame({"group": pd.Categorical(labels.to_numpy())}, index=adata.obs_names))
    slim.var_names = pd.Index(gene_names(var, settings.gene_symbols, where=var_where(where)))
    # Wilcoxon scores do not change under a monotone transform, so scanpy's "log your data" notice is not printed
    verbosity = sc.settings.verbosity
    sc.settings.verbosity = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.tl.rank_genes_groups(
                slim, "group", groups=scorable, method="wilcoxon", n_genes=slim.n_vars, use_raw=False
            )
    finally:
        sc.settings.verbosity = verbosity
    result = slim.uns["rank_genes_groups"]
    return {
        g: pd.Series(np.asarray(result["scores"][g], dtype=np.float64), index=np.asarray(result["names"][g], dtype=str))
        for g in scorable
    }


# summary
def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation over the pairs where both are finite; NaN for fewer than 3 pairs or a constant side."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(spearmanr(x[ok], y[ok]).statistic)


def unexplained(deletion: np.ndarray, masking: np.ndarray) -> float:
    """``1 - R^2`` of the least-squares line of the deletion effects on the masking effects (NaN if undefined)."""
    ok = np.isfinite(deletion) & np.isfinite(masking)
    d, m = deletion[ok], masking[ok]
    if ok.sum() < 3 or np.ptp(d) == 0:
        return float("nan")
    if np.ptp(m) == 0:
        return 1.0
    r = np.corrcoef(d, m)[0, 1]
    return float(1.0 - r**2)


def summarize(effects: pd.DataFrame) -> pd.DataFrame:
    """Per group, Spearman correlations of each gene score with the deletion and masking effects, and more."""
    rows = []
    for group, t in effects.groupby("group", sort=False):
        rho = {
            f"{mode}_{score}": spearman(t[_SCORE_COLUMN.get(score, score)].to_numpy(), t[mode].to_numpy())
            for mode in MODES
            for score in SCORES
        }
        baselines = {b: rho[f"deletion_{b}"] for b in BASELINES if np.isfinite(rho[f"deletion_{b}"])}
        circuit = rho["deletion_circuit"]
        rows.append(
            {
                "group": group,
                "n_cells": int(t["obs_name"].nunique()),
                "n_pairs": len(t),
                "n_circuit_pairs": int(t["in_circuit"].sum()),
                **rho,
                "masking_vs_deletion": spearman(t["masking"].to_numpy(), t["deletion"].to_numpy()),
                "deletion_unexplained": unexplained(t["deletion"].to_numpy(), t["masking"].to_numpy()),
                "best_baseline": max(baselines, key=lambda b: baselines[b]) if baselines else "",
                "circuit_wins": bool(np.isfinite(circuit) and all(circuit > v for v in baselines.values())),
            }
        )
    return pd.DataFrame(rows)


# the tool
@one_at_a_time
def validate_circuit_genes(
    adata: AnnData,
    model: C2SModel,
    key: str,
    *,
    n_other_genes: int = 10,
    n_circuit_genes: int | None = None,
    min_frequency: float = 0.0,
    groupby_de: str | None = None,
    random_state: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> pd.DataFrame:
    """Check a traced circuit's genes by knocking them out of the traced cells in the real model.

    On every traced cell, each of its group's circuit genes (gene nodes of the group's graph) present in the cell's
    sentence, and ``n_other_genes`` other genes of the sentence drawn at random, are knocked out one at a time:

    - **deletion**: the gene leaves the cell sentence (later genes move up one place; the sentence gets one gene
      shorter), the prompt is rebuilt and the model run again;
    - **masking**: every position is kept and the gene's token embeddings are replaced by a neutral embedding, the
      mean input embedding over the model's vocabulary (a forward hook on the input embedding).

    The effect is the change of the cell's target, the traced label's logit difference (``target(original) -
    target(knocked out)``, teacher-forced prefix as traced), so a gene that supports the label has a positive effect,
    as its signed ``attribution`` in the circuit does. Per group the effects over its (cell, gene) pairs are compared
    (Spearman correlation) with four gene scores:

    - ``circuit``: the gene's signed attribution in the cell's whole graph (the circuit's ``genes`` table);
    - ``expression``: minus the gene's rank in the cell sentence (higher = more expressed; the order the model reads,
      also for sentences stored in ``.obs``);
    - ``de_score``: the Wilcoxon score (``sc.tl.rank_genes_groups``, the cell's group against the rest, on the
      matrix the sentences were built from) of the gene in the cell's group of the circuit's ``groupby`` (or
      ``groupby_de``); NaN when neither is given, or for a group of a single cell;
    - ``gradient_x_input``: in the real model, ``d target / d embedding`` at the gene's tokens dotted with ``embedding
      - neutral embedding``, summed over the tokens: the first-order estimate of the masking effect.

    Deletion also shifts every later gene by one place and changes what attention sees; the frozen-attention graph
    the circuit is read from cannot see either. How much of deletion masking does not explain says how much of it
    works that way.

    Parameters
    ----------
    adata
        Annotated data matrix with a circuit from :func:`cellcircuits.tl.trace_circuit` (with its ``genes`` table).
    model
        The model the circuit was traced on.
    key
        The circuit's key in ``.uns["circuits"]``.
    n_other_genes
        Genes of each cell's sentence outside the circuit knocked out too (fewer when the sentence holds fewer).
    n_circuit_genes
        Circuit genes are the group's gene nodes of most influence (mean over its traced cells), at most this many;
        ``None``: all of them (a traced cell's graph often keeps most genes of its sentence).
    min_frequency
        Circuit genes are the group's gene nodes present in at least this fraction of its traced cells.
    groupby_de
        Column of ``.obs`` whose groups the DE baseline compares; default the circuit's ``groupby``.
    random_state
        Seed of the draw of the other genes.
    batch_size
        Prompts per forward pass.
    progress
        Show a progress bar.

    Returns
    -------
    One row per group: ``n_cells``, ``n_pairs`` (cells x knocked-out genes), ``n_circuit_pairs``, the Spearman
    correlations ``deletion_<score>`` and ``masking_<score>`` for the scores ``circuit``, ``expression``,
    ``de_score`` and ``gradient_x_input``, ``masking_vs_deletion`` (Spearman correlation of the two effects),
    ``deletion_unexplained`` (``1 - R^2`` of the least-squares line of the deletion effects on the masking effects:
    the share of deletion's variance that masking leaves unexplained), ``best_baseline`` (the baseline of highest
    ``deletion_`` correlation, ``""`` when none could be computed) and ``circuit_wins`` (the circuit's
    ``deletion_circuit`` beats every computed baseline's). Also stored, with the per-pair ``effects`` table (columns
    ``obs_name``, ``group``, ``gene``, ``rank``, ``in_circuit``, ``attribution``, ``influence``, ``deletion``,
    ``masking``, ``gradient_x_input``, ``expression``, ``de_score``) and the ``params``, as
    ``.uns["circuits"][key]["gene_validation"]``.

    Raises
    ------
    KeyError
        When there is no circuit under ``key``, it has no ``genes`` table, a traced cell is no longer in ``adata``,
        or the DE column is not in ``.obs``.
    ValueError
        For a model other than the traced one, ``n_other_genes`` or ``n_circuit_genes`` below 0, ``min_frequency``
        outside ``[0, 1]``, ``batch_size < 1``, duplicate ``obs_names``, or a cell whose sentence no longer holds the
        traced genes.
    """
    result = circuit_result(adata, key)
    genes = pd.DataFrame(circuit_genes(adata, key))
    params = result["params"]
    check_traced_model(params, model, key)
    check_gene_validation(n_other_genes, min_frequency, batch_size, n_circuit_genes)
    check_unique_obs_names(adata, "validate_circuit_genes")
    cells = pd.DataFrame(result["cells"])
    missing = [c for c in cells["obs_name"] if c not in adata.obs_names]
    if missing:
        msg = f"traced cells {missing[:5]} are not in adata"
        raise KeyError(msg)
    column = de_column(adata, params, groupby_de)
    mode = as_target_mode(str(params.get("target_mode", "distinguishing")))
    label_ids = label_token_ids(model.tokenizer, model.prompt, model.prompt.labels or [])
    targets = [label_target(label_ids, label_index(model, str(lab)), mode) for lab in cells["label"]]
    settings = SentenceSettings.from_params(params.get("sentences", {}), random_state=params.get("random_state", 0))
    rows = adata.obs_names.get_indexer(cells["obs_name"])
    prompts = cell_prompts(adata, model, settings, rows)
    nodes = pd.DataFrame(result["nodes"])
    nodes = nodes[(nodes["kind"] == "gene") & (nodes["frequency"] >= min_frequency)]
    nodes = nodes.sort_values("influence", ascending=False, kind="stable")
    top = slice(None) if n_circuit_genes is None else slice(int(n_circuit_genes))
    in_circuit = {str(g): set(t["gene"].astype(str).iloc[top]) for g, t in nodes.groupby("group", sort=False)}

    rng = np.random.default_rng(random_state)
    tables, chosen = [], []
    for i, (obs_name, group) in enumerate(zip(cells["obs_name"], cells["group"].astype(str), strict=True)):
        table = genes[genes["obs_name"] == obs_name].sort_values("rank")
        if list(table["gene"].astype(str)) != list(prompts[i].genes):
            msg = f"the sentence of the traced cell {obs_name!r} no longer holds the genes it was traced with"
            raise ValueError(msg)
        mine = table["gene"].astype(str).isin(in_circuit.get(group, set())).to_numpy()
        others = np.flatnonzero(~mine)
        drawn = rng.choice(others, size=min(n_other_genes, len(others)), replace=False) if len(others) else others
        pick = np.sort(np.concatenate([np.flatnonzero(mine), drawn]).astype(np.int64))
        chosen.append(pick)
        tables.append(table.iloc[pick].assign(in_circuit=mine[pick], group=group))

    de = de_scores(adata, settings, column, list(adata.obs[column].iloc[rows].astype(str))) if column else {}
    knocked = knockout_genes(
        model, prompts, targets, chosen, organism=settings.organism, batch_size=batch_size, progress=progress
    )
    effects = pd.concat(tables, ignore_index=True)
    for c in ("deletion", "masking", "gradient_x_input"):
        effects[c] = knocked[c].to_numpy()
    effects["expression"] = 0.0 - effects["rank"].to_numpy(dtype=np.float64)
    cell_de_group = adata.obs[column].iloc[rows].astype(str).to_numpy() if column else np.full(len(rows), "")
    de_group = np.repeat(cell_de_group, [len(c) for c in chosen])
    effects["de_score"] = [
        float(de[g].get(gene, np.nan)) if g in de else np.nan
        for g, gene in zip(de_group, effects["gene"].astype(str), strict=True)
    ]
    effects = effects[EFFECT_COLUMNS].reset_index(drop=True)
    effects["obs_name"] = effects["obs_name"].astype(str)
    effects["gene"] = effects["gene"].astype(str)
    summary = summarize(effects)
    result[GENE_VALIDATION] = {
        "effects": effects,
        "summary": summary,
        "params": {
            "n_other_genes": int(n_other_genes),
            "n_circuit_genes": -1 if n_circuit_genes is None else int(n_circuit_genes),
            "min_frequency": float(min_frequency),
            "groupby_de": column or "",
            "random_state": int(random_state),
            "model": model.name,
            "neutral_embedding": "mean input embedding over the vocabulary",
            "expression": "minus the rank in the cell sentence",
            "de_method": "wilcoxon",
            "deletion_unexplained": "1 - R^2 of deletion on masking (least squares)",
        },
    }
    return summary
