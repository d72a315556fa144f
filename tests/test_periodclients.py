"""An alerted period's cause (``periodclients.py``): a day whose clients' routing went beyond what
the same content got on the baseline days is put down to routing and its clients are the ones with
small p's; a day that only holds more of one region of content (whose residual the neighbours'
prediction gets wrong) is put down to the mix; benign days' p_routing is a p-value; a verbatim
repeat is not its own match; without the baseline's requests (--history) no cause is given, and
says why."""

from __future__ import annotations

import numpy as np
import pytest

from moeguard.monitor import periodclients, periods

DAY = 86400.0
WHY_NO_REQUESTS = ("(a --history's periods bring theirs from the period_requests folder beside it, which "
                   "`monitor score --period` writes; serve's period log has none)")
REGIONS = 12


def _world(seed: int = 0):
    """Region centres in 8 dimensions and each region's bias in one cell (the neighbours' prediction
    is off by that much there): region 0 is off by +0.06, the others by small amounts."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (REGIONS, 8))
    bias = rng.normal(0, 0.005, REGIONS)
    bias[0] = 0.06
    return centres, bias


def _requests(rng, centres, bias, regions, shift: float = 0.0):
    """One client's requests in the given regions: embeddings near the centres, residual in the cell."""
    x = centres[regions] + rng.normal(0, 0.5, (len(regions), 8))
    r = bias[regions] + rng.normal(0, 0.04, len(regions)) + shift
    return x, r


def _day(rng, centres, bias, *, users: int = 40, heavy: int = 0, campaign: int = 0, shift: float = 0.05,
         away: float = 0.0, region: int | None = None):
    """A day's requests: ``users`` benign users of 8 requests, each keeping to 2 regions (habits;
    region 0 as often as any); ``heavy`` identities of 24 requests of region 0 only (a batch job);
    ``campaign`` identities of 24 requests in ordinary regions whose routing is moved by ``shift``
    (and their embeddings by ``away`` along one axis: a prefix moves them too; ``region``: all in
    that one)."""
    xs, rs, who = [], [], []
    for u in range(users):
        x, r = _requests(rng, centres, bias, rng.choice(rng.choice(REGIONS, 2, replace=False), 8))
        xs.append(x), rs.append(r), who.extend([f"user-{u}"] * 8)
    for h in range(heavy):
        x, r = _requests(rng, centres, bias, np.zeros(24, dtype=int))
        xs.append(x), rs.append(r), who.extend([f"batch-{h}"] * 24)
    for c in range(campaign):
        x, r = _requests(rng, centres, bias, rng.integers(1, REGIONS, 24) if region is None else np.full(24, region), shift)
        x[:, 0] += away
        xs.append(x), rs.append(r), who.extend([f"mallory-{c}"] * 24)
    return np.concatenate(xs), np.concatenate(rs), who


def _cause(rng, centres, bias, **day):
    """The cause of a day (its clients' p's too) against 10 benign baseline days."""
    base = [_day(rng, centres, bias) for _ in range(10)]
    before = periodclients.Earlier([b[0] for b in base], [[f"{i}:{c}" for c in b[2]] for i, b in enumerate(base)])
    x, r, who = _day(rng, centres, bias, **day)
    row: dict = {}
    ps = before.cause(row, r=r, clients=who, pool_r=np.concatenate([b[1] for b in base]), alpha=0.01,
                      nn=before.match(x))
    return row, ps


def _days_in_cells(days: list, seed: int = 7):
    """``_day``'s days as score_periods' input: times, embeddings, residuals [N, 2, 3] (the days' in
    cell (1, 2), noise in the others) and clients (benign users named per day)."""
    t = np.concatenate([d * DAY + np.linspace(0, DAY - 1, len(x)) for d, (x, _, _) in enumerate(days)])
    r = np.zeros((len(t), 2, 3))
    r[:, 1, 2] = np.concatenate([d[1] for d in days])
    r += np.random.default_rng(seed).normal(0, 0.01, r.shape) * np.array([1, 1, 0])
    who = [c if not c.startswith("user") else f"{d}:{c}" for d, (_, _, cs) in enumerate(days) for c in cs]
    return t, np.concatenate([d[0] for d in days]), r, who


