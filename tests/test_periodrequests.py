"""Each period's requests kept for a later run (``periodrequests.py``): a daily run given the history
and its kept requests gets the rows one run over all the days gets, the clients' test and the cause
included, where without them neither test has matches; which periods are kept; a damaged or foreign
file is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeguard.errors import MoeguardError
from moeguard.monitor import periodhistory, periodrequests, periods
from test_periodclients import DAY, _one_identity_on_day_12

SETTINGS = dict(period=DAY, baseline=14, alpha=0.01, layers=[0, 1])


def _first_run(tmp_path, t, x, r, who, upto: int):
    """Score the days before ``upto`` as one run, written as `monitor score` writes them (periods.jsonl and
    period_requests/); its periods.jsonl read back as a history, with its requests."""
    first = t < upto * DAY
    rows = periods.score_periods(t[first], r[first], who[:first.sum()], x=x[first], clients_test=True, **SETTINGS)
    out = tmp_path / "first"
    out.mkdir()
    (out / "periods.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    kept = periodrequests.save(out, rows, x=x[first], resid=r[first], clients=who[:first.sum()],
                               parts={int(k): i for k, i in zip(*periods.members(t[first], DAY))},
                               baseline=14, digest="", history=None)
    history = periodhistory.read_history(out / "periods.jsonl", period=DAY, digest="", shape=(2, 3), baseline=14,
                                         alpha=0.01, clients_test=True)
    return out, kept, history


def test_a_daily_run_with_the_kept_requests_gets_the_one_runs_rows_and_without_them_no_clients_test(tmp_path):
    t, x, r, who = _one_identity_on_day_12()          # one identity moved on day 12: the clients' test alone sees it
    one = periods.score_periods(t, r, who, x=x, clients_test=True, **SETTINGS)
    assert one[12]["clients_alert"] and not one[12].get("alert"), one[12]
    out, kept, history = _first_run(tmp_path, t, x, r, who, upto=12)
    assert kept == {"periods": 12, "first": 0, "mib": kept["mib"]} and kept["mib"] > 0
    held = periodrequests.read(out / "periods.jsonl", history, dim=8, shape=(2, 3))
    assert sorted(held) == list(range(12)) and all(len(h[2]) == one[i]["requests"] for i, h in held.items())
    then = t >= 12 * DAY
    daily = periods.score_periods(t[then], r[then], who[then.sum() * -1:], x=x[then], clients_test=True, history=history,
                                  held=held, **SETTINGS)
    assert json.dumps(daily) == json.dumps(one)       # every row, every number
    assert held == {}                                 # taken out of the dict: the arrays are not held twice
    # the history alone: the day's clients have no matches (2 periods of this run are needed), so no alarm
    bare = periods.score_periods(t[then], r[then], who[then.sum() * -1:], x=x[then], clients_test=True, history=history,
                                 **SETTINGS)
    assert bare[12]["clients_p"] is None and not bare[12].get("clients_alert"), bare[12]
    assert bare[12]["clients_why"].startswith("0 baseline periods (0 requests) held with their requests"), bare[12]
    assert bare[12]["p"] == one[12]["p"]              # the load test needs no requests
    with pytest.raises(ValueError, match="embeddings"):
        periods.score_periods(t[then], r[then], who[then.sum() * -1:], history=history, **SETTINGS,
                              held=periodrequests.read(out / "periods.jsonl", history, dim=8, shape=(2, 3)))


def test_the_periods_kept_are_those_a_later_baseline_can_take_alerted_ones_among_them():
    def row(i, *, state=True, **flags):
        return {"index": i, **({"state": {}} if state else {}), **flags}

    rows = [row(0, state=False), row(1), row(2), row(3, alert=True), row(4), row(5, clients_alert=True), row(6)]
    assert periodrequests.carried(rows, 3) == [2, 3, 4, 5, 6]   # the last 3 that join: 2, 4, 6
    assert periodrequests.carried(rows, 10) == [1, 2, 3, 4, 5, 6]
    assert periodrequests.carried([*rows, row(7, small_alert=True)], 2) == [4, 5, 6, 7]
    assert periodrequests.carried([row(1, accepted=True, alert=True), row(2, alert=True)], 1) == [1, 2]
    assert periodrequests.carried([row(1, alert=True), row(2, alert=True), row(3, alert=True)], 2) == [2, 3]
    assert periodrequests.carried([row(0, state=False)], 3) == []


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda z: z.update(x=z["x"][:-1]), "its embeddings are (319, 8), not (320, 8)"),
    (lambda z: z.update(resid=z["resid"][:, :1]), "its residuals are (320, 1, 3), not (320, 2, 3)"),
    (lambda z: z.update(clients=z["clients"][:3]), "it names (3,) clients, not 320"),
    (lambda z: z.update(start=np.array("1970-01-09T00:00:00Z")), "its start is 1970-01-09T00:00:00Z"),
    (lambda z: z.update(digest=np.array("abc")), "another profile's neighbour references"),
    (lambda z: z["x"].__setitem__((0, 0), np.nan), "a value that is not finite"),
    (lambda z: z.pop("resid"), "is not a period's requests as `monitor score --period` writes them (KeyError"),
    (lambda z: z.update(x=z["x"].astype(int)), "its embeddings or residuals are not numbers"),
    (lambda z: z.update(clients=np.arange(len(z["clients"]))), "its clients are not names"),
    ("npy", "is not a period's requests as `monitor score --period` writes them (TypeError"),
])
def test_a_file_that_is_not_its_periods_is_a_one_line_error_naming_it_and_the_fix(tmp_path, edit, needle):
    t, x, r, who = _one_identity_on_day_12()
    keep = t < 5 * DAY
    out, _, history = _first_run(tmp_path, t[keep], x[keep], r[keep], who[:keep.sum()], upto=5)
    path = out / "period_requests" / "3.npz"
    with np.load(path) as z:
        arrays = dict(z)
    if edit == "npy":   # a lone array under the name: np.load gives an array, not an archive
        with open(path, "wb") as f:
            np.save(f, arrays["x"])
    else:
        edit(arrays)
        np.savez(path, **arrays)
    with pytest.raises(MoeguardError) as e:
        periodrequests.read(out / "periods.jsonl", history, dim=8, shape=(2, 3))
    assert needle in e.value.message and str(path) in e.value.message and "\n" not in e.value.message, e.value.message
    assert e.value.hint.startswith(f"delete {path} ")


def test_the_periods_read_back_are_those_the_first_baseline_takes_accepted_ones_among_them():
    def row(i, **flags):
        return {"index": i, "start": str(i), "_state": (), **flags}

    rows = [{"index": 0, "start": "0"}, row(1), row(2, alert=True), row(3), row(4, clients_alert=True), row(5)]
    assert [r["index"] for r in periodrequests.wanted(rows, baseline=2)] == [3, 5]
    assert [r["index"] for r in periodrequests.wanted(rows, baseline=10)] == [1, 3, 5]
    assert [r["index"] for r in periodrequests.wanted(rows, baseline=3, accept=["4"])] == [3, 4, 5]
    assert [r["index"] for r in periodrequests.wanted([*rows, row(6, accepted=True, alert=True)], baseline=2)] == [5, 6]


def test_a_resumed_save_replaces_what_an_interrupted_one_left_and_writes_through_no_link(tmp_path):
    t, x, r, who = _one_identity_on_day_12()
    keep = t < 6 * DAY
    out, _, history = _first_run(tmp_path, t[keep], x[keep], r[keep], who[:keep.sum()], upto=6)
    then = (t >= 6 * DAY) & (t < 8 * DAY)
    rows = periods.score_periods(t[then], r[then], who[keep.sum():keep.sum() + then.sum()], x=x[then], clients_test=True,
                                 history=history, **SETTINGS)
    run = tmp_path / "run.partial"
    (run / "period_requests").mkdir(parents=True)
    (run / "period_requests" / "99.npz").write_bytes(b"left by an interrupted attempt")
    before = (out / "period_requests" / "2.npz").read_bytes()
    for _ in range(2):   # the second: a resumed run saving into the same partial folder
        kept = periodrequests.save(run, rows, x=x[then], resid=r[then], clients=who[keep.sum():keep.sum() + then.sum()],
                                   parts={int(k): i for k, i in zip(*periods.members(t[then], DAY))}, baseline=14,
                                   digest="", history=out / "periods.jsonl")
    assert sorted(int(f.stem) for f in (run / "period_requests").iterdir()) == list(range(8)) and kept["periods"] == 8
    assert (run / "period_requests" / "2.npz").stat().st_ino == (out / "period_requests" / "2.npz").stat().st_ino
    assert (out / "period_requests" / "2.npz").read_bytes() == before
