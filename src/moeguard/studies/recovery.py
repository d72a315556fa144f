"""The recovery study: how many labels does an attacker need to get a pruned task back?

Phases:

1. ``prepare`` (one job): the full model's score, attribution with one method, the pruning
   plan (``keep`` experts per layer), the pruned model's score and size. Skipped parts when the
   caller already has them (the audit passes its own plan, scores and full score). With
   ``route="merge"`` the model is *merged* down to ``keep`` experts per layer instead (centres by
   the method's scores, ``merge_method``; calibrated on the task as the attack harness's merge
   route is) and the merge plan (clusters and weights) is recorded, so every curve rebuilds
   exactly the model that was scored.
2. ``curves``: one job per (seed, strategy), the active-learning loop over the budget grid on
   the pruned (or merged) model.

``reduce``: per strategy the mean learning curve with its spread, labels-to-target, savings
against ``random`` and the area under the curve, each with its spread over seeds and a
bootstrap 95% interval (seeds resampled, paired: a strategy and random share each seed's pool).
A strategy *saves labels* only when its savings interval lies above zero.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from moeguard.config import SEED_MAX, setting, validate
from moeguard.errors import MoeguardError
from moeguard.realign.engine import FinetuneConfig
from moeguard.studies import Phase
from moeguard.studies.engine import Job
from moeguard.studies.recoverysummary import summarize

SCHEMA = "moeguard.recovery/2"
DEFAULT_METHOD = "ablation"  # best mean AUC of the knowledge-loss study (benchmarks/results/knowledge_loss.json)


@dataclass(frozen=True, kw_only=True)
class RecoveryConfig:
    task: str = setting(help="task name or YAML path")  # a name once resolved at the edge
    keep: int = setting(min=1, help="experts kept per layer")
    strategies: tuple[str, ...] = setting(("random", "orphan"),
                                          help="comma-separated strategies; random is added as the baseline")
    budgets: tuple[int, ...] = setting((4, 8, 16, 32, 64, 128, 256), min=1, help="label counts on the learning curve")
    seeds: int = setting(3, min=1, help="runs per strategy (seeds --seed, --seed+1, ...)")
    seed: int = setting(0, min=0, max=SEED_MAX, help="random seed; the same seed gives the same numbers")
    method: str = setting(DEFAULT_METHOD, help="attribution method; default: the best for the task in --sweep, "
                                               "else ablation")
    samples: int = setting(64, min=1, help="attribution samples")
    pool_size: int = setting(1000, min=1, help="unlabeled pool: this many train records")
    eval_limit: int = setting(200, min=1, help="eval records scored per round")
    target: float = setting(95.0, help="percent of the full model's score to reach")
    route: str = setting("prune", choices=("prune", "merge"),
                         help="the compression re-aligned: prune (drop experts) or merge (fold each layer's experts "
                              "into --keep, by --merge-method)")
    merge_method: str = setting("router-weighted", help="merge method of the merge route (moeguard merge-methods)")
    finetune: FinetuneConfig = setting(factory=FinetuneConfig, cli=False, help="how each round fine-tunes")
    # off under a memory cap, where tracing cannot run; a job argument, so capped curves (untraced)
    # are never taken for uncapped ones from a shared job cache (their keys leave the cap out)
    traced: bool = setting(True, cli=False, help="trace the re-aligned models")
    # what the caller already knows (the audit): the plan {layer: experts} and the full score
    given_plan: dict[str, list[int]] | None = setting(None, cli=False, help="a plan chosen by the caller")
    given_full: float | None = setting(None, cli=False, help="the full model's score, known to the caller")
    given_scores: dict[str, Any] | None = setting(None, cli=False,
                                                  help="the method's attribution scores (Scores.to_dict), known to "
                                                       "the caller: the merge route's centres")

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        d = {**dataclasses.asdict(self), "strategies": list(self.strategies), "budgets": list(self.budgets),
             "finetune": self.finetune.to_dict()}
        for k in ("given_plan", "given_full"):  # not settings of the study, inputs from its caller
            if d[k] is None:
                d.pop(k)
        d.pop("given_scores")            # an input (L x E numbers), not a setting: kept out of the document
        if self.traced:                  # a traced study's document (and its jobs' keys) as before the setting
            d.pop("traced")
        if self.route == "prune":        # a pruning study's document (and its jobs' keys) as before the merge route
            d.pop("route"), d.pop("merge_method")
        return d


def best_method(sweep: dict[str, Any], task: str, *, model: Any = None) -> str:
    """The method with the highest deletion-curve AUC for ``task`` in a sweep document; with
    ``model`` (a ModelRef), a sweep whose run record names another model is refused (its ranking is
    that model's). The names are compared as paths too: './ckpt' and 'ckpt' are one model, and a
    relative name typed in another folder is not this one."""
    every = sweep.get("faithfulness") if isinstance(sweep, dict) else None
    if not isinstance(every, dict):
        raise MoeguardError("the sweep document has no 'faithfulness' map", hint="pass the sweep.json of `moeguard sweep`")
    run = sweep.get("run")
    swept = run.get("settings", {}).get("model") if isinstance(run, dict) and isinstance(run.get("settings"), dict) else None
    if model is not None and swept is not None and not model.answers_to(str(swept)):
        raise MoeguardError(f"the sweep ranks methods on model '{swept}'; this study is on '{model.name}'",
                            hint="pass the sweep of this model, or --method")
    faith = every.get(task)
    if not faith or not isinstance(faith, dict):
        raise MoeguardError(f"the sweep has no results for task '{task}' (it has {sorted(map(str, every))})",
                            hint="run the sweep on this task, or pass --method")
    ranked = sorted(((float(v["auc"]), m) for m, v in faith.items() if m != "random" and isinstance(v, dict)
                     and isinstance(v.get("auc"), (int, float)) and not isinstance(v.get("auc"), bool)
                     and math.isfinite(v["auc"])), reverse=True)
    if not ranked:
        raise MoeguardError(f"the sweep has no method AUCs for task '{task}'", hint="pass --method")
    return ranked[0][1]


def preflight(cfg: RecoveryConfig, model) -> None:
    """Everything that can be wrong with the settings, checked before any model work.
    ``model``: the resolved :class:`~moeguard.models.handle.ModelHandle`."""
    from moeguard.attribution.base import check_method_runs, get_method
    from moeguard.models.handle import check_merge_route
    from moeguard.realign.loop import check_schedule, label_pool
    from moeguard.realign.strategies.base import get_strategy
    from moeguard.tasks.registry import get_task

    task = get_task(cfg.task)
    # attribution scores one count per layer: refused in the prepare job after the full model was scored
    model.check_uniform("the recovery study's attribution", hint="study the model before it was budget-pruned")
    check_method_runs(get_method(cfg.method), model.family)
    check_merge_route(model.family, cfg.route == "merge")
    check_schedule(cfg.budgets)
    model.check_keep(cfg.keep)
    if cfg.seeds < 1:
        raise MoeguardError(f"the recovery study's seeds are {cfg.seeds}", hint="use at least 1 seed")
    if not cfg.strategies:
        raise MoeguardError("no strategies given", hint="e.g. random,orphan")
    if "random" not in cfg.strategies:
        raise MoeguardError(f"strategies {list(cfg.strategies)} lack 'random', the baseline every strategy is "
                            "compared with", hint="add random")
    for s in cfg.strategies:
        get_strategy(s, task)
    if not 0 < cfg.target <= 100:
        raise MoeguardError(f"the target is {cfg.target}", hint="a percentage in (0, 100]")
    if cfg.route == "merge":
        from moeguard.pruning.merging.base import check_merge_methods

        check_merge_methods((cfg.merge_method,))
        if cfg.given_plan is not None:
            raise MoeguardError("the merge route builds its own merge plan; a given pruning plan does not apply",
                                hint="pass given_scores (the method's scores) instead")
    label_pool(task, pool_size=cfg.pool_size, budget=cfg.budgets[-1], seed=cfg.seed, budget_flag="--budgets")


def check_capped(max_memory: str, *, mode: str, merge: bool = False, mode_flag: str = "--mode", otherwise: str = "") -> None:
    """Recovery under a memory cap (``max_memory`` as the user wrote it) trains LoRA adapters over
    offloaded weights on the pruning route; the rest refuses here, before any work."""
    from moeguard.realign.modes import MODES, get_mode

    if not get_mode(mode).adapters:
        # full, router and experts train base weights, which accelerate cannot update on disk
        with_adapters = " or ".join(n for n in MODES.names() if get_mode(n).adapters)
        raise MoeguardError(f"max_memory {max_memory} is set with recovery mode '{mode}', which trains weights that "
                            "are offloaded to disk",
                            hint=f"use {mode_flag} {with_adapters} (its adapters train in memory){otherwise}")
    if merge:
        raise MoeguardError(f"max_memory {max_memory} is set with recovery on the merge route, which merges the "
                            "model in memory", hint=f"use --route prune{otherwise}")


# --------------------------------------------------------------------------- jobs

def prepare_job(ctx, *, task: str, keep: int, method: str, samples: int, eval_limit: int, seed: int,
                plan: dict[str, list[int]] | None = None, full: float | None = None,
                merge_method: str | None = None, scores: dict[str, Any] | None = None) -> dict[str, Any]:
    """Full score, attribution and plan (unless given), the pruned model's score and size. With
    ``merge_method``: the merged model's instead, and its merge plan (``plan.merge``)."""
    from moeguard.attribution.run import make_context, score
    from moeguard.models.adapter import MoEAdapter
    from moeguard.pruning.plan import plan_from_scores
    from moeguard.studies.sweep import reduction
    from moeguard.tasks.evaluate import evaluate_task
    from moeguard.tasks.registry import get_task

    model, tok = ctx.model()
    t = get_task(task)
    adapter = MoEAdapter(model)
    full_result = None
    if full is None:
        full_result = evaluate_task(model, tok, t, limit=eval_limit, batch_size=32).to_dict()
        full = full_result["score"]
    if merge_method is not None:
        _refuse_merge_offloaded(model)
        return _prepare_merged(model, tok, t, adapter, keep=keep, method=method, samples=samples, eval_limit=eval_limit,
                               seed=seed, full=full, full_result=full_result, merge_method=merge_method, scores=scores,
                               kept=ctx.scratch_for("attribution"), evaluations=ctx.scratch_for("evaluations"))
    if plan is None:
        c = make_context(model, tok, t, samples=samples, batch_size=8, seed=seed, keep=ctx.scratch_for("attribution"))
        p = plan_from_scores(score(c, method), keep=keep, min_keep=adapter.family.min_experts)
        plan_doc = p.to_dict()
        keep_map = p.keep
    else:
        keep_map = {int(l): list(v) for l, v in plan.items()}
        plan_doc = {"keep": {str(l): v for l, v in keep_map.items()}, "rule": "given"}
    pruned, record = pruned_copy(ctx, model, keep_map)
    initial = evaluate_task(pruned, tok, t, limit=eval_limit, batch_size=32, baseline=False)
    if record.get("method") == "streaming":   # under a cap: its folders go before the curves write theirs
        import gc

        del pruned
        gc.collect()   # accelerate's hooks keep the model in reference cycles
    return {"full": full_result, "full_score": full, "plan": plan_doc, "record": record,
            "reduction": reduction(adapter, keep_map), "initial": initial.to_dict()}


def _prepare_merged(model, tok, t, adapter, *, keep: int, method: str, samples: int, eval_limit: int, seed: int,
                    full: float, full_result, merge_method: str, scores: dict[str, Any] | None,
                    kept=None, evaluations=None) -> dict[str, Any]:
    """The merge route's prepare: the attack harness's merge candidate for one method and merge
    method (the same calibration and merge), so the study re-aligns what that route would."""
    from moeguard.attribution.base import Scores
    from moeguard.attribution.run import make_context, score
    from moeguard.studies.merge_route import attack_candidates
    from moeguard.studies.sweep import reduction

    s = Scores.from_dict(scores) if scores is not None else score(
        make_context(model, tok, t, samples=samples, batch_size=8, seed=seed, keep=kept), method)
    [(cand, result)] = attack_candidates(model, tok, t, {method: s}, keep=keep, merge_methods=(merge_method,),
                                         samples=samples, eval_limit=eval_limit, seed=seed, full_score=full,
                                         kept=evaluations)
    keep_map = {int(l): list(v) for l, v in cand["keep"].items()}
    return {"full": full_result, "full_score": full,
            "plan": {"keep": {str(l): v for l, v in keep_map.items()}, "rule": "merge", "merge_method": merge_method,
                     "merge": cand["merge"]},
            # what the merged checkpoint keeps: each layer's centres, each the average of its cluster
            "record": {"route": "merge", "merge_method": merge_method, "centres": cand["keep"],
                       "clusters": cand["merge"]["clusters"]},
            "reduction": reduction(adapter, keep_map), "initial": result.to_dict()}


def curve_job(ctx, *, task: str, keep: dict[str, list[int]], strategy: str, seed: int, budgets: list[int],
              pool_size: int, eval_limit: int, full_score: float | None, finetune: dict[str, Any],
              initial: dict[str, Any] | None = None, merge: dict[str, Any] | None = None,
              traced: bool = True) -> dict[str, Any]:
    """One active-learning re-alignment of ``task`` on the model pruned to ``keep`` (with ``merge``:
    merged by that plan, ``keep`` its centres)."""
    from moeguard.models.adapter import MoEAdapter
    from moeguard.realign.loop import ALConfig, label_pool, run_active_learning
    from moeguard.realign.offload import offloaded
    from moeguard.realign.strategies.base import get_strategy
    from moeguard.realign.strategies.orphan import orphan_shares
    from moeguard.io import digest
    from moeguard.tasks.evaluate import TaskResult
    from moeguard.tasks.registry import get_task
    from moeguard.trace.api import tracer

    model, tok = ctx.model()
    plan = {int(l): list(v) for l, v in keep.items()}
    if merge is None:
        pruned = ctx.derived(("pruned", ctx.runtime.model, digest(keep)), lambda: pruned_copy(ctx, model, plan)[0])
    else:
        from moeguard.studies.merge_route import merged_from

        _refuse_merge_offloaded(model)
        pruned = ctx.derived(("merged", ctx.runtime.model, digest(merge)), lambda: merged_from(model, merge))
    t = get_task(task)
    ft = FinetuneConfig(**{**finetune, "seed": seed, "only": tuple(finetune.get("only", ()))})
    al = ALConfig(strategy=strategy, schedule=tuple(budgets), pool_size=pool_size, eval_limit=eval_limit, seed=seed,
                  finetune=ft)
    pool = label_pool(t, pool_size=pool_size, budget=budgets[-1], seed=seed)
    share = None
    if get_strategy(strategy, t).needs_original:
        # merged: the experts folded into a centre count as dropped (their own output is gone)
        shares = orphan_shares(model, tok, t, plan, MoEAdapter(model).num_experts)
        share = lambda: shares(pool)  # noqa: E731
    start = TaskResult(**initial) if initial is not None else None
    # a fingerprint reads every expert's weights, and tracing the re-aligned model would fold its
    # adapters into base weights that are on disk: under a cap the curves are not traced
    traced = traced and not offloaded(model)
    after = tracer(model, tok, plan, key=json.dumps([ctx.runtime.model, ctx.runtime.dtype]), seed=seed,
                   merge=merge) if traced else None
    from moeguard.realign.engine import TrainingDiverged

    try:
        curve, _ = run_active_learning(pruned, tok, t, al, pool=pool, orphan_share=share, full_score=full_score,
                                       initial=start, after=after, state_dir=ctx.scratch_for("rounds"))
    except TrainingDiverged as e:   # its hint named --mode, which the audit calls --recovery-mode
        lora = "" if ft.mode == "lora" else (" or fine-tune LoRA adapters (`moeguard recovery --mode lora`; in an "
                                              "audit, --recovery-mode lora)")
        raise TrainingDiverged(f"recovery of {task} ({strategy}, seed {seed}, {ft.mode} fine-tuning): {e.message}",
                               hint=f"lower the learning rate (now {ft.learning_rate:g}: `moeguard recovery --lr`)"
                                    + lora) from None
    if not traced:
        curve["after"] = {"trace": None, "trace_skipped": CAPPED_TRACE}
    return curve


CAPPED_TRACE = ("the model is offloaded (max_memory): tracing reads every expert's weights and would fold "
                "the adapters into weights on disk")


def pruned_copy(ctx, model, plan: dict[int, list[int]]):
    """``(pruned model, record)``: ``model`` sliced in memory, or, when its weights are offloaded
    (a memory cap), the checkpoint pruned by streaming surgery and loaded under the same cap
    (:mod:`moeguard.pruning.capped`)."""
    from moeguard.realign.offload import offloaded

    if not offloaded(model):
        from moeguard.models.prune import prune_model

        return prune_model(model, plan)
    import torch

    from moeguard.pruning.capped import pruned_under_cap

    rt = ctx.runtime
    return pruned_under_cap(rt.model, plan, max_memory=rt.max_memory, device_map=rt.device_map,
                            dtype=getattr(torch, rt.dtype) if rt.dtype else None)


def _refuse_merge_offloaded(model) -> None:
    from moeguard.realign.offload import offloaded

    if offloaded(model):
        raise MoeguardError("the merge route's recovery merges the model in memory, and its weights are offloaded "
                            "(max_memory)", hint="re-align the pruning route under a cap (route prune), or run "
                                                 "the merge route where the model fits")


# --------------------------------------------------------------------------- the study

class RecoveryStudy:
    name = "recovery"
    schema = SCHEMA

    def plan(self, cfg: RecoveryConfig):
        merged = cfg.route == "merge"
        # a pruning study's job arguments (and so their cache keys) are as before the merge route
        route_args = {"merge_method": cfg.merge_method, "scores": cfg.given_scores} if merged else {}
        tag = " merge" if merged else ""
        prep = (yield Phase("prepare", [Job(
            stage="recovery", name=f"{cfg.task}{tag} prepare", fn="moeguard.studies.recovery:prepare_job",
            args={"task": cfg.task, "keep": cfg.keep, "method": cfg.method, "samples": cfg.samples,
                  "eval_limit": cfg.eval_limit, "seed": cfg.seed, "plan": cfg.given_plan, "full": cfg.given_full,
                  **route_args})],
            label=f"recovery {cfg.task}: {cfg.route}"))[0]
        finetune = cfg.finetune.to_dict()
        merge = {"merge": prep["plan"]["merge"]} if merged else {}
        jobs = [Job(stage="recovery", name=f"{cfg.task}{tag} {s} seed {seed}", fn="moeguard.studies.recovery:curve_job",
                    args={"task": cfg.task, "keep": prep["plan"]["keep"], "strategy": s, "seed": seed,
                          "budgets": list(cfg.budgets), "pool_size": cfg.pool_size, "eval_limit": cfg.eval_limit,
                          "full_score": prep["full_score"], "finetune": finetune, "initial": prep["initial"], **merge,
                          **({} if cfg.traced else {"traced": False})})
                for seed in seeds_of(cfg) for s in cfg.strategies]
        yield Phase("curves", jobs, label=f"recovery {cfg.task}{tag}")

    def reduce(self, cfg: RecoveryConfig, results: dict[str, list]) -> dict[str, Any]:
        from moeguard.tasks.registry import get_task

        task = get_task(cfg.task)
        prep, curves = results["prepare"][0], results["curves"]
        return {
            "schema": SCHEMA,
            "task": task.name, "kind": task.kind.value, "metric": task.primary_metric,
            "higher_is_better": task.higher_is_better,
            "full": prep["full"], "full_score": prep["full_score"], "pruned": prep["initial"],
            "pruned_retention": curves[0]["points"][0]["retention"] if curves else None,
            "attribution": {"method": cfg.method, "samples": cfg.samples},
            **({"route": "merge", "merge_method": cfg.merge_method} if cfg.route == "merge" else {}),
            "plan": prep["plan"], "reduction": prep["reduction"], "record": prep["record"],
            "settings": cfg.to_dict(), "seeds": seeds_of(cfg),
            "curves": curves,
            "summary": summarize(curves, cfg.strategies, target=cfg.target, seed=cfg.seed),
            "detectability": detectability_of(curves),
        }


def detectability_of(curves: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best re-aligned model (highest final retention), traced (``studies.common.detectability_of``)."""
    from moeguard.studies.common import detectability_of as best_traced

    d = best_traced(curves, score=lambda c: c["points"][-1]["retention"])
    if d is None or "skipped" in d:
        return d
    best = curves[d.pop("run")]
    return {**d, "retention": best["points"][-1]["retention"]}


def seeds_of(cfg: RecoveryConfig) -> list[int]:
    from moeguard.config import run_seeds

    return run_seeds(cfg.seed, cfg.seeds)
