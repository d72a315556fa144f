"""`moeguard defend-eval`: what a defense costs the owner and what it costs the attacker.

For a base model and its hardened version, on the owner's tasks:

- **utility cost**: each task's full-model score, hardened vs base, as the percent of the
  base score lost (0 = no cost; negative = the hardened model is better);
- **the attack harness** (``defense/attack.py``) against both, at every keep level, with the
  same grid and seeds, and one from-scratch baseline shared by both (same architecture, same
  labels; retention is relative to each model's own full score);
- **the attacker's extra label cost**: labels to reach the target on the hardened model minus
  on the base model (a lower bound when the hardened model is never brought there);
- **the selective protocol**, when the hardened model ships a protocol file: the authorized
  path (its mode and parameters, on the full hardened model) against full fine-tuning of the
  full base model, with the same labels;
- the issue's goals checked against the numbers (never asserted in advance).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.defense.attack import AttackConfig, run_attack, run_scratch
from moeguard.pruning.evaluate import retention

SCHEMA = "moeguard.defense-eval/1"


@dataclass(frozen=True, kw_only=True)
class DefendEvalConfig:
    tasks: tuple[str, ...]
    keeps: tuple[int, ...]
    attack: AttackConfig                   # task and keep are filled in per cell
    utility_tasks: tuple[str, ...] = ()    # full-model utility on these too (empty: ``tasks``)
    utility_limit: int | None = None       # eval records for the utility comparison (None: all)

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "keeps": list(self.keeps), "attack": self.attack.to_dict(),
                "utility_tasks": list(self.utility_tasks),
                "utility_limit": self.utility_limit}


def defend_eval(base, hardened, tokenizer, cfg: DefendEvalConfig, *, protocol=None, progress: Any = None,
                job_dir: Path | None = None) -> dict[str, Any]:
    from moeguard.tasks.evaluate import evaluate_task
    from moeguard.tasks.registry import get_task

    started = time.perf_counter()
    utility = {}
    for name in dict.fromkeys([*cfg.tasks, *cfg.utility_tasks]):
        t = get_task(name)
        b = evaluate_task(base, tokenizer, t, limit=cfg.utility_limit, batch_size=32, baseline=True)
        h = evaluate_task(hardened, tokenizer, t, limit=cfg.utility_limit, batch_size=32, baseline=False)
        r = retention(h.score, b.score, higher_is_better=t.higher_is_better)
        utility[t.name] = {"metric": t.primary_metric, "base": b.score, "hardened": h.score,
                           "baseline": (b.baseline or {}).get("score"), "cost_percent": None if r is None else 100 - r}
    attacks: dict[str, dict[str, Any]] = {}
    for name in cfg.tasks:
        t = get_task(name)
        for keep in cfg.keeps:
            acfg = dataclasses.replace(cfg.attack, task=t.name, keep=keep)
            jd = (lambda sub: job_dir / sub / f"{t.name}-keep{keep}") if job_dir is not None else (lambda sub: None)
            scratch = run_scratch(base, tokenizer, acfg, progress=progress, job_dir=jd("scratch")) if acfg.scratch else None
            no_scratch = dataclasses.replace(acfg, scratch=False)
            docs = {who: run_attack(m, tokenizer, no_scratch, progress=progress, job_dir=jd(who), scratch=scratch)
                    for who, m in (("base", base), ("hardened", hardened))}
            attacks.setdefault(t.name, {})[str(keep)] = {
                who: {k: d[k] for k in ("full", "baseline_score", "attribution", "worst_case", "scratch", "summary",
                                        "runs", "metric", "higher_is_better", "task", "keep", "budget", "settings")}
                for who, d in docs.items()}
            attacks[t.name][str(keep)]["extra_labels"] = extra_labels(docs["base"]["summary"],
                                                                      docs["hardened"]["summary"], acfg.budget)
    doc = {"schema": SCHEMA, "settings": cfg.to_dict(), "utility": utility, "attacks": attacks}
    if protocol is not None:
        doc["protocol"] = protocol_paths(base, hardened, tokenizer, cfg, protocol, progress=progress)
    doc["goals"] = goals(doc, num_experts=_num_experts(base))
    doc["seconds"] = round(time.perf_counter() - started, 1)
    return doc


def _num_experts(model) -> int:
    from moeguard.models.adapter import MoEAdapter

    return MoEAdapter(model).num_experts


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


def protocol_paths(base, hardened, tokenizer, cfg: DefendEvalConfig, protocol, *, progress: Any = None) -> dict[str, Any]:
    """Authorized path (protocol mode + parameters) on the full hardened model vs full fine-tuning
    of the full base model, same labels and seeds; score ratio in percent per task."""
    from moeguard.realign.engine import FinetuneConfig
    from moeguard.realign.loop import ALConfig, label_pool, run_active_learning
    from moeguard.tasks.registry import get_task

    a = cfg.attack
    out = {"modes": list(protocol.modes), "authorized_parameters": list(protocol.patterns), "tasks": {}}
    for name in cfg.tasks:
        t = get_task(name)
        finals = {"authorized": [], "full_ft_base": []}
        for i in range(a.seeds):
            seed = a.seed + i
            pool = label_pool(t, pool_size=a.pool_size, budget=a.budget, seed=seed)
            for who, model, ft in (
                    ("authorized", hardened, FinetuneConfig(mode=protocol.modes[0], only=protocol.patterns, seed=seed)),
                    ("full_ft_base", base, FinetuneConfig(mode="full", seed=seed))):
                al = ALConfig(strategy="random", schedule=(a.budget,), pool_size=a.pool_size, eval_limit=a.eval_limit,
                              seed=seed, finetune=ft)
                curve, _ = run_active_learning(model, tokenizer, t, al, pool=pool, progress=progress)
                finals[who].append(curve["points"][-1]["score"])
        au, fb = float(np.mean(finals["authorized"])), float(np.mean(finals["full_ft_base"]))
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
        g["moonshot_no_better_than_scratch"] = {"met": all(v is True for v in scratch.values()), "values": scratch,
                                                "area_between": {t: c["hardened"]["summary"].get("area_between")
                                                                 for t, c in cells.items()}}
    g["utility_cost_at_most_2"] = {"met": all(c is not None and c <= 2 for c in costs.values()), "values": costs}
    if "protocol" in doc:
        ratios = {t: v["ratio_percent"] for t, v in doc["protocol"]["tasks"].items()}
        g["authorized_path_at_least_90"] = {"met": all(r is not None and r >= 90 for r in ratios.values()),
                                            "values": ratios}
    return g
