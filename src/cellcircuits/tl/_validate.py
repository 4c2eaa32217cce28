"""Validation of traced circuits by intervention: ablate, keep only, or clamp the circuit's features."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .._keys import circuit_result
from ..circuits._intervene import clean_run, run_edits
from ..circuits._targets import label_target
from ..models._tokens import label_token_ids
from ._cells import cell_prompts
from ._circuits import label_index, node_names, position_roles

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models._load import C2SModel
    from ..models._tokens import TokenizedPrompt
    from ..transcoders._transcoder_set import TranscoderSet


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
    from tqdm.auto import tqdm

    result = circuit_result(adata, key)
    if n_random < 1:
        msg = f"n_random must be at least 1, got {n_random}"
        raise ValueError(msg)
    if not 0 <= min_frequency <= 1:
        msg = f"min_frequency must be in [0, 1], got {min_frequency}"
        raise ValueError(msg)
    params = result["params"]
    transcoders.check_compatible(n_layers=model.adapter.n_layers, d_model=model.adapter.d_model)
    cells = pd.DataFrame(result["cells"])
    missing = [c for c in cells["obs_name"] if c not in adata.obs_names]
    if missing:
        msg = f"traced cells {missing[:5]} are not in adata"
        raise KeyError(msg)
    nodes = pd.DataFrame(result["nodes"])
    rows = adata.obs_names.get_indexer(cells["obs_name"])
    sentence = params.get("sentences", {})
    prompts = cell_prompts(
        adata, model, sentence_key=str(sentence.get("sentence_key", "cell_sentence")),
        layer=str(sentence.get("layer", "")) or None, use_raw={1: True, 0: False}.get(int(sentence.get("use_raw", -1))),
        gene_symbols=str(sentence.get("gene_symbols", "")) or None, random_state=int(params.get("random_state", 0)),
        cells=rows,
    )  # fmt: skip
    label_ids = label_token_ids(model.tokenizer, model.prompt, model.prompt.labels)
    mode = str(params.get("target_mode", "distinguishing"))
    targets = [label_target(label_ids, label_index(model, lab), mode) for lab in cells["label"]]
    inputs = [list(p.input_ids) + t.prefix for p, t in zip(prompts, targets, strict=True)]

    # pass 1: each feature's mean activation over every position of the traced cells
    sums = {m: 0.0 for m in transcoders.layers}
    n_positions = 0
    for ids in inputs:
        run = clean_run(model, transcoders, ids)
        for m in transcoders.layers:
            sums[m] = sums[m] + run.activations[m].sum(0)
        n_positions += len(ids)
    means = {m: s / n_positions for m, s in sums.items()}

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
        edits = _edits_of_cell(
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
    result["validation"] = validation
    return validation


def _edits_of_cell(
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
    T = len(run.input_ids)
    in_circuit = {m: np.isin(named[m][2], list(circuit)) for m in layers}
    in_support = {m: np.isin(named[m][2], list(support or ())) for m in layers}
    n_circuit = int(sum(v.sum() for v in in_circuit.values()))
    n_support = int(sum(v.sum() for v in in_support.values()))
    # every active non-circuit feature instance, to draw the random baselines from
    pool = [(m, j) for m in layers for j in np.flatnonzero(~in_circuit[m])]

    def draw(n: int) -> list:
        return [pool[k] for k in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]

    draws = [draw(n_circuit) for _ in range(n_random)]
    support_draws = [draw(n_support) for _ in range(n_random)]
    rows = ["full", "zero", "mean", "only", "none", "clamp", "support"] + [f"rz{d}" for d in range(n_random)]
    rows += [f"rm{d}" for d in range(n_random)] + [f"rs{d}" for d in range(n_random)]
    B = len(rows)
    scale, override = {}, {}
    for m in layers:
        F = transcoders[m].cfg.n_features
        s = torch.ones(B, T, F)
        o = torch.full((B, T, F), float("nan"))
        pos, feat, names = named[m]
        c = torch.as_tensor(in_circuit[m])
        cp, cf = pos[c].cpu(), feat[c].cpu()
        s[rows.index("zero"), cp, cf] = 0.0
        o[rows.index("mean"), cp, cf] = means[m][cf].cpu().float()
        s[rows.index("only")] = 0.0
        s[rows.index("only"), cp, cf] = 1.0
        s[rows.index("none")] = 0.0
        sup = torch.as_tensor(in_support[m])
        s[rows.index("support"), pos[sup].cpu(), feat[sup].cpu()] = 0.0
        clamp = torch.as_tensor(names == clamp_name)
        s[rows.index("clamp"), pos[clamp].cpu(), feat[clamp].cpu()] = clamp_factor
        for d, draw in enumerate(draws):
            mine = [j for (mm, j) in draw if mm == m]
            rp, rf = pos.cpu()[mine], feat.cpu()[mine]
            s[rows.index(f"rz{d}"), rp, rf] = 0.0
            o[rows.index(f"rm{d}"), rp, rf] = means[m][rf].cpu().float()
        for d, draw_ in enumerate(support_draws):
            mine = [j for (mm, j) in draw_ if mm == m]
            s[rows.index(f"rs{d}"), pos.cpu()[mine], feat.cpu()[mine]] = 0.0
        scale[m], override[m] = s, o
    logits = run_edits(model, transcoders, run, scale, override)
    value, prob = target_metrics(logits, position, target.token, target.competitors)
    at = {r: k for k, r in enumerate(rows)}
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
