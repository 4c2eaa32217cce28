"""Validation of a traced circuit by intervention: ablate, keep only, or clamp its features on each traced prompt.

Works on tokenized prompts and the circuit's tables alone; :func:`cellcircuits.tl.validate_circuit` is the AnnData
adapter that rebuilds the traced cells' prompts and stores the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..models._hooks import one_at_a_time
from ..models._tokens import label_token_ids
from ._aggregate import node_names, position_roles
from ._intervene import FeatureEdits, clean_run, run_feature_edits
from ._targets import label_target
from ._trace import label_index

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..models._load import C2SModel
    from ..models._tokens import TokenizedPrompt
    from ..transcoders._transcoder_set import TranscoderSet
    from ._trace import TargetMode


def active_names(run_acts: dict[int, torch.Tensor], prompt: TokenizedPrompt, label: str) -> dict[int, tuple]:
    """Per layer, the active (position, feature) pairs of a clean run and their names as in the traced graphs."""
    out = {}
    for m, acts in run_acts.items():
        pos, feat = (acts > 0).nonzero(as_tuple=True)
        gene, role = position_roles(prompt, acts.shape[0])
        p = pos.cpu().numpy()
        kind = np.full(len(p), "feature", dtype=object)
        names = node_names(kind, np.full(len(p), m), feat.cpu().numpy(), gene[p], role[p], label)
        out[m] = (pos, feat, names)
    return out


def target_metrics(logits: torch.Tensor, position: int, token: int, competitors: tuple[int, ...]) -> tuple:
    """Target value (logit difference) and the label's probability among the competing tokens, per batch row."""
    at = logits[:, position]
    if competitors:
        value = at[:, token] - at[:, list(competitors)].mean(1)
        prob = torch.softmax(at[:, [token, *competitors]], dim=1)[:, 0]
    else:
        value = at[:, token]
        prob = torch.softmax(at, dim=1)[:, token]
    return value.cpu().numpy(), prob.cpu().numpy()


def check_validation(n_random: int, min_frequency: float) -> None:
    """Refuse fewer than one random draw or a ``min_frequency`` outside ``[0, 1]``."""
    if n_random < 1:
        msg = f"n_random must be at least 1, got {n_random}"
        raise ValueError(msg)
    if not 0 <= min_frequency <= 1:
        msg = f"min_frequency must be in [0, 1], got {min_frequency}"
        raise ValueError(msg)


