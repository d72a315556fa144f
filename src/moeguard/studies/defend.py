"""`moeguard defend-eval`: what a defense costs the owner and what it costs the attacker.

For a base model and its hardened version, on the owner's tasks:

- **utility cost**: each task's full-model score, hardened vs base, as the percent of the
  base score lost (0 = no cost; negative = the hardened model is better);
- **the attack harness** (``studies/attack.py``) against both, at every keep level, with the
  same grid and seeds, and one from-scratch baseline shared by both (same architecture, same
  labels; retention is relative to each model's own full score);
- **the attacker's extra label cost**: labels to reach the target on the hardened model minus
  on the base model (a lower bound when the hardened model is never brought there);
- **the selective protocol**, when the hardened model ships a protocol file: the authorized
  path (its mode and parameters, on the full hardened model) against full fine-tuning of the
  full base model, with the same labels;
- the issue's goals checked against the numbers (never asserted in advance).

Phases: ``utility`` (full-model scores of both), ``pick`` (each attack's attribution and plan,
on both models), ``grid`` (every attacker cell on both models and the shared from-scratch
cells), ``protocol`` (the authorized path against full fine-tuning); every job runs on the
study's backend, Ray included.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.analysis import bootstrap, mean_score, read_score, retention, spread
from moeguard.studies import Phase
from moeguard.studies.attack import AttackConfig, attack_doc, grid_jobs, pick_phase_job, scratch_jobs
from moeguard.studies.engine import Job

SCHEMA = "moeguard.defense-eval/1"


@dataclass(frozen=True, kw_only=True)
class DefendEvalConfig:
    tasks: tuple[str, ...]
    keeps: tuple[int, ...]
    attack: AttackConfig                   # task and keep are filled in per cell
    utility_tasks: tuple[str, ...] = ()    # full-model utility on these too (empty: ``tasks``)
    utility_limit: int | None = None       # eval records for the utility comparison (None: all)
    num_experts: int = 8                   # experts per layer of the base model (the goals' keep N/2)
    base: str | None = None                # the models compared: checkpoint paths or hub ids (None: embedded)
    hardened: str | None = None
    protocol: dict[str, Any] | None = None  # the selective protocol to measure ({"modes", "patterns"}), if any

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "keeps": list(self.keeps), "attack": self.attack.to_dict(),
                "utility_tasks": list(self.utility_tasks),
                "utility_limit": self.utility_limit, "base": self.base, "hardened": self.hardened,
                "protocol": self.protocol}


def check_pair(base: Any, hardened: Any) -> None:
    """The hardened model is the base's architecture (handles): one line before any work."""
    from moeguard.errors import MoeguardError

    if (hardened.num_experts, hardened.num_layers) != (base.num_experts, base.num_layers):
        raise MoeguardError(f"the hardened model has {hardened.num_layers} MoE layers of {hardened.num_experts} "
                            f"experts, the base {base.num_layers} of {base.num_experts}",
                            hint="compare a model with its own hardened version")


