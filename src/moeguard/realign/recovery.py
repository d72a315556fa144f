"""The recovery study: how many labels does an attacker need to get a pruned task back?

attribution (one method) -> prune to ``keep`` experts per layer (in memory) -> for every
strategy and seed, the active-learning loop over the budget grid -> per strategy: the mean
learning curve with its spread, the labels needed to reach ``target`` percent of the full
model's score, the label savings against ``random`` and the area under the learning curve.

Every (strategy, seed) run is an independent job; with ``job_dir`` each finished job is saved
and a re-run of the same study skips it (the audit's Ray backend will schedule the same jobs).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeguard.errors import MoeguardError
from moeguard.io import write_json
from moeguard.realign.engine import FinetuneConfig
from moeguard.realign.loop import ALConfig, check_schedule, label_pool, run_active_learning
from moeguard.realign.strategies.base import get_strategy
from moeguard.tasks.registry import get_task

SCHEMA = "moeguard.recovery/1"
DEFAULT_METHOD = "ablation"  # best mean AUC of the knowledge-loss study (benchmarks/results/knowledge_loss.json)


@dataclass(frozen=True, kw_only=True)
class RecoveryConfig:
    task: str                         # a registered name or a task YAML path
    keep: int
    strategies: tuple[str, ...] = ("random", "orphan")
    budgets: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    seeds: int = 3
    seed: int = 0
    method: str = DEFAULT_METHOD
    samples: int = 64                 # attribution samples
    pool_size: int = 1000
    eval_limit: int = 200
    target: float = 95.0              # percent of the full model's score
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "strategies": list(self.strategies), "budgets": list(self.budgets),
                "finetune": self.finetune.to_dict()}


def best_method(sweep: dict[str, Any], task: str) -> str:
    """The method with the highest deletion-curve AUC for ``task`` in a sweep document."""
    faith = sweep.get("faithfulness", {}).get(task)
    if not faith:
        raise MoeguardError(f"the sweep has no results for task '{task}' (it has {sorted(sweep.get('faithfulness', {}))})",
                            hint="run the sweep on this task, or pass --method")
    ranked = sorted(((v["auc"], m) for m, v in faith.items() if m != "random" and v.get("auc") is not None), reverse=True)
    if not ranked:
        raise MoeguardError(f"the sweep has no method AUCs for task '{task}'", hint="pass --method")
    return ranked[0][1]


def preflight(cfg: RecoveryConfig, num_experts: int, min_keep: int) -> None:
    """Everything that can be wrong with the settings, checked before any model work."""
    from moeguard.attribution.base import get_method

    task = get_task(cfg.task)
    get_method(cfg.method)
    check_schedule(cfg.budgets)
    if not min_keep <= cfg.keep < num_experts:
        raise MoeguardError(f"--keep {cfg.keep} is impossible for {num_experts} experts per layer",
                            hint=f"use a value from {min_keep} to {num_experts - 1}")
    if cfg.seeds < 1:
        raise MoeguardError(f"--seeds is {cfg.seeds}", hint="pass --seeds of at least 1")
    if not cfg.strategies:
        raise MoeguardError("no strategies given", hint="e.g. --strategies random,orphan")
    for s in cfg.strategies:
        get_strategy(s, task)
    if not 0 < cfg.target <= 100:
        raise MoeguardError(f"--target is {cfg.target}", hint="pass a percentage in (0, 100]")
    label_pool(task, pool_size=cfg.pool_size, budget=cfg.budgets[-1], seed=cfg.seed)


def run_recovery(model, tokenizer, cfg: RecoveryConfig, *, progress: Any = None,
                 job_dir: str | Path | None = None) -> dict[str, Any]:
    from moeguard.attribution.run import make_context, score
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.prune import prune_model
    from moeguard.pruning.plan import plan_from_scores
    from moeguard.pruning.sweep import reduction
    from moeguard.realign.strategies.orphan import orphan_shares
    from moeguard.tasks.evaluate import evaluate_task

    started = time.perf_counter()
    task = get_task(cfg.task)
    adapter = MoEAdapter(model)
    preflight(cfg, adapter.num_experts, adapter.family.min_experts)
    full = evaluate_task(model, tokenizer, task, limit=cfg.eval_limit, batch_size=32)
    ctx = make_context(model, tokenizer, task, samples=cfg.samples, batch_size=8, seed=cfg.seed, progress=progress)
    scores = score(ctx, cfg.method)
    plan = plan_from_scores(scores, keep=cfg.keep, min_keep=adapter.family.min_experts)
    pruned, record = prune_model(model, plan.keep)
    shares = orphan_shares(model, tokenizer, task, plan.keep, adapter.num_experts)
    initial = evaluate_task(pruned, tokenizer, task, limit=cfg.eval_limit, batch_size=32, baseline=False)

    job_dir = Path(job_dir) if job_dir is not None else None
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    curves: list[dict[str, Any]] = []
    for seed in seeds:
        pool = label_pool(task, pool_size=cfg.pool_size, budget=cfg.budgets[-1], seed=seed)
        for name in cfg.strategies:
            curves.append(_job(pruned, tokenizer, task, cfg, name, seed, pool, lambda p=pool: shares(p), full.score, initial,
                               job_dir, progress))
    doc = {
        "schema": SCHEMA,
        "task": task.name, "kind": task.kind.value, "metric": task.primary_metric,
        "higher_is_better": task.higher_is_better,
        "full": full.to_dict(), "pruned": initial.to_dict(),
        "pruned_retention": curves[0]["points"][0]["retention"] if curves else None,
        "attribution": {"method": cfg.method, "samples": cfg.samples},
        "plan": plan.to_dict(), "reduction": reduction(adapter, plan.keep), "record": record,
        "settings": cfg.to_dict(), "seeds": seeds,
        "curves": curves,
        "summary": summarize(curves, cfg.strategies, target=cfg.target),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return doc


def _job(pruned, tokenizer, task, cfg, name, seed, pool, orphan_share, full_score, initial, job_dir, progress):
    al = ALConfig(strategy=name, schedule=tuple(cfg.budgets), pool_size=cfg.pool_size, eval_limit=cfg.eval_limit,
                  seed=seed, finetune=dataclasses.replace(cfg.finetune, seed=seed))
    path = job_dir / f"{name}-seed{seed}.json" if job_dir is not None else None
    return cached_curve(pruned, tokenizer, task, al, settings={"study": cfg.to_dict(), "job": al.to_dict()}, path=path,
                        pool=pool, orphan_share=orphan_share, full_score=full_score, initial=initial, progress=progress)


def cached_curve(model, tokenizer, task, al: ALConfig, *, settings: dict[str, Any], path: Path | None, pool,
                 orphan_share, full_score, initial, progress) -> dict[str, Any]:
    """One active-learning run, or its saved result when ``path`` holds one with the same ``settings``."""
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == json.loads(json.dumps(settings)):
            return saved["curve"]
    torch.manual_seed(al.seed)
    curve, _ = run_active_learning(model, tokenizer, task, al, pool=pool, orphan_share=orphan_share,
                                   full_score=full_score, initial=initial, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"settings": settings, "curve": curve})
    return curve


# --------------------------------------------------------------------------- summaries

def labels_to_target(labels: list[int], values: list[float | None], target: float) -> float | None:
    """Labels at which the curve first reaches ``target``, linearly interpolated between the
    budgets that bracket the crossing; 0 when the pruned model already meets it; None if never."""
    prev = None
    for x, y in zip(labels, values):
        if y is not None and y >= target:
            if prev is None or prev[1] is None:
                return float(x)
            (x0, y0) = prev
            return float(x0 + (target - y0) * (x - x0) / (y - y0))
        prev = (x, y)
    return None


def curve_auc(labels: list[int], values: list[float | None]) -> float | None:
    """Mean retention over the label range: trapezoid area / (max labels - min labels)."""
    pts = [(x, y) for x, y in zip(labels, values) if y is not None]
    if len(pts) < 2:
        return None
    xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    return float(((ys[1:] + ys[:-1]) / 2 * np.diff(xs)).sum() / (xs[-1] - xs[0]))


def summarize(curves: list[dict[str, Any]], strategies, *, target: float) -> dict[str, Any]:
    out: dict[str, Any] = {"target": target, "strategies": {}}
    for name in strategies:
        runs = [c for c in curves if c["strategy"] == name]
        if not runs:
            continue
        labels = [p["labels"] for p in runs[0]["points"]]
        vals = np.array([[np.nan if p["retention"] is None else p["retention"] for p in c["points"]] for c in runs])
        mean = np.nanmean(vals, axis=0)
        per_seed = [labels_to_target(labels, list(v), target) for v in vals]
        reached = [x for x in per_seed if x is not None]
        out["strategies"][name] = {
            "labels": labels,
            "mean": mean.tolist(), "std": np.nanstd(vals, axis=0).tolist(),
            "min": np.nanmin(vals, axis=0).tolist(), "max": np.nanmax(vals, axis=0).tolist(),
            "labels_to_target": labels_to_target(labels, mean.tolist(), target),
            "labels_to_target_per_seed": per_seed,
            "seeds_reaching_target": len(reached),
            "auc": curve_auc(labels, mean.tolist()),
            "auc_per_seed": [curve_auc(labels, list(v)) for v in vals],
            "final": float(mean[-1]),
        }
    rnd = out["strategies"].get("random")
    for name, s in out["strategies"].items():
        s["savings_vs_random"] = savings(s["labels_to_target"], rnd["labels_to_target"] if rnd else None,
                                         budget=s["labels"][-1]) if name != "random" and rnd else None
    # best = the largest positive savings; a study where every strategy loses has no best
    ranked = [(s["savings_vs_random"]["percent"], n) for n, s in out["strategies"].items()
              if s["savings_vs_random"] and (s["savings_vs_random"]["percent"] or 0) > 0]
    out["best"] = max(ranked)[1] if ranked else None
    return out


def savings(strategy: float | None, random: float | None, *, budget: int) -> dict[str, Any]:
    """Label savings against random, in percent: 100 * (1 - labels_strategy / labels_random).

    When random never reaches the target within the budget, savings are a lower bound
    (``bound: "at least"``, random's count taken as the budget); when the strategy never
    does, they are unknown unless random reached it (then the strategy loses)."""
    if strategy is not None and random is not None:
        if random == 0:
            return {"percent": None, "bound": "exact", "note": "the pruned model already meets the target"}
        return {"percent": 100.0 * (1 - strategy / random), "bound": "exact"}
    if strategy is not None:
        return {"percent": 100.0 * (1 - strategy / budget), "bound": "at least",
                "note": f"random does not reach the target within {budget} labels"}
    if random is not None:
        return {"percent": None, "bound": "loses", "note": f"does not reach the target within {budget} labels; random does"}
    return {"percent": None, "bound": "neither", "note": f"neither reaches the target within {budget} labels"}