@one_at_a_time
def validate_prompts(
    model: C2SModel,
    transcoders: TranscoderSet,
    prompts: Sequence[TokenizedPrompt],
    cells: pd.DataFrame,
    nodes: pd.DataFrame,
    *,
    target_mode: TargetMode = "distinguishing",
    min_frequency: float = 0.0,
    n_random: int = 5,
    clamp_factor: float = 2.0,
    random_state: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Intervene on a circuit's features on each traced prompt and summarise the effects per group.

    See :func:`cellcircuits.tl.validate_circuit` for the edits and the columns of the result.

    Parameters
    ----------
    model
        The model the circuit was traced on.
    transcoders
        The transcoders the circuit was traced with.
    prompts
        The traced prompts, in the order of ``cells``.
    cells
        Per traced prompt: ``group``, ``label`` and the graph's ``*_score`` columns (the ``cells`` table of
        :class:`cellcircuits.circuits.CircuitTables`).
    nodes
        The circuit's aggregated node table (``group``, ``node``, ``kind``, ``influence``, ``attribution``,
        ``frequency``).
    target_mode
        The target the circuit was traced to (see :func:`cellcircuits.circuits.label_target`).
    min_frequency
        Circuit features are the group's feature nodes present in at least this fraction of its traced prompts.
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
    One row per group (columns as :func:`cellcircuits.tl.validate_circuit` returns them).
    """
    from tqdm.auto import tqdm

    check_validation(n_random, min_frequency)
    if len(prompts) != len(cells):
        msg = f"{len(prompts)} prompts for {len(cells)} traced cells"
        raise ValueError(msg)
    transcoders.check_model(model)
    label_ids = label_token_ids(model.tokenizer, model.prompt, model.prompt.labels or [])
    targets = [label_target(label_ids, label_index(model, lab), target_mode) for lab in cells["label"]]
    inputs = [list(p.input_ids) + t.prefix for p, t in zip(prompts, targets, strict=True)]

    # pass 1: each feature's mean activation over every position of the traced cells
    sums: dict[int, torch.Tensor | float] = {m: 0.0 for m in transcoders.layers}
    n_positions = 0
    for ids in inputs:
        run = clean_run(model, transcoders, ids)
        for m in transcoders.layers:
            sums[m] = sums[m] + run.activations[m].sum(0)
        n_positions += len(ids)
    means = {m: torch.as_tensor(s / n_positions) for m, s in sums.items()}

    rng = np.random.default_rng(random_state)
    per_cell = []
    for i in tqdm(range(len(cells)), desc="validate", disable=not progress):
        group, label = str(cells["group"].iloc[i]), str(cells["label"].iloc[i])
        g_nodes = nodes[(nodes["group"] == group) & (nodes["kind"] == "feature")]
        kept = g_nodes[g_nodes["frequency"] >= min_frequency]
        circuit = set(kept["node"])
        support = set(kept.loc[kept["attribution"] > 0, "node"])
        top = g_nodes.sort_values("influence", ascending=False).head(1)
        clamp_name = str(top["node"].iloc[0]) if len(top) else ""
        run = clean_run(model, transcoders, inputs[i])
        named = active_names(run.activations, prompts[i], label)
        edits = cell_edits(
            model, transcoders, run, named, circuit, clamp_name, means, targets[i], len(inputs[i]) - 1,
            n_random, clamp_factor, rng, support=support,
        )  # fmt: skip
        per_cell.append({**edits, "group": group, "clamp_feature": clamp_name})
    table = pd.DataFrame(per_cell)
    out = []
    for group, t in table.groupby("group", sort=False):
        g_nodes = nodes[nodes["group"] == group].set_index("node")
        clamp = str(t["clamp_feature"].iloc[0])
        predicted = (clamp_factor - 1) * float(g_nodes.loc[clamp, "attribution"]) if clamp in g_nodes.index else 0.0
        denominator = (t["full"] - t["none"]).sum()
        g_cells = cells[cells["group"] == group]
        out.append(
            {
                "group": group,
                "n_cells": len(t),
                "n_circuit_features": t["n_circuit"].mean(),
                "target_value": t["full"].mean(),
                "probability": t["prob"].mean(),
                "zero_drop": (t["full"] - t["zero"]).mean(),
                "zero_prob_drop": (t["prob"] - t["zero_prob"]).mean(),
                "random_zero_drop": np.mean(np.stack(t["random_zero"]).mean(0)),
                "random_zero_drop_sd": np.std(np.stack(t["random_zero"]).mean(0)),
                "n_support_features": t["n_support"].mean(),
                "support_drop": (t["full"] - t["support"]).mean(),
                "random_support_drop": np.mean(np.stack(t["random_support"]).mean(0)),
                "mean_drop": (t["full"] - t["mean"]).mean(),
                "mean_prob_drop": (t["prob"] - t["mean_prob"]).mean(),
                "random_mean_drop": np.mean(np.stack(t["random_mean"]).mean(0)),
                "random_mean_drop_sd": np.std(np.stack(t["random_mean"]).mean(0)),
                "faithfulness": (t["only"] - t["none"]).sum() / denominator if abs(denominator) > 1e-12 else np.nan,
                "clamp_feature": clamp,
                "clamp_shift": t["clamp"].mean(),
                "clamp_shift_predicted": predicted,
                **{c: g_cells[c].mean() for c in g_cells.columns if c.endswith("_score")},
            }
        )
    validation = pd.DataFrame(out)
    return validation


def _entries(parts: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of :class:`FeatureEdits`: ``(n, 3)`` run, position and feature, and ``(n,)`` values.

    ``parts`` holds ``(run, positions, features, value or values)``.
    """
    at = [torch.stack([torch.full_like(p, run), p, f], 1) for run, p, f, _ in parts]
    values = [torch.as_tensor(v, dtype=torch.float32).expand(len(p)) for _, p, _, v in parts]
    if not at:
        return torch.zeros(0, 3, dtype=torch.long), torch.zeros(0)
    return torch.cat(at).long(), torch.cat(values)


