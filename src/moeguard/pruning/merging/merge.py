"""Merge a loaded model: choose clusters and weights with a registered method (from attribution
scores, a pruning plan's centres or explicit clusters), then average (``operation``). The
library entry point; ``write.py`` puts the result on disk, the studies call it in memory.

Everything checkable is checked before calibration runs: the method, the gate, the plan or the
scores against the model's layers, K against the family's router minimum.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.pruning.merging.base import GATES, MERGE_METHODS, get_merge_method
from moeguard.pruning.merging.operation import merge_experts
from moeguard.pruning.merging.plan import MergePlan, centres_from_keep, explicit_clusters


def prepare(adapter: MoEAdapter, *, method: str, gate: str = "applied", keep: int | None = None, scores=None,
            plan: dict | None = None, plan_origin: str = "--plan") -> dict[str, Any]:
    """Check the request against a (meta or loaded) model view; returns what ``merge_model`` needs,
    including whether calibration data is needed (``needs_data``)."""
    m = get_merge_method(method)
    if gate not in GATES:
        raise MoeguardError(f"--gate {gate!r} is not one of {list(GATES)}",
                            hint="applied: the weights the block uses; raw: the router's score before renormalization")
    if gate != "applied" and not m.uses_gate:   # it was recorded as asked while changing nothing
        raise MoeguardError(f"--gate {gate} changes only methods that weigh by the router, and '{method}' does not",
                            hint="drop --gate, or use a method that does: "
                                 + ", ".join(n for n in MERGE_METHODS.names() if MERGE_METHODS[n].uses_gate))
    layers = {l.index: l.num_experts for l in adapter.layers}
    if (scores is None) == (plan is None):
        raise MoeguardError("give exactly one of --scores or --plan", hint="e.g. --scores scores.json --keep 4")
    if plan is not None and keep is not None:
        raise MoeguardError("--keep goes with --scores, not with --plan", hint="a plan already fixes each layer's clusters")
    from moeguard.models.handle import check_keep

    rows: dict[int, list[float]] = {}
    fixed = weights = None
    if plan is not None and isinstance(plan.get("clusters"), dict):
        fixed, weights = explicit_clusters(plan, origin=plan_origin, layers=layers)
        counts = {l: len(g) for l, g in fixed.items()}
    elif plan is not None:
        centres = centres_from_keep(plan, origin=plan_origin, layers=layers)
        if not m.sets_centres:
            raise MoeguardError(f"merge method '{method}' clusters on its own; a pruning plan fixes the centres",
                                hint="pass --scores S --keep K to it, or a merge plan with explicit clusters")
        rows = {l: [1.0 if e in c else 0.0 for e in range(layers[l])] for l, c in centres.items()}
        counts = {l: len(c) for l, c in centres.items()}
    else:
        if keep is None:
            raise MoeguardError("--scores needs --keep", hint="e.g. --keep 4 (experts per layer after merging)")
        if sorted(scores.layers) != sorted(layers) or scores.num_experts != adapter.num_experts:
            raise MoeguardError(f"the scores cover layers {scores.layers} x {scores.num_experts} experts; the model has "
                                f"layers {sorted(layers)} x {adapter.num_experts}",
                                hint="attribute this model: moeguard attribute --model ... --out scores.json")
        if not torch.isfinite(scores.scores).all():   # as prune refuses them: NaN ranks as anything
            raise MoeguardError(f"scores of method '{scores.method}' contain NaN or infinite values",
                                hint="re-run moeguard attribute (more --samples)")
        rows = {l: scores.scores[i].tolist() for i, l in enumerate(scores.layers)}
        if keep in scores.subsets and set(scores.subsets[keep]) == set(scores.layers):
            # a search's best K-subset (reconstruction) is ranked first, as prune keeps it: the routes
            # table compares the two routes on the same experts (the top K by single-drop error differ)
            rows = {l: _subset_first(r, scores.subsets[keep][l]) for l, r in rows.items()}
        counts = {l: keep for l in layers}
    for l, k in counts.items():
        if k != layers[l] or scores is not None:   # a plan may keep a layer whole (one cluster per expert)
            check_keep(k, num_experts=layers[l], family=adapter.family, top_k=adapter.top_k,
                       what=f"layer {l}: merging to")
    from moeguard.models.prune import pruned_config
    from moeguard.pruning.merging.cluster import by_score

    # what the family cannot express, on the centres the merge will keep where they are known now (a
    # group-routed family refuses unbalanced centres; hc-smoe finds its centres only by calibrating)
    if fixed is not None:
        kept = {l: sorted(g[0] for g in gs) for l, gs in fixed.items()}
    elif m.sets_centres:
        kept = {l: sorted(by_score(r)[:counts[l]]) for l, r in rows.items()}
    else:
        kept = {l: list(range(k)) for l, k in counts.items()}
    pruned_config(adapter, kept)
    needs_data = fixed is None or (weights is None and m.weighs_by_data)
    return {"method": m, "gate": gate, "rows": rows, "counts": counts, "clusters": fixed, "weights": weights,
            "needs_data": needs_data}


def _subset_first(scores: list[float], subset: list[int]) -> list[float]:
    """Ranks standing in for ``scores``: ``subset`` first, each part in its own score order (what
    the centre choices read is order only)."""
    from moeguard.pruning.merging.cluster import by_score

    order = sorted(by_score(scores), key=lambda e: e not in subset)   # stable: score order inside each part
    ranks = [0.0] * len(scores)
    for r, e in enumerate(order):
        ranks[e] = float(len(scores) - r)
    return ranks


def profile_model(model: nn.Module, batches: list, *, tokens: int = 256, seed: int = 0, progress=None,
                  adapter: MoEAdapter | None = None) -> tuple[dict[int, Any], dict[str, Any]]:
    """Calibration profiles by MoE layer index, and their cost; in eval mode, the mode restored.
    Computed once, they serve every method, keep level and set of centres of one model and task."""
    from moeguard.pruning.merging.calibrate import calibrate

    was_training = model.training
    model.eval()
    try:
        found, cost = calibrate(model, adapter or MoEAdapter(model), batches, tokens=tokens, seed=seed,
                                progress=progress)
    finally:
        model.train(was_training)
    return {p.layer: p for p in found}, cost


def merge_model(model: nn.Module, prepared: dict[str, Any], *, batches: list | None = None, tokens: int = 256,
                seed: int = 0, task: str | None = None, scores_method: str | None = None, progress=None,
                profiles: tuple[dict[int, Any], dict[str, Any]] | None = None,
                share_unchanged: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The merged model (``model`` untouched) and its record: the plan, the merges and the cost.
    ``profiles``: :func:`profile_model`'s result, when already computed (then ``batches`` is not used).
    ``share_unchanged``: the merged model shares the tensors merging leaves as they are with
    ``model`` (``prune_model``): for a caller that only evaluates or saves it."""
    plan, cost = plan_merge(model, prepared, batches=batches, tokens=tokens, seed=seed, task=task,
                            scores_method=scores_method, progress=progress, profiles=profiles)
    merged, record = merge_experts(model, plan.clusters, plan.weights, share_unchanged=share_unchanged)
    return merged, {**record, "plan": plan.to_dict(), "calibration": cost}


