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

Phases of the study: ``pick`` (one job: attribution, every candidate plan scored by masking),
then ``grid`` (one job per attacker cell and per from-scratch cell, on any backend); ``reduce``
takes the envelope and adds, beside each derived number, its spread over seeds and a bootstrap
95% interval (each seed's own worst case over the grid, seeds resampled).
"""

from __future__ import annotations

import json

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from moeguard.analysis import retention
from moeguard.config import SEED_MAX, setting, validate
from moeguard.errors import MoeguardError
from moeguard.realign.engine import FinetuneConfig, TrainingDiverged
from moeguard.realign.loop import ALConfig, check_schedule, label_pool
from moeguard.studies import Phase
from moeguard.studies.attacksummary import attack_detectability, attack_uncertainty, envelope, summarize_attack
from moeguard.studies.engine import Job
from moeguard.tasks.registry import get_task

SCHEMA = "moeguard.attack/1"


@dataclass(frozen=True, kw_only=True)
class AttackConfig:
    task: str = setting(help="task name or YAML path")
    keep: int = setting(min=1, help="experts per layer the attacker keeps")
    budget: int = setting(256, min=1, help="labels the attacker may use in total")
    budgets: tuple[int, ...] = setting((), min=1, help="learning-curve points (comma-separated, ending at --budget); "
                                                        "default: budget/64, /16, /4, budget")
    methods: tuple[str, ...] = setting((), help="attribution methods; default: every registered one")
    plans: tuple[str, ...] = setting(("uniform", "budgeted"), choices=("uniform", "budgeted"),
                                     help="pruning plans: uniform, budgeted")
    strategies: tuple[str, ...] = setting(("random",), help="active-learning strategies the attacker tries")
    # router: re-calibrating only the router rows, the cheapest recovery the literature reports after
    # either route (Router-KD, 2603.02217)
    modes: tuple[str, ...] = setting(("full", "lora", "router"), help="fine-tuning modes the attacker tries")
    lr_scales: tuple[float, ...] = setting((0.1, 1.0, 10.0), help="learning rates tried, as multiples of each mode's default")
    epochs: tuple[float, ...] = setting((4.0, 16.0), help="passes over the labels tried (the attacker's steps)")
    seeds: int = setting(3, min=1, help="seeds per setting (label draws and training)")
    seed: int = setting(0, min=0, max=SEED_MAX, help="random seed; the same seed gives the same numbers")
    samples: int = setting(64, min=1, help="attribution samples")
    pool_size: int = setting(1000, min=1, help="unlabeled pool: this many train records")
    eval_limit: int = setting(200, min=1, help="eval records per score")
    target: float = setting(95.0, help="percent of the full model's score the attacker aims at")
    scratch: bool = setting(True, negative="--no-scratch", help="run the from-scratch baseline")
    routes: tuple[str, ...] = setting(("prune",), choices=("prune", "merge"),
                                      help="compression routes the attacker tries: prune, merge or both; the worst "
                                           "case is the envelope over every route and the whole grid")
    merge_methods: tuple[str, ...] = setting(("router-weighted",),
                                             help="merge methods the attacker tries on the merge route")

    def __post_init__(self) -> None:
        validate(self)

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


def preflight(cfg: AttackConfig, model, *, budget_flag: str = "--budget") -> None:
    """Every setting checked before model work; ``model``: the resolved :class:`~moeguard.models.handle.ModelHandle`."""
    from moeguard.attribution.base import get_method
    from moeguard.realign.modes import get_mode
    from moeguard.realign.strategies.base import get_strategy

    task = get_task(cfg.task)
    # attribution scores one count per layer: refused in the pick job after the full model was scored
    model.check_uniform("the attack's attribution", hint="attack the model before it was budget-pruned")
    model.check_keep(cfg.keep)
    for m in cfg.methods:
        get_method(m)
    if not cfg.routes:
        raise MoeguardError("the attack has no route", hint="pass --routes prune, merge or prune,merge")
    if "merge" in cfg.routes:
        from moeguard.models.handle import check_merge_route
        from moeguard.pruning.merging.base import check_merge_methods

        check_merge_methods(cfg.merge_methods)
        # before the grid: a family with one module per expert failed at its first merge, after the
        # full evaluation, every attribution and every pruning plan (again at each resume)
        check_merge_route(model.family, True, flag="--routes prune")
    if not 0 < cfg.target <= 100:   # --target 0 reported 0 labels needed
        raise MoeguardError(f"the attack's target is {cfg.target}", hint="a percentage in (0, 100], e.g. 95")
    bad = [p for p in cfg.plans if p not in ("uniform", "budgeted")]
    if bad or not cfg.plans:
        raise MoeguardError(f"attack plans {list(cfg.plans)} are not known", hint="use uniform, budgeted or both")
    for s in cfg.strategies:
        get_strategy(s, task)
    for m in cfg.modes:
        get_mode(m)
    if not cfg.strategies or not cfg.modes or not cfg.lr_scales or not cfg.epochs:
        raise MoeguardError("the attacker grid is empty", hint="give at least one strategy, mode, lr scale and epochs")
    if any(s <= 0 for s in cfg.lr_scales) or any(e <= 0 for e in cfg.epochs):
        raise MoeguardError(f"lr scales {list(cfg.lr_scales)} / epochs {list(cfg.epochs)}", hint="use positive values")
    if cfg.seeds < 1:
        raise MoeguardError(f"the attack's seeds are {cfg.seeds}", hint="use at least 1 seed")
    check_schedule(cfg.schedule)
    if cfg.schedule[-1] != cfg.budget:
        raise MoeguardError(f"label budgets {list(cfg.schedule)} do not end at the attack's budget {cfg.budget}",
                            hint=f"end the budgets with {cfg.budget}")
    label_pool(task, pool_size=cfg.pool_size, budget=cfg.budget, seed=cfg.seed, budget_flag=budget_flag)


# --------------------------------------------------------------------------- jobs

def pick_job(ctx, *, task: str, keep: int, methods: list[str], plans: list[str], samples: int, eval_limit: int,
             seed: int, model: str | None = "", routes: tuple[str, ...] = ("prune",),
             merge_methods: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every method x plan kind, scored by masking; the attacker's pick is the best retention.
    ``best_result`` is that plan's eval result (masking scores what physical pruning scores).
    With the merge route, every method x merge method is merged and scored too, and ``picks``
    holds each route's best: the grid re-aligns both."""
    from moeguard.attribution.base import list_methods
    from moeguard.attribution.run import make_context, score
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.prune import pruned_config
    from moeguard.pruning.evaluate import MaskedEvaluator
    from moeguard.pruning.plan import plan_from_scores

    m, tok = ctx.model(model)
    t = get_task(task)
    adapter = MoEAdapter(m)
    ev = MaskedEvaluator(m, tok, adapter=adapter, keep=ctx.scratch_for("evaluations"))
    full = ev(t, None, limit=eval_limit, baseline=True)
    names = list(methods) or [x.name for x in list_methods()]
    c = make_context(m, tok, t, samples=samples, batch_size=8, seed=seed, keep=ctx.scratch_for("attribution"))
    candidates, results, all_scores = [], [], {}
    for name in names:
        s = all_scores[name] = score(c, name)
        for kind in (plans if "prune" in routes else ()):
            args = {"keep": keep} if kind == "uniform" else {"budget": keep * len(adapter.layers)}
            plan = plan_from_scores(s, min_keep=adapter.family.min_experts, **args)
            try:   # a plan the family cannot be cut to (DeepSeek's groups or one module per expert, kept
                pruned_config(adapter, plan.keep)   # unevenly) is no attacker's pick: said, never scored
            except MoeguardError as exc:
                candidates.append({"method": name, "plan": kind, "keep": {str(k): v for k, v in plan.keep.items()},
                                   "score": None, "retention": None, "unbuildable": exc.one_line()})
                results.append(None)
                continue
            r = ev(t, plan.keep, limit=eval_limit)
            candidates.append({"method": name, "plan": kind, "keep": {str(k): v for k, v in plan.keep.items()},
                               "score": r.score, "retention": retention(r.score, full.score,
                                                                        higher_is_better=t.higher_is_better)})
            results.append(r)
    if "merge" in routes:
        from moeguard.studies.merge_route import attack_candidates

        for cand, r in attack_candidates(m, tok, t, all_scores, keep=keep, merge_methods=merge_methods,
                                         samples=samples, eval_limit=eval_limit, seed=seed, full_score=full.score,
                                         kept=ctx.scratch_for("evaluations")):
            candidates.append(cand)
            results.append(r)
    value = lambda j: -1e9 if candidates[j]["retention"] is None else candidates[j]["retention"]  # noqa: E731
    built = [j for j, cand in enumerate(candidates) if "unbuildable" not in cand]
    pruning = [j for j, cand in enumerate(candidates) if cand.get("route", "prune") == "prune"]
    if "prune" in routes and not set(pruning) & set(built):   # (the merge route's picks needed one per route too)
        failed = sorted({candidates[j]["plan"] for j in pruning})
        others = [p for p in ("uniform", "budgeted") if p not in failed]
        raise MoeguardError(f"no pruning plan of the attack can be built on {m.config.model_type}: "
                            f"{candidates[pruning[0]]['unbuildable']}",
                            hint=f"attack with --plans {others[0]}" if others else
                            "attack with --routes merge, or another --keep")
    i = max(built, key=value)
    from moeguard.models.prune import pruning_record

    # the record (what was kept, the new shapes) is the document's; the cells prune their own copy (a full
    # pruned copy was built here only for its record)
    record = pruning_record(m, {int(k): v for k, v in candidates[i]["keep"].items()})
    out = {"full": full.to_dict(), "candidates": candidates, "best": candidates[i],
           "best_result": results[i].to_dict(), "record": record}
    if "merge" in routes:
        out["picks"] = {}
        for route in routes:
            mine = [j for j in built if candidates[j].get("route", "prune") == route]
            j = max(mine, key=value)
            out["picks"][route] = {"best": candidates[j], "result": results[j].to_dict()}
    return out


def cell_job(ctx, *, task: str, keep: dict[str, list[int]], strategy: str, grid: dict[str, Any], seed: int,
             schedule: list[int], pool_size: int, eval_limit: int, full: float, initial: dict[str, Any],
             model: str | None = "", merge: dict[str, Any] | None = None) -> dict[str, Any]:
    """One attacker setting: re-align the pruned (or, with ``merge``, the merged) model along the budgets."""
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.prune import prune_model
    from moeguard.realign.strategies.base import get_strategy
    from moeguard.realign.strategies.orphan import orphan_shares
    from moeguard.io import digest
    from moeguard.tasks.evaluate import TaskResult

    from moeguard.trace.api import tracer

    m, tok = ctx.model(model)
    t = get_task(task)
    plan = {int(l): list(v) for l, v in keep.items()}
    if merge is None:
        pruned = ctx.derived(("pruned", model, ctx.runtime.model, digest(keep)), lambda: prune_model(m, plan)[0])
    else:
        from moeguard.studies.merge_route import merged_from

        pruned = ctx.derived(("merged", model, ctx.runtime.model, digest(merge)), lambda: merged_from(m, merge))
    # the model attacked is the one the attacker stole from (base or hardened): its fingerprint
    after = tracer(m, tok, plan, key=json.dumps([model, ctx.runtime.model, ctx.runtime.dtype]), seed=seed, merge=merge)
    pool = label_pool(t, pool_size=pool_size, budget=schedule[-1], seed=seed)
    orphan = None
    if get_strategy(strategy, t).needs_original:
        shares = orphan_shares(m, tok, t, plan, MoEAdapter(m).num_experts)
        orphan = lambda: shares(pool)  # noqa: E731
    cell = _cell(pruned, tok, t, strategy, grid, seed, schedule, pool, pool_size, eval_limit, orphan, full,
                 TaskResult(**initial), "attack", after=after, rounds=ctx.scratch_for("rounds"))
    return cell if merge is None else {**cell, "route": "merge"}


def scratch_job(ctx, *, task: str, keep: int, grid: dict[str, Any], seed: int, schedule: list[int], pool_size: int,
                eval_limit: int) -> dict[str, Any]:
    """One from-scratch setting: the pruned-size architecture from random initialization (seeded
    by ``10000 + seed``, the same for every cell of a seed), trained on the random strategy's labels."""
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.loading import model_class
    from moeguard.models.loading import release_memory
    from moeguard.models.prune import placed_like, prune_model, spread
    from moeguard.models.upstream import repair
    from moeguard.tasks.evaluate import evaluate_task

    m, tok = ctx.model()
    t = get_task(task)

    def make():
        uniform = {l.index: list(range(keep)) for l in MoEAdapter(m).layers}  # the shape, not which experts
        shaped, _ = prune_model(m, uniform)
        config, params, multi = shaped.config, sum(p.numel() for p in shaped.parameters()), spread(shaped)
        del shaped   # only its shape is needed: not held on the GPUs beside the fresh model
        if multi:
            release_memory()
        torch.manual_seed(10_000 + seed)
        fresh = model_class(config).from_config(config).train()
        repair(fresh)   # transformers' modules that do not compute their model (models/upstream.py)
        fresh = placed_like(fresh, m)   # initialized on the CPU (seeded as before), trained where the model is
        initial = evaluate_task(fresh, tok, t, limit=eval_limit, batch_size=32, baseline=False)
        return fresh, initial, params, len(uniform)

    fresh, initial, params, layers = ctx.derived(("scratch", ctx.runtime.model, task, keep, seed, eval_limit), make)
    pool = label_pool(t, pool_size=pool_size, budget=schedule[-1], seed=seed)
    cell = _cell(fresh, tok, t, "random", grid, seed, schedule, pool, pool_size, eval_limit, None, None, initial,
                 "scratch", rounds=ctx.scratch_for("rounds"))
    return {**cell, "architecture": {"num_experts": keep, "layers": layers, "parameters": params}}


def _cell(model, tok, task, strategy, g, seed, schedule, pool, pool_size, eval_limit, orphan, full, initial, kind,
          after=None, rounds=None):
    """``after(stolen)``: what to record of the cell's last model (the attack cells trace it);
    ``rounds``: a folder for the finished rounds (``run_active_learning``'s ``state_dir``)."""
    from moeguard.realign.loop import run_active_learning

    ft = FinetuneConfig(mode=g["mode"], lr=g["lr"], epochs=g["epochs"], seed=seed)
    al = ALConfig(strategy=strategy, schedule=tuple(schedule), pool_size=pool_size, eval_limit=eval_limit,
                  seed=seed, finetune=ft)
    cell = {"kind": kind, "strategy": strategy, "seed": seed, **g}
    try:
        torch.manual_seed(al.seed)
        curve, _ = run_active_learning(model, tok, task, al, pool=pool, orphan_share=orphan, full_score=full,
                                       initial=initial, after=after, state_dir=rounds)
    except TrainingDiverged as e:  # a setting that blows up is one the attacker would not use
        return {**cell, "diverged": e.one_line(), "points": []}
    out = {**cell, "points": [{"labels": p["labels"], "score": p["score"]} for p in curve["points"]]}
    if "after" in curve:
        out["after"] = curve["after"]
    return out


# --------------------------------------------------------------------------- the study

def pick_phase_job(cfg: AttackConfig, *, model: str | None = "", who: str = "") -> Job:
    # a prune-only attack keeps its job's arguments (and so its cache key) as before the merge route
    routes = {} if "merge" not in cfg.routes else {"routes": list(cfg.routes), "merge_methods": list(cfg.merge_methods)}
    from moeguard.attribution.base import list_methods

    # the methods by name, never "all": a newly registered method changes the job's key, so a cached
    # pick made without it is not reused
    methods = list(cfg.methods) or [x.name for x in list_methods()]
    return Job(stage="attack", name=f"{who}{cfg.task} keep {cfg.keep}: attribution and pruning",
               fn="moeguard.studies.attack:pick_job",
               args={"task": cfg.task, "keep": cfg.keep, "methods": methods, "plans": list(cfg.plans),
                     "samples": cfg.samples, "eval_limit": cfg.eval_limit, "seed": cfg.seed, "model": model, **routes})


def grid_jobs(cfg: AttackConfig, pick: dict[str, Any], *, model: str | None = "", who: str = "") -> list[Job]:
    """The attacker's cells: for each route's pick, seed, strategy and (mode, lr, epochs)."""
    full = pick["full"]["score"]
    picks = pick.get("picks") or {"prune": {"best": pick["best"], "result": pick["best_result"]}}
    jobs = []
    for route, p in picks.items():
        extra = {} if route == "prune" else {"merge": p["best"]["merge"]}
        tag = "" if route == "prune" else "merge: "
        jobs += [Job(stage="attack", name=f"{who}{tag}{cfg.task} {s} {g['mode']} lr {g['lr']:.0e} ep {g['epochs']:g} seed {seed}",
                     fn="moeguard.studies.attack:cell_job",
                     args={"task": cfg.task, "keep": p["best"]["keep"], "strategy": s, "grid": g, "seed": seed,
                           "schedule": list(cfg.schedule), "pool_size": cfg.pool_size, "eval_limit": cfg.eval_limit,
                           "full": full, "initial": p["result"], "model": model, **extra})
                 for seed in _seeds(cfg) for s in cfg.strategies for g in cfg.grid()]
    return jobs


def scratch_jobs(cfg: AttackConfig) -> list[Job]:
    grid = dataclasses.replace(cfg, modes=("full",)).grid()
    return [Job(stage="scratch", name=f"{cfg.task} keep {cfg.keep} {g['mode']} lr {g['lr']:.0e} ep {g['epochs']:g} seed {seed}",
                fn="moeguard.studies.attack:scratch_job",
                args={"task": cfg.task, "keep": cfg.keep, "grid": g, "seed": seed, "schedule": list(cfg.schedule),
                      "pool_size": cfg.pool_size, "eval_limit": cfg.eval_limit})
            for seed in _seeds(cfg) for g in grid]


def _seeds(cfg: AttackConfig) -> list[int]:
    from moeguard.config import run_seeds

    return run_seeds(cfg.seed, cfg.seeds)


class AttackStudy:
    name = "attack"
    schema = SCHEMA

    def plan(self, cfg: AttackConfig):
        pick = (yield Phase("pick", [pick_phase_job(cfg)], label="attacker: attribution and pruning"))[0]
        yield Phase("grid", grid_jobs(cfg, pick), label="attacker: re-alignment grid")
        if cfg.scratch:
            yield Phase("scratch", scratch_jobs(cfg), label="from-scratch baseline")

    def reduce(self, cfg: AttackConfig, results: dict[str, list]) -> dict[str, Any]:
        return attack_doc(cfg, results["pick"][0], results["grid"], results.get("scratch"))


def attack_doc(cfg: AttackConfig, pick: dict[str, Any], runs: list[dict[str, Any]],
               scratch_runs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The attack document from the pick, the attacker's cells and (optionally) the scratch cells."""
    task = get_task(cfg.task)
    full, base = pick["full"]["score"], (pick["full"].get("baseline") or {}).get("score")
    doc = {
        "schema": SCHEMA, "task": task.name, "kind": task.kind.value, "metric": task.primary_metric,
        "higher_is_better": task.higher_is_better, "keep": cfg.keep, "budget": cfg.budget,
        "full": pick["full"], "baseline_score": base,
        # the methods the pick ran, by name: settings hold the user's list, empty for "every one"
        "attribution": {"methods": list(dict.fromkeys(c["method"] for c in pick["candidates"])),
                        "candidates": pick["candidates"], "best": pick["best"]},
        "pruned": pick["best_result"], "record": pick["record"], "settings": cfg.to_dict(), "runs": runs,
    }
    doc["worst_case"] = envelope(runs, task.higher_is_better, full, base)
    if pick.get("picks"):   # each route's pick and its own envelope; the worst case above is over both
        doc["routes"] = {route: {"pick": p["best"], "worst_case": envelope(
            [r for r in runs if r.get("route", "prune") == route], task.higher_is_better, full, base)}
            for route, p in pick["picks"].items()}
    doc["scratch"] = None
    if scratch_runs is not None:
        arch = scratch_runs[0]["architecture"] if scratch_runs else None
        sruns = [{k: v for k, v in r.items() if k != "architecture"} for r in scratch_runs]
        doc["scratch"] = {"architecture": arch, "runs": sruns,
                          "best": envelope(sruns, task.higher_is_better, full, base)}
    doc["detectability"] = attack_detectability(runs, task.higher_is_better)
    doc["summary"] = summarize_attack(doc, target=cfg.target)
    if "routes" in doc:
        s = doc["summary"]
        at = {route: v["worst_case"]["retention"][v["worst_case"]["labels"].index(cfg.budget)]
              if cfg.budget in v["worst_case"]["labels"] else None for route, v in doc["routes"].items()}
        s["realigned_retention_by_route"] = at
        known = {r: v for r, v in at.items() if v is not None}
        s["stronger_route"] = max(known, key=known.get) if known else None
    doc["summary"]["uncertainty"] = attack_uncertainty(doc, target=cfg.target, seed=cfg.seed)
    return doc
