"""Periods of all traffic (``monitor score --period``): a day whose routing load moved beyond what its
requests' content predicts alerts against the days before it and names the clients that moved it;
benign days and days heavy in one benign task pass; an alerted day stays out of later baselines;
bad settings are one-line errors before the model loads."""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.loading import load_model
from moeguard.monitor import neighbours, periodclients, periodhistory, periods, periodstats, periodwatch
from moeguard.monitor.fit import build
from moeguard.monitor.profile import Profile
from moeguard.monitor.routertap import SEPARATOR
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task

TASKS = ("arith-compare", "docstring-topic", "code-naming")
CAMPAIGN = "zq xv ## }{ 0x9f @@ ~~ %% qqq lorem ipsum"
DAY = 86400


@pytest.fixture(scope="module")
def setting():
    m, tok, _ = load_model(None)
    prompts = {t: [r["input"] for r in load_records(get_task(t), "eval", limit=120)] for t in TASKS}
    return m, tok, build(m, tok, prompts, window=8, seed=0, name="embedded")


def _day(d: int, rng: random.Random, *, n: int = 48, campaign: int = 0, heavy: str | None = None) -> list[dict]:
    """Day ``d``'s requests: ``n`` benign ones from users sending 4 each (unseen eval inputs of the
    tasks; ``heavy``: all of that one task), and ``campaign`` requests of a crafted prefix before such
    inputs, from identities sending 4 each."""
    fresh = {t: [r["input"] for r in load_records(get_task(t), "eval")[120:]] for t in TASKS}
    rows = []
    for i in range(n + campaign):
        bad = i >= n
        text = rng.choice(fresh[heavy or rng.choice(TASKS)])
        rows.append({"id": f"d{d}-{i}", "client": f"{'mallory' if bad else 'user'}-{d}-{i // 4}",
                     "time": f"2026-11-{d + 1:02d}T{i * 24 // (n + campaign):02d}:{rng.randrange(60):02d}:00Z",
                     "prompt": CAMPAIGN + SEPARATOR + text if bad else text})
    return rows


def _replay_each_log_once(monkeypatch) -> list[int]:
    """Make ``score``'s replay (the model's forward over a log's prompts: the same arrays for the same
    prompts and profile) run once per distinct list of prompts in this test; later runs on that log get
    copies of the arrays. It was most of this test's time (7 replays); the runs after the first test
    the period logic, which the replay feeds. Returns the number of prompts each real replay had."""
    from moeguard.monitor import score as score_mod

    real, done, ran = score_mod.replay, {}, []

    def replay(model, tokenizer, prof, prompts, **kw):
        key = (tuple(prompts), tuple(kw.get("replies") or ()))    # every run here reads one profile file
        if key not in done:
            ran.append(len(prompts))
            done[key] = real(model, tokenizer, prof, prompts, **kw)
        return tuple(None if a is None else tuple(x.copy() for x in a) if isinstance(a, tuple) else a.copy()
                     for a in done[key])

    monkeypatch.setattr(score_mod, "replay", replay)
    return ran


