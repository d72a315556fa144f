"""The attack study's summary (``studies/attack.py``'s reduce): the worst case for the defender, the
envelope of the attacker's grid at every budget (the maximum, never the mean), its labels-to-target
and area under the curve, their uncertainty over seeds, and the best cell traced against the model it
attacked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeguard.analysis import above_baseline, auc, bootstrap, labels_to_target, mean_ci, read_score, retention, spread


def attack_detectability(runs: list[dict[str, Any]], higher_is_better: bool) -> dict[str, Any] | None:
    """The attacker's best cell (best final score), traced against the model it attacked."""
    from moeguard.studies.common import detectability_of

    sign = 1.0 if higher_is_better else -1.0
    attacks = [r for r in runs if r.get("kind") == "attack"]
    d = detectability_of(attacks, score=lambda r: None if r["points"][-1]["score"] is None else sign * r["points"][-1]["score"])
    if d is None or "skipped" in d:
        return d
    best = attacks[d.pop("run")]
    return {**d, "score": best["points"][-1]["score"], **{k: best[k] for k in ("mode", "lr", "epochs") if k in best}}


def attack_uncertainty(doc: dict[str, Any], *, target: float, seed: int = 0) -> dict[str, Any]:
    """Each seed's own worst case (the best cell of that seed's grid), its spread over seeds and a
    bootstrap 95% interval (seeds resampled) of the mean: for the re-aligned retention at the
    budget, labels-to-target and the area under the envelope."""
    hib = doc["higher_is_better"]
    full, base = doc["full"]["score"], doc["baseline_score"]
    seeds = sorted({r["seed"] for r in doc["runs"]})
    per: dict[str, list] = {"realigned_retention": [], "labels_to_target": [], "auc": []}
    for s in seeds:
        env = envelope([r for r in doc["runs"] if r["seed"] == s], hib, full, base)
        at_budget = env["retention"][env["labels"].index(doc["budget"])] if doc["budget"] in env["labels"] else None
        per["realigned_retention"].append(at_budget)
        per["labels_to_target"].append(labels_to_target(env["labels"], env["retention"], target))
        per["auc"].append(auc(env["labels"], env["retention"]))
    out = {"seeds": seeds, "note": "per seed: that seed's worst case over the grid; the reported worst case is "
                                   "the envelope over every seed, so it is at least each seed's"}
    for k, v in per.items():
        out[k] = {"per_seed": v, **(mean_ci(v, seed=seed) if k != "labels_to_target" else
                                    {**spread(v), "ci": bootstrap(len(v), lambda i, v=v: _mean_or_none(v, i), seed=seed)})}
    return out


def _mean_or_none(values: list, idx) -> float | None:
    picked = [values[i] for i in idx]
    return None if any(x is None for x in picked) else float(np.mean(picked))



def envelope(runs: list[dict[str, Any]], higher_is_better: bool, full: float, base: float | None) -> dict[str, Any]:
    """Per label count, the best score over every run (max, or min for perplexity) and the run that got it.

    A score that is not a finite number (null once read back) is never the best while another run
    has one; where no run has one, that label count's best is None and retains 0 (a broken model
    keeps nothing, as ``analysis.retention`` says), not a gap that a mean over seeds would close over."""
    by: dict[int, list[tuple[float, int]]] = {}
    broken: dict[int, int] = {}   # label count -> the first run whose score there was not finite
    for i, r in enumerate(runs):
        for p in r["points"]:
            if p["score"] is not None and np.isfinite(p["score"]):
                by.setdefault(p["labels"], []).append((p["score"], i))
            else:
                broken.setdefault(p["labels"], i)
    labels = sorted(set(by) | set(broken))
    pick = max if higher_is_better else min
    best = [pick(by[x]) if x in by else (None, broken[x]) for x in labels]
    scores = [b[0] for b in best]
    return {"labels": labels, "score": scores,
            "retention": [retention(read_score(s), full, higher_is_better=higher_is_better) for s in scores],
            "above_baseline": [above_baseline(read_score(s), full, base, higher_is_better=higher_is_better) for s in scores],
            "argbest": [{k: runs[b[1]][k] for k in ("strategy", "mode", "lr", "epochs", "seed", "route") if k in runs[b[1]]}
                        for b in best]}


def summarize_attack(doc: dict[str, Any], *, target: float) -> dict[str, Any]:
    w = doc["worst_case"]
    at = lambda env, x: env["retention"][env["labels"].index(x)] if env and x in env["labels"] else None  # noqa: E731
    s = {
        "pruned_retention": doc["attribution"]["best"]["retention"],
        "realigned_retention": at(w, doc["budget"]),
        "realigned_above_baseline": w["above_baseline"][-1] if w["labels"] and w["labels"][-1] == doc["budget"] else None,
        "labels_to_target": labels_to_target(w["labels"], w["retention"], target),
        "target": target,
        "auc": auc(w["labels"], w["retention"]),
        "diverged_runs": sum(1 for r in doc["runs"] if r.get("diverged")),
    }
    sc = doc.get("scratch")
    if sc:
        b = sc["best"]
        s["scratch_retention"] = at(b, doc["budget"])
        s["scratch_auc"] = auc(b["labels"], b["retention"])
        s["scratch_labels_to_target"] = labels_to_target(b["labels"], b["retention"], target)
        # the experts' worth to the attacker: mean retention gained over training from scratch
        s["area_between"] = None if s["auc"] is None or s["scratch_auc"] is None else s["auc"] - s["scratch_auc"]
        # budgets where both have a retention (a full score of 0 leaves none: no comparison, not a crash)
        common = [x for x in w["labels"] if x in b["labels"] and x > 0 and at(w, x) is not None and at(b, x) is not None]
        s["no_better_than_scratch"] = all(at(w, x) <= at(b, x) + 1e-9 for x in common) if common else None
    return s
