"""The period test in a sparse cell (``periodstats``): an expert that almost no request is routed to.
Benign periods keep nominal false alarms there, where the first test alerted a benign day with one
request routed there at p 1e-36 and kept alerting (an alerted day stays out of the baseline); load
moved there by a handful of requests is still seen."""

from __future__ import annotations

import numpy as np
from scipy.stats import t as student

from moeguard.monitor import periods, periodstats

CELL = (1, 2)


def _period(rng, *, n: int = 200, rate: float = 0.002, hijacked: int = 0, size: float = 0.2):
    """A period of ``n`` requests' residuals [n, 2, 4] (every cell noisy, but ``CELL``: 0 except in a
    ``rate`` share of requests, which route 0.002-0.02 there), and ``hijacked`` requests moved there by
    ``size``: its mean, sampling variance and count, as ``score_periods`` gives ``Baseline.judge``."""
    r = rng.normal(0, 0.05, (n, 2, 4)) + rng.normal(0, 0.003, (1, 2, 4))
    r[:, CELL[0], CELL[1]] = np.where(rng.uniform(size=n) < rate, rng.uniform(0.002, 0.02, n), 0.0)
    r[:hijacked, CELL[0], CELL[1]] += size
    return r.mean(0), r.var(0, ddof=1) / n, n


def _last(rng, days: int = 15, alpha: float = 0.01, **last) -> dict:
    base = periods.Baseline(baseline=14, alpha=alpha, layers=[0, 1])
    for _ in range(days - 1):
        base.judge({}, *_period(rng, rate=last.get("rate", 0.002)))
    row: dict = {}
    base.judge(row, *_period(rng, **last))
    return row


def test_benign_periods_keep_nominal_false_alarms_in_a_sparse_cell_and_a_handful_of_hijacks_is_seen():
    rng = np.random.default_rng(0)
    benign = [_last(rng) for _ in range(200)]
    # the first test: 15% of such periods alerted at 0.01 (results/period_sparse_cells.json)
    assert np.mean([bool(r.get("alert")) for r in benign]) <= 0.025, sorted(r["p"] for r in benign)[:10]
    assert np.mean([r["p"] <= 0.05 for r in benign]) <= 0.09
    seen = [_last(rng, hijacked=5, size=0.05) for _ in range(40)]
    assert np.mean([bool(r.get("alert")) and (r["layer"], r["expert"]) == CELL for r in seen]) >= 0.9, \
        sorted(r["p"] for r in seen)[-10:]


def test_one_request_routed_where_three_empty_days_routed_nothing_is_no_alert_and_does_not_stay_the_norm():
    """The first test's failure on a many-expert model, in small: days whose cell is exactly 0, then
    days with one request routed there. Each was an alert at p 1.6e-25, and none joined the
    baseline, so every later such day alerted too."""
    rng = np.random.default_rng(1)
    base = periods.Baseline(baseline=14, alpha=0.01, layers=[0, 1])
    for _ in range(3):
        base.judge({}, *_period(rng, rate=0.0))
    rows = []
    for _ in range(4):
        m, se2, n = _period(rng, rate=0.0)
        r = np.zeros(n)
        r[7] = 0.001                                     # one request, a tenth of a percent of its tokens
        m[CELL], se2[CELL] = r.mean(), r.var(ddof=1) / n
        rows.append({})
        base.judge(rows[-1], m, se2, n)
    assert not any(r.get("alert") for r in rows) and min(r["p"] for r in rows) > 0.05, [r["p"] for r in rows]
    assert len(base.kept) == 7                           # every day joined: the zeros are not kept the norm
    # a campaign after more empty days (the cell sparse again: 5 of 8 periods at 0): 20 of 200 requests
    for _ in range(4):
        base.judge({}, *_period(rng, rate=0.0))
    assert np.mean([a[CELL] == 0 for a, _, _ in base.kept[-11:]]) >= periodstats.SPARSE
    row: dict = {}
    base.judge(row, *_period(rng, rate=0.0, hijacked=20, size=0.05))
    assert row.get("alert") and (row["layer"], row["expert"]) == CELL and row["p"] < 1e-6, row


def test_a_sparse_cell_moves_no_other_cell_test():
    """The sparse cell's noise is pooled with the period's: it takes no part in the directions the
    other cells' test removes, so what the period holds there leaves their expected values alone."""
    rng = np.random.default_rng(2)
    pattern = rng.normal(0, 0.02, (2, 4))               # the day's mix of users moves every other cell along it
    pattern[CELL] = 0.0

    def day(rate):
        m, se2, n = _period(rng, rate=rate)
        return m + rng.uniform(-1, 1) * pattern, se2, n

    base = periods.Baseline(baseline=14, alpha=0.01, layers=[0, 1])
    for d in range(14):
        base.judge({}, *day(0.0 if d % 3 else 0.01))    # 9 of 14 days with no request there
    assert np.mean([a[CELL] == 0 for a, _, _ in base.kept]) >= periodstats.SPARSE
    m, se2, n = day(0.0)
    got = []
    for value, noise in ((0.0, 0.0), (0.004, 0.004**2 / n), (0.03, 0.002)):
        m[CELL], se2[CELL] = value, noise
        row: dict = {}
        expected, *_ = base.judge(row, m.copy(), se2.copy(), n, hold=True)
        got.append((np.delete(expected.ravel(), CELL[0] * 4 + CELL[1]), row["factors"]))
    assert got[0][1] == 1 and all(np.array_equal(g[0], got[0][0]) and g[1] == got[0][1] for g in got), got