def test_a_campaign_is_put_down_to_routing_and_a_heavy_region_to_the_mix():
    centres, bias = _world()
    rng = np.random.default_rng(1)
    row, ps = _cause(rng, centres, bias, campaign=3, shift=0.08)
    assert row["cause"] == "routing" and row["p_routing"] < 1e-4, row
    assert {c for c in ps if ps[c] <= 0.01} == {"mallory-0", "mallory-1", "mallory-2"}, ps
    # six batch identities sending region 0 only: their residuals are high (region 0's bias), and as
    # high as region 0's requests were on the baseline days
    row, ps = _cause(rng, centres, bias, heavy=6)
    assert row["cause"] == "mix" and row["p_routing"] > 0.01, row
    assert np.mean(_day(rng, centres, bias, users=0, heavy=6)[1]) > 0.05     # a high cell, as an alert's
    # the same identities with their routing moved too: routing
    row, _ = _cause(rng, centres, bias, heavy=6, campaign=2)
    assert row["cause"] == "routing", row


def test_benign_days_p_routing_is_a_p_value():
    centres, bias = _world(2)
    rng = np.random.default_rng(3)
    ps = [_cause(rng, centres, bias)[0]["p_routing"] for _ in range(40)]
    assert np.mean(np.array(ps) <= 0.05) <= 0.1 and np.mean(np.array(ps) <= 0.5) >= 0.2, sorted(ps)[:10]


def test_a_verbatim_repeat_is_not_its_own_match_and_a_request_left_without_matches_counts_for_nothing():
    rng = np.random.default_rng(4)
    pool = rng.normal(size=(50, 4))
    q = np.concatenate([pool[:3], pool[:3] + 1e-3])
    nn = periodclients.nearest(q, pool, 4)
    assert all(i not in row for i, row in zip(range(3), nn[:3])), nn       # the copies are excluded
    assert all(i in row for i, row in zip(range(3), nn[3:])), nn           # a near one is still the nearest
    # more copies than k, beside rows without any, in one chunk: each copy's k are its nearest others
    many = np.concatenate([pool, np.repeat(pool[:1], 9, 0)])
    nn = periodclients.nearest(np.concatenate([pool[:1], q[3:]]), many, 4)
    want = np.argsort(((pool[:1, None] - pool[None, 1:]) ** 2).sum(-1), axis=1)[0, :4] + 1
    assert sorted(nn[0].tolist()) == sorted(want.tolist()), nn
    assert set(nn[1].tolist()) <= {0, *range(50, 59)}, nn                # a near one: the copies are its nearest
    # copies in a later chunk (512 rows a chunk at this pool), among rows without: each row's own answer
    far = rng.normal(size=(700, 4))
    far[[3, 550, 551, 699]] = pool[[5, 6, 6, 7]]
    nn = periodclients.nearest(far, pool, 4)
    d2 = ((far[:, None] - pool[None]) ** 2).sum(-1)
    d2[d2 <= 1e-12] = np.inf
    assert [set(a) for a in nn] == [set(b) for b in np.argsort(d2, axis=1)[:, :4]]
    assert all(i not in nn[r] for r, i in ((3, 5), (550, 6), (551, 6), (699, 7))), nn[[3, 550, 551, 699]]
    # a pool of 5 rows, 4 of them copies of the query: one match is left, the rest are -1
    copies = np.concatenate([np.repeat(pool[:1], 4, 0), pool[1:2]])
    nn = periodclients.nearest(pool[:1], copies, 3)
    assert sorted(nn[0].tolist()) == [-1, -1, 4], nn
    v = np.array([9.0, 9.0, 9.0, 9.0, 2.0])
    assert periodclients.matched_mean(v, nn).tolist() == [2.0]
    assert np.isnan(periodclients.matched_mean(v, periodclients.nearest(pool[:1], copies[:4], 3))).all()
    # such a request is left out of its client's t, not turned into NaN for the client
    z, _, tested = periodclients.moderated_z(np.array([0.1, np.nan, 0.2, 0.1, 0.3, 0.0, 0.1, 0.2, 0.1]),
                                             np.array([0, 0, 0, 0, 0, 1, 1, 1, 1]))
    assert tested.tolist() == [True, True] and np.isfinite(z).all(), z


