"""The attack harness: the strongest prune-and-re-align attacker moeguard knows, as a yardstick.

1. **Attribution and pruning.** Every attribution method scores the task's experts; each gives
   a uniform plan (``keep`` per layer) and a budgeted one (``keep * layers`` in total, spread
   where the scores are highest). Every plan is scored by masking; the attacker takes the plan
   with the highest retention (*before re-alignment*).
2. **Re-alignment sweep.** That pruned model is fine-tuned along the label budgets by every
   (strategy, mode, learning rate, epochs, seed) in the grid. Learning rates are the mode's
   default times ``lr_scales`` (default 0.1, 1, 10: two orders of magnitude).
3. **Worst case for the defender.** At every budget, the *maximum* score over the whole grid
   (never the mean: tamper-resistance evaluations that averaged attacks overstated their
   defenses). Labels-to-target and the area under the learning curve come from this envelope.
4. **From-scratch baseline.** The same pruned-size architecture, randomly initialized, trained
   with the same labels (the ``random`` strategy's picks for the same seeds) over the same
   ``full``-mode grid; its best curve. The area between the attacker's envelope and this curve
   is what the stolen experts are worth to the attacker (in retention points).

Each grid cell is a job saved under ``job_dir``; a re-run of the same attack skips finished jobs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeguard.errors import MoeguardError
from moeguard.pruning.evaluate import above_baseline, retention
from moeguard.realign.engine import FinetuneConfig, TrainingDiverged
from moeguard.realign.loop import ALConfig, check_schedule, label_pool
from moeguard.realign.recovery import cached_curve, curve_auc, labels_to_target
from moeguard.tasks.registry import get_task

SCHEMA = "moeguard.attack/1"


@dataclass(frozen=True, kw_only=True)
class AttackConfig:
    task: str
    keep: int
    budget: int = 256
    budgets: tuple[int, ...] = ()          # learning-curve points; empty: budget/64, /16, /4, budget
    methods: tuple[str, ...] = ()          # attribution methods; empty: every registered one
    plans: tuple[str, ...] = ("uniform", "budgeted")
    strategies: tuple[str, ...] = ("random",)
    modes: tuple[str, ...] = ("full", "lora")
    lr_scales: tuple[float, ...] = (0.1, 1.0, 10.0)
    epochs: tuple[float, ...] = (4.0, 16.0)
    seeds: int = 3
    seed: int = 0
    samples: int = 64
    pool_size: int = 1000
    eval_limit: int = 200
    target: float = 95.0
    scratch: bool = True

    @property
    def schedule(self) -> tuple[int, ...]:
        if self.budgets:
            return tuple(self.budgets)
        return tuple(sorted({max(1, self.budget // d) for d in (64, 16, 4)} | {self.budget}))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}, "schedule": list(self.schedule)}

    def grid(self) -> list[dict[str, Any]]:
        from moeguard.realign.modes import get_mode

        return [{"mode": m, "lr": get_mode(m).default_lr * s, "lr_scale": s, "epochs": e}
                for m in self.modes for s in self.lr_scales for e in self.epochs]


def preflight(cfg: AttackConfig, num_experts: int, min_keep: int, num_layers: int) -> None:
    from moeguard.attribution.base import get_method
    from moeguard.realign.modes import get_mode
    from moeguard.realign.strategies.base import get_strategy

    task = get_task(cfg.task)
    if not min_keep <= cfg.keep < num_experts:
        raise MoeguardError(f"--keep {cfg.keep} is impossible for {num_experts} experts per layer",
                            hint=f"use a value from {min_keep} to {num_experts - 1}")
    for m in cfg.methods:
        get_method(m)
    bad = [p for p in cfg.plans if p not in ("uniform", "budgeted")]
    if bad or not cfg.plans:
        raise MoeguardError(f"--plans {list(cfg.plans)}", hint="use uniform, budgeted or both")
    for s in cfg.strategies:
        get_strategy(s, task)
    for m in cfg.modes:
        get_mode(m)
    if not cfg.strategies or not cfg.modes or not cfg.lr_scales or not cfg.epochs:
        raise MoeguardError("the attacker grid is empty", hint="give at least one strategy, mode, lr scale and epochs")
    if any(s <= 0 for s in cfg.lr_scales) or any(e <= 0 for e in cfg.epochs):
        raise MoeguardError(f"lr scales {list(cfg.lr_scales)} / epochs {list(cfg.epochs)}", hint="use positive values")
    if cfg.seeds < 1:
        raise MoeguardError(f"--seeds is {cfg.seeds}", hint="pass --seeds of at least 1")
    check_schedule(cfg.schedule)
    if cfg.schedule[-1] != cfg.budget:
        raise MoeguardError(f"--budgets {list(cfg.schedule)} do not end at --budget {cfg.budget}",
                            hint=f"end the budgets with {cfg.budget}")
    label_pool(task, pool_size=cfg.pool_size, budget=cfg.budget, seed=cfg.seed)


def attribute_and_prune(model, tokenizer, cfg: AttackConfig, *, progress: Any = None) -> dict[str, Any]:
    """Every method x plan kind, scored by masking; the attacker's pick is the best retention.
    ``best_result`` is that plan's eval result (masking scores what physical pruning scores)."""
    from moeguard.attribution.base import list_methods
    from moeguard.attribution.run import make_context, score
    from moeguard.models.adapter import MoEAdapter
    from moeguard.pruning.evaluate import MaskedEvaluator
    from moeguard.pruning.plan import plan_from_scores

    task = get_task(cfg.task)
    adapter = MoEAdapter(model)
    ev = MaskedEvaluator(model, tokenizer, adapter=adapter)
    full = ev(task, None, limit=cfg.eval_limit, baseline=True)
    methods = list(cfg.methods) or [m.name for m in list_methods() if m.name != "random"]
    ctx = make_context(model, tokenizer, task, samples=cfg.samples, batch_size=8, seed=cfg.seed)
    bar = progress.add_task("attacker: attribution and pruning", total=len(methods)) if progress is not None else None
    candidates, results = [], []
    for name in methods:
        s = score(ctx, name)
        for kind in cfg.plans:
            args = {"keep": cfg.keep} if kind == "uniform" else {"budget": cfg.keep * len(adapter.layers)}
            plan = plan_from_scores(s, min_keep=adapter.family.min_experts, **args)
            r = ev(task, plan.keep, limit=cfg.eval_limit)
            candidates.append({"method": name, "plan": kind, "keep": {str(k): v for k, v in plan.keep.items()},
                               "score": r.score, "retention": retention(r.score, full.score,
                                                                        higher_is_better=task.higher_is_better)})
            results.append(r)
        if bar is not None:
            progress.update(bar, advance=1)
    i = max(range(len(candidates)), key=lambda j: -1e9 if candidates[j]["retention"] is None else candidates[j]["retention"])
    return {"full": full.to_dict(), "candidates": candidates, "best": candidates[i], "best_result": results[i]}


