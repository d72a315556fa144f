"""Scores -> PrunePlan: which original experts each MoE layer keeps, and why.

A plan is plain JSON (``{"keep": {"<layer>": [experts]}}`` plus provenance), so it can be
written by hand, reviewed, and applied in memory, by streaming surgery or by masking.
Planning never needs the model's weights; :func:`check_plan` validates a plan against a
config-only (meta-device) view of the model before anything expensive starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeguard.attribution.base import Scores
from moeguard.config import is_decimal
from moeguard.errors import MoeguardError
from moeguard.io import read_json

SCHEMA = "moeguard.plan/1"


@dataclass(kw_only=True)
class PrunePlan:
    keep: dict[int, list[int]]
    num_experts: int
    rule: str                                      # "keep=K" | "keep_ratio=R" | "budget=N" | "explicit"
    method: str | None = None
    task: str | None = None
    scores: dict[int, list[float]] = field(default_factory=dict)   # the scores the choice was made on
    why: str = ""
    # the expert count the plan's file states (None: it states none); another model's plan is refused
    declared_num_experts: int | None = field(default=None, repr=False)
    # each layer's expert count, set by check_plan from the model (a budget-pruned one's differ)
    layer_experts: dict[int, int] = field(default_factory=dict, repr=False)

    def check_model(self, num_experts: int, *, origin: str = "the plan") -> None:
        """Refuse a plan whose file says it was made for a model with another expert count: its
        indices name other experts (a layer's own range is checked by the caller)."""
        if self.declared_num_experts is not None and self.declared_num_experts != num_experts:
            raise MoeguardError(f"{origin} was made for a model with {self.declared_num_experts} experts per layer; "
                                f"this model has {num_experts}",
                                hint="make the plan on this model (moeguard attribute, then prune --plan-only)")

    @property
    def uniform(self) -> bool:
        return len({len(v) for v in self.keep.values()}) == 1

    @property
    def kept_total(self) -> int:
        return sum(len(v) for v in self.keep.values())

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "keep": {str(l): v for l, v in sorted(self.keep.items())},
                "num_experts": self.num_experts, "rule": self.rule, "method": self.method, "task": self.task,
                "why": self.why, "kept_total": self.kept_total,
                "dropped": {str(l): [e for e in range(self.layer_experts.get(l, self.num_experts)) if e not in v]
                            for l, v in sorted(self.keep.items())},
                # 12 significant digits, as scores files keep them (round(x, 9) made a 5e-10 loss delta 0.0)
                "scores": {str(l): [float(f"{x:.12g}") if math.isfinite(x) else None for x in v]
                           for l, v in sorted(self.scores.items())}}

    @classmethod
    def from_dict(cls, data: Any, *, origin: str = "<plan>") -> "PrunePlan":
        if not isinstance(data, dict) or not isinstance(data.get("keep"), dict) or not data["keep"]:
            raise MoeguardError(f"{origin} has no 'keep' map",
                                hint='write {"keep": {"<layer index>": [expert indices]}}, or the moeguard_pruning.json of an earlier prune')
        keep: dict[int, list[int]] = {}
        for layer, experts in data["keep"].items():
            # whole numbers only: 0.9 and 1.7 became experts 0 and 1, and the string "01" experts 0 and 1
            if not is_decimal(str(layer)) or not expert_indices(experts):
                raise MoeguardError(f"{origin}: layer {str(layer)[:20]!r} -> {str(experts)[:60]} is not a list of expert "
                                    f"indices", hint='write {"keep": {"0": [0, 3, 5, 6]}}: whole numbers from 0')
            if int(layer) in keep:   # "0" and "00": the last one silently won
                raise MoeguardError(f"{origin}: layer {int(layer)} is named twice", hint="name each layer once")
            keep[int(layer)] = experts
            if not experts:
                raise MoeguardError(f"{origin}: layer {layer} keeps no expert", hint="keep at least one expert per layer")
        n = data.get("original_num_experts") or data.get("num_experts")
        if n is not None and (type(n) is not int or n < 1):
            raise MoeguardError(f"{origin}: num_experts is {str(n)[:20]!r}", hint="a whole number, or leave it out")
        declared = n
        # without one, a guess: the model's own count replaces it when the plan is checked (check_plan)
        n = n if n is not None else max(max(v) for v in keep.values()) + 1
        return cls(keep=keep, num_experts=n, rule=data.get("rule", "explicit"), method=data.get("method"),
                   task=data.get("task"), why=data.get("why", "named explicitly"), declared_num_experts=declared)

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        path = Path(path)
        data = read_json(path, what="plan file", hint='write {"keep": {"<layer>": [experts]}} to it')
        return cls.from_dict(data, origin=str(path))