def test_without_the_baseline_periods_requests_no_cause_is_given_and_the_row_says_why():
    centres, bias = _world()
    rng = np.random.default_rng(5)
    one = _day(rng, centres, bias)
    before = periodclients.Earlier([one[0]], [one[2]])
    row: dict = {}
    assert before.cause(row, r=one[1], clients=one[2], pool_r=one[1], alpha=0.01, nn=None) == {}
    assert row["cause"] is None and "1 baseline periods" in row["cause_why"] and "--history" in row["cause_why"], row
    few = [_day(rng, centres, bias, users=2) for _ in range(4)]       # 2 users a period: 16 requests
    assert "2 baseline periods (32 requests) held with their requests; 2 and 256 needed" in \
        periodclients.Earlier([f[0] for f in few[:2]], [f[2] for f in few[:2]]).why
    repeated = periodclients.Earlier([np.concatenate([f[0]] * 5) for f in few],      # enough requests, 8 clients
                                     [[f"{i}:{c}" for c in f[2]] * 5 for i, f in enumerate(few)])
    assert repeated.why == "8 clients of 4 or more requests in the baseline periods, 32 needed", repeated.why


def test_score_periods_gives_an_alert_its_cause_and_each_named_client_its_p():
    centres, bias = _world()
    rng = np.random.default_rng(6)
    days = [_day(rng, centres, bias) for _ in range(12)] + [_day(rng, centres, bias, campaign=3, shift=0.15)]
    t, x, r, who = _days_in_cells(days)
    rows = periods.score_periods(t, r, who, period=DAY, baseline=14, alpha=0.01, layers=[0, 1], x=x)
    last = rows[-1]
    assert last.get("alert") and (last["layer"], last["expert"]) == (1, 2), (last["p"], last["layer"], last["expert"])
    assert last["cause"] == "routing" and last["p_routing"] < 1e-4, last
    named = {c["client"]: c["p_routing"] for c in last["top_clients"]}
    assert {c for c in named if c.startswith("mallory")} == {"mallory-0", "mallory-1", "mallory-2"}, named
    assert all(named[c] < 1e-3 for c in named if c.startswith("mallory")), named
    assert "routing beyond content" in periods.reason(last)["detail"] and periods.reason(last)["cause"] == "routing"
    assert not any("cause" in row for row in rows[:-1])       # only an alert is given a cause
    without = periods.score_periods(t, r, who, period=DAY, baseline=14, alpha=0.01, layers=[0, 1])
    assert "cause" not in without[-1] and without[-1]["p"] == last["p"]


@pytest.mark.parametrize(("k", "queries"), [(1, 7), (5, 7), (5, 1100)])
def test_nearest_returns_the_k_nearest_other_rows(k, queries):
    rng = np.random.default_rng(8)
    pool, q = rng.normal(size=(40, 3)), rng.normal(size=(queries, 3))    # 1,100 queries: three chunks
    got = periodclients.nearest(q, pool, k)
    want = np.argsort(((q[:, None] - pool[None]) ** 2).sum(-1), axis=1)[:, :k]
    assert [set(a) for a in got] == [set(b) for b in want]
    assert (np.diff(got, axis=1) > 0).all(), got[:3]     # in pool order: means over them sum in one order
    assert periodclients.nearest(q, pool[:0], k).shape == (queries, 0)   # no pool: no match, no error
    # skip: the same as the pool without those rows, as indices into the whole pool
    others = np.r_[0:10, 25:40]
    within = periodclients.nearest(q, pool[others], k)
    assert np.array_equal(periodclients.nearest(q, pool, k, skip=(10, 25)), others[within])
    left = periodclients.nearest(q[:2], pool, 7, skip=(0, 35))            # 5 rows left for 7 matches
    assert [sorted(r.tolist()) for r in left] == [[-1, -1, 35, 36, 37, 38, 39]] * 2, left