def plan_merge(model: nn.Module, prepared: dict[str, Any], *, batches: list | None = None, tokens: int = 256,
               seed: int = 0, task: str | None = None, scores_method: str | None = None, progress=None,
               profiles: tuple[dict[int, Any], dict[str, Any]] | None = None) -> tuple[MergePlan, dict[str, Any]]:
    """The merge plan (clusters and weights per layer) and the calibration's cost, without merging:
    a model loaded under a memory cap is calibrated, and the plan streamed onto its checkpoint."""
    m, gate = prepared["method"], prepared["gate"]
    found, cost = {}, {"forward_passes": 0}
    if prepared["needs_data"]:
        if profiles is None:
            if not batches:
                raise MoeguardError(f"merge method '{m.name}' needs calibration data and none was given",
                                    hint="pass --task (default: the scores' task)")
            profiles = profile_model(model, batches, tokens=tokens, seed=seed, progress=progress)
        found, cost = profiles
    clusters = prepared["clusters"] or {l: m.group(found[l], prepared["rows"][l], k)
                                        for l, k in prepared["counts"].items()}
    weights = prepared["weights"] or {l: [m.weigh(found.get(l), g, gate) for g in gs] for l, gs in clusters.items()}
    how = "explicit clusters" if prepared["clusters"] else (
        f"{m.name}: clusters from {scores_method} scores and output similarity" if m.sets_centres and scores_method else
        f"{m.name}: clusters around the plan's centres by output similarity" if m.sets_centres else
        f"{m.name}: {m.description}")   # a method that clusters freely says how (not always hc-smoe's way)
    plan = MergePlan(clusters=clusters, weights=weights, num_experts=MoEAdapter(model).num_experts, method=m.name,
                     gate=gate if m.uses_gate else None, task=task, scores_method=scores_method, why=how)
    return plan, cost
