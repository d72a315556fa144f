"""The knowledge-loss study: attribute, prune to each keep level, measure what survives.

For every task, method and keep level: the task's score with only the chosen experts (by
masking, exact to physical pruning), its retention, the collateral damage on the other tasks,
and the parameter/memory reduction. Random rankings (``random_seeds`` of them) give the band a
method must beat; deletion curves over every keep level from N-1 down to top-k give each
method's area under the curve (AUC) and its Spearman correlation with ``ablation``. A sample of
points of each task is re-checked on physically pruned models.

Phases of the study: ``baseline`` (each task's full-model scores), ``attribution`` (each task's
expert scores by every method) and ``sweep`` (one job per pruned task, collateral damage measured
on all of them); the audit passes the first two from its own stages.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from moeguard.attribution.base import Scores
from moeguard.attribution.run import make_context, score
from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.loading import release_memory
from moeguard.models.prune import prune_model, spread
from moeguard.analysis import above_baseline, auc, bootstrap, mean_ci, retention, spearman
from moeguard.config import SEED_MAX, setting, validate
from moeguard.pruning.evaluate import MaskedEvaluator
from moeguard.studies import Phase
from moeguard.studies.engine import Job, untimed
from moeguard.studies.merge_route import merge_points, stronger_route
from moeguard.pruning.plan import plan_from_scores
from moeguard.tasks.evaluate import evaluate_task
from moeguard.tasks.registry import get_task

SCHEMA = "moeguard.sweep/1"
ROUTES = ("prune", "merge")


@dataclass(kw_only=True)
class SweepConfig:
    tasks: list[str] = setting(help="comma-separated tasks or YAML paths; default: the embedded suite")
    methods: list[str] = setting(help="comma-separated attribution methods; default: every one the model's family can run")
    keeps: list[int] = setting(flag="--keep", min=1,
                               help="keep levels with collateral damage, e.g. 2,4,6; default: N/4, N/2, 3N/4")
    samples: int = setting(64, min=1, help="attribution calibration samples per task")
    eval_limit: int = setting(64, min=1, help="eval samples of the pruned task")
    collateral_limit: int = setting(32, min=1, help="eval samples of each other task")
    random_seeds: int = setting(5, min=0, help="random rankings for the baseline band")
    deletion_curves: bool = setting(True, negative="--no-deletion-curves",
                                    help="also every keep level from N-1 down to top-k")
    physical_checks: int = setting(2, min=0, help="points of each task re-scored on physically pruned copies")
    batch_size: int = setting(32, min=1, cli=False, help="eval batch size")
    seed: int = setting(0, min=0, max=SEED_MAX, help="random seed; the same seed gives the same numbers")
    reference: list[str] | None = setting(None, cli=False, help="contrastive's reference tasks (default: the rest of the suite)")
    routes: list[str] = setting(factory=lambda: ["prune"], flag="--route", choices=ROUTES,
                                help="compression routes: prune, or prune,merge (merging at the --keep levels)")
    merge_methods: list[str] = setting(factory=lambda: ["router-weighted"],
                                       help="merge methods of the merge route (see `moeguard merge-methods`)")
    merge_tokens: int = setting(256, min=1, help="merge route: tokens per layer every expert is run on")

    def __post_init__(self) -> None:
        validate(self)
        check_routes(self.routes, self.merge_methods)


def check_routes(routes, merge_methods) -> None:
    """The sweep's (and the audit's) route rule: pruning is the base route; merging's methods exist."""
    if "prune" not in routes:
        raise MoeguardError(f"routes are {list(routes)}; pruning is the sweep's base route",
                            hint="pass --route prune or --route prune,merge")
    if "merge" in routes:
        from moeguard.pruning.merging.base import check_merge_methods

        check_merge_methods(merge_methods)