def test_the_null_matches_each_period_against_the_others_only():
    rng = np.random.default_rng(11)
    sizes = [300, 1, 260, 280]                                 # a period of one request: too few clients
    x = [rng.normal(size=(m, 3)) for m in sizes]
    x[2][:40] = x[0][:40]                                      # copies across periods: matches, not repeats
    x[3][:5] = x[3][5:10]                                      # copies within a period: skipped with it
    clients = [[f"p{j}-c{i // 4}" for i in range(m)] for j, m in enumerate(sizes)]
    before = periodclients.Earlier(x, clients)
    starts = np.cumsum([0] + sizes[:-1])
    period = np.searchsorted(starts, before._rows, side="right") - 1
    assert set(period.tolist()) == {0, 2, 3} and len(before._nn) == len(before._rows)
    for row, j, nn in zip(before._rows, period, before._nn):
        others = np.concatenate([np.arange(a, a + m) for i, (a, m) in enumerate(zip(starts, sizes)) if i != j])
        want = others[periodclients.nearest(before.pool[row][None], before.pool[others], periodclients.K)[0]]
        assert not np.isin(nn, np.arange(starts[j], starts[j] + sizes[j])).any(), (row, j)
        far = ((before.pool[nn] - before.pool[row]) ** 2).sum(1)         # the same distances: copies tie
        assert np.array_equal(np.sort(far), np.sort(((before.pool[want] - before.pool[row]) ** 2).sum(1))), (row, j)


def test_the_null_takes_other_clients_each_period_where_names_recur():
    centres, bias = _world()
    rng = np.random.default_rng(9)
    days = [_day(rng, centres, bias) for _ in range(10)]      # the same 40 names every day (API keys)
    before = periodclients.Earlier([d[0] for d in days], [d[2] for d in days])
    assert len(before.sampled) == periodclients.NULL_CLIENTS and before.why is None
    assert len({name for _, name in before.sampled}) > 30, before.sampled    # not 13 names, 10 times each


def test_a_campaign_on_consecutive_days_is_put_down_to_routing_each_day():
    # an alerting day stays out of the next day's matches: its campaign does not become its content's norm
    centres, bias = _world(1)
    rng = np.random.default_rng(10)
    days = [_day(rng, centres, bias) for _ in range(10)] + [_day(rng, centres, bias, campaign=3, shift=0.15, away=4.0,
                                                                 region=1) for _ in range(2)]
    t = np.concatenate([d * DAY + np.linspace(0, DAY - 1, len(x)) for d, (x, _, _) in enumerate(days)])
    r = np.zeros((len(t), 1, 2))
    r[:, 0, 1] = np.concatenate([d[1] for d in days])
    who = [c if c.startswith("mallory") else f"{d}:{c}" for d, (_, _, cs) in enumerate(days) for c in cs]
    rows = periods.score_periods(t, r, who, period=DAY, baseline=14, alpha=0.01, layers=[0],
                                 x=np.concatenate([d[0] for d in days]))
    assert [bool(row.get("alert")) for row in rows[-2:]] == [True, True], [row["p"] for row in rows]
    assert [row["cause"] for row in rows[-2:]] == ["routing", "routing"], rows[-2:]
    assert rows[-1]["p_routing"] < 1e-4, rows[-1]


def test_an_alert_without_a_cause_says_why_in_its_detail():
    row = {"layer": 1, "expert": 2, "z": 5.0, "p": 1e-6, "requests": 300, "clients": 40, "shift": 0.01, "baseline": 14,
           "cause": None, "p_routing": None, "cause_why": "1 baseline periods (300 requests) held with their requests; "
                                                       "2 and 256 needed " + WHY_NO_REQUESTS}
    detail = periods.reason(row)["detail"]
    assert detail.endswith("; no cause given (1 baseline periods (300 requests) held with their requests; 2 and 256 "
                           "needed " + WHY_NO_REQUESTS + "); if it is benign (a launch, a batch job), "
                           "accept the period (--accept START) so that later periods are tested against it"), detail
    assert "cause" not in periods.reason(row)


def _two_cells(rng, day, shift: float = 0.0):
    """A day of ``_day``'s in two cells: its residual in (0, 1), where region 0's bias moves it, and
    noise in (1, 2), moved by ``shift`` (a campaign's pull)."""
    x, ra, who = day
    r = np.zeros((len(x), 2, 3))
    r[:, 0, 1] = ra
    r[:, 1, 2] = rng.normal(0, 0.04, len(x)) + shift
    return x, r, who


