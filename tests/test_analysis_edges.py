"""The shared analysis maths at its edges (review of audit/ and studies/): a model no better than
its baseline, NaN gaps in a study's matrix, a diverged re-alignment round."""

from __future__ import annotations

import json
import math

from moeguard.analysis import above_baseline, auc, labels_to_target


def test_the_margin_over_the_baseline_needs_a_margin():
    assert above_baseline(0.45, 0.5, 0.3, higher_is_better=True) == 75.0
    # full 0.3 under its baseline 0.5: a better pruned score (0.6) read as -50%, a worse one (0.4) as +50%
    assert above_baseline(0.6, 0.3, 0.5, higher_is_better=True) is None
    assert above_baseline(0.4, 0.5, 0.5, higher_is_better=True) is None
    assert above_baseline(20.0, 30.0, 25.0, higher_is_better=False) is None   # perplexity above its baseline's
    assert round(above_baseline(20.0, 10.0, 40.0, higher_is_better=False), 6) == 50.0


def test_nan_is_a_gap_like_none():
    assert auc([0, 8, 16], [50.0, float("nan"), 90.0]) == auc([0, 16], [50.0, 90.0]) == 70.0
    assert labels_to_target([0, 8, 16], [50.0, float("nan"), 100.0], 90.0) == labels_to_target([0, 8, 16], [50.0, None, 100.0], 90.0)
    assert labels_to_target([0, 8], [float("nan"), float("nan")], 90.0) is None


def _curve(strategy, seed, retentions):
    return {"strategy": strategy, "seed": seed,
            "points": [{"labels": x, "retention": r} for x, r in zip((0, 8, 16), retentions)]}


def test_a_diverged_round_counts_as_nothing_retained_and_no_nan_reaches_the_summary():
    from moeguard.studies.recoverysummary import summarize

    curves = [_curve("random", 0, [40.0, float("nan"), 96.0]), _curve("random", 1, [40.0, 70.0, 96.0]),
              _curve("orphan", 0, [40.0, 95.0, 97.0]), _curve("orphan", 1, [40.0, 93.0, math.inf])]
    s = summarize(curves, ["random", "orphan"], target=90.0)
    rnd, orp = s["strategies"]["random"], s["strategies"]["orphan"]
    assert rnd["mean"] == [40.0, 35.0, 96.0]          # the diverged round is 0, not dropped (70 alone)
    assert orp["mean"][2] == 48.5 and orp["final"] == 48.5
    assert all(v is None or math.isfinite(v) for v in rnd["labels_to_target_per_seed"] + rnd["auc_per_seed"])
    json.dumps(s, allow_nan=False)                    # valid JSON: no NaN anywhere


def test_a_nan_is_a_gap_for_robust_z_spearman_and_a_flat_auc():
    """One NaN made every robust z NaN (a damaged expert hid among NaNs), spearman NaN (invalid
    JSON), and an AUC over one x value was 0/0."""
    import math

    import numpy as np

    from moeguard.analysis import auc, robust_z, spearman

    z = robust_z([1.0, 1.1, 0.9, float("nan"), 9.0])
    assert math.isnan(z[3]) and np.isfinite(np.delete(z, 3)).all() and z[4] > 5
    assert spearman([1, 2, float("nan")], [1, 2, 3]) is None and spearman([1], [1]) is None
    assert spearman([1, 2, 3], [1, 2, 4]) == 1.0
    assert auc([4, 4], [80, 90]) == 85.0
