"""Periods the owner accepts (``monitor score --period 24h --accept START``): a launch of new content
alerts every day after it, because each alerting day is held out of later baselines; once the owner
accepts a day of it, that day joins the baselines (its row and alerts say so, and a run reading it as
history keeps it), and the days after it pass. A start that names no period is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeguard.errors import MoeguardError
from moeguard.monitor import periodhistory, periods

DAY = 86400


def _launch(days: int, first: int, *, n: int = 200, seed: int = 0):
    """Residuals [N, 2, 4] of ``days`` days (a per-day effect per cell, per-request noise); from day
    ``first`` on, 30 more requests a day from new clients ("app-d-k") whose content the neighbours do
    not know: they sit 0.3 above in cell (1, 3), every day, as a launch's users do."""
    rng = np.random.default_rng(seed)
    t, r, c = [], [], []
    for d in range(days):
        effect = rng.normal(0, 0.003, (2, 4))
        for i in range(n + (30 if d >= first else 0)):
            x = effect + rng.normal(0, 0.05, (2, 4))
            if i >= n:
                x[1, 3] += 0.3
            t.append(d * DAY + rng.uniform(0, DAY))
            r.append(x)
            c.append(f"app-{d}-{i % 3}" if i >= n else f"u{rng.integers(40)}")
    return np.array(t), np.array(r), c


def _score(t, r, c, **kw):
    return periods.score_periods(t, r, c, period=DAY, baseline=14, alpha=0.01, layers=[3, 7], **kw)


def test_a_launch_alerts_every_day_until_a_day_of_it_is_accepted_then_the_days_after_pass():
    t, r, c = _launch(26, 20)
    plain = _score(t, r, c)
    assert [i for i, row in enumerate(plain) if row.get("alert")] == [20, 21, 22, 23, 24, 25], [row["p"] for row in plain]
    first = plain[20]["start"]
    assert first == "1970-01-21T00:00:00Z"
    rows = _score(t, r, c, accept=[first])
    # the accepted day still alerts (it is out of line), says it was accepted, and joins the baselines
    assert rows[20]["alert"] and rows[20]["accepted"] and rows[20]["p"] == plain[20]["p"]
    assert not any(row.get("accepted") for i, row in enumerate(rows) if i != 20)
    assert rows[:21] == [dict(row, accepted=True) if i == 20 else row for i, row in enumerate(plain[:21])]
    # one day of it in the baseline: the days after are what the baseline holds, not an alert
    assert not any(row.get("alert") for row in rows[21:]), [row["p"] for row in rows[21:]]


def test_an_accepted_day_joins_the_baseline_even_when_the_clients_test_alone_alerted():
    t, r, c = _launch(22, 20)
    base = periods.Baseline(baseline=14, alpha=0.01, layers=[3, 7])
    m, se2 = r[:200].mean(0), r[:200].var(0) / 200
    row: dict = {}
    assert base.judge(row, m, se2, 200, requests="held", hold=True) is None and base.kept == []
    assert base.judge(row, m, se2, 200, requests="kept", hold=True, accept=True) is None
    assert len(base.kept) == 1 and base.requests == ["kept"]


def test_an_accepted_period_in_a_history_joins_the_next_runs_baseline_and_a_history_period_can_be_accepted_later():
    t, r, c = _launch(23, 20)
    one = _score(t, r, c, accept=["1970-01-21T00:00:00Z"])
    early = t < 21 * DAY
    first = _score(t[early], r[early], [x for x, e in zip(c, early) if e], accept=["1970-01-21T00:00:00Z"])
    hist = [dict(row, _state=(periodhistory._unpack(row["state"]["mean"], (2, 4)),
                              periodhistory._unpack(row["state"]["noise"], (2, 4)))) if "state" in row else row
            for row in json.loads(json.dumps(first))]
    then = _score(t[~early], r[~early], [x for x, e in zip(c, ~early) if e], history=hist)
    assert [row["p"] for row in then] == [row["p"] for row in one] and then[20]["accepted"]
    # the same day not accepted in the first run, accepted when the next run reads it as history
    plain = _score(t[early], r[early], [x for x, e in zip(c, early) if e])
    hist = [dict(row, _state=(periodhistory._unpack(row["state"]["mean"], (2, 4)),
                              periodhistory._unpack(row["state"]["noise"], (2, 4)))) if "state" in row else row
            for row in json.loads(json.dumps(plain))]
    later = _score(t[~early], r[~early], [x for x, e in zip(c, ~early) if e], history=hist, accept=["1970-01-21T00:00:00Z"])
    assert [row["p"] for row in later] == [row["p"] for row in one] and later[20]["accepted"]
    assert not any(row.get("alert") for row in later[21:])


@pytest.mark.parametrize(("accept", "history", "needle", "hint"), [
    (["1970-01-05T00:00:00Z"], None, "--accept 1970-01-05T00:00:00Z: no period of the history or the log starts then "
                                     "(the first is 1970-01-02T00:00:00Z, the last 1970-01-03T00:00:00Z)", "as periods.jsonl writes it"),
    (["1970-01-02"], None, "--accept 1970-01-02: no period", "as periods.jsonl writes it"),
    (["1970-01-01T00:00:00Z"], [{"start": "1970-01-01T00:00:00Z", "why": "fewer than 4 requests: not tested, and in no baseline"}],
     "--accept 1970-01-01T00:00:00Z: that period of the history was not tested (fewer than 4 requests",
     "accept a period that was tested"),
    # a log period too small to be tested: accepted, it joined no baseline, silently
    (["1970-01-02T00:00:00Z"], None, "--accept 1970-01-02T00:00:00Z: that period of the log has 1 requests, fewer than "
                                     "the 16 a period needs to be tested or to join a baseline", "accept a period with more requests"),
])
def test_an_accept_that_names_no_tested_period_is_a_one_line_error(accept, history, needle, hint):
    t = [DAY + 5.0] + [2 * DAY + 7.0 + i for i in range(16)]
    with pytest.raises(MoeguardError) as e:
        periodhistory.check_accept(accept, t, period=DAY, history=history)
    assert needle in e.value.message and "\n" not in e.value.message, e.value.message
    assert hint in e.value.hint, e.value.hint
    periodhistory.check_accept(["1970-01-03T00:00:00Z"], t, period=DAY, history=history)   # a period the log holds: no error