def test_a_campaign_behind_a_decoy_is_put_down_to_routing_in_its_own_cell(monkeypatch):
    # a heavy load of region 0 (a decoy: the mix moves cell (0, 1) most) beside a campaign that moves
    # cell (1, 2): the test's top cell is the decoy's; the campaign is found in the other alerting cell
    centres, bias = _world()
    rng = np.random.default_rng(11)
    days = [_two_cells(rng, _day(rng, centres, bias)) for _ in range(12)]
    heavy = _two_cells(rng, _day(rng, centres, bias, heavy=12))
    camp = _two_cells(rng, _day(rng, centres, bias, users=0, campaign=3, shift=0.0), shift=0.15)
    days.append((np.concatenate([heavy[0], camp[0]]), np.concatenate([heavy[1], camp[1]]), heavy[2] + camp[2]))
    t = np.concatenate([d * DAY + np.linspace(0, DAY - 1, len(x)) for d, (x, _, _) in enumerate(days)])
    who = [c if not c.startswith("user") else f"{d}:{c}" for d, (_, _, cs) in enumerate(days) for c in cs]
    args = (t, np.concatenate([d[1] for d in days]), who)
    kw = dict(period=DAY, baseline=14, alpha=0.01, layers=[0, 1], x=np.concatenate([d[0] for d in days]))
    last = periods.score_periods(*args, **kw)[-1]
    assert last.get("alert") and (last["layer"], last["expert"]) == (0, 1), (last["p"], last["layer"], last["expert"])
    assert {c["client"] for c in last["top_clients"]} <= {f"batch-{i}" for i in range(12)}, last["top_clients"]
    assert last["cause"] == "routing" and last["cause_cell"] == [1, 2] and last["p_routing"] < 1e-4, last
    assert {c["client"] for c in last["routing_clients"]} == {"mallory-0", "mallory-1", "mallory-2"}, last
    detail = periods.reason(last)["detail"]
    assert "went to expert 2 at layer 1 (which alerts too)" in detail and "whose: mallory-" in detail, detail
    # sought in the top cell alone (the cause as first built), the decoy hides the campaign
    monkeypatch.setattr(periods, "CAUSE_CELLS", 1)
    alone = periods.score_periods(*args, **kw)[-1]
    assert alone["cause"] == "mix" and alone["cause_cell"] == [0, 1] and "routing_clients" not in alone, alone
    # the alert says it too, beyond its detail: where, and whose routing moved
    alert = periods.reason(last)
    assert alert["cause_cell"] == [1, 2] and [c["client"] for c in alert["routing_clients"]][0].startswith("mallory-")
    assert "routing_clients" not in periods.reason(alone)


def test_judge_gives_the_top_cell_first_then_every_other_alerting_cell(monkeypatch):
    rng = np.random.default_rng(12)
    base = periods.Baseline(baseline=14, alpha=0.01, layers=[0, 1])
    for _ in range(10):
        base.judge({}, rng.normal(0, 1, (2, 4)), np.full((2, 4), 1.0), 100)
    m = rng.normal(0, 1, (2, 4))
    m[1, 3], m[0, 2], m[1, 0], m[0, 0], m[0, 1] = 1000.0, 300.0, 90.0, 27.0, 8.0   # five cells far out, each 3x the next
    row: dict = {}
    _, l, e, cells = base.judge(row, m, np.full((2, 4), 1.0), 100)
    assert (l, e) == (1, 3) and cells[0] == (1, 3, row["p"]), (cells, row["p"])
    assert [c[:2] for c in cells] == [(1, 3), (0, 2), (1, 0), (0, 0), (0, 1)] and all(c[2] <= 0.01 for c in cells), cells
    assert [c[2] for c in cells] == sorted(c[2] for c in cells), cells
    monkeypatch.setattr(periods, "CAUSE_CELLS", 4)          # a cap keeps the most deviant
    *_, capped = base.judge({}, m, np.full((2, 4), 1.0), 100)
    assert capped == cells[:4], (capped, cells)
    calm: dict = {}
    *_, cells = base.judge(calm, rng.normal(0, 0.5, (2, 4)), np.full((2, 4), 1.0), 100)   # no alert: the top cell alone
    assert not calm.get("alert") and len(cells) == 1 and cells[0][2] == calm["p"], (cells, calm["p"])