def resolve(*, base: Any, hardened: Any, tasks: list, utility_tasks: list, keeps: list[int] | None,
            attack: AttackConfig, protocol: Any = None) -> tuple[DefendEvalConfig, Any]:
    """The study's config from resolved inputs (model handles, Task objects), checked before any
    weights are read. ``attack``: the attacker's settings (its task and keep are filled per cell);
    ``protocol``: a protocol file, default: the hardened checkpoint's own, if it ships one.
    Returns the config and the protocol file used (or None)."""
    from moeguard.defense.protocol import FILENAME, Protocol
    from moeguard.studies.attack import preflight

    check_pair(base, hardened)
    levels = [base.check_keep(k) for k in keeps] if keeps else [base.check_keep(base.num_experts // 2)]
    for t in tasks:
        for k in levels:
            preflight(dataclasses.replace(attack, task=t.name, keep=k), base)
    own = hardened.ref.path / FILENAME if hardened.ref.path is not None else None
    path = protocol or (own if own is not None and own.exists() else None)
    if path is not None and Path(path).is_dir():   # a checkpoint folder: the protocol file it holds (what is hashed)
        path = Path(path) / FILENAME
    proto = Protocol.load(path) if path is not None else None
    if proto is not None:   # the protocol phase runs last: patterns that leave its mode nothing failed after the grid
        from moeguard.realign.api import check_protocol_covers
        from moeguard.realign.engine import FinetuneConfig

        check_protocol_covers(hardened, FinetuneConfig(mode=proto.modes[0], only=tuple(proto.patterns)))
    cfg = DefendEvalConfig(tasks=tuple(t.name for t in tasks), keeps=tuple(levels),
                           attack=dataclasses.replace(attack, task=tasks[0].name, keep=levels[0]),
                           utility_tasks=tuple(t.name for t in utility_tasks), base=base.arg, hardened=hardened.arg,
                           protocol={"modes": list(proto.modes), "patterns": list(proto.patterns)} if proto else None,
                           num_experts=base.num_experts)
    return cfg, path


def utility_job(ctx, *, task: str, limit: int | None, model: str | None, baseline: bool, seed: int) -> dict[str, Any]:
    from moeguard.tasks.evaluate import evaluate_task

    m, tok = ctx.model(model)
    return evaluate_task(m, tok, task, limit=limit, batch_size=32, baseline=baseline).to_dict()


def protocol_job(ctx, *, task: str, who: str, mode: str, only: list[str], seed: int, budget: int, pool_size: int,
                 eval_limit: int, model: str | None) -> dict[str, Any]:
    """One final score: the authorized path (protocol mode + parameters) on the hardened model, or
    full fine-tuning of the base model, with the random strategy's labels for ``seed``."""
    from moeguard.realign.engine import FinetuneConfig
    from moeguard.realign.loop import ALConfig, label_pool, run_active_learning
    from moeguard.tasks.registry import get_task

    m, tok = ctx.model(model)
    t = get_task(task)
    pool = label_pool(t, pool_size=pool_size, budget=budget, seed=seed)
    ft = FinetuneConfig(mode=mode, only=tuple(only), seed=seed) if only else FinetuneConfig(mode=mode, seed=seed)
    al = ALConfig(strategy="random", schedule=(budget,), pool_size=pool_size, eval_limit=eval_limit, seed=seed,
                  finetune=ft)
    curve, _ = run_active_learning(m, tok, t, al, pool=pool, state_dir=ctx.scratch_for("rounds"))
    return {"who": who, "score": curve["points"][-1]["score"]}


class DefendEvalStudy:
    name = "defend-eval"
    schema = SCHEMA

    def plan(self, cfg: DefendEvalConfig):
        models = {"base": cfg.base, "hardened": cfg.hardened}
        names = list(dict.fromkeys([*cfg.tasks, *cfg.utility_tasks]))
        yield Phase("utility", [Job(stage="utility", name=f"{t} {who}", fn="moeguard.studies.defend:utility_job",
                                    args={"task": t, "limit": cfg.utility_limit, "model": models[who],
                                          "baseline": who == "base", "seed": cfg.attack.seed})
                                for t in names for who in ("base", "hardened")], label="utility")
        cells = _cells(cfg)
        picks = yield Phase("pick", [pick_phase_job(a, model=models[who], who=f"{who}: ") for a in cells
                                     for who in ("base", "hardened")], label="attacker: attribution and pruning")
        jobs: list[Job] = []
        for i, a in enumerate(cells):
            if a.scratch:
                jobs += scratch_jobs(a)
            for w, who in enumerate(("base", "hardened")):
                jobs += grid_jobs(a, picks[2 * i + w], model=models[who], who=f"{who}: ")
        yield Phase("grid", jobs, label="attacker: re-alignment grid")
        if cfg.protocol is not None:
            a = cfg.attack
            from moeguard.config import run_seeds

            yield Phase("protocol", [
                Job(stage="protocol", name=f"{t} {who} seed {s}", fn="moeguard.studies.defend:protocol_job",
                    args={"task": t, "who": who, "mode": mode, "only": only, "seed": s, "budget": a.budget,
                          "pool_size": a.pool_size, "eval_limit": a.eval_limit, "model": models[m]})
                for t in cfg.tasks for s in run_seeds(a.seed, a.seeds)
                for who, m, mode, only in (("authorized", "hardened", cfg.protocol["modes"][0],
                                            list(cfg.protocol["patterns"])),
                                           ("full_ft_base", "base", "full", []))], label="selective protocol")

    def reduce(self, cfg: DefendEvalConfig, results: dict[str, list]) -> dict[str, Any]:
        from moeguard.tasks.registry import get_task

        names = list(dict.fromkeys([*cfg.tasks, *cfg.utility_tasks]))
        utility = {}
        for n, name in enumerate(names):
            t = get_task(name)
            b, h = results["utility"][2 * n], results["utility"][2 * n + 1]
            r = retention(read_score(h["score"]), read_score(b["score"]), higher_is_better=t.higher_is_better)
            utility[t.name] = {"metric": t.primary_metric, "base": b["score"], "hardened": h["score"],
                               "baseline": (b.get("baseline") or {}).get("score"),
                               "cost_percent": None if r is None else 100 - r}
        attacks: dict[str, dict[str, Any]] = {}
        grid = iter(results["grid"])
        for i, a in enumerate(_cells(cfg)):
            scratch = [next(grid) for _ in scratch_jobs(a)] if a.scratch else None
            docs = {}
            for w, who in enumerate(("base", "hardened")):
                pick = results["pick"][2 * i + w]
                runs = [next(grid) for _ in grid_jobs(a, pick)]
                docs[who] = attack_doc(a, pick, runs, scratch)
            attacks.setdefault(a.task, {})[str(a.keep)] = {
                who: {k: d[k] for k in ("full", "baseline_score", "attribution", "worst_case", "scratch", "summary",
                                        "runs", "metric", "higher_is_better", "task", "keep", "budget", "settings",
                                        "detectability")} | ({"routes": d["routes"]} if "routes" in d else {})
                for who, d in docs.items()}
            cell = attacks[a.task][str(a.keep)]
            cell["extra_labels"] = extra_labels(docs["base"]["summary"], docs["hardened"]["summary"], a.budget)
            cell["extra_labels"]["uncertainty"] = extra_labels_uncertainty(docs["base"], docs["hardened"], a.budget,
                                                                          seed=a.seed)
        doc = {"schema": SCHEMA, "settings": cfg.to_dict(), "utility": utility, "attacks": attacks}
        if cfg.protocol is not None:
            doc["protocol"] = protocol_summary(cfg, results["protocol"])
        doc["goals"] = goals(doc, num_experts=cfg.num_experts)
        return doc


def _cells(cfg: DefendEvalConfig) -> list[AttackConfig]:
    return [dataclasses.replace(cfg.attack, task=t, keep=k) for t in cfg.tasks for k in cfg.keeps]


def extra_labels_uncertainty(base: dict[str, Any], hardened: dict[str, Any], budget: int, *, seed: int = 0) -> dict[str, Any]:
    """Per seed, labels-to-target of that seed's worst case on the hardened model minus on the
    base model (never reached: counted at the budget, censored), with a paired bootstrap."""
    b = base["summary"]["uncertainty"]["labels_to_target"]["per_seed"]
    h = hardened["summary"]["uncertainty"]["labels_to_target"]["per_seed"]
    per = [(budget if y is None else y) - (budget if x is None else x) for x, y in zip(b, h)]
    return {"per_seed": per, **spread(per), "censored_at": budget,
            "ci": bootstrap(len(per), lambda i: float(np.mean([per[j] for j in i])), seed=seed)}


def extra_labels(base: dict[str, Any], hardened: dict[str, Any], budget: int) -> dict[str, Any]:
    """Labels the attacker needs on the hardened model minus on the base model."""
    b, h = base["labels_to_target"], hardened["labels_to_target"]
    if b is not None and h is not None:
        return {"labels": h - b, "bound": "exact"}
    if b is not None:
        return {"labels": budget - b, "bound": "at least",
                "note": f"the hardened model is not brought to the target within {budget} labels"}
    if h is not None:
        return {"labels": h - budget, "bound": "at most", "note": f"the base model is not brought there within {budget}"}
    return {"labels": None, "bound": "neither", "note": f"neither reaches the target within {budget} labels"}


def protocol_summary(cfg: DefendEvalConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Authorized path (protocol mode + parameters) on the full hardened model vs full fine-tuning
    of the full base model, same labels and seeds; score ratio in percent per task."""
    from moeguard.tasks.registry import get_task

    a = cfg.attack
    out = {"modes": list(cfg.protocol["modes"]), "authorized_parameters": list(cfg.protocol["patterns"]), "tasks": {}}
    it = iter(results)
    for name in cfg.tasks:
        t = get_task(name)
        finals = {"authorized": [], "full_ft_base": []}
        for _ in range(a.seeds):
            for _who in ("authorized", "full_ft_base"):
                r = next(it)
                finals[r["who"]].append(r["score"])
        au, fb = mean_score(finals["authorized"]), mean_score(finals["full_ft_base"])
        out["tasks"][t.name] = {"metric": t.primary_metric, "labels": a.budget, "authorized": finals["authorized"],
                                "full_ft_base": finals["full_ft_base"],
                                "ratio_percent": retention(au, fb, higher_is_better=t.higher_is_better)}
    return out


def goals(doc: dict[str, Any], *, num_experts: int) -> dict[str, Any]:
    """The issue's goals, each with the numbers it was judged on; None where not measured."""
    half = str(num_experts // 2)
    cells = {t: v[half] for t, v in doc["attacks"].items() if half in v}
    costs = {t: u["cost_percent"] for t, u in doc["utility"].items()}
    g: dict[str, Any] = {"keep": int(half)}
    if cells:
        base = {t: c["base"]["summary"]["realigned_retention"] for t, c in cells.items()}
        hard = {t: c["hardened"]["summary"]["realigned_retention"] for t, c in cells.items()}
        g["undefended_keeps_90"] = {"met": all(v is not None and v >= 90 for v in base.values()), "values": base}
        g["hardened_at_most_50"] = {"met": all(v is not None and v <= 50 for v in hard.values()), "values": hard}
        scratch = {t: c["hardened"]["summary"].get("no_better_than_scratch") for t, c in cells.items()}
        # a task where the attack beat scratch misses the goal whatever the others show; otherwise None
        # where a task was not measured (--no-scratch ran no from-scratch baseline, or no shared budget)
        g["moonshot_no_better_than_scratch"] = {"met": False if any(v is False for v in scratch.values())
                                                else None if any(v is None for v in scratch.values()) else True,
                                                "values": scratch,
                                                "area_between": {t: c["hardened"]["summary"].get("area_between")
                                                                 for t, c in cells.items()}}
    g["utility_cost_at_most_2"] = {"met": all(c is not None and c <= 2 for c in costs.values()), "values": costs}
    if "protocol" in doc:
        ratios = {t: v["ratio_percent"] for t, v in doc["protocol"]["tasks"].items()}
        g["authorized_path_at_least_90"] = {"met": all(r is not None and r >= 90 for r in ratios.values()),
                                            "values": ratios}
    return g