def test_serve_takes_accepted_periods_of_its_period_log_at_start_and_refuses_one_it_does_not_hold(tmp_path):
    from types import SimpleNamespace

    from moeguard.io import dumps
    from moeguard.monitor import servesetup

    t, r, c = _launch(21, 20)
    rows = _score(t, r, c)
    assert rows[20].get("alert")
    log = tmp_path / "periods.jsonl"
    log.write_text("".join(dumps(row) + "\n" for row in rows))
    prof = SimpleNamespace(neighbours=SimpleNamespace(digest=""), mean=np.zeros((2, 4)), meta={"layers": [3, 7]})
    kw = dict(period=DAY, baseline=14, alpha=0.01)
    plain = servesetup.period_history(prof, log, **kw)
    taken = servesetup.period_history(prof, log, **kw, accept=["1970-01-21T00:00:00Z"])
    assert [h.get("accepted") for h in taken] == [None] * 20 + [True] and not any(h.get("accepted") for h in plain)
    assert log.read_text() == "".join(dumps(row) + "\n" for row in rows)          # the log itself is not rewritten
    # the online watch's baseline (periodwatch.PeriodWatch builds it so) holds the accepted period
    kept = periods.Baseline(baseline=14, alpha=0.01, layers=[3, 7], history=taken).kept
    assert len(kept) == 14 and np.array_equal(kept[-1][0], taken[-1]["_state"][0])
    assert not np.array_equal(periods.Baseline(baseline=14, alpha=0.01, layers=[3, 7], history=plain).kept[-1][0],
                              taken[-1]["_state"][0])
    with pytest.raises(MoeguardError, match="--accept 1970-01-23T00:00:00Z: no period of the history or the log starts then"):
        servesetup.period_history(prof, log, **kw, accept=["1970-01-23T00:00:00Z"])


def test_serve_keeps_accepted_periods_beside_its_period_log_and_takes_them_at_every_later_start(tmp_path):
    """``serve --accept`` once: the acceptance is kept in ``FILE.accepted`` (the log itself is not
    rewritten), so a restart without ``--accept`` keeps the period in the baseline; a start whose period
    the log no longer holds is left out; a damaged file is a one-line error saying what to do."""
    from types import SimpleNamespace

    from moeguard.io import dumps
    from moeguard.monitor import servesetup

    t, r, c = _launch(22, 20)
    rows = _score(t, r, c)
    log = tmp_path / "periods.jsonl"
    log.write_text("".join(dumps(row) + "\n" for row in rows))
    prof = SimpleNamespace(neighbours=SimpleNamespace(digest=""), mean=np.zeros((2, 4)), meta={"layers": [3, 7]})
    kw = dict(period=DAY, baseline=14, alpha=0.01)
    side = periodhistory.accepted_path(log)
    assert side.name == "periods.jsonl.accepted" and not side.exists()
    assert not any(h.get("accepted") for h in servesetup.period_history(prof, log, **kw))
    assert not side.exists()                                  # nothing accepted, nothing written
    servesetup.period_history(prof, log, **kw, accept=["1970-01-21T00:00:00Z"])
    assert json.loads(side.read_text()) == {"accepted": ["1970-01-21T00:00:00Z"]}
    assert log.read_text() == "".join(dumps(row) + "\n" for row in rows)
    # the next start, without --accept: the period is still accepted, and joins the baseline
    again = servesetup.period_history(prof, log, **kw)
    assert [i for i, h in enumerate(again) if h.get("accepted")] == [20]
    # another accepted later adds to the file; its older lines dropped from the log, a kept start is left out
    servesetup.period_history(prof, log, **kw, accept=["1970-01-22T00:00:00Z"])
    assert json.loads(side.read_text()) == {"accepted": ["1970-01-21T00:00:00Z", "1970-01-22T00:00:00Z"]}
    log.write_text("".join(dumps(row) + "\n" for row in rows[21:]))
    assert [h["start"] for h in servesetup.period_history(prof, log, **kw) if h.get("accepted")] == ["1970-01-22T00:00:00Z"]
    for bad, said in (("{", "JSONDecodeError"), ('{"accepted": "1970-01-21T00:00:00Z"}', "not a list of period starts"),
                      ("[]", "TypeError")):
        side.write_text(bad)
        with pytest.raises(MoeguardError) as e:
            servesetup.period_history(prof, log, **kw)
        assert f"{side} is not a list of accepted periods" in str(e.value) and said in str(e.value), str(e.value)
        assert "delete it and pass them to --accept again" in e.value.hint


def test_serve_refuses_alerts_written_where_the_period_log_keeps_its_accepted_periods(tmp_path):
    from moeguard.monitor import servesetup

    log = tmp_path / "periods.jsonl"
    with pytest.raises(MoeguardError, match="is where --period-log keeps the periods you accepted"):
        servesetup.check_options(host="127.0.0.1", port=8000, alpha=0.01, max_clients=10, flush_every=1, max_delay=1.0,
                                 metrics_token=None, alerts=periodhistory.accepted_path(log), period="24h", baseline=None,
                                 period_log=log)