def test_one_cell_as_a_column_gives_the_same_cause_and_two_cells_cost_a_bonferroni_factor():
    centres, bias = _world()
    rng = np.random.default_rng(13)
    base = [_day(rng, centres, bias) for _ in range(10)]
    before = periodclients.Earlier([b[0] for b in base], [[f"{i}:{c}" for c in b[2]] for i, b in enumerate(base)])
    x, r, who = _day(rng, centres, bias, campaign=2, shift=0.05)
    pool, nn = np.concatenate([b[1] for b in base]), before.match(x)
    one, col, two = {}, {}, {}
    p1 = before.cause(one, r=r, clients=who, pool_r=pool, alpha=0.01, nn=nn)
    assert before.cause(col, r=r[:, None], clients=who, pool_r=pool[:, None], alpha=0.01, nn=nn) == p1 and col == one
    p2 = before.cause(two, r=np.stack([r, r], 1), clients=who, pool_r=np.stack([pool, pool], 1), alpha=0.01, nn=nn,
                      cells=[[0, 1], [1, 2]])
    assert {c: (None if v is None else min(1.0, 2 * v)) for c, v in p1.items() if v is None or v < 0.5} == \
        {c: v for c, v in p2.items() if p1[c] is None or p1[c] < 0.5}
    assert two["p_routing"] == pytest.approx(2 * one["p_routing"]) and two["cause_cell"] == [0, 1], (one, two)
    with pytest.raises(ValueError, match="residuals in 2 cells, the pool's in 1"):
        before.cause({}, r=np.stack([r, r], 1), clients=who, pool_r=pool, alpha=0.01, nn=nn)
    # the pool read in place (rows by pool_at, the cells' columns by pool_cols): the same as the copy, no copy made
    wide = np.stack([rng.normal(size=len(pool) + 5), np.r_[pool, np.zeros(5)], rng.normal(size=len(pool) + 5)], 1)
    at, placed = rng.permutation(len(pool)), {}
    wide[:len(pool), 1] = 0.0
    wide[at, 1] = pool
    got = before.cause(placed, r=np.stack([r, r], 1), clients=who, pool_r=wide, pool_at=at, pool_cols=[1, 1],
                       alpha=0.01, nn=nn, cells=[[0, 1], [1, 2]])
    assert got == p2 and placed == two


def test_routing_clients_are_those_at_or_under_the_level_smallest_first():
    ps = {"a": 0.5, "b": 1e-6, "c": None, "d": 0.01, "e": 1e-3}
    got = periodclients.routing_clients(ps, ["a", "b", "b", "d", "e", "e", "e", "c"], 0.01)
    assert got == [{"client": "b", "requests": 2, "p_routing": 1e-6}, {"client": "e", "requests": 3, "p_routing": 1e-3},
                   {"client": "d", "requests": 1, "p_routing": 0.01}]


def test_a_lift_every_client_shares_is_centred_away_and_a_campaign_still_stands_out():
    """The test's cell was chosen because the period's mean stood out there, which lifts every client's
    difference a little: the null is centred on the period's own clients' median where that is higher.
    The baseline's centre alone (``centre="baseline"``, the test before) reads such a lift as routing."""
    centres, bias = _world()
    rng = np.random.default_rng(20)
    base = [_day(rng, centres, bias) for _ in range(10)]
    before = periodclients.Earlier([b[0] for b in base], [[f"{i}:{c}" for c in b[2]] for i, b in enumerate(base)])
    pool = np.concatenate([b[1] for b in base])
    x, r, who = _day(rng, centres, bias)
    lifted, by_period = {}, {}
    before.cause(lifted, r=r + 0.05, clients=who, pool_r=pool, alpha=0.01, nn=before.match(x), centre="baseline")
    before.cause(by_period, r=r + 0.05, clients=who, pool_r=pool, alpha=0.01, nn=before.match(x))
    assert lifted["cause"] == "routing" and by_period["cause"] == "mix", (lifted, by_period)
    # a period whose clients sit lower than the baseline's keeps the baseline's centre: never more liberal
    low = {c: before.cause({}, r=r - 0.05, clients=who, pool_r=pool, alpha=0.01, nn=before.match(x), centre=c)
           for c in ("baseline", "period")}
    assert low["baseline"] == low["period"], low
    # two identities whose routing moved further stand out of the lifted day, and only they
    xc, rc, wc = _day(rng, centres, bias, users=0, campaign=2, shift=0.11)
    row: dict = {}
    ps = before.cause(row, r=np.concatenate([r + 0.05, rc]), clients=who + wc, pool_r=pool, alpha=0.01,
                      nn=before.match(np.concatenate([x, xc])))
    assert row["cause"] == "routing" and {c for c, p in ps.items() if p is not None and p <= 0.01} == \
        {"mallory-0", "mallory-1"}, (row, {c: p for c, p in ps.items() if p is not None and p < 0.5})
    with pytest.raises(ValueError, match="centre is 'median', not 'period' or 'baseline'"):
        before.cause({}, r=r, clients=who, pool_r=pool, alpha=0.01, nn=before.match(x), centre="median")


