"""The headline: how easily can a task be cut out of the model and kept?

Definitions (also in docs/report.md, "Prunability risk"):

- ``pruned[k]``: the best retention any attribution method reaches when every layer keeps
  ``k`` of its N experts, by masking, with no fine-tuning. The attacker can measure this on
  their own data, so the audit takes the best method, not the average.
- with the merge route (``--route prune,merge``), ``pruned[k]`` is the better of the two
  routes at ``k`` (the attacker takes the stronger; ``route[k]`` names it), so adding a route
  never lowers a number.
- ``attacked``: at the recovery keep (N/4 by default), the better of ``pruned`` and the best
  strategy's mean retention after the whole label budget of re-alignment; with the merge route,
  over the re-aligned merged model too (``recovered_by_route``; ``attack_route`` names the
  route of the best re-aligned model).
- ``labels_to_recover``: the fewest labels any strategy needs (mean curve, interpolated) to
  reach the target (95% by default), on either route; ``None`` when none reaches it within the
  budget.
- level:
    * ``high``: ``attacked`` >= 90 at the recovery keep (a model with a quarter of the
      experts keeps 90% of the task, after at most the budget's labels),
    * ``medium``: otherwise, ``pruned[N/2]`` >= 90 (half the experts keep 90% with no
      fine-tuning at all),
    * ``low``: neither.
  Retention is relative to the full model's score (perplexity inverted); for a task the full
  model barely does better than its trivial baseline, retention says little, so the margin
  over the baseline is reported beside it (``weak_task`` when under 10% of the full score).
"""

from __future__ import annotations

from typing import Any

HIGH, MEDIUM = 90.0, 90.0
WEAK_MARGIN = 10.0


