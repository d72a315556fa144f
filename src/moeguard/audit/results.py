"""results.json: what the report shows, assembled from the audit's stage files (schema in
docs/report.md), and what two runs' documents must agree on (their numbers, not their times)."""

from __future__ import annotations

import time
from typing import Any

from moeguard.audit.config import AuditConfig
from moeguard.audit.stages import StageResult
from moeguard.studies.engine import TIMING_FIELDS

SCHEMA = "moeguard.audit/1"


def assemble(cfg: AuditConfig, info: dict[str, Any], stages: dict[str, StageResult], *,
             backend: dict[str, Any]) -> dict[str, Any]:
    """results.json: everything the report shows, from the stages' files (schema in docs/report.md)."""
    from moeguard.audit.risk import task_risk

    base = stages["baseline"].read("baseline.json")
    sweep = stages["sweep"].read("sweep.json")
    recs = {}
    if "recovery" in stages:
        for t in cfg.recovery_tasks:
            recs[t] = _recovery_entry(stages["recovery"].read(f"recovery/{t}.json"))
            if "merge" in cfg.routes:   # the merged model re-aligned: beside pruning's, under "merge"
                recs[t]["merge"] = _recovery_entry(stages["recovery"].read(f"recovery/{t}.merge.json"))
    E = int(info["num_experts"])
    tasks = {}
    for t in cfg.tasks:
        full = sweep["full"][t]
        methods = {}
        for m in cfg.methods:
            pts = sorted((p["keep"], p) for p in sweep["points"] if p["task"] == t and p["method"] == m)
            methods[m] = {"retention": {str(k): p["retention"] for k, p in pts},
                          "retention_above_baseline": {str(k): p["retention_above_baseline"] for k, p in pts},
                          "auc": sweep["faithfulness"][t][m]["auc"],
                          "spearman_vs_ablation": sweep["faithfulness"][t][m]["spearman_vs_ablation"],
                          "seconds": sweep["attribution"][t][m]["seconds"]}
        entry = {"metric": full["metric"], "higher_is_better": full["higher_is_better"],
                 "full": {"score": full["score"], "baseline": full["baseline"], "baseline_name": full["baseline_name"],
                          "eval_limit": cfg.eval_limit},
                 "evaluation": base[t][str(cfg.eval_limit)],
                 "methods": methods,
                 "random": sweep["random_summary"].get(t, {}),
                 "random_auc": sweep["faithfulness"][t]["random"]}
        if sweep.get("routes"):
            entry["routes"] = sweep["routes"][t]
        if t in recs:
            entry["recovery"] = recs[t]
        # the model's levels, not the run's --keeps (keeps [32, 48] of 64 experts made N/4 read 32); the
        # sweep measures no level below the family's minimum, so the levels it measured bound them
        entry["risk"] = task_risk(entry, num_experts=E)
        tasks[t] = entry
    doc = {"schema": SCHEMA, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": info,
           "config": cfg.to_dict(), "backend": backend, "tasks": tasks,
           "physical_checks": sweep["physical_checks"],
           "collateral": {str(k): _collateral(sweep, k) for k in cfg.keeps}}
    if "defense" in stages:
        d = stages["defense"].read("defense.json")
        doc["defense"] = {"method": cfg.defense, "hardened": cfg.hardened, "utility": d["utility"],
                          "goals": d["goals"], "extra_labels": {t: {k: v.get("extra_labels") for k, v in c.items()}
                                                                for t, c in d["attacks"].items()},
                          "summaries": {t: {k: {"base": v["base"]["summary"], "hardened": v["hardened"]["summary"]}
                                            for k, v in c.items()} for t, c in d["attacks"].items()},
                          # the attacker's best model of each side, traced against the model it was cut from
                          "detectability": {t: {k: {"base": v["base"].get("detectability"),
                                                    "hardened": v["hardened"].get("detectability")}
                                                for k, v in c.items()} for t, c in d["attacks"].items()}}
    if "scan" in stages:
        d = stages["scan"].read("scan/scan.json")
        from moeguard.report.scan import TOP

        top = set(d["ranking"][:TOP])   # the report's suspects; the stage's scan.json holds every expert
        doc["scan"] = {"suspicion": d["suspicion"], "flagged": d["flagged"], "ranking": d["ranking"],
                       "experts": [r for r in d["experts"] if f"{r['layer']}:{r['expert']}" in top],
                       "file": "stages/scan/scan/scan.json"}
    return doc


def _recovery_entry(r: dict[str, Any]) -> dict[str, Any]:
    """results.json's recovery fields of one recovery document (a route's)."""
    out = {"keep": r["settings"]["keep"], "method": r["attribution"]["method"],
           "pruned_retention": r["pruned_retention"], "full_score": r["full_score"],
           "target": r["summary"]["target"], "best": r["summary"]["best"],
           "saves_labels": r["summary"]["saves_labels"], "rule": r["summary"]["rule"],
           "seeds": r["summary"].get("seeds"), "min_seeds": r["summary"].get("min_seeds"),
           "strategies": r["summary"]["strategies"],
           "detectability": r.get("detectability")}
    if r.get("route") == "merge":
        out["merge_method"] = r["merge_method"]
    return out


def _collateral(sweep: dict[str, Any], keep: int) -> dict[str, Any]:
    out = {}
    for p in sweep["points"]:
        if p["keep"] == keep and "collateral" in p:
            out.setdefault(p["task"], {})[p["method"]] = {"retention": p["retention"],
                                                          "collateral_mean_retention": p["collateral_mean_retention"]}
    return out


# what legitimately differs between two runs with the same settings: wall-clock times anywhere, and
# results.json's own run record, stage list, backend and file names (at its top only: deeper, "run" is a
# number, detectability's best traced run, which was dropped from every comparison with them)
TIMING_KEYS = TIMING_FIELDS | {"stages", "run", "backend", "files"}
TOP_KEYS = TIMING_KEYS - TIMING_FIELDS


def numbers_only(doc: Any, *, top: bool = True) -> Any:
    """``doc`` without its timing fields: equal for two runs with the same seed and settings. A run
    record (``{"settings": ..., "versions": ...}``) is dropped wherever it is."""
    if isinstance(doc, dict):
        return {k: numbers_only(v, top=False) for k, v in doc.items() if not not_a_number(k, v, top=top)}
    if isinstance(doc, list):
        return [numbers_only(v, top=False) for v in doc]
    return doc


def not_a_number(key: str, value: Any, *, top: bool) -> bool:
    """Whether ``key`` of a results document is left out of comparisons: a timing field anywhere; a run
    record, stage list, backend or file names at the top, and deeper too (the config's backend: local
    or ray) unless it is a number named like one (detectability's best traced run)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return key in TIMING_FIELDS or (key in TOP_KEYS and (top or not number))
