"""The analysis maths every study shares, in one place: retention, areas under curves,
labels-to-target, savings against random, rank correlation, and the uncertainty of each
(spread over seeds and a bootstrap 95% interval), and robust z-scores.

Studies compute their point numbers with these functions and nothing else, so a number in
``sweep.json``, ``recovery.json``, ``attack.json`` and ``results.json`` means one thing.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

# bootstrap resamples: 2000 gives percentile intervals stable to ~0.5 points at 3-10 seeds
BOOTSTRAP = 2000
LEVEL = 0.95


def floored(x: float | None, digits: int = 1, *, none: str = "–") -> str:
    """``x`` printed with ``digits`` decimals, rounded down: a retention of 89.96% is printed 89.9,
    never 90.0, beside a rule that says "at least 90%" (rounding put it on the wrong side of its
    own line)."""
    if x is None or not math.isfinite(x):
        return none
    q = 10 ** digits
    return f"{math.floor(round(x * q, 6)) / q:.{digits}f}"


def labels_text(x: float | None, *, none: str = "not reached") -> str:
    """An interpolated label count: whole labels, and "<1" for a curve that reaches its target
    between none and the first label ("0" reads as "already at the target")."""
    if x is None:
        return none
    return "<1" if 0 < x < 1 else f"{x:.0f}"


def retention(score: float | None, full: float | None, *, higher_is_better: bool) -> float | None:
    """Pruned score relative to the full model's, in percent, 100 = unchanged.

    Higher-is-better metrics: 100 * pruned / full. Perplexity: 100 * full / pruned, so that
    retention falls as perplexity rises (the study's normalized perplexity read as retention).

    A score that is not a number (NaN: broken weights, a diverged fine-tune) retains nothing: 0,
    not a gap that a mean over seeds would close over, and not a NaN that JSON cannot hold. A full
    score that is not a finite number gives no reference: None."""
    if score is None or full is None or not math.isfinite(full) or (higher_is_better and not full):
        return None
    if math.isnan(score):
        return 0.0
    if higher_is_better:
        return 100.0 * score / full
    return 100.0 * full / score if score else None


def read_score(score: float | None) -> float:
    """A measured score read back from JSON, where null is a score that was not a finite number
    (``io.json_safe``): NaN, which :func:`retention` reads as nothing retained. Only for scores that
    were measured (an evaluation's result), never for a field whose null means "not measured"."""
    return math.nan if score is None else float(score)


def mean_score(scores: Sequence[float | None]) -> float:
    """The mean of measured scores read back from JSON (:func:`read_score`): NaN if any was not finite."""
    return float(np.mean([read_score(s) for s in scores]))


def above_baseline(score: float | None, full: float | None, base: float | None, *, higher_is_better: bool) -> float | None:
    """Share of the full model's margin over the trivial baseline that survives, in percent
    (0 = no better than "knows nothing about the input"; can go negative). None when the full
    model has no margin: at or below its baseline, the share's sign would flip (a better pruned
    score reading as a larger loss). A score that is not a finite number (NaN, or an infinite
    perplexity: -inf, which JSON cannot hold) is counted as keeping nothing of the margin: 0, as
    :func:`retention` counts it."""
    if score is None or full is None or base is None or not (math.isfinite(full) and math.isfinite(base)):
        return None
    if (full <= base) if higher_is_better else (full >= base):
        return None
    if not math.isfinite(score):
        return 0.0
    if higher_is_better:
        return 100.0 * (score - base) / (full - base)
    if min(full, base, score) <= 0:
        # lower-is-better scores compare in log space (perplexity's); a metric that reaches 0 has no
        # log there (math domain error in the sweep): no share, as at no margin. Such a kind reports
        # its higher-is-better counterpart (accuracy, not an error rate) for a margin on one scale
        return None
    lf, lb, ls = math.log(full), math.log(base), math.log(score)  # perplexities compare in log space
    return 100.0 * (lb - ls) / (lb - lf)


def _missing(y) -> bool:
    """No value: None, or NaN (a numpy row of a study's matrix marks a gap with NaN)."""
    return y is None or (isinstance(y, float) and math.isnan(y))


def auc(xs: Sequence[float], ys: Sequence[float | None]) -> float | None:
    """The curve's mean value over its x range: trapezoid area / (max x - min x).

    One definition for deletion curves (retention vs keep level) and learning curves
    (retention vs labels): points with no value are dropped; a single point is its own mean;
    no point gives None."""
    pts = sorted((x, y) for x, y in zip(xs, ys) if not _missing(y))
    if len(pts) < 2:
        return float(pts[0][1]) if pts else None
    x = np.array([p[0] for p in pts], float)
    y = np.array([p[1] for p in pts], float)
    if x[-1] == x[0]:   # every point at one x: the mean of its values (0/0 gave NaN)
        return float(y.mean())
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum() / (x[-1] - x[0]))


def labels_to_target(labels: Sequence[int], values: Sequence[float | None], target: float) -> float | None:
    """Labels at which the curve first reaches ``target``, linearly interpolated between the
    budgets that bracket the crossing; 0 when the pruned model already meets it; None if never."""
    prev = None
    for x, y in zip(labels, values):
        y = None if _missing(y) else y
        if y is not None and y >= target:
            if prev is None or prev[1] is None:
                return float(x)
            (x0, y0) = prev
            return float(x0 + (target - y0) * (x - x0) / (y - y0))
        prev = (x, y)
    return None


def savings(strategy: float | None, random: float | None, *, budget: int) -> dict[str, Any]:
    """Label savings against random, in percent: 100 * (1 - labels_strategy / labels_random).

    When random never reaches the target within the budget, savings are a lower bound
    (``bound: "at least"``, random's count taken as the budget); when the strategy never
    does, they are unknown unless random reached it (then the strategy loses)."""
    if strategy is not None and random is not None:
        if random == 0:
            return {"percent": None, "bound": "exact", "note": "the pruned model already meets the target"}
        return {"percent": 100.0 * (1 - strategy / random), "bound": "exact"}
    if strategy is not None:
        return {"percent": 100.0 * (1 - strategy / budget), "bound": "at least",
                "note": f"random does not reach the target within {budget} labels"}
    if random is not None:
        return {"percent": None, "bound": "loses", "note": f"does not reach the target within {budget} labels; random does"}
    return {"percent": None, "bound": "neither", "note": f"neither reaches the target within {budget} labels"}


def censored_savings(strategy: float | None, random: float | None, *, budget: int) -> float | None:
    """Savings in percent with a never-reached target counted at the budget (censored): the
    value a bootstrap resample contributes. None only when random reaches it at 0 labels."""
    s = budget if strategy is None else strategy
    r = budget if random is None else random
    return None if r == 0 else 100.0 * (1 - s / r)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho with average ranks for ties (scipy's definition), without scipy."""
    import pandas as pd

    a, b = list(a), list(b)
    if len(a) < 2 or len(a) != len(b) or not (np.isfinite(np.asarray(a, float)).all()
                                              and np.isfinite(np.asarray(b, float)).all()):
        return None   # no correlation to give (a NaN gave NaN, which JSON cannot hold)
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


# --------------------------------------------------------------------------- uncertainty

def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, standard deviation, min and max over seeds of the values that exist."""
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    if not v:
        return {"n": 0, "missing": len(values), "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(v), "missing": len(values) - len(v), "mean": float(np.mean(v)), "std": float(np.std(v)),
            "min": float(np.min(v)), "max": float(np.max(v))}


def bootstrap(n: int, statistic: Callable[[np.ndarray], float | None], *, seed: int = 0,
              resamples: int = BOOTSTRAP, level: float = LEVEL) -> dict[str, Any]:
    """Percentile bootstrap of ``statistic(indices)`` over ``n`` units (seeds) resampled with
    replacement; resamples where the statistic is None are counted, not used. With one unit
    the interval is the point itself and ``degenerate`` says so."""
    if n < 1:
        return {"low": None, "high": None, "level": level, "resamples": 0, "undefined": 0, "degenerate": True}
    rng = np.random.default_rng(seed)
    draws = [statistic(rng.integers(0, n, n)) for _ in range(resamples)] if n > 1 else [statistic(np.zeros(1, int))]
    got = np.array([d for d in draws if d is not None and np.isfinite(d)], float)
    if got.size == 0:
        return {"low": None, "high": None, "level": level, "resamples": len(draws), "undefined": len(draws),
                "degenerate": n < 2}
    a = (1 - level) / 2
    return {"low": float(np.quantile(got, a)), "high": float(np.quantile(got, 1 - a)), "level": level,
            "resamples": len(draws), "undefined": len(draws) - int(got.size), "degenerate": n < 2}


def mean_ci(values: Sequence[float | None], *, seed: int = 0) -> dict[str, Any]:
    """Spread and bootstrap interval of the mean of per-seed values."""
    v = np.array([float(x) for x in values if x is not None and np.isfinite(x)], float)
    return {**spread(values), "ci": bootstrap(len(v), lambda i: float(v[i].mean()), seed=seed)}


def excludes_zero(ci: dict[str, Any]) -> bool:
    """True when a bootstrap interval lies strictly above zero, from at least two units."""
    return bool(not ci.get("degenerate") and ci.get("low") is not None and ci["low"] > 0)


MAD_SCALE = 1.4826   # makes the median absolute deviation a consistent estimator of a normal sd


def robust_z(values, base=None, *, floor: float = 1e-12) -> np.ndarray:
    """z of ``values`` against the median and scaled MAD of ``base`` (default: ``values``), so the
    outlier looked for cannot hide by inflating the spread it is measured against. ``floor``
    bounds the MAD away from 0 (identical siblings would otherwise give infinities)."""
    v = np.asarray(values, dtype=np.float64)
    b = v if base is None else np.asarray(base, dtype=np.float64)
    b = b[np.isfinite(b)]   # a NaN is a gap (a damaged expert), not a reason every z becomes NaN
    if b.size == 0:
        return np.full(v.shape, np.nan)
    med = np.median(b)
    mad = np.median(np.abs(b - med)) * MAD_SCALE
    return (v - med) / max(mad, floor)