def expert_indices(value: Any) -> bool:
    """Whether ``value`` is a list of expert indices as JSON gives them: whole numbers from 0 (a bool,
    a float or a string's characters are not)."""
    return isinstance(value, list) and all(type(e) is int and e >= 0 for e in value)


def _check_count(what: str, value: int, E: int, min_keep: int) -> None:
    if value < min_keep:
        raise MoeguardError(f"{what} keeps {value} expert(s) per layer; this router needs at least {min_keep}",
                            hint=f"keep between {min_keep} and {E} experts")
    if value > E:
        raise MoeguardError(f"{what} keeps {value} experts per layer but layers have {E}",
                            hint=f"keep between {min_keep} and {E} experts")


def plan_from_scores(scores: Scores, *, keep: int | None = None, keep_ratio: float | None = None,
                     budget: int | None = None, min_keep: int = 1) -> PrunePlan:
    """Exactly one of ``keep`` (per layer), ``keep_ratio`` (of each layer) or ``budget`` (in total)."""
    given = [x is not None for x in (keep, keep_ratio, budget)]
    if sum(given) != 1:
        raise MoeguardError("give exactly one of --keep, --keep-ratio, --budget", hint="e.g. --keep 4")
    E, L = scores.num_experts, len(scores.layers)
    if not torch.isfinite(scores.scores).all():
        raise MoeguardError(f"scores of method '{scores.method}' contain NaN or infinite values",
                            hint="re-run moeguard attribute (more --samples)")
    raw = {l: scores.scores[i].tolist() for i, l in enumerate(scores.layers)}
    common = dict(num_experts=E, method=scores.method, task=scores.task, scores=raw)
    if keep_ratio is not None:
        if not 0 < keep_ratio <= 1:
            raise MoeguardError(f"--keep-ratio is {keep_ratio}", hint="pass a ratio in (0, 1], e.g. 0.5")
        keep = max(1, round(keep_ratio * E))
        rule = f"keep_ratio={keep_ratio}"
    if keep is not None:
        rule = rule if keep_ratio is not None else f"keep={keep}"
        _check_count("the plan", keep, E, min_keep)
        if keep in scores.subsets and set(scores.subsets[keep]) == set(scores.layers):
            chosen = {l: sorted(scores.subsets[keep][l]) for l in scores.layers}
            why = f"best {keep}-subset per layer found by {scores.method}'s search"
        else:
            chosen = {l: sorted(scores.ranking(i)[:keep]) for i, l in enumerate(scores.layers)}
            why = f"top {keep} experts per layer by {scores.method} score"
        return PrunePlan(keep=chosen, rule=rule, why=why, **common)
    if not min_keep * L <= budget <= E * L:
        raise MoeguardError(f"--budget {budget} cannot be split over {L} layers of {E} experts",
                            hint=f"pass a budget between {min_keep * L} and {E * L}")
    return PrunePlan(keep=allocate_budget(scores, budget, min_keep=min_keep), rule=f"budget={budget}",
                     why=_budget_why(scores), **common)