def test_a_day_whose_load_moved_alerts_and_names_its_identities_where_benign_days_pass(setting, tmp_path, capsys, monkeypatch):
    m, _, prof = setting
    replayed = _replay_each_log_once(monkeypatch)
    assert prof.neighbours is not None and len(prof.neighbours.x) == 180 and prof.neighbours.k == neighbours.NEIGHBOURS
    rng = random.Random(0)
    # 11 benign days, a day heavy in one benign task, a campaign day (a third of its requests), a benign day
    rows = [r for d in range(11) for r in _day(d, rng)] + _day(11, rng, heavy="code-naming") \
        + _day(12, rng, campaign=24) + _day(13, rng)
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pfile = tmp_path / "profile.json"
    pfile.write_text(json.dumps(prof.to_dict()))
    out = tmp_path / "scored"
    assert main(["monitor", "score", "--profile", str(pfile), "--log", str(log), "--out", str(out),
                 "--period", "24h", "--baseline", "10"]) == 0
    said = capsys.readouterr().out
    assert "testing periods" in said and "14/14" in said   # a bar over the periods, after the replay's
    spans = [json.loads(line) for line in (out / "periods.jsonl").read_text().splitlines()]
    assert "1 period alerts (11 of 14 periods tested; 1 put down to routing)" in said, [(s["p"], s.get("z")) for s in spans]
    assert [s["start"] for s in spans] == [f"2026-11-{d + 1:02d}T00:00:00Z" for d in range(14)]
    assert [s["baseline"] for s in spans] == [*range(11), 10, 10, 10]
    assert all(s["p"] is None and "3 needed" in s["why"] for s in spans[:3])
    ps = [s["p"] for s in spans[3:]]
    # day 12 alone, by orders of magnitude; day 11 (heavy in one task) passes. Benign p-values are
    # nominal (the first test's were all above 0.2), so only "none alerts" is asserted of them
    assert ps[9] <= 1e-4 and all(p > 0.01 for i, p in enumerate(ps) if i != 9), ps
    named = [c["client"] for c in spans[12]["top_clients"]]
    assert len(named) == periodclients.NAMED and all(c.startswith("mallory-12-") for c in named), named
    # its cause: the named clients' routing went beyond what the same content got on the days before
    assert spans[12]["cause"] == "routing" and spans[12]["p_routing"] < 1e-3, spans[12]
    assert all(c["p_routing"] < 0.01 for c in spans[12]["top_clients"][:3]), spans[12]["top_clients"]
    (alert,) = [json.loads(line) for line in (out / "alerts.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "period"]
    assert alert["time"] == ["2026-11-13T00:00:00Z", "2026-11-14T00:00:00Z"] and alert["statistic"] == "period_load"
    assert f"expert {spans[12]['expert']} at layer {spans[12]['layer']}" in alert["detail"] and "mallory-12-" in alert["detail"]
    assert "against the 10 periods before" in alert["detail"] and alert["experts"] == [spans[12]["expert"]]
    assert alert["cause"] == "routing" and "routing beyond content" in alert["detail"], alert
    assert alert["detail"].endswith("accept the period (--accept 2026-11-13T00:00:00Z) so that later periods are tested "
                                    "against it") and "a launch's users read the same" in alert["detail"], alert["detail"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["period"] == DAY and summary["periods"] == 14 and summary["periods_tested"] == 11
    assert summary["alerts"]["period"] == 1 and summary["run"]["settings"]["baseline"] == 10
    assert "lorem" not in (out / "periods.jsonl").read_text() + (out / "alerts.jsonl").read_text()
    # a daily run: days 0-9, then days 10-13 with the first run's periods as its history, give the
    # one run's periods line for line, the alert's cause included: the first run kept its periods'
    # requests (period_requests/) and the second takes them as the baseline's
    for name, part, extra in (("first", rows[:480], []), ("then", rows[480:], ["--history", str(tmp_path / "first" / "periods.jsonl")])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        assert main(["monitor", "score", "--profile", str(pfile), "--log", str(tmp_path / f"{name}.jsonl"), "--out",
                     str(tmp_path / name), "--period", "24h", "--baseline", "10", *extra]) == 0
    assert (tmp_path / "then" / "periods.jsonl").read_text() == (out / "periods.jsonl").read_text()
    then = json.loads((tmp_path / "then" / "summary.json").read_text())
    assert (then["history"], then["periods"], then["periods_tested"], then["alerts"]["period"]) == (10, 4, 4, 1)
    assert then["history_stale_alerts"] == []   # this version's history: nothing to judge again
    said = capsys.readouterr().out
    assert "1 period alerts (4 of 4 periods tested; 1 put down to routing)" in said, said
    # kept: the first run's 10 days (all in the next baseline); the second's from the oldest day of its last
    # baseline (3) on, the first run's files linked, not copied, and the campaign day (12) among them, which
    # joins no baseline but which an owner can still accept
    kept = lambda name: sorted(int(f.stem) for f in (tmp_path / name / "period_requests").iterdir())   # noqa: E731
    day = spans[0]["index"]
    assert kept("first") == [day + d for d in range(10)] and kept("then") == [day + d for d in range(3, 14)]
    assert (tmp_path / "then" / "period_requests" / f"{day + 5}.npz").stat().st_ino == \
        (tmp_path / "first" / "period_requests" / f"{day + 5}.npz").stat().st_ino
    assert then["period_requests"] == {"periods": 11, "first": day + 3, "mib": then["period_requests"]["mib"], "read": 10,
                                       "history_baseline": 10}
    assert "the requests of 11 periods kept for later runs' baselines (" in said, said
    assert "lorem" not in "".join(f.read_bytes().decode("latin-1") for f in (tmp_path / "then" / "period_requests").iterdir())
    # the history's kept requests are an input: an --out there is refused, --overwrite or not
    capsys.readouterr()
    assert main(["monitor", "score", "--profile", str(pfile), "--log", str(tmp_path / "then.jsonl"), "--out",
                 str(tmp_path / "first" / "period_requests"), "--overwrite", "--period", "24h", "--baseline", "10",
                 "--history", str(tmp_path / "first" / "periods.jsonl")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"output {tmp_path / 'first' / 'period_requests'} is (or holds) the input" in err, err
    assert kept("first") == [day + d for d in range(10)]
    # without the folder, the history brings no requests: no cause, and the row says why
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "periods.jsonl").write_text((tmp_path / "first" / "periods.jsonl").read_text())
    assert main(["monitor", "score", "--profile", str(pfile), "--log", str(tmp_path / "then.jsonl"), "--out",
                 str(tmp_path / "then-bare"), "--period", "24h", "--baseline", "10", "--history",
                 str(tmp_path / "bare" / "periods.jsonl")]) == 0
    daily = [json.loads(line) for line in (tmp_path / "then-bare" / "periods.jsonl").read_text().splitlines()]
    assert daily[12]["cause"] is None and daily[12]["p_routing"] is None, daily[12]
    assert daily[12]["cause_why"].startswith("2 baseline periods (96 requests) held with their requests; 2 and 256 "
                                             "needed (a --history's periods bring theirs from the period_requests folder")

    def without_cause(rows):
        return [{k: ([{a: b for a, b in c.items() if a != "p_routing"} for c in v] if k == "top_clients" else v)
                 for k, v in row.items() if k not in ("cause", "p_routing", "cause_why", "cause_cell", "routing_clients")} for row in rows]

    assert without_cause(daily) == without_cause(spans)
    said = capsys.readouterr()
    assert "1 period alerts (4 of 4 periods tested; 1 with no cause given)" in said.out
    assert said.err.startswith(f"note: 10 of the 10 baseline periods read from --history have no kept requests (none in "
                               f"{tmp_path / 'bare' / 'period_requests'}): the clients' test and an alert's cause match "
                               "among the requests of the other 0"), said.err
    # a history period that alerted where this test passes it (as the test before sparse cells did): one
    # warning line naming it, both p's and the --accept that brings it back; the summary lists it
    forged = [json.loads(line) for line in (tmp_path / "bare" / "periods.jsonl").read_text().splitlines()]
    forged[9].update(alert=True, p=1e-30)
    (tmp_path / "bare" / "periods.jsonl").write_text("".join(json.dumps(r) + "\n" for r in forged))
    # (the embedded model has no sparse cell: every cell counts as one here, for the judging again only)
    with pytest.warns(UserWarning) as said, monkeypatch.context() as m:
        m.setattr(periodstats, "SPARSE", 0.0)
        assert main(["monitor", "score", "--profile", str(pfile), "--log", str(tmp_path / "then.jsonl"), "--out",
                     str(tmp_path / "then-stale"), "--period", "24h", "--baseline", "10", "--history",
                     str(tmp_path / "bare" / "periods.jsonl")]) == 0
    err = [str(w.message) for w in said if "of the history" in str(w.message)]
    assert len(err) == 1 and err[0].startswith(f"1 period of the history alerted when scored and passes this version of "
                                               f"the test against the same baseline periods: {forged[9]['start']} (load "
                                               f"p 1e-30 -> "), err
    assert err[0].endswith(f"review it, and if it is benign pass --accept {forged[9]['start']}"), err
    (stale,) = json.loads((tmp_path / "then-stale" / "summary.json").read_text())["history_stale_alerts"]
    assert stale["start"] == forged[9]["start"] and stale["tests"]["load"]["p_now"] > 0.01, stale
    capsys.readouterr()
    # a damaged file of the folder is a one-line error before the model loads, naming it and the fix
    shutil.copytree(tmp_path / "first", tmp_path / "damaged")
    (tmp_path / "damaged" / "period_requests" / f"{day + 9}.npz").write_bytes(b"not a zip")
    assert main(["monitor", "score", "--profile", str(pfile), "--log", str(tmp_path / "then.jsonl"), "--out",
                 str(tmp_path / "then-damaged"), "--period", "24h", "--baseline", "10", "--history",
                 str(tmp_path / "damaged" / "periods.jsonl")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"period_requests/{day + 9}.npz is not a period's requests as `monitor score " \
        "--period` writes them (not numpy's .npz format" in err and "allow_pickle" not in err, err
    assert f"delete {tmp_path / 'damaged' / 'period_requests' / f'{day + 9}.npz'}" in err and not (tmp_path / "then-damaged").exists()
    # --period-alpha sets the period test's level apart from --alpha: the campaign day (p < 1e-4) passes at 1e-12
    assert main(["monitor", "score", "--profile", str(pfile), "--log", str(log), "--out", str(tmp_path / "strict"),
                 "--period", "24h", "--baseline", "10", "--period-alpha", "1e-12", "--no-period-requests"]) == 0
    strict = json.loads((tmp_path / "strict" / "summary.json").read_text())
    # --no-period-requests: no folder, nothing said of it; the settings record it
    assert not (tmp_path / "strict" / "period_requests").exists() and "period_requests" not in strict
    assert strict["run"]["settings"]["period_requests"] is False and then["run"]["settings"]["period_requests"] is True
    assert (strict["alerts"]["period"], strict["period_alpha"], strict["alpha"]) == (0, 1e-12, 0.01)
    assert all(json.loads(x)["settings"]["alpha"] == 1e-12 for x in (tmp_path / "strict" / "periods.jsonl").read_text().splitlines())
    said = capsys.readouterr().out
    assert "0 period alerts (11 of 14 periods tested)" in said and "kept for later runs" not in said, said
    # --period-clients: every period's clients in every cell, an alarm of its own, on the campaign day alone;
    # the load test's numbers are unchanged (no benign day is held out of a baseline by it)
    assert main(["monitor", "score", "--profile", str(pfile), "--log", str(log), "--out", str(tmp_path / "clients"),
                 "--period", "24h", "--baseline", "10", "--period-clients"]) == 0
    said = capsys.readouterr().out
    both = [json.loads(line) for line in (tmp_path / "clients" / "periods.jsonl").read_text().splitlines()]
    tested = [i for i, s in enumerate(both) if s["clients_p"] is not None]
    assert "1 clients' test alerts" in said and f"({len(tested)} periods tested)" in said, said
    assert "0 small clients' test alerts (0 periods tested)" in said, said
    assert tested == list(range(6, 14)), [(s["clients_p"], s.get("clients_why")) for s in both]   # 6 days of 48: 288 >= 256
    assert "5 baseline periods (240 requests) held with their requests; 2 and 256 needed" in both[5]["clients_why"], both[5]
    assert [i for i, s in enumerate(both) if s.get("clients_alert")] == [12], [s["clients_p"] for s in both]
    assert both[12]["clients_p"] < 1e-3 and all(both[i]["clients_p"] > 0.01 for i in tested if i != 12)
    assert {c["client"][:11] for c in both[12]["clients_routing"]} == {"mallory-12-"}, both[12]["clients_routing"]
    assert all(s["settings"]["clients_test"] is True for s in both)
    clients_keys = ("clients_p", "clients_why", "clients_cell", "clients_alert", "clients_routing", "settings")
    assert [{k: v for k, v in s.items() if k not in clients_keys and not k.startswith("small_")} for s in both] == \
        [{k: v for k, v in s.items() if k not in clients_keys} for s in spans]
    # the small clients' test (periodsmall): every client here sends 4 requests a day, so the first pool that
    # holds any (clients of fewer than 8) is the whole day, which is the load test's: no pool is tested
    assert all(s["small_p"] is None and "more than half the period" in s["small_why"] for s in both), both[12]
    (alert,) = [json.loads(line) for line in (tmp_path / "clients" / "alerts.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "period_clients"]
    assert alert["statistic"] == "period_clients" and alert["time"] == ["2026-11-13T00:00:00Z", "2026-11-14T00:00:00Z"]
    assert [alert["layer"], alert["experts"][0]] == both[12]["clients_cell"] and "mallory-12-" in alert["detail"]
    assert "routed beyond what requests of the same content got" in alert["detail"] and "load alerted too" in alert["detail"]
    assert "a launch's users read the same" in alert["detail"] and "(--accept 2026-11-13T00:00:00Z)" in alert["detail"]
    summary = json.loads((tmp_path / "clients" / "summary.json").read_text())
    assert summary["alerts"]["period_clients"] == 1 and summary["periods_clients_tested"] == len(tested)
    assert summary["alerts"]["period_small_clients"] == 0 and summary["periods_small_tested"] == 0
    assert summary["run"]["settings"]["period_clients"] is True and "period_clients" not in strict["alerts"]
    assert "lorem" not in (tmp_path / "clients" / "periods.jsonl").read_text() + (tmp_path / "clients" / "alerts.jsonl").read_text()
    # the history's days are not in the log: the second run is given only the new days'
    assert main(["monitor", "score", "--profile", str(pfile), "--log", str(log), "--out", str(tmp_path / "again"),
                 "--period", "24h", "--baseline", "10", "--history", str(tmp_path / "first" / "periods.jsonl")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "the log has requests from 2026-11-01T00:00:00Z, in or before the history's " \
        "last period (2026-11-10T00:00:00Z)" in err, err
    # --accept: the owner reviewed the campaign day and judged it benign (as it would a launch's): it still
    # alerts and says so, joins the later baselines (day 13 is tested against it), and the row keeps it
    assert main(["monitor", "score", "--profile", str(pfile), "--log", str(log), "--out", str(tmp_path / "accepted"),
                 "--period", "24h", "--baseline", "10", "--accept", "2026-11-13T00:00:00Z"]) == 0
    assert "1 period accepted into baselines" in capsys.readouterr().out
    acc = [json.loads(line) for line in (tmp_path / "accepted" / "periods.jsonl").read_text().splitlines()]
    assert [i for i, s in enumerate(acc) if s.get("accepted")] == [12] and acc[12]["alert"]
    assert acc[:13] == [dict(s, accepted=True) if i == 12 else s for i, s in enumerate(spans[:13])]
    assert acc[13]["p"] != spans[13]["p"] and acc[13]["baseline"] == 10
    (alert,) = [json.loads(line) for line in (tmp_path / "accepted" / "alerts.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "period"]
    assert alert["accepted"] is True and alert["time"][0] == "2026-11-13T00:00:00Z" and "--accept" not in alert["detail"]
    summary = json.loads((tmp_path / "accepted" / "summary.json").read_text())
    assert summary["periods_accepted"] == ["2026-11-13T00:00:00Z"] and summary["run"]["settings"]["accept"] == ["2026-11-13T00:00:00Z"]
    assert main(["monitor", "score", "--profile", str(pfile), "--log", str(log), "--out", str(tmp_path / "nothing"),
                 "--period", "24h", "--baseline", "10", "--accept", "2026-11-13"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--accept 2026-11-13: no period of the history or the log starts then (the " \
        "first is 2026-11-01T00:00:00Z, the last 2026-11-14T00:00:00Z)" in err, err
    assert not (tmp_path / "nothing").exists()
    # the whole log, then its first 10 days and its last 4: each replayed once
    assert replayed == [len(rows), 480, len(rows) - 480], replayed


def _synthetic(days: int, shifted: dict[int, float], *, n: int = 200, seed: int = 0):
    """Residuals [N, 2, 4] of ``days`` days: a per-day effect per cell and per-request noise; on the
    days in ``shifted``, 30 more requests from clients "evil-k" push cell (1, 3) by that much."""
    rng = np.random.default_rng(seed)
    t, r, c = [], [], []
    for d in range(days):
        effect = rng.normal(0, 0.003, (2, 4))
        for i in range(n + (30 if d in shifted else 0)):
            x = effect + rng.normal(0, 0.05, (2, 4))
            if i >= n:
                x[1, 3] += shifted[d]
            t.append(d * DAY + rng.uniform(0, DAY))
            r.append(x)
            c.append(f"evil-{i % 3}" if i >= n else f"u{rng.integers(40)}")
    return np.array(t), np.array(r), c


def test_an_alerted_period_stays_out_of_the_baseline_so_a_campaign_that_goes_on_is_seen_again():
    t, r, c = _synthetic(24, {20: 0.3, 21: 0.3, 22: 0.3})
    rows = periods.score_periods(t, r, c, period=DAY, baseline=14, alpha=0.01, layers=[3, 7])
    alerted = [i for i, row in enumerate(rows) if row.get("alert")]
    assert alerted == [20, 21, 22], [(i, row["p"]) for i, row in enumerate(rows)]
    assert all((row["layer"], row["expert"]) == (7, 3) for row in rows[20:23])
    top = rows[21]["top_clients"]
    assert {x["client"] for x in top[:3]} == {"evil-0", "evil-1", "evil-2"} and top[2]["excess"] > 3 * top[3]["excess"], top
    assert 0.8 < sum(x["excess"] for x in top[:3]) < 1.3 and [x["requests"] for x in top[:3]] == [10, 10, 10], top
    assert rows[23]["baseline"] == 14 and rows[23]["p"] > 0.01
    # were alerted days kept in the baseline, the campaign would become the norm by its second day
    kept = periods.score_periods(t, r, c, period=DAY, baseline=14, alpha=1e-300, layers=[3, 7])
    assert kept[20]["p"] == rows[20]["p"] and kept[21]["p"] > 0.01 and kept[22]["p"] > 0.01, [k["p"] for k in kept[20:23]]


def _mixed_days(rng, days: int, shift: float = 0.0):
    """Day means [days, 4, 8] whose cells move together: each day's share of two kinds of users moves
    every cell along one pattern (about ten times a cell's own day-to-day spread), as composition does
    on real days; the last day's cell (2, 5) is pushed by ``shift``. With their sampling noise and count."""
    pattern = rng.normal(0, 0.04, (4, 8))
    m = (2 * rng.uniform(0, 1, (days, 1, 1)) - 1) * pattern + rng.normal(0, 0.002, (days, 4, 8))
    m[-1, 2, 5] += shift
    return m, np.full((4, 8), 0.05 ** 2 / 3000), 3000


def _test_last(m, se2, n, alpha=0.01):
    base = periods.Baseline(baseline=14, alpha=alpha, layers=[0, 1, 2, 3])
    for d in range(len(m) - 1):
        base.judge({}, m[d], se2, n)
    row: dict = {}
    base.judge(row, m[-1], se2, n)
    return row


def test_days_that_differ_by_their_mix_of_users_keep_nominal_false_alarms_and_hide_no_shift():
    """The test removes the baseline's main directions of day-to-day variation (the mix of users),
    which the first test (Sidak over the raw cells) did not. Its p-values are nominal on benign days, and
    a shift of 8 times a cell's own day-to-day spread, in days whose mix moves each cell about ten times
    that spread, is seen on 88 of 100 days (the first test: 11; without removing the direction: 8)."""
    rng = np.random.default_rng(0)
    benign = [_test_last(*_mixed_days(rng, 15))["p"] for _ in range(400)]
    assert 0.025 <= np.mean(np.array(benign) <= 0.05) <= 0.08, np.mean(np.array(benign) <= 0.05)
    shifted = [_test_last(*_mixed_days(rng, 15, shift=0.016)) for _ in range(100)]
    assert np.mean([r["p"] <= 0.01 for r in shifted]) >= 0.8, sorted(r["p"] for r in shifted)[:50]
    assert np.mean([(r["layer"], r["expert"]) == (2, 5) for r in shifted]) >= 0.8
    assert all(r["factors"] == 1 for r in shifted)   # one direction stands above noise, and only it is removed


def test_a_short_baseline_is_not_anti_conservative_and_an_expert_nothing_routes_to_is_no_nan():
    rng = np.random.default_rng(1)
    small = [periods.Baseline(baseline=5, alpha=0.05, layers=[0, 1, 2, 3]) for _ in range(300)]
    ps = []
    for base in small:
        m, se2, n = _mixed_days(rng, 6)
        for d in range(5):
            base.judge({}, m[d], se2, n)
        row: dict = {}
        base.judge(row, m[5], se2, n)
        ps.append(row["p"])
    assert np.mean(np.array(ps) <= 0.05) <= 0.08, np.mean(np.array(ps) <= 0.05)
    # a cell no baseline period routes to (0 every day, no noise): finite, and load moved there alerts
    m, se2, n = _mixed_days(rng, 15)
    m[:, 3, 7], se2 = 0.0, se2.copy()
    se2[3, 7] = 0.0
    quiet = _test_last(m, se2, n)
    assert quiet["p"] is not None and np.isfinite(quiet["p"]) and not quiet.get("alert"), quiet
    m[-1, 3, 7] = 0.01
    moved = _test_last(m, se2, n)
    assert moved.get("alert") and (moved["layer"], moved["expert"]) == (3, 7), moved


def test_small_periods_are_skipped_and_a_smaller_period_is_not_an_alert_for_its_noise():
    t, r, c = _synthetic(18, {})
    # day 16 keeps only 20 of its requests (more sampling noise), day 17 only 5 (too few to test)
    keep = ~(((t // DAY) == 16) & (np.arange(len(t)) % 200 >= 20)) & ~(((t // DAY) == 17) & (np.arange(len(t)) % 200 >= 5))
    rows = periods.score_periods(t[keep], r[keep], [x for x, k in zip(c, keep) if k], period=DAY, baseline=14,
                                 alpha=0.01, layers=[0, 1])
    assert rows[16]["requests"] == 20 and rows[16]["p"] > 0.05, rows[16]
    assert rows[17]["requests"] == 5 and rows[17]["p"] is None and "fewer than 16" in rows[17]["why"]
    assert not any(row.get("alert") for row in rows)


def test_the_residual_is_what_the_neighbours_do_not_predict_and_survives_the_profile_file(setting, tmp_path):
    _, _, prof = setting
    nb = prof.neighbours
    same = nb.residual(nb.x[:5], nb.h[:5])
    # a reference is among its own neighbours: its residual is 1/k of its distance from the others'
    assert np.abs(same).max() < 1.0 and np.allclose(same.sum((1, 2)), 0, atol=1e-9)
    moved = nb.h[:5].copy()
    moved[:, 0] = np.roll(moved[:, 0], 1, axis=-1)
    assert np.abs(nb.residual(nb.x[:5], moved) - same).max() > 0.01
    back = Profile.from_dict(json.loads(json.dumps(prof.to_dict())), where="p")
    assert np.allclose(back.neighbours.residual(nb.x[:9], nb.h[:9]), nb.residual(nb.x[:9], nb.h[:9]), atol=1e-5)
    doc = prof.to_dict()
    doc["neighbours"]["count"] = 7
    with pytest.raises(MoeguardError, match="damaged routing profile"):
        Profile.from_dict(doc, where="p")


@pytest.mark.parametrize(("value", "seconds"), [("24h", DAY), ("30m", 1800), ("7d", 7 * DAY), ("1w", 7 * DAY),
                                                ("3600", 3600), ("1.5h", 5400), ("90s", 90)])
def test_a_period_is_a_length_with_its_unit(value, seconds):
    assert periods.parse_period(value) == seconds


@pytest.mark.parametrize("value", ["0", "0h", "-1h", "day", "24x", "h", ""])
def test_a_period_that_is_no_length_is_refused_with_the_forms_there_are(value):
    with pytest.raises(MoeguardError, match="--period is") as e:
        periods.parse_period(value)
    assert "24h, 30m, 7d" in e.value.hint


@pytest.mark.parametrize(("args", "needle"), [
    (["--period", "day"], "--period is 'day'"),
    (["--period", "24h", "--baseline", "2"], "--baseline is 2 periods"),
    (["--period", "24h"], "the profile has no neighbour references, which --period needs"),
    (["--baseline", "7"], "--baseline 7 without --period"),
    (["--period-alpha", "0.001"], "--period-alpha 0.001 without --period"),
    (["--period-clients"], "--period-clients without --period"),
    (["--accept", "2026-11-01T00:00:00Z"], "--accept 2026-11-01T00:00:00Z without --period"),
    (["--no-period-requests"], "--no-period-requests without --period"),
    (["--period", "24h", "--accept", " , "], "--accept is ' , '"),
    (["--period", "24h", "--period-alpha", "2"], "--period-alpha is 2.0"),
])
def test_bad_period_settings_are_one_line_errors_before_the_model_loads(setting, tmp_path, capsys, monkeypatch, args, needle):
    _, _, prof = setting
    doc = prof.to_dict()
    doc.pop("neighbours")          # a profile made before neighbours were kept
    pfile = tmp_path / "p.json"
    pfile.write_text(json.dumps(doc))
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"id": 1, "client": "a", "time": 0, "prompt": "x"}) + "\n")
    import moeguard.models.handle as handle

    monkeypatch.setattr(handle.ModelHandle, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    capsys.readouterr()
    assert main(["monitor", "score", "--profile", str(pfile), "--log", str(log), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_a_model_with_many_experts_keeps_fewer_references_not_a_huge_profile(monkeypatch):
    rng = np.random.default_rng(0)
    x, h = rng.normal(size=(1000, 8)), rng.random((1000, 4, 8))
    assert len(neighbours.Neighbours.fit(x, h, seed=0).x) == 1000
    monkeypatch.setattr(neighbours, "VALUES", 3200)                  # 100 histograms of 4 x 8
    nb = neighbours.Neighbours.fit(x, h, seed=0)
    assert len(nb.x) == 100 and nb.k == neighbours.NEIGHBOURS
    assert len(neighbours.Neighbours.fit(x, h, seed=1).x) == 100 and not np.array_equal(neighbours.Neighbours.fit(x, h, seed=1).x, nb.x)
    monkeypatch.setattr(neighbours, "VALUES", 10)                    # never fewer than twice the neighbours
    assert len(neighbours.Neighbours.fit(x, h, seed=0).x) == 2 * neighbours.NEIGHBOURS


def _history(tmp_path, prof, lines):
    rng = np.random.default_rng(0)
    rows = periods.score_periods(np.repeat(np.arange(5) * DAY, 40) + 1.0, rng.normal(0, 0.05, (200, *prof.mean.shape)),
                                 [f"u{i % 9}" for i in range(200)], period=DAY, baseline=14, alpha=0.01,
                                 layers=prof.meta["layers"], digest=prof.neighbours.digest)
    lines = lines(rows)
    path = tmp_path / "periods.jsonl"
    path.write_text("".join(x if isinstance(x, str) else json.dumps(x) + "\n" for x in lines))
    return path


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda rows: rows, None),
    (lambda rows: [{**rows[0], "seconds": 3600}], "is a period of 3600 s, this run's are 86400 s"),
    (lambda rows: [{**rows[0], "neighbours": "0" * 16}], "scored with another profile's neighbour references"),
    (lambda rows: rows[1:3][::-1], ":2 is period 1, not after the line before it (2)"),
    (lambda rows: [{**rows[0], "settings": {**rows[0]["settings"], "baseline": 10}}],
     ":1 was scored with --baseline 10 --period-alpha 0.01, this run with --baseline 14 --period-alpha 0.01"),
    (lambda rows: [{**rows[0], "settings": {**rows[0]["settings"], "clients_test": True}}],
     ":1 was scored with --period-clients, this run without"),
    (lambda rows: [{**rows[0], "settings": {"baseline": 14, "alpha": 0.01}}],
     f":1 was tested by another version of the period test (the first; this one is {periods.TEST})"),
    (lambda rows: [{k: v for k, v in rows[0].items() if k != "requests"}], ":1 is not a period of `monitor score --period` (KeyError"),
    (lambda rows: [json.dumps(rows[0]).replace('"index": 0', '"index": 1e999') + "\n"], ":1 is not a period"),
    (lambda rows: [json.dumps(rows[0]).replace('"index": 0', '"index": NaN') + "\n"], ":1 is not a period"),
    (lambda rows: [{k: v for k, v in rows[0].items() if k != "start"}], ":1 is not a period of `monitor score --period` (KeyError"),
    (lambda rows: [{**rows[0], "state": {"mean": "AAAA", "noise": "AAAA"}}], ":1 is not a period of `monitor score --period`"),
    (lambda rows: [{k: v for k, v in rows[0].items() if k != "index"}], ":1 is not a period of `monitor score --period` (KeyError"),
    (lambda rows: [{**rows[0], "small_state": [1]}], ":1 is not a period of `monitor score --period` (AttributeError"),
    (lambda rows: ["[" * 100_000 + "\n"], ":1 is not a period of `monitor score --period` (ValueError: nested too deeply"),
    (lambda rows: [], "holds no period"),
    # a row whose append never finished (serve's period log on a full disk): the fix is to drop that line
    (lambda rows: [rows[0], json.dumps(rows[1])[:50]], ":2, the last line, is cut short (JSONDecodeError"),
])
def test_a_history_is_checked_line_by_line_against_this_run(setting, tmp_path, edit, needle):
    _, _, prof = setting
    path = _history(tmp_path, prof, edit)
    if needle is None:
        got = periodhistory.read_history(path, period=DAY, digest=prof.neighbours.digest, shape=prof.mean.shape, baseline=14,
                                   alpha=0.01)
        assert [g["index"] for g in got] == [0, 1, 2, 3, 4] and all(g["_state"][0].shape == (4, 8) for g in got)
        return
    with pytest.raises(MoeguardError) as e:
        periodhistory.read_history(path, period=DAY, digest=prof.neighbours.digest, shape=prof.mean.shape, baseline=14,
                             alpha=0.01)
    assert needle in e.value.message, e.value.message
    if "cut short" in needle:
        assert e.value.hint == f"remove that line (its period's row is lost), e.g. sed -i '$ d' {path}, and start again"
    if needle == "holds no period":   # serve's period log is made empty at its first start
        assert periodhistory.read_history(path, period=DAY, digest="", shape=(4, 8), baseline=14, alpha=0.01,
                                          empty_ok=True) == []
    with pytest.raises(MoeguardError, match="is a folder"):
        periodhistory.read_history(tmp_path, period=DAY, digest="", shape=(4, 8), baseline=14, alpha=0.01)


def test_a_time_without_a_zone_is_utc_wherever_the_log_is_scored(monkeypatch):
    import time

    from moeguard.monitor.score import _time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert _time("2026-11-01T00:00:00", "w") == _time("2026-11-01T00:00:00Z", "w") == 1793491200.0
        assert _time("2026-11-01T00:00:00+01:00", "w") == 1793491200.0 - 3600
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_the_online_hook_tests_each_period_as_score_does_and_its_log_is_a_history(setting, tmp_path):
    import torch

    from moeguard.monitor.servesetup import alert_writer as _alert_writer
    from moeguard.monitor.online import RoutingMonitor
    from moeguard.monitor.score import _time, score

    m, tok, prof = setting
    rng = random.Random(0)
    rows = [r for d in range(11) for r in _day(d, rng)] + _day(11, rng, heavy="code-naming") \
        + _day(12, rng, campaign=24) + _day(13, rng)
    now = [0.0]
    log, alerts = tmp_path / "periods.jsonl", tmp_path / "alerts.jsonl"
    mon = RoutingMonitor(m, prof, flush_every=8, max_delay_s=None, period=DAY, baseline=10, clock=lambda: now[0],
                         on_result=_alert_writer(alerts, log))
    handles = []
    with mon:
        for r in rows:
            now[0] = _time(r["time"], "")
            with mon.request(r["client"]) as res:
                bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
                m(input_ids=torch.tensor([bos + tok(r["prompt"], add_special_tokens=False)["input_ids"]]))
            handles.append(res)
    online = [h.result["period"] for h in handles if h.result["period"] is not None]
    offline = score(m, tok, prof, [{**r, "_t": _time(r["time"], "")} for r in rows], period=DAY, baseline=10)[3]["traffic_periods"]
    # day 13 has no request after it: still open. The others close at the next day's first request
    assert len(online) == 13 and [o["start"] for o in online] == [o["start"] for o in offline[:13]]
    assert [o["p"] is None for o in online] == [o["p"] is None for o in offline[:13]]
    assert all(a["p"] is None or (math.isclose(a["p"], b["p"], rel_tol=1e-6) and (a["layer"], a["expert"]) == (b["layer"], b["expert"]))
               for a, b in zip(online, offline)), [(a["p"], b["p"]) for a, b in zip(online, offline)]
    assert [bool(o.get("alert")) for o in online] == [d == 12 for d in range(13)]
    (alert,) = [json.loads(line) for line in alerts.read_text().splitlines() if json.loads(line)["kind"] == "period"]
    assert alert["client"] is None and alert["period"] == ["2026-11-13T00:00:00Z", "2026-11-14T00:00:00Z"]
    assert "not named online" in alert["detail"] and "`moeguard monitor score --period`" in alert["detail"]
    assert mon.registry.get_sample_value("moeguard_alerts_total", {"kind": "period", "statistic": "period_load"}) == 1
    assert mon.registry.get_sample_value("moeguard_period_anomaly") == pytest.approx(-math.log10(online[-1]["p"]))
    # the server's log is a history: a restart takes its baseline from it, and `score --history` reads it
    history = periodhistory.read_history(log, period=DAY, digest=prof.neighbours.digest, shape=prof.mean.shape, baseline=10,
                                   alpha=0.01)
    assert [h["index"] for h in history] == [o["index"] for o in online] and history[12]["alert"] is True
    # the server's own alerts are this test's: judged again from the log's states, none is named stale
    assert periodhistory.stale_alerts(history, baseline=10, alpha=0.01, layers=prof.meta["layers"]) == []
    watch = periodwatch.PeriodWatch(prof.neighbours, period=DAY, baseline=10, alpha=0.01, layers=prof.meta["layers"],
                                history=history)
    assert len(watch._base.kept) == 10 and watch._floor == online[-1]["index"] + 1
    # the baseline is days 2-11 (the last 10 before it): the campaign day (12) alerted and stays out
    state = lambda d: periodhistory._unpack(history[d]["state"]["mean"], prof.mean.shape)   # noqa: E731
    assert np.array_equal(watch._base.kept[-1][0], state(11)) and np.array_equal(watch._base.kept[0][0], state(2))
    with pytest.raises(MoeguardError, match="period is 0 seconds"):
        periodwatch.PeriodWatch(prof.neighbours, period=0, baseline=10, alpha=0.01, layers=prof.meta["layers"])


@pytest.mark.parametrize(("args", "needle"), [
    (["--period-log", "x.jsonl"], "--period-log x.jsonl without --period"),
    (["--period", "1d", "--alerts", "a.jsonl", "--period-log", "a.jsonl"], "--alerts and --period-log are both a.jsonl"),
    (["--period", "1d", "--baseline", "1"], "--baseline is 1 periods"),
    (["--period-alpha", "0.001"], "--period-alpha 0.001 without --period"),
    (["--period", "1d", "--period-alpha", "0"], "--period-alpha is 0.0"),
    (["--period", "soon"], "--period is 'soon'"),
    (["--period", "1d", "--alerts", "x.jsonl.open", "--period-log", "x.jsonl"],
     "--alerts x.jsonl.open is where --period-log keeps the open period"),
    (["--accept", "2026-11-01T00:00:00Z"], "--accept 2026-11-01T00:00:00Z without --period"),
    (["--period", "1d", "--accept", "2026-11-01T00:00:00Z"], "--accept 2026-11-01T00:00:00Z without --period-log"),
    (["--period", "1d", "--period-log", "x.jsonl", "--accept", ","], "--accept is ','"),
])
def test_bad_serve_period_settings_are_one_line_errors_before_anything_starts(tmp_path, capsys, args, needle):
    assert main(["serve", "--profile", str(tmp_path / "p.json"), "--port", "1", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err, err


def serve_refuses(prof, tmp_path, capsys, monkeypatch, log, *extra: str) -> str:
    """``serve --period 1d --period-log log``'s one-line error, asserted to come before the model loads."""
    import socket

    import moeguard.models.handle as handle

    pfile = tmp_path / "p.json"
    pfile.write_text(json.dumps(prof.to_dict()))
    monkeypatch.setattr(handle.ModelHandle, "load", lambda *a, **k: pytest.fail("the model loaded"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    capsys.readouterr()
    assert main(["serve", "--profile", str(pfile), "--port", str(port), "--period", "1d", "--period-log", str(log), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err


def test_serve_refuses_a_period_log_whose_last_period_is_not_over(setting, tmp_path, capsys, monkeypatch):
    _, _, prof = setting
    rng = np.random.default_rng(0)
    rows = periods.score_periods(np.full(20, 4e9), rng.normal(0, 0.05, (20, *prof.mean.shape)), ["u"] * 20,   # in 2096
                                 period=DAY, baseline=14, alpha=0.01, layers=prof.meta["layers"], digest=prof.neighbours.digest)
    log = tmp_path / "periods.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = serve_refuses(prof, tmp_path, capsys, monkeypatch, log)
    assert "last period (2096-10-02T00:00:00Z) is not over yet" in err, err


def test_serve_refuses_to_accept_a_period_its_period_log_does_not_hold(setting, tmp_path, capsys, monkeypatch):
    _, _, prof = setting
    rng = np.random.default_rng(0)
    rows = periods.score_periods(np.arange(40) * 3600.0 * 3, rng.normal(0, 0.05, (40, *prof.mean.shape)), ["u"] * 40,
                                 period=DAY, baseline=14, alpha=0.01, layers=prof.meta["layers"], digest=prof.neighbours.digest)
    log = tmp_path / "periods.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = serve_refuses(prof, tmp_path, capsys, monkeypatch, log, "--accept", "1970-01-09T00:00:00Z")
    assert "--accept 1970-01-09T00:00:00Z: no period of the history or the log starts then (the first is " \
           "1970-01-01T00:00:00Z, the last 1970-01-05T00:00:00Z)" in err, err


def test_serve_refuses_a_period_log_another_server_holds(setting, tmp_path, capsys, monkeypatch):
    """Two servers on one period log appended the same period's row and saved over each other's open
    period: the next start could read neither. The second is refused before the model loads, and the
    lock goes with the server that held it."""
    import fcntl

    _, _, prof = setting
    log = tmp_path / "periods.jsonl"
    with open(tmp_path / "periods.jsonl.lock", "a") as other:    # a running server's lock
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = serve_refuses(prof, tmp_path, capsys, monkeypatch, log)
    assert f"another server uses --period-log {log} (it holds {log}.lock)" in err and "its own --period-log" in err, err
    from moeguard.monitor.servesetup import lock_period_log

    held = lock_period_log(log)                                  # released: a start takes it
    held.close()


def test_a_period_p_that_underflows_to_zero_is_still_reported_online(setting, monkeypatch):
    """A long baseline and a strong campaign can make Student t's tail 0.0: -log10(0) raised inside
    the flush and lost the batch's results and the period's alert."""
    import torch

    from moeguard.monitor.online import RoutingMonitor

    m, tok, prof = setting
    row = {"start": "s", "end": "e", "requests": 99, "clients": None, "baseline": 14, "p": 0.0, "z": 40.0, "layer": 1,
           "expert": 2, "shift": 0.3, "alert": True}
    monkeypatch.setattr(periodwatch.PeriodWatch, "add", lambda self, t, r: dict(row))
    mon = RoutingMonitor(m, prof, flush_every=1, max_delay_s=None, period=DAY)
    with mon, mon.request("a") as res:
        m(input_ids=torch.tensor([tok("hello there", add_special_tokens=False)["input_ids"]]))
    got = res.result
    assert "error" not in got and got["period"]["alert"]["kind"] == "period" and got["period"]["alert"]["p"] == 0.0
    assert mon.registry.get_sample_value("moeguard_period_anomaly") == 300.0


def test_a_campaign_split_over_identities_of_two_requests_is_a_small_clients_alert_through_the_cli(setting, tmp_path, capsys):
    """``--period-clients`` on a log of regular users (8 requests a day) and one-off identities (2): a
    day on which 8 identities of 2 requests send the crafted prefix alerts the small clients' test,
    whose alert names them and whose counts reach the summary and the printed line."""
    _, _, prof = setting
    rng = random.Random(1)
    fresh = {t: [r["input"] for r in load_records(get_task(t), "eval")[120:]] for t in TASKS}
    rows = []
    for d in range(7):
        who = [f"user-{i // 8}" for i in range(32)] + [f"once-{d}-{i // 2}" for i in range(16)] \
            + ([f"sybil-{i // 2}" for i in range(16)] if d == 6 else [])
        for i, w in enumerate(who):
            text = rng.choice(fresh[rng.choice(TASKS)])
            rows.append({"id": f"d{d}-{i}", "client": w, "time": f"2026-11-{d + 1:02d}T{i * 24 // len(who):02d}:00:00Z",
                         "prompt": CAMPAIGN + SEPARATOR + text if w.startswith("sybil") else text})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(prof.to_dict()))
    out = tmp_path / "scored"
    assert main(["monitor", "score", "--profile", str(tmp_path / "p.json"), "--log", str(tmp_path / "log.jsonl"),
                 "--out", str(out), "--period", "24h", "--baseline", "10", "--period-clients"]) == 0
    said = capsys.readouterr().out
    spans = [json.loads(line) for line in (out / "periods.jsonl").read_text().splitlines()]
    assert "1 small clients' test alerts (4 periods tested)" in said, [(s["small_p"], s.get("small_why")) for s in spans]
    assert [i for i, s in enumerate(spans) if s.get("small_alert")] == [6]
    day = spans[6]
    assert day["small_under"] == 4 and (day["small_requests"], day["small_clients"]) == (32, 16), day
    # against 6 earlier days; the benign days' pools, each against the days before it, are far from it
    assert day["small_p"] < 0.01 and all(s["small_p"] > 0.1 for s in spans[3:6]), [s["small_p"] for s in spans]
    (alert,) = [json.loads(line) for line in (out / "alerts.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "period_small_clients"]
    assert alert["statistic"] == "period_small_clients" and alert["time"] == ["2026-11-07T00:00:00Z", "2026-11-08T00:00:00Z"]
    assert {c["client"][:6] for c in alert["clients"]} == {"sybil-"} and len(alert["clients"]) == periodclients.NAMED
    assert alert["detail"].startswith("the 32 requests of the period's 16 clients of fewer than 4 requests each: "), alert
    summary = json.loads((out / "summary.json").read_text())
    assert summary["alerts"]["period_small_clients"] == 1 and summary["periods_small_tested"] == 4
    assert "lorem" not in (out / "periods.jsonl").read_text() + (out / "alerts.jsonl").read_text()