def _members(names: np.ndarray, chosen: set[str]) -> np.ndarray:
    """Which of ``names`` are in ``chosen``, by hashing (``np.isin`` would sort both string arrays)."""
    return np.fromiter((n in chosen for n in names), dtype=bool, count=len(names))


def cell_edits(
    model: C2SModel,
    transcoders: TranscoderSet,
    run,
    named: dict,
    circuit: set[str],
    clamp_name: str,
    means: dict[int, torch.Tensor],
    target,
    position: int,
    n_random: int,
    clamp_factor: float,
    rng: np.random.Generator,
    support: set[str] | None = None,
) -> dict:
    """Every edit of one cell in one batch; the target and probability under each."""
    layers = transcoders.layers
    in_circuit = {m: _members(named[m][2], circuit) for m in layers}
    in_support = {m: _members(named[m][2], support or set()) for m in layers}
    n_circuit = int(sum(v.sum() for v in in_circuit.values()))
    n_support = int(sum(v.sum() for v in in_support.values()))
    # every active non-circuit feature instance, to draw the random baselines from
    pool = [(m, j) for m in layers for j in np.flatnonzero(~in_circuit[m])]

    def draw_random(n: int) -> list:
        return [pool[k] for k in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]

    draws = [draw_random(n_circuit) for _ in range(n_random)]
    support_draws = [draw_random(n_support) for _ in range(n_random)]
    rows = ["full", "zero", "mean", "only", "none", "clamp", "support"] + [f"rz{d}" for d in range(n_random)]
    rows += [f"rm{d}" for d in range(n_random)] + [f"rs{d}" for d in range(n_random)]
    at = {r: k for k, r in enumerate(rows)}
    edits = {}
    for m in layers:
        pos, feat, names = named[m]
        pos, feat = pos.cpu(), feat.cpu()
        default = torch.ones(len(rows))
        default[[at["only"], at["none"]]] = 0.0
        scaled: list[tuple] = []  # (run, positions, features, factor or values) per kind of edit
        setting: list[tuple] = []
        c = torch.as_tensor(in_circuit[m])
        cp, cf = pos[c], feat[c]
        scaled += [(at["zero"], cp, cf, 0.0), (at["only"], cp, cf, 1.0)]
        setting.append((at["mean"], cp, cf, means[m][cf].cpu().float()))
        sup = torch.as_tensor(in_support[m])
        scaled.append((at["support"], pos[sup], feat[sup], 0.0))
        clamp = torch.as_tensor(names == clamp_name)
        scaled.append((at["clamp"], pos[clamp], feat[clamp], clamp_factor))
        for d, draw in enumerate(draws):
            mine = [j for (mm, j) in draw if mm == m]
            scaled.append((at[f"rz{d}"], pos[mine], feat[mine], 0.0))
            setting.append((at[f"rm{d}"], pos[mine], feat[mine], means[m][feat[mine]].cpu().float()))
        for d, draw_ in enumerate(support_draws):
            mine = [j for (mm, j) in draw_ if mm == m]
            scaled.append((at[f"rs{d}"], pos[mine], feat[mine], 0.0))
        edits[m] = FeatureEdits(default, *_entries(scaled), *_entries(setting))
    logits = run_feature_edits(model, transcoders, run, edits)
    value, prob = target_metrics(logits, position, target.token, target.competitors)
    full = value[at["full"]]
    return {
        "n_circuit": n_circuit,
        "n_support": n_support,
        "support": value[at["support"]],
        "random_support": np.array([full - value[at[f"rs{d}"]] for d in range(n_random)]),
        "full": full,
        "prob": prob[at["full"]],
        "zero": value[at["zero"]],
        "zero_prob": prob[at["zero"]],
        "mean": value[at["mean"]],
        "mean_prob": prob[at["mean"]],
        "only": value[at["only"]],
        "none": value[at["none"]],
        "clamp": value[at["clamp"]] - full,
        "random_zero": np.array([full - value[at[f"rz{d}"]] for d in range(n_random)]),
        "random_mean": np.array([full - value[at[f"rm{d}"]] for d in range(n_random)]),
    }