def test_a_period_events_are_its_requests_routed_there_and_one_in_fifteen_periods_is_p_one_fifteenth():
    r = np.zeros(200)
    r[[3, 50, 120]] = 0.01
    assert abs(float(periodstats.events(r.mean(), r.var(ddof=1) / 200, 200)) - 3) < 1e-9
    r[:20] = 0.01                                        # 22 of them: m^2 / se2 alone would say 24.3
    assert abs(float(periodstats.events(r.mean(), r.var(ddof=1) / 200, 200)) - 22) < 1e-9
    assert float(periodstats.events(-r.mean(), r.var(ddof=1) / 200, 200)) == 0   # load moved away
    # every request moved alike (no spread): all of them, not infinitely many
    assert float(periodstats.events(np.float64(0.01), np.float64(0.0), 200)) == 200
    # one event in the period, none in 14 earlier periods of as many requests: exactly 1 / 15
    one = np.zeros(200)
    one[9] = 0.004
    empty = (np.zeros(1), np.zeros(1), 200)
    z = periodstats.events_z([empty] * 14, np.array([one.mean()]), np.array([one.var(ddof=1) / 200]), 200, df=13)
    assert abs(float(student.sf(z[0], 13)) - 1 / 15) < 1e-9, float(student.sf(z[0], 13))
    # load moved away from the cell is no event test's business (+inf: the t decides)
    assert periodstats.events_z([empty] * 14, np.array([-one.mean()]), np.array([one.var(ddof=1) / 200]), 200,
                                df=13)[0] == np.inf
    # every request moved: p below what scipy's t inverts at some df (3: -inf at 1e-250), still a z that far out
    for df in range(1, 121):
        z = periodstats.events_z([empty] * 14, np.array([0.01]), np.array([0.0]), 3000, df=df)[0]
        assert np.isfinite(z) and student.sf(z, df) < 1e-150, (df, z)


def _blip_days(days: int, blips: tuple[int, ...], *, campaign: int | None = None, seed: int = 3):
    """``days`` days of 40 regular users of 10 requests and 40 one-off requests: residuals [N, 2, 4]
    (noisy, but ``CELL`` exactly 0), embeddings [N, 8]. On each day in ``blips`` one one-off request
    routes 0.001 to ``CELL`` (benign: the many-expert model's rare expert); on ``campaign``, 30 one-off
    requests route 0.05 there each."""
    rng = np.random.default_rng(seed)
    t, r, c = [], [], []
    for d in range(days):
        effect = rng.normal(0, 0.003, (2, 4))
        for i, w in enumerate([f"u{i % 40}" for i in range(400)] + [f"once-{d}-{i}" for i in range(40)]):
            x = effect + rng.normal(0, 0.05, (2, 4))
            x[CELL] = 0.001 * (d in blips and i == 400) + 0.05 * (d == campaign and i >= 410)
            t.append(d * 86400 + rng.uniform(0, 86400))
            r.append(x)
            c.append(w)
    x = rng.normal(size=(len(r), 8))
    return np.array(t), np.array(r), c, x / np.linalg.norm(x, axis=1, keepdims=True)


def _history(tmp_path, rows, name):
    import json

    from moeguard.monitor import periodhistory

    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return periodhistory.read_history(path, period=86400, digest="", shape=(2, 4), baseline=14, alpha=0.01,
                                      clients_test=True)