def run_attack(model, tokenizer, cfg: AttackConfig, *, progress: Any = None, job_dir: str | Path | None = None,
               scratch: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole attack on ``model`` (left unchanged). ``scratch``: a from-scratch baseline
    already run for the same task, keep and labels (defend-eval shares one across models)."""
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.prune import prune_model
    from moeguard.realign.strategies.base import get_strategy
    from moeguard.realign.strategies.orphan import orphan_shares

    started = time.perf_counter()
    task = get_task(cfg.task)
    adapter = MoEAdapter(model)
    preflight(cfg, adapter.num_experts, adapter.family.min_experts, len(adapter.layers))
    pick = attribute_and_prune(model, tokenizer, cfg, progress=progress)
    full, base = pick["full"]["score"], (pick["full"].get("baseline") or {}).get("score")
    keep = {int(k): v for k, v in pick["best"]["keep"].items()}
    pruned, record = prune_model(model, keep)
    initial = pick["best_result"]
    job_dir = Path(job_dir) if job_dir is not None else None
    shares = None
    if any(get_strategy(s, task).needs_original for s in cfg.strategies):
        shares = orphan_shares(model, tokenizer, task, keep, adapter.num_experts)
    runs = []
    grid = cfg.grid()
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    bar = progress.add_task("attacker: re-alignment grid", total=len(grid) * len(seeds) * len(cfg.strategies)) \
        if progress is not None else None
    for seed in seeds:
        pool = label_pool(task, pool_size=cfg.pool_size, budget=cfg.budget, seed=seed)
        for strategy in cfg.strategies:
            for g in grid:
                runs.append(_run_cell(pruned, tokenizer, task, cfg, strategy, g, seed, pool,
                                      (lambda p=pool: shares(p)) if shares else None, full, initial, job_dir, "attack"))
                if bar is not None:
                    progress.update(bar, advance=1)
    del pruned
    if cfg.scratch and scratch is None:
        scratch = run_scratch(model, tokenizer, cfg, progress=progress, job_dir=job_dir)
    doc = {
        "schema": SCHEMA, "task": task.name, "kind": task.kind.value, "metric": task.primary_metric,
        "higher_is_better": task.higher_is_better, "keep": cfg.keep, "budget": cfg.budget,
        "full": pick["full"], "baseline_score": base,
        "attribution": {"candidates": pick["candidates"], "best": pick["best"]},
        "pruned": initial.to_dict(), "record": record, "settings": cfg.to_dict(), "runs": runs,
    }
    doc["worst_case"] = envelope(runs, task.higher_is_better, full, base)
    doc["scratch"] = None
    if scratch is not None:
        doc["scratch"] = {**scratch, "best": envelope(scratch["runs"], task.higher_is_better, full, base)}
    doc["summary"] = summarize_attack(doc, target=cfg.target)
    doc["seconds"] = round(time.perf_counter() - started, 1)
    return doc


def run_scratch(model, tokenizer, cfg: AttackConfig, *, progress: Any = None, job_dir: Path | None = None) -> dict[str, Any]:
    """The pruned-size architecture from random initialization, trained on the random strategy's
    labels with the ``full``-mode part of the grid; raw scores (retention is per model)."""
    from transformers import AutoModelForCausalLM

    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.prune import prune_model

    task = get_task(cfg.task)
    uniform = {l.index: list(range(cfg.keep)) for l in MoEAdapter(model).layers}  # the shape, not which experts
    shaped, _ = prune_model(model, uniform)
    grid = dataclasses.replace(cfg, modes=("full",)).grid()
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    runs = []
    bar = progress.add_task("from-scratch baseline", total=len(grid) * len(seeds)) if progress is not None else None
    from moeguard.tasks.evaluate import evaluate_task

    for seed in seeds:
        torch.manual_seed(10_000 + seed)
        fresh = AutoModelForCausalLM.from_config(shaped.config).train()
        pool = label_pool(task, pool_size=cfg.pool_size, budget=cfg.budget, seed=seed)
        initial = evaluate_task(fresh, tokenizer, task, limit=cfg.eval_limit, batch_size=32, baseline=False)
        for g in grid:
            runs.append(_run_cell(fresh, tokenizer, task, cfg, "random", g, seed, pool, None, None, initial, job_dir,
                                  "scratch"))
            if bar is not None:
                progress.update(bar, advance=1)
    return {"architecture": {"num_experts": cfg.keep, "layers": len(uniform),
                             "parameters": sum(p.numel() for p in shaped.parameters())}, "runs": runs}


def _run_cell(model, tokenizer, task, cfg, strategy, g, seed, pool, orphan, full, initial, job_dir, kind) -> dict[str, Any]:
    ft = FinetuneConfig(mode=g["mode"], lr=g["lr"], epochs=g["epochs"], seed=seed)
    al = ALConfig(strategy=strategy, schedule=cfg.schedule, pool_size=cfg.pool_size, eval_limit=cfg.eval_limit,
                  seed=seed, finetune=ft)
    name = f"{kind}-{strategy}-{g['mode']}-lr{g['lr']:.0e}-ep{g['epochs']:g}-seed{seed}.json"
    settings = {"kind": kind, "task": task.name, "keep": cfg.keep, "samples": cfg.samples, "plans": list(cfg.plans),
                "methods": list(cfg.methods), "job": al.to_dict()}
    cell = {"kind": kind, "strategy": strategy, "seed": seed, **g}
    try:
        curve = cached_curve(model, tokenizer, task, al, settings=settings,
                             path=job_dir / name if job_dir is not None else None, pool=pool, orphan_share=orphan,
                             full_score=full, initial=initial, progress=None)
    except TrainingDiverged as e:  # a setting that blows up is one the attacker would not use
        return {**cell, "diverged": e.one_line(), "points": []}
    return {**cell, "points": [{"labels": p["labels"], "score": p["score"]} for p in curve["points"]]}


def envelope(runs: list[dict[str, Any]], higher_is_better: bool, full: float, base: float | None) -> dict[str, Any]:
    """Per label count, the best score over every run (max, or min for perplexity) and the run that got it."""
    by: dict[int, list[tuple[float, int]]] = {}
    for i, r in enumerate(runs):
        for p in r["points"]:
            if p["score"] is not None and np.isfinite(p["score"]):
                by.setdefault(p["labels"], []).append((p["score"], i))
    labels = sorted(by)
    pick = max if higher_is_better else min
    best = [pick(by[x]) for x in labels]
    scores = [b[0] for b in best]
    return {"labels": labels, "score": scores,
            "retention": [retention(s, full, higher_is_better=higher_is_better) for s in scores],
            "above_baseline": [above_baseline(s, full, base, higher_is_better=higher_is_better) for s in scores],
            "argbest": [{k: runs[b[1]][k] for k in ("strategy", "mode", "lr", "epochs", "seed")} for b in best]}


def summarize_attack(doc: dict[str, Any], *, target: float) -> dict[str, Any]:
    w = doc["worst_case"]
    at = lambda env, x: env["retention"][env["labels"].index(x)] if env and x in env["labels"] else None  # noqa: E731
    s = {
        "pruned_retention": doc["attribution"]["best"]["retention"],
        "realigned_retention": at(w, doc["budget"]),
        "realigned_above_baseline": w["above_baseline"][-1] if w["labels"] and w["labels"][-1] == doc["budget"] else None,
        "labels_to_target": labels_to_target(w["labels"], w["retention"], target),
        "target": target,
        "auc": curve_auc(w["labels"], w["retention"]),
        "diverged_runs": sum(1 for r in doc["runs"] if r.get("diverged")),
    }
    sc = doc.get("scratch")
    if sc:
        b = sc["best"]
        s["scratch_retention"] = at(b, doc["budget"])
        s["scratch_auc"] = curve_auc(b["labels"], b["retention"])
        s["scratch_labels_to_target"] = labels_to_target(b["labels"], b["retention"], target)
        # the experts' worth to the attacker: mean retention gained over training from scratch
        s["area_between"] = None if s["auc"] is None or s["scratch_auc"] is None else s["auc"] - s["scratch_auc"]
        common = [x for x in w["labels"] if x in b["labels"] and x > 0]
        s["no_better_than_scratch"] = all(at(w, x) <= at(b, x) + 1e-9 for x in common) if common else None
    return s
