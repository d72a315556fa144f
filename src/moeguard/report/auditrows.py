"""The audit report's tables as data (``report/audit.py`` renders them as markdown and HTML): one
row builder per section, each a list of {column: text} from results.json.
"""

from __future__ import annotations

from typing import Any

from moeguard.analysis import floored, labels_text
from moeguard.report.recovery import savings_text


def _fmt(x, spec: str = ".1f", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def risk_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    """One row per task, under the same columns. A keep level shared by every task is in its column's
    name; one that differs between tasks (a task outside --recovery-tasks is attacked at N/4, the
    others at --recovery-keep) is in each cell. Retention is rounded down (89.96 is 89.9, never the
    90.0 the levels' rule reads as met)."""
    risks = [e["risk"] for e in doc["tasks"].values()]
    shared = {key: len({r[key] for r in risks}) == 1 for key in ("keep_half", "keep_quarter", "attack_keep")}

    def head(key: str, what: str, r: dict[str, Any], generic: str) -> str:
        return f"{what}, {r[key]}/layer" if shared[key] else f"{what}, {generic}"

    def at(key: str, r: dict[str, Any]) -> str:
        return "" if shared[key] else f" at {r[key]}/layer"

    rows = []
    for t, e in doc["tasks"].items():
        r = e["risk"]
        h, q = str(r["keep_half"]), str(r["keep_quarter"])
        attack = floored(r["attacked"]) + "%" + at("attack_keep", r)
        if not e.get("recovery"):   # no re-alignment ran for it: the number is pruning's alone
            attack += " (pruned only)"
        rows.append({"task": t, "risk": r["level"], "metric": e["metric"],
                     "full (baseline)": _fmt(e["full"]["score"], ".4g") + f" ({_fmt(e['full']['baseline'], '.4g')})",
                     head("keep_half", "pruned", r, "N/2"): floored(r["pruned"].get(h)) + "%" + at("keep_half", r)
                     + _by_merge(r, h),
                     head("keep_quarter", "pruned", r, "N/4"): floored(r["pruned"].get(q)) + "%" + at("keep_quarter", r)
                     + _by_merge(r, q),
                     head("attack_keep", "after attack", r, "its keep"): attack,
                     "labels to target": labels_text(r["labels_to_recover"]) if e.get("recovery") else "–",
                     "best strategy": best_strategy_text(r) if r.get("best_strategy") else
                                      ("none beats random" if e.get("recovery") else "–")})
    return rows


def best_strategy_text(r: dict[str, Any]) -> str:
    """The largest point saving, whether it is a claim (seeds enough, interval above zero), and the
    strategy whose claim holds where that is another one."""
    text = r["best_strategy"]
    seeds, least = r.get("recovery_seeds"), r.get("min_seeds")
    if r.get("best_strategy_saves_labels"):
        return text
    if isinstance(seeds, int) and isinstance(least, int) and seeds < least:
        return f"{text} ({seeds} seeds: too few to tell, a claim needs {least})"
    other = r.get("strategy_saving_labels")
    return f"{text} (not significant)" + (f"; {other} saves labels" if other else "")


def _by_merge(risk: dict[str, Any], k: str) -> str:
    return " (by merging)" if risk.get("route", {}).get(k) == "merge" else ""


def method_rows(doc: dict[str, Any], task: str) -> list[dict[str, str]]:
    e = doc["tasks"][task]
    keeps = [str(k) for k in doc["config"]["keeps"]]
    rows = []
    for m, v in e["methods"].items():
        row = {"method": m}
        for k in keeps:
            rnd = e["random"].get(k)
            row[f"keep {k}"] = floored(v["retention"].get(k)) + (f" (rand {floored(rnd['mean'])})" if rnd else "")
        row["AUC"] = _fmt(v["auc"])
        row["ρ vs ablation"] = _fmt(v["spearman_vs_ablation"], ".2f")
        row["seconds"] = _fmt(v["seconds"], ".1f")
        rows.append(row)
    ra = e["random_auc"]
    rows.append({"method": "random rankings", **{f"keep {k}": (floored(e['random'][k]['mean']) + f" ± {_fmt(e['random'][k]['std'])}")
                                                if k in e["random"] else "–" for k in keeps},
                 "AUC": _fmt(ra.get("auc_mean")) + (f" ± {ra['auc_std']:.1f}" if ra.get("auc_std") is not None else ""),
                 "ρ vs ablation": "–", "seconds": "–"})
    routes = e.get("routes") or {}
    if routes:   # the merge route: its best per keep (which centres and merge method), its own random band
        cell = lambda r: "–" if not r else (floored(r["retention"]) + f" ({r['method']} + {r['merge_method']}"  # noqa: E731
                                           + (f", rand {floored(r['random_mean'])})" if r.get("random_mean") is not None else ")"))
        rows.append({"method": "merge route (best)", **{f"keep {k}": cell((routes.get(k) or {}).get("merge")) for k in keeps},
                     "AUC": "–", "ρ vs ablation": "–", "seconds": "–"})
        rows.append({"method": "stronger route", **{f"keep {k}": (routes.get(k) or {}).get("winner", "–") for k in keeps},
                     "AUC": "–", "ρ vs ablation": "–", "seconds": "–"})
    return rows


def recovery_rows(doc: dict[str, Any], task: str) -> list[dict[str, str]]:
    rec = doc["tasks"][task].get("recovery")
    if not rec:
        return []
    rows = []
    # with the merge route, the merged model's re-alignment beside pruning's (a route column)
    routes = [("prune", rec)] + ([(f"merge ({rec['merge']['merge_method']})", rec["merge"])] if rec.get("merge") else [])
    for route, r in routes:
        for n, s in r["strategies"].items():
            rows.append({**({"route": route} if len(routes) > 1 else {}), "strategy": n,
                         "labels to target": labels_text(s["labels_to_target"]), "savings vs random": savings_text(n, s),
                         "AUC": _fmt(s["auc"]), f"retention at {s['labels'][-1]} labels": floored(s["final"]) + "%"})
    return rows


def _identified(d: dict[str, Any]) -> str:
    """"k of K kept experts", or for a merged model "k of K experts (M merged, named by their sources)"."""
    merged = d.get("merged_total") or 0
    return (f"identifying {d['kept_identified']} of {d['kept_total']} "
            + (f"experts ({merged} of them merges, each named by its sources)" if merged else "kept experts"))


def detect_text(rec: dict[str, Any]) -> str | None:
    """The detectability sentence of a task: its best stolen model, traced (docs/trace.md)."""
    d = rec.get("detectability")
    if not d:
        return None
    if "skipped" in d:
        return f"Detectability: not traced ({d['skipped']})."
    from moeguard.report.trace import p_text

    return (f"Detectability: if the attacker's best re-aligned model ({d['strategy']}, {d['labels']} labels, "
            f"{floored(d['retention'])}% retained) were stolen, `moeguard trace` would find it with p = "
            f"{p_text(d['p_value'])} ({d['verdict']}), {_identified(d)}; every re-aligned run traced as derived: {'yes' if d['all_derived'] else 'no'} "
            f"(largest p {p_text(d['largest_p'])}).")


def defense_detect_text(doc: dict[str, Any]) -> list[str]:
    """Per task and keep: the attacker's best model of the hardened release, traced against it."""
    from moeguard.report.trace import p_text

    out = []
    for t, by_keep in ((doc.get("defense") or {}).get("detectability") or {}).items():
        for k, sides in by_keep.items():
            d = sides.get("hardened")
            if not d:
                continue
            if "skipped" in d:
                out.append(f"Detectability, `{t}` at {k} experts: not traced ({d['skipped']}).")
                continue
            out.append(f"Detectability, `{t}` at {k} experts: if the attacker's best model cut from the hardened "
                       f"release ({d.get('mode', '?')}, {d['labels']} labels) were stolen, `moeguard trace` would "
                       f"find it with p = {p_text(d['p_value'])} ({d['verdict']}), {_identified(d)}; all "
                       f"{d['traced_runs']} attack runs traced as derived: "
                       f"{'yes' if d['all_derived'] else 'no'} (largest p {p_text(d['largest_p'])}).")
    return out


def defense_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    from moeguard.report.defense import extra_labels_text

    d = doc.get("defense")
    if not d:
        return []
    rows = []
    for t, by_keep in d["summaries"].items():
        for k, v in by_keep.items():
            b, h = v["base"], v["hardened"]
            rows.append({"task": t, "keep": k,
                         "pruned base → hardened": f"{floored(b['pruned_retention'])} → {floored(h['pruned_retention'])}%",
                         "after attack base → hardened": f"{floored(b['realigned_retention'])} → {floored(h['realigned_retention'])}%",
                         "extra labels": extra_labels_text(d["extra_labels"][t][k], ".1f"),
                         "from scratch": floored(h.get("scratch_retention")) + "%"})
    return rows


def defense_utility_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    """The defense's cost to the full model, a table of its own (not under the attack's columns)."""
    d = doc.get("defense")
    return [{"task": t, "metric": u.get("metric", ""), "base": _fmt(u["base"], ".4g"), "hardened": _fmt(u["hardened"], ".4g"),
             "utility cost": _fmt(u["cost_percent"]) + "%"} for t, u in (d or {}).get("utility", {}).items()]


def card_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    m = doc["model"]
    p = m.get("parameters", {})
    facts = [("model", m.get("name")), ("source", m.get("path") or m.get("hub_id")), ("family", m.get("family")),
             ("decoder layers", m.get("num_layers")), ("MoE layers", len(m.get("moe_layers") or [])),
             ("experts per layer", m.get("num_experts")), ("experts per token (top-k)", m.get("top_k")),
             ("shared experts", len(m.get("shared_experts") or [])), ("routing", m.get("gate_normalization")),
             ("parameters", _count(p.get("total"))), ("active per token", _count(p.get("active"))),
             ("routed-expert parameters", _count(p.get("routed_experts"))),
             # JetMoE: its MLP and attention experts differ in size, so each kind's, not their mean
             ("per expert", "; ".join(f"{kind} {_count(n)}" for kind, n in p["per_expert_by_block"].items())
              if p.get("per_expert_by_block") else _count(p.get("per_expert"))),
             # NLLB-MoE: transformers' forward is wrong, and the audit measured the repaired model
             ("upstream repair", m.get("upstream_repair"))]
    return [{"fact": k, "value": str(v)} for k, v in facts if v is not None]


def _count(n) -> str | None:
    if n is None:
        return None
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return str(n)


def repro_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    run = doc["run"]
    rows = [{"item": "command", "value": run.get("command") or "moeguard audit (from Python)"},
            {"item": "git commit", "value": str(run.get("git_commit"))},
            {"item": "backend", "value": ", ".join(f"{k}={v}" for k, v in doc["backend"].items())},
            {"item": "created", "value": doc["created_at"]},
            {"item": "wall time", "value": f"{doc['seconds']:.0f} s (stages: " + ", ".join(
                s["stage"] + (" cached" if s["cached"] else f" {s['seconds']:.0f} s") for s in doc["stages"]) + ")"}]
    rows += [{"item": k, "value": v} for k, v in run["versions"].items()]
    from moeguard.provenance import describe

    # a resumed run's numbers from work another version kept: not this commit's (provenance.reusing)
    rows += [{"item": "reused work", "value": f"{len(g['what'])} kept piece(s) by {describe(g['differs'])}: "
              + ", ".join(g["what"][:4]) + (", ..." if len(g["what"]) > 4 else "")} for g in run.get("reused", [])]
    return rows
