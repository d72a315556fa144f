"""The recovery study's summary (``studies/recovery.py``'s reduce): per strategy the mean learning
curve with its spread, labels-to-target, savings against ``random`` and the area under the curve,
each with its spread over seeds and a bootstrap 95% interval (seeds resampled, paired: a strategy
and random share each seed's pool).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moeguard.analysis import (auc, bootstrap, censored_savings, excludes_zero, labels_to_target, mean_ci, savings,
                               spread)
from moeguard.io import json_safe


def _matrix(runs: list[dict[str, Any]]) -> np.ndarray:
    """[seeds, budgets] retention; a round whose fine-tuning broke the model (a NaN score) retains
    nothing and counts 0, not a gap the other seeds' mean would close over: ``analysis.retention``
    says 0 at the source, and a non-finite retention handed in directly is read the same way. A
    point with no retention at all (None: no reference score) is a gap."""
    def value(r):
        if r is None:
            return np.nan
        return float(r) if math.isfinite(r) else 0.0
    return np.array([[value(p["retention"]) for p in c["points"]] for c in runs])


def _nan_stats(vals: np.ndarray) -> dict[str, np.ndarray]:
    """Per budget over seeds: mean, std, min, max ignoring gaps; a budget no seed measured is NaN
    (numpy's "empty slice" warnings for it are the expected answer, not news)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"mean": np.nanmean(vals, axis=0), "std": np.nanstd(vals, axis=0),
                "min": np.nanmin(vals, axis=0), "max": np.nanmax(vals, axis=0)}


def _mean_curve(vals: np.ndarray) -> list[float]:
    return _nan_stats(vals)["mean"].tolist()


def _l2t(labels, vals: np.ndarray, target: float) -> float | None:
    return labels_to_target(labels, _mean_curve(vals), target)


def _finite(a) -> list[float | None]:
    return json_safe(np.asarray(a, dtype=float).tolist())


# a saving claim needs this many seeds (README). A percentile interval from fewer says little: from 2
# seeds it lies above zero whenever both seeds saved labels, one run in four with no effect at all
MIN_SEEDS = 10


def summarize(curves: list[dict[str, Any]], strategies, *, target: float, seed: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"target": target, "strategies": {}}
    mats: dict[str, np.ndarray] = {}
    for name in strategies:
        runs = [c for c in curves if c["strategy"] == name]
        if not runs:
            continue
        labels = [p["labels"] for p in runs[0]["points"]]
        vals = mats[name] = _matrix(runs)
        stats = _nan_stats(vals)
        mean = stats["mean"]
        per_seed = [labels_to_target(labels, list(v), target) for v in vals]
        reached = [x for x in per_seed if x is not None]
        auc_per_seed = [auc(labels, list(v)) for v in vals]
        out["strategies"][name] = {
            "labels": labels,
            # a point no seed measured (retention None: a full score of 0) is None, not NaN (invalid JSON)
            "mean": _finite(mean), "std": _finite(stats["std"]), "min": _finite(stats["min"]), "max": _finite(stats["max"]),
            "labels_to_target": labels_to_target(labels, mean.tolist(), target),
            "labels_to_target_per_seed": per_seed,
            "seeds_reaching_target": len(reached),
            "auc": auc(labels, mean.tolist()),
            "auc_per_seed": auc_per_seed,
            "final": _finite(mean[-1:])[0],
            # uncertainty: spread over seeds and a bootstrap interval over resampled seeds
            "uncertainty": {
                "labels_to_target": {**spread(per_seed),
                                     "ci": bootstrap(len(vals), lambda i, v=vals, x=labels: _l2t(x, v[i], target),
                                                     seed=seed)},
                "auc": mean_ci(auc_per_seed, seed=seed),
                "final": mean_ci(list(vals[:, -1]), seed=seed),
            },
        }
    rnd = out["strategies"].get("random")
    for name, s in out["strategies"].items():
        if name == "random" or not rnd:
            s["savings_vs_random"] = None
            continue
        s["savings_vs_random"] = savings(s["labels_to_target"], rnd["labels_to_target"], budget=s["labels"][-1])
        s["savings_vs_random"]["uncertainty"] = _savings_uncertainty(mats[name], mats["random"], s["labels"], target,
                                                                     seed)
        s["seeds"] = min(len(mats[name]), len(mats["random"]))   # resampled in pairs
        s["saves_labels"] = s["seeds"] >= MIN_SEEDS and excludes_zero(s["savings_vs_random"]["uncertainty"]["ci"])
    # best = the largest point saving (kept as before); a claim needs the interval: saves_labels
    ranked = [(s["savings_vs_random"]["percent"], n) for n, s in out["strategies"].items()
              if s["savings_vs_random"] and (s["savings_vs_random"]["percent"] or 0) > 0]
    out["best"] = max(ranked)[1] if ranked else None
    significant = [(s["savings_vs_random"]["percent"] or 0, n) for n, s in out["strategies"].items()
                   if s.get("saves_labels")]
    out["saves_labels"] = max(significant)[1] if significant else None
    out["seeds"] = len(mats["random"]) if "random" in mats else None
    out["min_seeds"] = MIN_SEEDS
    out["rule"] = ("a strategy saves labels only when the bootstrap 95% interval of its savings against random, "
                   f"seeds resampled in pairs, lies above zero, from at least {MIN_SEEDS} seeds")
    return out


def _savings_uncertainty(strat: np.ndarray, rnd: np.ndarray, labels, target: float, seed: int) -> dict[str, Any]:
    """Savings per seed (the seed's own curves) and a paired bootstrap of the mean-curve savings;
    a curve that never reaches the target counts at the budget (censored)."""
    budget = labels[-1]
    n = min(len(strat), len(rnd))
    per_seed = [censored_savings(labels_to_target(labels, list(strat[i]), target),
                                 labels_to_target(labels, list(rnd[i]), target), budget=budget) for i in range(n)]

    def stat(i):
        return censored_savings(_l2t(labels, strat[i], target), _l2t(labels, rnd[i], target), budget=budget)

    return {"per_seed": per_seed, **spread(per_seed), "ci": bootstrap(n, stat, seed=seed), "censored_at": budget}