def test_a_history_s_alerts_that_this_test_passes_are_named_and_its_own_are_not(tmp_path, monkeypatch):
    """A history scored before sparse cells were handled keeps its false alarms (each alerted day stays
    out of later baselines): ``periodhistory.stale_alerts`` judges its alerted periods again against the
    same baseline periods and names those this test passes, with both p's; a history this version wrote
    gives none, its campaign day included."""
    import warnings

    from moeguard.monitor import periodhistory

    t, r, c, x = _blip_days(18, (6, 9, 12), campaign=15)
    kw = dict(period=86400, baseline=14, alpha=0.01, layers=[3, 7], x=x, clients_test=True)
    with monkeypatch.context() as m:
        m.setattr(periods, "SPARSE", 2.0)                # no cell is sparse: the test before 2026-12-07
        old = periods.score_periods(t, r, c, **kw)
    assert [i for i, row in enumerate(old) if row.get("alert")] == [6, 9, 12, 15], [row["p"] for row in old]
    assert all(old[i].get("small_alert") for i in (6, 9, 12)) and max(old[i]["p"] for i in (6, 9, 12)) < 1e-6
    stale = periodhistory.stale_alerts(_history(tmp_path, old, "old.jsonl"), baseline=14, alpha=0.01, layers=[3, 7])
    assert [s["start"] for s in stale] == [old[i]["start"] for i in (6, 9, 12)], stale   # not the campaign's day
    for s, i in zip(stale, (6, 9, 12)):
        assert set(s["tests"]) == {"load", "small_clients"}
        load = s["tests"]["load"]
        assert load["p_then"] == old[i]["p"] and load["p_now"] > 0.01 and (load["layer"], load["expert"]) == (7, 2)
        assert s["tests"]["small_clients"]["p_then"] == old[i]["small_p"] and s["tests"]["small_clients"]["p_now"] > 0.01
    # the owner accepted one: not named again
    hist = periodhistory.mark_accepted(_history(tmp_path, old, "old.jsonl"), {old[9]["start"]})
    assert [s["start"] for s in periodhistory.stale_alerts(hist, baseline=14, alpha=0.01, layers=[3, 7])] == \
        [old[6]["start"], old[12]["start"]]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        periodhistory.warn_stale(hist, baseline=14, alpha=0.01, layers=[3, 7])
    assert len(said) == 1, [str(w.message) for w in said]
    text = str(said[0].message)
    assert text.startswith("2 periods of the history alerted when scored and pass this version of the test")
    assert f"{old[6]['start']} (load p {old[6]['p']:.2g} -> " in text and "layer 7 expert 2" in text
    assert text.endswith(f"--accept {old[6]['start']},{old[12]['start']}")
    # this version's rows: the blips pass, the campaign alerts, and nothing is named
    new = periods.score_periods(t, r, c, **kw)
    assert [i for i, row in enumerate(new) if row.get("alert")] == [15], [row["p"] for row in new]
    assert periodhistory.stale_alerts(_history(tmp_path, new, "new.jsonl"), baseline=14, alpha=0.01, layers=[3, 7]) == []


def test_the_load_test_alone_is_judged_again_against_the_baseline_its_period_had(tmp_path, monkeypatch):
    """Without the clients' tests, a history's load alerts alone: the campaign's (days 15 and 16) still
    alert against the baseline they had then, even where the owner later accepted day 16 (in the
    baseline of the whole history, day 15 would have it)."""
    from moeguard.monitor import periodhistory

    t, r, c, x = _blip_days(18, (6, 9, 12), campaign=15)
    later = (t >= 16 * 86400) & (t < 17 * 86400)
    r[later & (np.arange(len(t)) % 440 >= 410), CELL[0], CELL[1]] = 0.05   # the campaign goes on on day 16
    kw = dict(period=86400, baseline=14, alpha=0.01, layers=[3, 7])
    with monkeypatch.context() as m:
        m.setattr(periods, "SPARSE", 2.0)
        old = periods.score_periods(t, r, c, **kw)
        accepted = periods.score_periods(t, r, c, accept=[old[16]["start"]], **kw)
    assert [i for i, row in enumerate(old) if row.get("alert")] == [6, 9, 12, 15, 16], [row["p"] for row in old]
    path = tmp_path / "old.jsonl"
    for rows in (old, accepted):
        path.write_text("".join(__import__("json").dumps(row) + "\n" for row in rows))
        hist = periodhistory.read_history(path, period=86400, digest="", shape=(2, 4), baseline=14, alpha=0.01)
        stale = periodhistory.stale_alerts(hist, baseline=14, alpha=0.01, layers=[3, 7])
        assert [s["start"] for s in stale] == [old[i]["start"] for i in (6, 9, 12)], stale
        assert all(set(s["tests"]) == {"load"} for s in stale)
    # day 15 accepted in a later run: day 16 was judged without it, so its verdict is not certain (with
    # it, day 16 may pass): not named
    hist = periodhistory.mark_accepted(periodhistory.read_history(path, period=86400, digest="", shape=(2, 4), baseline=14,
                                                                  alpha=0.01), {old[15]["start"]})
    assert [s["start"] for s in periodhistory.stale_alerts(hist, baseline=14, alpha=0.01, layers=[3, 7])] == \
        [old[i]["start"] for i in (6, 9, 12)]
    # a log whose older lines were dropped: no period has the baseline it had, none is named
    assert periodhistory.stale_alerts(hist[5:], baseline=14, alpha=0.01, layers=[3, 7]) == []
    # an edited row this cannot read is passed over, not a traceback (only a warning is at stake)
    hist[6] = {k: v for k, v in hist[6].items() if k != "expert"}
    assert [s["start"] for s in periodhistory.stale_alerts(hist, baseline=14, alpha=0.01, layers=[3, 7])] == \
        [old[i]["start"] for i in (9, 12)]