def random_scores(adapter: MoEAdapter, seed: int, task: str) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(adapter.num_experts, generator=gen).double() for _ in adapter.layers])
    return Scores(method=f"random:{seed}", task=task, model="", samples=0, tokens=0,
                  layers=[l.index for l in adapter.layers], num_experts=adapter.num_experts, top_k=adapter.top_k,
                  scores=rows)


def reduction(adapter: MoEAdapter, keep: dict[int, list[int]]) -> dict[str, Any]:
    """Parameters and bytes after dropping experts (routers lose their rows too)."""
    total = adapter.parameter_counts()["total"]
    removed = 0
    for layer in adapter.layers:
        dropped = layer.num_experts - len(keep[layer.index])
        removed += dropped * (layer.expert_param_count() + layer.router_param_count()) // layer.num_experts
    itemsize = next(adapter.model.parameters()).element_size()
    return {"params": total - removed, "params_full": total, "param_reduction_pct": 100.0 * removed / total,
            "memory_bytes": (total - removed) * itemsize, "memory_bytes_full": total * itemsize}


def full_scores(result: dict[str, Any], collateral: dict[str, Any]) -> dict[str, Any]:
    """A task's full-model entry of a sweep, from its results (``TaskResult.to_dict()``) at the
    eval limit (with the trivial baseline) and at the collateral limit."""
    base = result.get("baseline") or {}
    return {"metric": result["metric"], "higher_is_better": result["higher_is_better"], "score": result["score"],
            "collateral_score": collateral["score"], "baseline": base.get("score"), "baseline_name": base.get("name")}


def run_sweep(model, tokenizer, cfg: SweepConfig, *, progress=None, on_scores=None, targets: list[str] | None = None,
              scores: dict[str, dict[str, Scores]] | None = None, full: dict[str, dict[str, Any]] | None = None,
              keep=None) -> dict[str, Any]:
    """``targets``: the tasks whose experts are chosen and pruned (default: every task; the
    others still count for collateral damage), so one target per job splits a sweep into
    independent jobs. ``scores``: attribution already computed, {task: {method: Scores}}.
    ``full``: every task's :func:`full_scores`, already computed (the jobs of a split sweep
    share them instead of each evaluating the full model on every task). ``keep``: a folder where
    each masked evaluation is kept as it finishes (a job's scratch: a killed job resumes from them)."""
    started = time.perf_counter()
    adapter = MoEAdapter(model)
    E, k_min = adapter.num_experts, max(1, adapter.family.min_experts)
    tasks = [get_task(t) for t in cfg.tasks]
    pruned_tasks = tasks if targets is None else [get_task(t) for t in targets]
    ev = MaskedEvaluator(model, tokenizer, batch_size=cfg.batch_size, adapter=adapter, keep=keep)
    levels = sorted(set(cfg.keeps) | (set(range(max(k_min, adapter.top_k), E)) if cfg.deletion_curves else set()))

    if full is None:
        full = {t.name: full_scores(ev(t, None, limit=cfg.eval_limit, baseline=True).to_dict(),
                                    ev(t, None, limit=cfg.collateral_limit).to_dict()) for t in tasks}

    def measure(task, keep, k, with_collateral) -> dict[str, Any]:
        return score_point(cfg, full, task, tasks if with_collateral else None, k,
                           lambda t, limit: ev(t, keep, limit=limit))

    attribution, points, random_points = {}, [], []
    merge: dict[str, Any] = {"points": [], "random": [], "calibration": {}}
    all_scores: dict[str, dict[str, Scores]] = {}
    for t in pruned_tasks:
        given = (scores or {}).get(t.name, {})
        ctx = None if all(m in given for m in cfg.methods) else make_context(
            model, tokenizer, t, samples=cfg.samples, seed=cfg.seed, reference=cfg.reference)
        all_scores[t.name] = {}
        for m in cfg.methods:
            s = given[m] if m in given else score(ctx, m)
            all_scores[t.name][m] = s
            attribution.setdefault(t.name, {})[m] = {"seconds": round(s.seconds, 3), "samples": s.samples,
                                                     "tokens": s.tokens}
            if on_scores is not None:
                on_scores(t.name, m, s)
        jobs = [(m, k) for m in cfg.methods for k in levels]
        randoms = [(seed, k) for seed in range(cfg.random_seeds) for k in levels]
        tid = progress.add_task(f"sweep {t.name}", total=len(jobs) + len(randoms)) if progress else None
        for m, k in jobs:
            plan = plan_from_scores(all_scores[t.name][m], keep=k, min_keep=k_min)
            p = measure(t, plan.keep, k, k in cfg.keeps)
            points.append({"task": t.name, "method": m, "plan": {str(l): v for l, v in plan.keep.items()}, **p,
                           **reduction(adapter, plan.keep)})
            progress and progress.advance(tid)
        for seed, k in randoms:
            plan = plan_from_scores(random_scores(adapter, cfg.seed * 1000 + seed, t.name), keep=k, min_keep=k_min)
            random_points.append({"task": t.name, "seed": seed, **measure(t, plan.keep, k, False)})
            progress and progress.advance(tid)
        progress and progress.remove_task(tid)
        if "merge" in cfg.routes:

            found = merge_points(model, tokenizer, cfg, t, tasks, full, all_scores[t.name],
                                 lambda seed, _t=t.name: random_scores(adapter, seed, _t), progress=progress,
                                 keep=keep)
            merge["points"] += found["points"]
            merge["random"] += found["random"]
            merge["calibration"].update(found["calibration"])

    summary = _summaries(cfg, pruned_tasks, levels, points, random_points, all_scores)
    checks = _physical_checks(model, tokenizer, cfg, tasks, points, ev, adapter)
    return {
        "schema": SCHEMA,
        "settings": {**asdict(cfg), "levels": levels},
        "model": {"name": getattr(model.config, "_name_or_path", ""), **adapter.describe()},
        "full": full, "attribution": attribution, "points": points, "random": random_points,
        "random_summary": summary["random"], "faithfulness": summary["faithfulness"],
        "physical_checks": checks,
        **({"merge": merge, "routes": stronger_route(cfg, pruned_tasks, points, random_points, merge)}
           if "merge" in cfg.routes else {}),
        "evaluations": {"run": ev.runs, "reused": ev.hits},
        "seconds": round(time.perf_counter() - started, 1),
    }


