"""The small clients' test (``monitor score --period-clients``, ``periodsmall.py``): a campaign split
over many identities of a few requests each is not tested by the clients' test and is diluted in the
load test; pooled with the period's other small clients, against the same pool of earlier periods, it
alerts and its identities are named. Benign days pass, an alerting day joins no baseline, and a run
reading the rows as history gets one run's numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeguard.monitor import periodhistory, periods, periodsmall

DAY = 86400


def _days(days: int, sybil_day: int | None, *, shift: float = 0.2, seed: int = 0):
    """Residuals [N, 2, 4] and embeddings [N, 8] of ``days`` days: 40 regular users of 10 requests and
    40 one-off requests (identities of 1 or 2) a day, a per-day effect per cell and per-request noise.
    On ``sybil_day``, 12 more requests from 6 identities of 2 ("sybil-k"), ``shift`` above in cell (1, 3)."""
    rng = np.random.default_rng(seed)
    t, r, c = [], [], []
    for d in range(days):
        effect = rng.normal(0, 0.003, (2, 4))
        who = [f"u{i % 40}" for i in range(400)] + [f"once-{d}-{i // 2 if i < 20 else i}" for i in range(40)]
        if d == sybil_day:
            who += [f"sybil-{i // 2}" for i in range(12)]
        for w in who:
            x = effect + rng.normal(0, 0.05, (2, 4))
            if w.startswith("sybil"):
                x[1, 3] += shift
            t.append(d * DAY + rng.uniform(0, DAY))
            r.append(x)
            c.append(w)
    x = rng.normal(size=(len(r), 8))
    return np.array(t), np.array(r), c, x / np.linalg.norm(x, axis=1, keepdims=True)


def _score(t, r, c, x, **kw):
    return periods.score_periods(t, r, c, period=DAY, baseline=14, alpha=0.01, layers=[3, 7], x=x, clients_test=True, **kw)


def test_pools_hold_the_requests_of_clients_under_each_size():
    clients = ["a"] * 3 + ["b"] * 5 + ["c"] * 9 + ["d"]
    got = dict(periodsmall.pools(clients))
    assert list(got) == list(periodsmall.SIZES) == [4, 8, 16, 32, 64]
    assert got[4].tolist() == [0, 1, 2, 17] and got[8].tolist() == [*range(8), 17] and got[16].tolist() == list(range(18))


def test_a_campaign_split_over_identities_of_two_requests_alerts_the_small_clients_test_not_the_load_test():
    t, r, c, x = _days(20, 17)
    rows = _score(t, r, c, x)
    day = rows[17]
    # the load test sees 12 requests in 452 diluted; the clients' test cannot test identities of 2
    assert not day.get("alert") and not day.get("clients_alert"), (day["p"], day["clients_p"])
    assert day["small_alert"] and day["small_p"] < 1e-3 and day["small_under"] == 4, day
    assert (day["small_layer"], day["small_expert"]) == (7, 3) and day["small_requests"] == 52 and day["small_clients"] == 36
    assert {n["client"][:6] for n in day["small_top_clients"]} == {"sybil-"}, day["small_top_clients"]
    # the pools above it hold the same requests (every client but the regulars is under 4): tested once
    assert [p["under"] for p in day["small_pools"]] == [4] and day["small_p"] == day["small_pools"][0]["p"]
    # benign days pass
    assert [i for i, row in enumerate(rows) if row.get("small_alert")] == [17], [row["small_p"] for row in rows]
    assert all(row["small_p"] is None and "3 needed" in row["small_why"] for row in rows[:3])
    # and the campaign day joins no baseline, the load test's included: the day after gets the numbers it
    # gets when the campaign day is not in the log at all
    assert not periods.joins(day)
    keep = np.floor(t / DAY) != 17
    alt = _score(t[keep], r[keep], [v for v, k in zip(c, keep) if k], x[keep])
    assert (alt[17]["start"], alt[17]["small_p"], alt[17]["p"]) == (rows[18]["start"], rows[18]["small_p"], rows[18]["p"])
    # without the campaign the day passes every test
    plain = _score(*_days(20, None))
    assert not any(row.get("small_alert") or row.get("alert") for row in plain), [row["small_p"] for row in plain]


def test_the_alert_says_which_clients_pool_moved_and_how_to_accept_it():
    day = _score(*_days(20, 17))[17]
    why = periodsmall.small_reason(day)
    assert why["statistic"] == "period_small_clients" and why["layer"] == 7 and why["experts"] == [3]
    assert why["detail"].startswith("the 52 requests of the period's 36 clients of fewer than 4 requests each: expert 3 "
                                    "at layer 7 took"), why["detail"]
    assert "A campaign split over many identities reads so" in why["detail"] and "sybil-" in why["detail"]
    assert why["detail"].endswith("accept the period (--accept 1970-01-18T00:00:00Z) so that later periods are tested "
                                  "against it")
    assert not periodsmall.small_reason(dict(day, accepted=True))["detail"].endswith("against it")


def test_a_run_reading_the_rows_as_history_gets_one_runs_small_clients_numbers(tmp_path):
    t, r, c, x = _days(20, 17)
    one = _score(t, r, c, x)
    early = t < 16 * DAY
    first = _score(t[early], r[early], [v for v, e in zip(c, early) if e], x[early])
    path = tmp_path / "periods.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in first))
    hist = periodhistory.read_history(path, period=DAY, digest="", shape=(2, 4), baseline=14, alpha=0.01, clients_test=True)
    assert all(set(row["_small_state"]) == set(periodsmall.SIZES) for row in hist), [sorted(row["_small_state"]) for row in hist]
    then = _score(t[~early], r[~early], [v for v, e in zip(c, ~early) if e], x[~early], history=hist)
    keys = ("small_p", "small_pools", "small_alert", "small_baseline", "small_z")
    assert [{k: row.get(k) for k in keys} for row in then[16:]] == [{k: row.get(k) for k in keys} for row in one[16:]]
    assert then[17]["small_alert"]
    # the history's rows come back as they were written (what was read back from them is not written again)
    assert json.loads(json.dumps(then[:16])) == json.loads(json.dumps(first))


def test_a_pool_whose_baseline_is_short_leaves_the_same_clients_to_the_next_pool():
    # the pools under 4 and 8 hold the same requests today (no client of 4-7), and only the pool under 8
    # has baseline periods enough: the period is tested there, not left untested as "the same test twice"
    rng = np.random.default_rng(0)
    small = periodsmall.SmallClients(baseline=14, alpha=0.01, layers=[3, 7])
    for _ in range(5):
        state = (rng.normal(0, 0.003, (2, 4)), np.full((2, 4), 0.05**2 / 40), 40)
        small.by_size[8].keep(state)
        small.by_size[16].keep(state)
    small.by_size[4].keep(state)
    clients = [f"u{i % 20}" for i in range(200)] + [f"once-{i}" for i in range(40)]   # regulars of 10, one-offs
    row: dict = {}
    small.test(row, rng.normal(0, 0.05, (len(clients), 2, 4)), clients)
    assert [p["under"] for p in row["small_pools"]] == [8] and row["small_p"] is not None, row
    assert row["small_under"] == 8 and row["small_requests"] == 40


@pytest.mark.parametrize("edit, said", [
    (lambda row: row["small_state"]["4"].update(mean="AAAA"), "is not a period of `monitor score --period`"),
    (lambda row: row["small_state"].update({"4": {"mean": row["state"]["mean"]}}), "KeyError: 'noise'"),
])
def test_a_damaged_small_state_in_a_history_is_a_one_line_error_naming_the_line(tmp_path, edit, said):
    from moeguard.errors import MoeguardError

    t, r, c, x = _days(5, None)
    rows = json.loads(json.dumps(_score(t, r, c, x)))
    edit(rows[3])
    path = tmp_path / "periods.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(MoeguardError) as e:
        periodhistory.read_history(path, period=DAY, digest="", shape=(2, 4), baseline=14, alpha=0.01, clients_test=True)
    assert f"{path}:4 " in str(e.value) and said in str(e.value), str(e.value)