def check_scores_model(scores: Any, path: str | Path, model: Any) -> None:
    """For a command given scores and no --model (``model``: the embedded model, the default): scores of
    another model are refused. A checkpoint of the embedded model's shape (a zoo model, a fine-tune) was
    cut by its own scores applied to the embedded model, without a word; another shape failed on the
    count. The model is named as attribute names it ('embedded') or by its folder (a sweep's or an
    audit's scores: the path transformers loaded it from)."""
    if scores.model and not model.ref.answers_to(scores.model):
        raise MoeguardError(f"{path} scores model '{scores.model}', and no --model was given (the default is the "
                            "embedded model)", hint=f"pass --model {scores.model} (the checkpoint it scores), as the "
                                                    "attribute command named it")


def plan_for(model: Any, *, scores: str | Path | None = None, plan: str | Path | None = None,
             keep: int | None = None, keep_ratio: float | None = None, budget: int | None = None,
             model_given: bool = True) -> PrunePlan:
    """The plan to prune ``model`` (a resolved :class:`~moeguard.models.handle.ModelHandle`)
    with: an explicit ``plan`` file, or a ``scores`` file (of ``moeguard attribute``) and exactly
    one of ``keep``, ``keep_ratio`` or ``budget``. Checked against the model before any weights
    are read."""
    if (scores is None) == (plan is None):
        raise MoeguardError("give exactly one of --scores or --plan", hint="e.g. --scores scores.json --keep 4")
    if plan is not None:
        if any(x is not None for x in (keep, keep_ratio, budget)):
            raise MoeguardError("--keep/--keep-ratio/--budget go with --scores, not with --plan",
                                hint="an explicit plan already names the kept experts")
        return PrunePlan.load(plan)
    s = Scores.load(scores)
    if not model_given:
        check_scores_model(s, scores, model)
    if s.num_experts != model.num_experts:
        raise MoeguardError(f"{scores} scores {s.num_experts} experts per layer, the model has {model.num_experts}",
                            hint="attribute this model: moeguard attribute --model ... --out scores.json")
    return plan_from_scores(s, keep=keep, keep_ratio=keep_ratio, budget=budget, min_keep=model.min_keep)


def _budget_why(scores: Scores) -> str:
    unit = "raw scores (same unit in every layer)" if scores.comparable_across_layers else \
        "each layer's scores as shares of the layer's total"
    return f"highest {scores.method} scores across all layers, compared as {unit}, at least the router minimum per layer"


def allocate_budget(scores: Scores, budget: int, *, min_keep: int = 1) -> dict[int, list[int]]:
    """Every layer first keeps its ``min_keep`` best experts; the rest of the budget goes to the
    highest remaining scores anywhere (non-uniform)."""
    s = scores.scores.clone()
    if not scores.comparable_across_layers:
        s = s / s.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)
    chosen = {l: scores.ranking(i)[:min_keep] for i, l in enumerate(scores.layers)}
    rest = [(float(s[i, e]), -i, -e) for i, l in enumerate(scores.layers) for e in range(scores.num_experts)
            if e not in chosen[l]]
    rest.sort(reverse=True)
    for value, neg_i, neg_e in rest[:budget - min_keep * len(scores.layers)]:
        chosen[scores.layers[-neg_i]].append(-neg_e)
    return {l: sorted(v) for l, v in chosen.items()}


def check_plan(plan: PrunePlan, adapter) -> dict[int, list[int]]:
    """Validate a plan against the model's MoE layers (a meta-device model is enough)."""
    from moeguard.models.hooks import normalize_keep

    names = {l.index for l in adapter.layers}
    missing = sorted(names - set(plan.keep))
    if missing:
        raise MoeguardError(f"the plan does not name MoE layers {missing}",
                            hint=f"name every MoE layer {sorted(names)} (list all experts to keep a layer whole)")
    layer_experts = {l.index: l.num_experts for l in adapter.layers}
    plan.check_model(max(layer_experts.values()))
    keep = normalize_keep(adapter, plan.keep)
    plan.layer_experts = layer_experts
    # the model's count (the most any layer has), not the plan's guess or claim
    plan.num_experts = max(layer_experts.values())
    return keep