USERS, BATCHES, SHIFT = 120, 30, 0.24   # a campaign's cell that alerts, less far out than the decoy's four


def _batches(rng, centres, region: int, ids: int, name: str):
    """``ids`` identities of 24 requests in one region each (a batch job), named ``name-i``: ``_requests``'
    embeddings (the caller gives the residuals)."""
    x, _ = _requests(rng, centres, np.zeros(REGIONS), np.full(24 * ids, region))
    return x, [f"{name}-{i}" for i in range(ids) for _ in range(24)]


def test_a_decoy_that_moves_more_cells_than_a_cap_does_not_hide_the_campaign(monkeypatch):
    # regions 1-4 are each off by +0.2 in a cell of their own (four tasks the neighbours get wrong);
    # a decoy of heavy loads of all four moves four cells further than a campaign moves its own (1, 1).
    # With the cause sought in at most 4 cells (the cap before 2026-12-06) the campaign's cell was not
    # tested and its alert read as the mix; every alerting cell is tested now, at a Bonferroni factor
    centres, _ = _world()
    rng = np.random.default_rng(21)
    bias = np.zeros(REGIONS)

    def cells(x, shift=0.0):
        """[n, 2, 3]: cells (0, 0)-(1, 0) region 1-4's bias; (1, 1) noise moved by ``shift``; (1, 2) noise."""
        region = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)   # the nearest centre: its content
        r = rng.normal(0, 0.04, (len(x), 6))
        r[:, :4] += 0.2 * (region[:, None] == np.arange(1, 5)[None])
        r[:, 4] += shift
        return r.reshape(len(x), 2, 3)

    days = []
    for _ in range(12):
        x, _, who = _day(rng, centres, bias, users=USERS)
        days.append((x, cells(x), who))
    x, _, who = _day(rng, centres, bias, users=USERS)
    xs, rs, whos = [x], [cells(x)], [who]
    for k in range(1, 5):
        xd, wd = _batches(rng, centres, k, BATCHES, f"batch{k}")
        xs.append(xd), rs.append(cells(xd)), whos.append(wd)
    xc, _, wc = _day(rng, centres, bias, users=0, campaign=3, shift=0.0)
    xs.append(xc), rs.append(cells(xc, shift=SHIFT)), whos.append(wc)
    days.append((np.concatenate(xs), np.concatenate(rs), sum(whos, [])))
    t = np.concatenate([d * DAY + np.linspace(0, DAY - 1, len(x)) for d, (x, _, _) in enumerate(days)])
    who = [c if not c.startswith("user") else f"{d}:{c}" for d, (_, _, cs) in enumerate(days) for c in cs]
    args = (t, np.concatenate([d[1] for d in days]), who)
    kw = dict(period=DAY, baseline=14, alpha=0.01, layers=[0, 1], x=np.concatenate([d[0] for d in days]))
    last = periods.score_periods(*args, **kw)[-1]
    assert last.get("alert") and (last["layer"], last["expert"]) != (1, 1), (last["p"], last["layer"], last["expert"])
    assert last["cause"] == "routing" and last["cause_cell"] == [1, 1] and last["p_routing"] < 1e-4, last
    assert {c["client"] for c in last["routing_clients"]} == {"mallory-0", "mallory-1", "mallory-2"}, last
    monkeypatch.setattr(periods, "CAUSE_CELLS", 4)
    capped = periods.score_periods(*args, **kw)[-1]
    assert capped["cause"] == "mix" and capped["cause_cell"] in ([0, 0], [0, 1], [0, 2], [1, 0]), capped