def score_point(cfg: SweepConfig, full: dict[str, dict[str, Any]], task, others: list | None, k: int,
                evaluate) -> dict[str, Any]:
    """One point of either route: the compressed model's score on ``task`` and its retention; with
    ``others``, the collateral damage on each other task. ``evaluate(task, limit)`` scores the
    compressed model (masked or merged) on a task."""
    f = full[task.name]
    r = evaluate(task, cfg.eval_limit)
    point = {"keep": k, "score": r.score,
             "retention": retention(r.score, f["score"], higher_is_better=f["higher_is_better"]),
             "retention_above_baseline": above_baseline(r.score, f["score"], f["baseline"],
                                                        higher_is_better=f["higher_is_better"])}
    if others is not None:
        coll = {}
        for other in others:
            if other.name == task.name:
                continue
            fo = full[other.name]
            ro = evaluate(other, cfg.collateral_limit)
            coll[other.name] = {"score": ro.score, "retention": retention(
                ro.score, fo["collateral_score"], higher_is_better=fo["higher_is_better"])}
        point["collateral"] = coll
        vals = [c["retention"] for c in coll.values() if c["retention"] is not None]
        point["collateral_mean_retention"] = float(np.mean(vals)) if vals else None
    return point


def merge_sweeps(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One sweep document from per-target ones (same settings, disjoint targets)."""
    out = {**docs[0], "points": [], "random": [], "attribution": {}, "random_summary": {}, "faithfulness": {},
           "physical_checks": [], "evaluations": {"run": 0, "reused": 0}, "seconds": 0.0}
    for d in docs:
        out["points"] += d["points"]
        out["random"] += d["random"]
        out["physical_checks"] += d["physical_checks"]
        for k in ("attribution", "random_summary", "faithfulness"):
            out[k].update(d[k])
        for k in ("run", "reused"):
            out["evaluations"][k] += d["evaluations"][k]
        if "merge" in d:   # the merge route's points and per-task calibration, and its route summary
            if d is docs[0]:
                out["merge"], out["routes"] = {"points": [], "random": [], "calibration": {}}, {}
            out["merge"]["points"] += d["merge"]["points"]
            out["merge"]["random"] += d["merge"]["random"]
            out["merge"]["calibration"].update(d["merge"]["calibration"])
            out["routes"].update(d["routes"])
        out["seconds"] = round(out["seconds"] + d["seconds"], 1)
    return out


def _summaries(cfg, tasks, levels, points, random_points, all_scores) -> dict[str, Any]:
    rand: dict[str, dict[str, Any]] = {}
    faith: dict[str, dict[str, Any]] = {}
    for t in tasks:
        rand[t.name] = {}
        rand_auc = []
        for seed in range(cfg.random_seeds):
            rs = [p for p in random_points if p["task"] == t.name and p["seed"] == seed]
            rand_auc.append(auc([p["keep"] for p in rs], [p["retention"] for p in rs]))
        for k in levels:
            vals = [p["retention"] for p in random_points if p["task"] == t.name and p["keep"] == k
                    and p["retention"] is not None]
            if vals:
                rand[t.name][str(k)] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)),
                                        "min": float(np.min(vals)), "max": float(np.max(vals)), "n": len(vals),
                                        "ci": mean_ci(vals, seed=cfg.seed)["ci"]}
        ra = [a for a in rand_auc if a is not None]
        faith[t.name] = {"random": {"auc_mean": float(np.mean(ra)) if ra else None,
                                    "auc_std": float(np.std(ra)) if ra else None,
                                    "uncertainty": mean_ci(ra, seed=cfg.seed)}}
        abl = all_scores[t.name].get("ablation")
        for m in cfg.methods:
            ps = [p for p in points if p["task"] == t.name and p["method"] == m]
            beats = {}
            for p in ps:
                r = rand[t.name].get(str(p["keep"]))
                if r and p["retention"] is not None:
                    beats[str(p["keep"])] = p["retention"] > r["mean"]
            rho = None
            if abl is not None:
                # within each layer, then averaged: a plan keeps k experts per layer, so only the order
                # inside a layer matters, and methods whose units differ across layers (frequency, gate,
                # REAP) would otherwise be judged by the layers' scales (rho 0.81 -> -0.01 when one
                # method's layers were rescaled by 10^layer: the same plans)
                per_layer = [spearman(a.tolist(), b.tolist())
                             for a, b in zip(abl.scores, all_scores[t.name][m].scores)]
                known = [r for r in per_layer if r is not None]
                rho = float(np.mean(known)) if known else None
            m_auc = auc([p["keep"] for p in ps], [p["retention"] for p in ps])
            faith[t.name][m] = {"auc": m_auc, "spearman_vs_ablation": rho, "beats_random_mean": beats,
                                "auc_vs_random": _against_random(m_auc, ra, cfg.seed)}
    return {"random": rand, "faithfulness": faith}


def _against_random(value: float | None, randoms: list[float], seed: int) -> dict[str, Any] | None:
    """A method's AUC minus the random rankings' mean AUC, with a bootstrap interval over the
    random seeds (the method's own AUC is one deterministic ranking): above zero = beats random."""
    if value is None or not randoms:
        return None
    r = np.array(randoms, float)
    ci = bootstrap(len(r), lambda i: float(value - r[i].mean()), seed=seed)
    return {"difference": float(value - r.mean()), "ci": ci,
            "beats_random": bool(not ci["degenerate"] and ci["low"] is not None and ci["low"] > 0)}


def _physical_checks(model, tokenizer, cfg, tasks, points, ev, adapter) -> list[dict[str, Any]]:
    """Re-score a few points on physically pruned copies (the masked numbers must match). Each check
    is kept beside the masked evaluations (``ev.keep``, the job's scratch) as it finishes: a rerun
    does not build and evaluate that copy again."""
    from moeguard.kept import document

    by_name = {t.name: t for t in tasks}
    chosen = [p for p in points if p["keep"] in cfg.keeps]
    chosen = sorted(chosen, key=lambda p: (p["keep"], p["task"], p["method"]))
    picks = []
    if chosen and cfg.physical_checks > 0:
        step = max(1, len(chosen) // cfg.physical_checks)
        picks = chosen[::step][:cfg.physical_checks]
    out = []
    offloaded = any(t.is_meta for t in model.parameters())
    for p in picks:
        keep = {int(l): v for l, v in p["plan"].items()}
        if offloaded:   # the pruned copy would be built in memory, which the cap is there to avoid
            out.append({"task": p["task"], "method": p["method"], "keep": p["keep"],
                        "skipped": "the model is offloaded (max_memory): a physical check builds the pruned copy in memory"})
            continue
        kept = document(ev.keep, "physical", ["physical", untimed(p), cfg.eval_limit, cfg.batch_size])
        found = kept.read() if kept is not None else None
        if found is not None:
            out.append(found)
            continue
        try:
            small, _ = prune_model(model, keep)
        except MoeguardError as exc:  # e.g. DeepSeek groups kept unevenly: masking only, say so
            out.append({"task": p["task"], "method": p["method"], "keep": p["keep"], "skipped": exc.one_line()})
            continue
        r = evaluate_task(small, tokenizer, by_name[p["task"]], limit=cfg.eval_limit, batch_size=cfg.batch_size,
                          baseline=False)
        params = sum(x.numel() for x in {id(q): q for q in small.parameters()}.values())
        out.append({"task": p["task"], "method": p["method"], "keep": p["keep"], "masked_score": p["score"],
                    "physical_score": r.score, "abs_diff": _abs_diff(r.score, p["score"]),
                    "params_physical": params, "params_expected": p["params"]})
        if kept is not None:
            kept.write(out[-1], exact=True)
        multi = spread(small)
        del small
        if multi:   # a copy over several GPUs stays there until a collection: the next check's copy beside it
            release_memory()
    return out


# how close a physically pruned model's score must be to the masked one's: float rounding of the same
# function (logits 3e-8 to 9e-8 apart in float32, the tests' rtol 1e-5), relative to the score's size (a
# perplexity of 388 is 1.07e-6 apart by rounding alone, which an absolute 1e-6 called a mismatch)
PHYSICAL_RTOL, PHYSICAL_ATOL = 1e-5, 1e-6


def physical_check_agrees(check: dict) -> bool:
    """Whether a physical check (a row of a sweep's ``physical_checks``, not skipped) agrees: its scores
    within rounding and its parameter count the expected one."""
    d = check["abs_diff"]
    scale = max(abs(x) for x in (check["masked_score"], check["physical_score"], 0.0) if x is not None and math.isfinite(x))
    return d is not None and d <= max(PHYSICAL_ATOL, PHYSICAL_RTOL * scale) \
        and check["params_physical"] == check["params_expected"]


def _abs_diff(physical: float, masked: float | None) -> float | None:
    """How far the physically pruned model's score is from the masked one's. Scores that are not
    finite numbers agree only when they are the same (both NaN, or the same infinity): 0; otherwise
    the difference is None, which every reader counts as mismatched (JSON cannot hold NaN).
    (None, a masked score read back from JSON, is an unknown non-finite number: it agrees with one.)"""
    finite = [x is not None and math.isfinite(x) for x in (physical, masked)]
    if all(finite):
        return abs(physical - masked)
    if any(finite):
        return None
    same = masked is None or physical == masked or (math.isnan(physical) and math.isnan(masked))
    return 0.0 if same else None


# --------------------------------------------------------------------------- the study

@dataclass(frozen=True, kw_only=True)
class SweepStudyConfig:
    sweep: SweepConfig
    references: dict[str, list[str] | None]        # contrastive's reference tasks, per task
    full: dict[str, dict[str, Any]] | None = None   # given by the audit's baseline stage
    scores: dict[str, dict[str, Any]] | None = None  # {task: {method: Scores dict}}, given by the audit
    # the jobs load the model offloaded (max_memory), which skips the physical checks: their results
    # must not be reused by an uncapped run (the runtime's scope leaves the cap out)
    capped: bool = False


def target_job(ctx, *, target: str, settings: dict[str, Any], scores: dict[str, Any], full: dict[str, Any],
               seed: int, capped: bool = False) -> dict[str, Any]:
    """The knowledge-loss sweep of one task (collateral damage measured on all of them);
    ``full``: every task's full-model scores from the baseline phase; ``capped`` only keys the job."""
    model, tok = ctx.model()
    cfg = SweepConfig(**settings)
    given = {target: {m: Scores.from_dict(d) for m, d in scores.items()}}
    return run_sweep(model, tok, cfg, targets=[target], scores=given, full=full, keep=ctx.scratch_for("evaluations"))


def baseline_phase(tasks: list[str], limits: list[int], seed: int) -> Phase:
    return Phase("baseline", [Job(stage="baseline", name=t, fn="moeguard.studies.common:baseline_job",
                                  args={"task": t, "limits": limits, "seed": seed}) for t in tasks], label="baseline")


def attribution_phase(tasks: list[str], methods: list[str], samples: int, seed: int,
                      references: dict[str, list[str] | None]) -> Phase:
    return Phase("attribution", [Job(stage="attribution", name=t, fn="moeguard.studies.common:attribution_job",
                                     args={"task": t, "methods": methods, "samples": samples, "seed": seed,
                                           "reference": references.get(t)}) for t in tasks], label="attribution")


class SweepStudy:
    name = "sweep"
    schema = SCHEMA

    def plan(self, c: SweepStudyConfig):
        s = c.sweep
        full = c.full
        if full is None:
            base = yield baseline_phase(s.tasks, sorted({s.eval_limit, s.collateral_limit}), s.seed)
            full = {t: full_scores(b[str(s.eval_limit)], b[str(s.collateral_limit)]) for t, b in zip(s.tasks, base)}
        scores = c.scores
        if scores is None:
            res = yield attribution_phase(s.tasks, s.methods, s.samples, s.seed, c.references)
            scores = dict(zip(s.tasks, res))
        settings = asdict(s)
        if "merge" not in s.routes:   # a prune-only sweep keeps its jobs' keys (and cached jobs) as before the route
            for k in ("routes", "merge_methods", "merge_tokens"):
                settings.pop(k)
        yield Phase("sweep", [Job(stage="sweep", name=t, fn="moeguard.studies.sweep:target_job",
                                  args={"target": t, "settings": settings, "seed": s.seed, "full": full,
                                        "scores": scores[t], **({"capped": True} if c.capped else {})})
                              for t in s.tasks], label="pruning sweep")

    def reduce(self, c: SweepStudyConfig, results: dict[str, list]) -> dict[str, Any]:
        """The merged sweep; ``scores`` ({task: {method: Scores dict}}) are written beside it as
        files (``scores/<task>/<method>.json``), not inside sweep.json."""
        doc = merge_sweeps(results["sweep"])
        doc["scores"] = c.scores if c.scores is not None else dict(zip(c.sweep.tasks, results["attribution"]))
        return doc