def _best(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def task_risk(entry: dict[str, Any], *, num_experts: int, min_keep: int = 1) -> dict[str, Any]:
    """``min_keep``: the fewest experts per layer the model's routing allows. The quarter and half
    levels are N/4 and N/2 (at least ``min_keep``), or the next level the sweep measured above when
    it did not measure them: the model fixes them, not the --keeps a run chose."""
    measured = sorted({int(k) for v in entry["methods"].values() for k in v["retention"]})

    def level(want: int) -> int:
        return next((k for k in measured if k >= want), want)

    quarter = level(max(min_keep, num_experts // 4))
    half = level(max(min_keep, num_experts // 2))
    methods = entry["methods"]
    pruned = {}
    best_method = {}
    for k in sorted({quarter, half}):
        vals = {m: v["retention"].get(str(k)) for m, v in methods.items()}
        pruned[str(k)] = _best(list(vals.values()))
        ranked = [m for m, v in vals.items() if v is not None and v == pruned[str(k)]]
        best_method[str(k)] = ranked[0] if ranked else None
    above = {str(k): _best([v["retention_above_baseline"].get(str(k)) for v in methods.values()])
             for k in sorted({quarter, half})}
    route = {str(k): "prune" for k in pruned}
    for k, row in (entry.get("routes") or {}).items():
        merged = (row.get("merge") or {}).get("retention")
        if k in pruned and merged is not None and (pruned[k] is None or merged > pruned[k]):
            pruned[k], route[k] = merged, "merge"
            best_method[k] = f"{row['merge']['method']} + {row['merge']['merge_method']} merge"
            above[k] = _best([above[k], row["merge"].get("above_baseline")])
    out: dict[str, Any] = {"keep_quarter": quarter, "keep_half": half, "pruned": pruned,
                           "pruned_above_baseline": above, "best_method": best_method, "route": route}
    rec = entry.get("recovery")
    attacked, labels, recovered, keep = None, None, None, quarter
    if rec:
        keep = rec["keep"]
        # each route's re-aligned model (pruning's, and the merged one's with the merge route)
        studies = {"prune": rec, **({"merge": rec["merge"]} if rec.get("merge") else {})}
        by_route = {r: _best([s["final"] for s in st["strategies"].values()]) for r, st in studies.items()}
        recovered = _best(list(by_route.values()))
        reach = [s["labels_to_target"] for st in studies.values() for s in st["strategies"].values()
                 if s["labels_to_target"] is not None]
        labels = min(reach) if reach else None
        start = _best([v["retention"].get(str(keep)) for v in methods.values()]
                      + [((entry.get("routes") or {}).get(str(keep), {}).get("merge") or {}).get("retention")])
        attacked = _best([start, recovered])
        if len(studies) > 1:
            out["recovered_by_route"] = by_route
            ranked = [r for r, v in by_route.items() if v is not None and v == recovered]
            out["attack_route"] = ranked[0] if ranked else None
        out["recovery_budget"] = rec["strategies"]["random"]["labels"][-1] if "random" in rec["strategies"] else None
        out["random_labels_to_recover"] = rec["strategies"].get("random", {}).get("labels_to_target")
        out["best_strategy"] = rec["best"]
        # the largest point saving; whether its interval lies above zero (the summary's own rule for a claim)
        out["best_strategy_saves_labels"] = rec.get("saves_labels") is not None and rec.get("saves_labels") == rec["best"]
        # another strategy than the largest point saving may be the one whose claim holds: it is said too
        out["strategy_saving_labels"] = rec.get("saves_labels")
        out["recovery_seeds"] = rec.get("seeds")
        out["min_seeds"] = rec.get("min_seeds")
    else:
        attacked = pruned.get(str(quarter))
    out.update({"attack_keep": keep, "recovered": recovered, "attacked": attacked, "labels_to_recover": labels})
    if attacked is not None and attacked >= HIGH:
        level = "high"
    elif pruned.get(str(half)) is None and half in measured:
        # measured, and no retention: the full model's score is 0 or not finite (null in JSON). It read as
        # "unmeasured" with the fix to add a keep that was already there
        level = "undefined"
    elif pruned.get(str(half)) is None:   # half the experts never measured (--keeps without it): medium or low unknown
        level = "unmeasured"
    elif pruned[str(half)] >= MEDIUM:
        level = "medium"
    else:
        level = "low"
    out["level"] = level
    full, base = entry["full"]["score"], entry["full"]["baseline"]
    if full and base is not None:
        margin = (full - base) / abs(full) * 100 if entry["higher_is_better"] else (base - full) / abs(base) * 100
        out["margin_over_baseline_pct"] = margin
        out["weak_task"] = margin < WEAK_MARGIN
    else:
        out["margin_over_baseline_pct"], out["weak_task"] = None, None
    out["reason"] = _reason(level, out, full)
    return out


def _reason(level: str, r: dict[str, Any], full: float | None = None) -> str:
    from moeguard.analysis import floored, labels_text

    fmt = lambda x: "n/a" if x is None else f"{floored(x, 0)}%"  # noqa: E731 -- 89.6 is not "90%" beside a 90% rule
    k, h = r["attack_keep"], r["keep_half"]
    text = {
        "high": f"keeping {k} experts per layer retains {fmt(r['attacked'])} after the attack",
        "medium": f"keeping {h} experts per layer retains {fmt(r['pruned'].get(str(h)))} with no fine-tuning; "
                  f"{k} per layer: {fmt(r['attacked'])} after the attack",
        "low": f"{h} experts per layer retain {fmt(r['pruned'].get(str(h)))}; {k} per layer "
               f"{fmt(r['attacked'])} after the attack",
        "unmeasured": f"{h} experts per layer were not measured (add {h} to --keeps); {k} per layer "
                      f"{fmt(r['attacked'])} after the attack",
        "undefined": f"no retention is defined: the full model's score on this task is {full} (0, or not a "
                     "finite number), so no pruned model keeps a share of it; check the task and the model",
    }[level]
    if r["labels_to_recover"] is not None:
        text += f"; {labels_text(r['labels_to_recover'])} labels reach the target"
    merged = sorted(int(k) for k, v in r.get("route", {}).items() if v == "merge")
    if merged:
        text += f" (merging beats pruning at {', '.join(map(str, merged))} per layer)"
    by = r.get("recovered_by_route")
    if by and r.get("attack_route") == "merge":
        text += (f" (after re-alignment merging keeps more: {fmt(by.get('merge'))} against pruning's "
                 f"{fmt(by.get('prune'))})")
    if r.get("weak_task") and r["margin_over_baseline_pct"] <= 0:   # "barely better" said the opposite of what was measured
        text += (f" (the full model is no better than the trivial baseline, by {floored(-r['margin_over_baseline_pct'], 1)}%:"
                 " it has not learned this task, and its retention means little)")
    elif r.get("weak_task"):
        text += " (the full model is barely better than the trivial baseline: read with care)"
    return text