def _one_identity_on_day_12():
    """14 days (``_days_in_cells``): benign but for day 12, where one identity's 24 requests are moved by 0.08."""
    centres, bias = _world()
    rng = np.random.default_rng(11)
    return _days_in_cells([_day(rng, centres, bias) for _ in range(12)] + [_day(rng, centres, bias, campaign=1, shift=0.08)]
                          + [_day(rng, centres, bias)])

def test_the_clients_test_sees_one_identity_the_load_test_misses_and_holds_its_day_out_of_the_baseline():
    t, x, r, who = _one_identity_on_day_12()
    rows = periods.score_periods(t, r, who, period=DAY, baseline=14, alpha=0.01, layers=[0, 1], x=x, clients_test=True)
    load = periods.score_periods(t, r, who, period=DAY, baseline=14, alpha=0.01, layers=[0, 1], x=x)
    day = rows[12]
    # one identity of 24 requests among 344: the period's load does not alert, its routing does
    assert day["p"] > 0.01 and not day.get("alert") and load[12]["p"] == day["p"], day["p"]
    assert day["clients_alert"] and day["clients_p"] < 1e-3 and day["clients_cell"] == [1, 2], day
    assert [c["client"] for c in day["clients_routing"]] == ["mallory-0"], day["clients_routing"]
    assert not any(row.get("clients_alert") for i, row in enumerate(rows) if i != 12), [row.get("clients_p") for row in rows]
    assert all(row["clients_p"] is None and "2 and 256 needed" in row["clients_why"] for row in rows[:2])
    # held out of the next day's baseline, as a load alert is (without the clients' test it joins it)
    assert (rows[13]["baseline"], load[13]["baseline"]) == (12, 13)
    assert not any(k.startswith("clients_") for row in load for k in row) and "clients_test" not in load[0]["settings"]
    got = periodclients.clients_reason(day)
    assert got["statistic"] == "period_clients" and (got["layer"], got["experts"]) == (1, [2]) and got["p"] == day["clients_p"]
    assert "mallory-0 (24 requests, p " in got["detail"] and "the period's load did not alert (p " in got["detail"], got
    with pytest.raises(ValueError, match="embeddings"):
        periods.score_periods(t, r, who, period=DAY, baseline=14, alpha=0.01, layers=[0, 1], clients_test=True)


def test_a_cell_almost_nothing_routes_to_flags_no_benign_client_and_hides_no_campaign():
    """A sparse cell (0, 2): exactly 0 for every request but 1% of them, routed there once (0.0025).
    Most null clients' differences there are 0 or nearly, so the null's median, MAD and upper tail
    are too; without a floor on its scale (``SCALE_FLOOR`` where ``SPARSE``), a benign client with one
    such request stood out at p 1e-18 and 11 of 12 benign days alerted. With it, day 12's identity
    alone, in its own cell."""
    t, x, r, who = _one_identity_on_day_12()
    assert not r[:, 0, 2].any()
    r[np.random.default_rng(3).random(len(r)) < 0.01, 0, 2] = 0.0025
    rows = periods.score_periods(t, r, who, period=DAY, baseline=14, alpha=0.01, layers=[0, 1], x=x, clients_test=True)
    assert [i for i, row in enumerate(rows) if row.get("clients_alert")] == [12], [row["clients_p"] for row in rows]
    assert rows[12]["clients_cell"] == [1, 2] and rows[12]["clients_p"] < 1e-3
    assert [c["client"] for c in rows[12]["clients_routing"]] == ["mallory-0"]


def test_a_history_scored_with_the_clients_test_keeps_its_held_out_periods_out(tmp_path):
    import json

    from moeguard.monitor import periodhistory

    t, x, r, who = _one_identity_on_day_12()   # day 12 is held out by the clients' test alone (the test above)
    rows = periods.score_periods(t, r, who, period=DAY, baseline=14, alpha=0.01, layers=[0, 1], x=x, clients_test=True)
    path = tmp_path / "periods.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    history = periodhistory.read_history(path, period=DAY, digest="", shape=(2, 3), baseline=14, alpha=0.01, clients_test=True)
    assert [bool(h.get("clients_alert")) for h in history] == [i == 12 for i in range(14)]
    assert len(periods.Baseline(baseline=14, alpha=0.01, layers=[0, 1], history=history).kept) == 13   # 14 days less day 12
