"""Periods of all traffic in service (``periodwatch.py``): a served period closes once its end has
passed, without waiting for the next request; a restart keeps the open period's counts (saved beside
the period log) and gives the periods an uninterrupted server gives; a saved open period that does
not fit is a one-line error before the model loads."""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import pytest
import torch

from moeguard.errors import MoeguardError
from moeguard.monitor import periodhistory, periods, periodwatch
from moeguard.monitor.online import RoutingMonitor
from moeguard.monitor.score import _time
from moeguard.monitor.servesetup import alert_writer, state_writer

from test_periods import DAY, _day, serve_refuses, setting  # noqa: F401 -- the module's fixture, built once here

HOUR = 3600.0


def _forward(m, tok, prompt):
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    m(input_ids=torch.tensor([bos + tok(prompt, add_special_tokens=False)["input_ids"]]))


def _send(mon, m, tok, rows, now):
    for r in rows:
        now[0] = _time(r["time"], "")
        with mon.request(r["client"]):
            _forward(m, tok, r["prompt"])


def _periods(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_restart_keeps_the_open_period_and_gives_the_periods_of_an_uninterrupted_server(setting, tmp_path):  # noqa: F811
    m, tok, prof = setting
    rng = random.Random(0)
    # days of 24 requests (at least periods.MIN_REQUESTS each, so every day is tested): what is checked
    # here is that restarts give one server's rows, which needs no more requests, and each is a forward
    rows = [r for d in range(6) for r in _day(d, rng, n=24)] + _day(6, rng, n=24, campaign=12) + _day(7, rng, n=24)
    rows.sort(key=lambda r: r["time"])
    cut = next(i for i, r in enumerate(rows) if r["time"] >= "2026-11-07T12")   # the campaign day's second half

    def serve(log, parts):
        """One monitor per part, each restarted from the period log and its saved open period."""
        now = [0.0]
        for part in parts:
            history = periodhistory.read_history(log, period=DAY, digest=prof.neighbours.digest, shape=prof.mean.shape,
                                           baseline=4, alpha=0.01) if log.exists() else None
            saved = periodwatch.read_open(periodwatch.open_path(log), period=DAY, digest=prof.neighbours.digest,
                                          shape=prof.mean.shape, baseline=4, alpha=0.01, history=history,
                                          now=_time(part[0]["time"], ""))
            mon = RoutingMonitor(m, prof, flush_every=8, max_delay_s=None, period=DAY, baseline=4, clock=lambda: now[0],
                                 period_history=history, period_open=saved, on_result=alert_writer(None, log),
                                 on_period_state=state_writer(log))
            with mon:
                _send(mon, m, tok, part, now)
        return _periods(log)

    once = serve(tmp_path / "once.jsonl", [rows])
    twice = serve(tmp_path / "twice.jsonl", [rows[:cut], rows[cut:]])
    assert json.loads(periodwatch.open_path(tmp_path / "twice.jsonl").read_text())["index"] == once[-1]["index"] + 1
    assert [r["index"] for r in once] == list(range(int(once[0]["index"]), int(once[0]["index"]) + 7))
    assert twice == once, [(a["requests"], b["requests"], a["p"], b["p"]) for a, b in zip(twice, once)]
    assert [r["p"] is None for r in once] == [True] * 3 + [False] * 4
    # down from the campaign day's middle to the next day: the saved half-day is closed (and logged,
    # in order) by the first request after the restart, as one server over the same requests does
    skip = next(i for i, r in enumerate(rows) if r["time"] >= "2026-11-08")
    gap = serve(tmp_path / "gap.jsonl", [rows[:cut], rows[skip:]])
    assert gap == serve(tmp_path / "gap1.jsonl", [rows[:cut] + rows[skip:]])
    assert gap[6]["requests"] == cut - sum(r["time"] < "2026-11-07" for r in rows) and len(gap) == 7
    # without the saved counts, the campaign day's first half is lost: the rows differ
    lost = serve(tmp_path / "lost.jsonl", [rows[:cut]])
    periodwatch.open_path(tmp_path / "lost.jsonl").unlink()
    lost = serve(tmp_path / "lost.jsonl", [rows[cut:]])
    assert lost[6]["requests"] < once[6]["requests"] and lost[:6] == once[:6]


def test_a_served_period_closes_once_its_end_has_passed_and_the_open_one_is_saved(setting, tmp_path, monkeypatch):  # noqa: F811
    m, tok, prof = setting
    monkeypatch.setattr(periodwatch, "CHECKPOINT_S", 0.0)
    now, got, states = [100 * DAY + HOUR], [], []
    log = tmp_path / "periods.jsonl"
    write = alert_writer(None, log)
    mon = RoutingMonitor(m, prof, flush_every=64, max_delay_s=0.02, period=DAY, clock=lambda: now[0],
                         on_result=lambda c, r: (got.append((c, r)), write(c, r)),
                         on_period_state=lambda s: states.append(s))
    rows = _day(0, random.Random(1), n=20)
    with mon:
        for r in rows:
            with mon.request(r["client"]):
                _forward(m, tok, r["prompt"])
        deadline = time.monotonic() + 10
        while not (states and states[-1] and states[-1]["requests"] == 20) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert states[-1]["index"] == 100 and states[-1]["requests"] == 20 and not log.exists()
        now[0] = 101 * DAY + 60          # a minute into the next day, and no request comes
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        while not (states and states[-1] is None) and time.monotonic() < deadline:
            time.sleep(0.01)
    (row,) = _periods(log)
    assert row["index"] == 100 and row["requests"] == 20 and "3 needed" in row["why"]
    assert [c for c, r in got if "period" in r and r["period"]] == [None]      # closed by no request
    assert states[-1] is None     # the next period is empty: nothing to keep


def test_a_failing_save_is_counted_and_does_not_fail_a_clean_stop(setting):  # noqa: F811
    m, tok, prof = setting

    def full(state):
        raise OSError(28, "No space left on device")

    now = [100 * DAY]
    mon = RoutingMonitor(m, prof, flush_every=4, max_delay_s=None, period=DAY, clock=lambda: now[0], on_period_state=full)
    with mon:
        for r in _day(0, random.Random(2), n=8):
            with mon.request(r["client"]):
                _forward(m, tok, r["prompt"])
    assert mon.registry.get_sample_value("moeguard_callback_failures_total") == 1


def test_a_result_callback_that_raises_in_the_last_flush_still_leaves_the_open_period_saved(setting):  # noqa: F811
    """The library's default (raise_errors): the exit's flush raises what ``on_result`` raised, and the
    open period is saved first (it was skipped: a restart lost the day's counts)."""
    m, tok, prof = setting
    states = []

    def broken(client, result):
        raise OSError(28, "No space left on device")

    mon = RoutingMonitor(m, prof, flush_every=64, max_delay_s=None, period=DAY, clock=lambda: 100 * DAY,
                         on_result=broken, on_period_state=states.append)
    with pytest.raises(OSError, match="No space left"):
        with mon:
            for r in _day(0, random.Random(3), n=6):
                with mon.request(r["client"]):
                    _forward(m, tok, r["prompt"])
    assert states and states[-1]["index"] == 100 and states[-1]["requests"] == 6, states[-1:]


def _saved(prof, **change):
    doc = {"schema": periodwatch.SCHEMA, "index": 100, "start": "x", "seconds": DAY, "requests": 20,
           "neighbours": prof.neighbours.digest, "settings": {"baseline": 14, "alpha": 0.01, "test": periods.TEST},
           "sum": periods.pack(np.zeros(prof.mean.shape), "<f8"), "sumsq": periods.pack(np.ones(prof.mean.shape), "<f8")}
    return {**doc, **change}


@pytest.mark.parametrize(("change", "needle"), [
    ({}, None),
    ({"schema": "other"}, "is not an open period saved by `moeguard serve`"),
    ({"sum": "AAAA"}, "is not an open period saved by `moeguard serve`"),
    ({"seconds": 3600}, "was saved with another --period, profile, --baseline or --period-alpha (3600 s"),
    ({"settings": {"baseline": 7, "alpha": 0.01, "test": periods.TEST}}, "baseline 7"),
    ({"settings": {"baseline": 14, "alpha": 0.01}}, "was saved with another"),
    ({"neighbours": "0" * 16}, "was saved with another"),
    ({"index": 10**6}, "has not started yet"),
    ({"requests": 0}, "holds 0 requests"),
    ({"requests": 10**13}, "holds 10000000000000 requests"),
    ({"index": 100.7}, "index is 100.7, not a whole number"),
    ({"index": "100"}, "index is '100', not a whole number"),
    ({"requests": True}, "requests is True, not a whole number"),
    ({"index": -5}, "index is -5, not a whole number of 0 or more"),
    ({"index": 10**400}, "has not started yet"),
    ({"made_by": "x"}, "is not an open period saved by `moeguard serve` (ValueError: made_by 'x')"),
    ({"made_by": [1]}, "is not an open period saved by `moeguard serve` (ValueError: made_by [1])"),
])
def test_a_saved_open_period_is_checked(setting, tmp_path, change, needle):  # noqa: F811
    _, _, prof = setting
    path = tmp_path / "periods.jsonl.open"
    path.write_text(json.dumps(_saved(prof, **change)))
    kw = dict(period=DAY, digest=prof.neighbours.digest, shape=prof.mean.shape, baseline=14, alpha=0.01, now=101 * DAY)
    if needle is None:
        got = periodwatch.read_open(path, history=None, **kw)
        assert got["index"] == 100 and got["requests"] == 20 and got["_sq"].shape == prof.mean.shape
        # the period log already holds it (closed after the last save): not restored
        assert periodwatch.read_open(path, history=[{"index": 100}], **kw) is None
        assert periodwatch.read_open(tmp_path / "none", history=None, **kw) is None
        return
    with pytest.raises(MoeguardError) as e:
        periodwatch.read_open(path, history=None, **kw)
    assert needle in e.value.message and f"delete {path}" in e.value.message + e.value.hint, e.value.message


def test_an_open_period_another_version_saved_is_continued_and_its_row_names_both(setting, tmp_path, recwarn):  # noqa: F811
    """A server restarted after an upgrade continues the period it saved: the period's row names every
    version that counted it, and the start's run record lists the saved counts as reused."""
    from moeguard import provenance

    _, _, prof = setting
    other = {**provenance.maker(), "git_commit": "0" * 40}
    both = [other, provenance.maker()]
    path = tmp_path / "periods.jsonl.open"
    path.write_text(json.dumps(_saved(prof, made_by=[other])))
    kw = dict(period=DAY, digest=prof.neighbours.digest, shape=prof.mean.shape, baseline=14, alpha=0.01, now=101 * DAY)
    got = periodwatch.read_open(path, history=None, **kw)
    assert got["made_by"] == [other] and provenance.run_record({})["reused"][0]["what"] == [str(path)]
    watch = periodwatch.PeriodWatch(prof.neighbours, period=DAY, baseline=14, alpha=0.01, layers=prof.meta["layers"],
                                    open_period=got)
    assert watch.state()["made_by"] == both                       # saved again: still both
    assert watch.close_over(102 * DAY)["made_by"] == both
    watch.add(102 * DAY + 5, np.zeros(prof.mean.shape))           # the next period: this version's alone
    assert watch.state()["made_by"] == [provenance.maker()] and "made_by" not in watch.close_over(103 * DAY)
    # a period saved before versions were recorded
    path.write_text(json.dumps(_saved(prof)))
    assert periodwatch.read_open(path, history=None, **kw)["made_by"] == [None]
    # rolled back to the first version: the versions keep the order in which they counted
    path.write_text(json.dumps(_saved(prof, made_by=[provenance.maker(), other])))
    back = periodwatch.PeriodWatch(prof.neighbours, period=DAY, baseline=14, alpha=0.01, layers=prof.meta["layers"],
                                   open_period=periodwatch.read_open(path, history=None, **kw))
    assert back.state()["made_by"] == [provenance.maker(), other]


def test_serve_refuses_a_damaged_open_period_before_the_model_loads(setting, tmp_path, capsys, monkeypatch):  # noqa: F811
    _, _, prof = setting
    log = tmp_path / "periods.jsonl"
    periodwatch.open_path(log).write_text("{not json")
    err = serve_refuses(prof, tmp_path, capsys, monkeypatch, log)
    assert "periods.jsonl.open is not an open period saved by `moeguard serve`" in err, err
    assert f"delete {periodwatch.open_path(log)}" in err


def test_serve_keeps_the_open_period_across_a_stop_and_a_start(setting, tmp_path):  # noqa: F811
    """The command, end to end: `serve --period 1d --period-log F` stopped by SIGTERM saves the open
    period to F.open, and the next start counts on from it."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from test_serve import _call

    _, _, prof = setting
    pfile, log = tmp_path / "p.json", tmp_path / "periods.jsonl"
    pfile.write_text(json.dumps(prof.to_dict()))
    day = int(time.time() // DAY)

    def serve_and_stop(n: int) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "moeguard.cli", "serve", "--profile", str(pfile), "--port", str(port),
                                 "--period", "1d", "--period-log", str(log), "--max-delay", "0.2"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if _call(port, "GET", "/health")[0] == 200:
                        break
                except OSError:
                    time.sleep(0.2)
            for i in range(n):
                status, body = _call(port, "POST", "/v1/completions", {"prompt": f"def add_{i}(a, b):", "max_tokens": 2})
                assert status == 200, body
        finally:
            proc.send_signal(signal.SIGTERM)
            err = proc.communicate(timeout=60)[1]
        assert "Traceback" not in err, err
        # a service manager's stop is the server's normal end: exit 0, saying what it kept (it was 130,
        # "interrupted; no output was written")
        assert proc.returncode == 0 and err.rstrip().endswith(
            f"moeguard: serve stopped; closed periods in {log}; the open period in {periodwatch.open_path(log)}"), err
        assert not log.with_name(log.name + ".lock").exists()   # its lock goes with it (it was left behind)
        return err

    serve_and_stop(3)
    first = json.loads(periodwatch.open_path(log).read_text())
    serve_and_stop(2)
    second = json.loads(periodwatch.open_path(log).read_text())
    if int(time.time() // DAY) != day:
        pytest.skip("the test ran across a UTC midnight: its period closed between the starts")
    assert (first["index"], first["requests"]) == (day, 3) and (second["index"], second["requests"]) == (day, 5)
    assert not log.read_text()      # no period closed: the log (created at start) is still empty


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a write's file through /proc (Linux)")
def test_the_open_period_and_each_closed_row_reach_the_disk_before_they_count_as_written(tmp_path, monkeypatch):
    """A rename, or an append, without fsync can leave an empty or short file after a power loss on some
    file systems; the next start then refused the state or the log."""
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    log = tmp_path / "periods.jsonl"
    state_writer(log)({"index": 1, "requests": 2})
    assert len(synced) == 1 and synced[0].startswith(str(tmp_path / ".periods.jsonl.open."))   # the temporary, then renamed
    assert json.loads(periodwatch.open_path(log).read_text()) == {"index": 1, "requests": 2}
    alert_writer(None, log)(None, {"period": {"start": "s", "index": 1}})
    assert synced[1:] == [str(log)] and json.loads(log.read_text()) == {"start": "s", "index": 1}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a write's file through /proc (Linux)")
def test_a_failed_period_log_append_leaves_no_half_line_and_is_appended_at_the_next_write(tmp_path, monkeypatch):
    """A full disk while a closed period's row is appended: the bytes written are cut back (the next
    row was glued to a half line, mid-log, which no later start could read past), the row is kept
    and written first at the next write, and the alert log is written all the same."""
    import errno

    log, alerts = tmp_path / "periods.jsonl", tmp_path / "alerts.jsonl"
    log.write_text('{"start": "a", "index": 0}\n')
    write = alert_writer(alerts, log)
    real_write, calls = os.write, []

    def full_disk(fd, data):
        calls.append(len(data))
        if os.readlink(f"/proc/self/fd/{fd}") == str(log) and len(calls) == 1:
            real_write(fd, data[:5])   # part of the row reaches the file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    closed = {"period": {"start": "b", "index": 1, "alert": {"kind": "period", "p": 0.001}}}
    with pytest.raises(OSError, match="No space left"):
        write(None, closed)
    assert log.read_text() == '{"start": "a", "index": 0}\n'              # cut back: no half line
    assert json.loads(alerts.read_text())["kind"] == "period"               # the alert log still written
    # tried again every minute (with the open period's state), not only at the next close
    from moeguard.monitor.servesetup import retrying

    saved = []
    retrying(saved.append, write)({"index": 2})
    assert saved == [{"index": 2}] and write.retry() == 0
    assert [json.loads(x)["start"] for x in log.read_text().splitlines()] == ["a", "b"]
    write(None, {"period": {"start": "c", "index": 2}})
    assert [json.loads(x)["start"] for x in log.read_text().splitlines()] == ["a", "b", "c"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a write's file through /proc (Linux)")
def test_without_periods_a_thread_retries_the_alert_rows_a_full_disk_kept(tmp_path, monkeypatch):
    """Only the periods' minute-by-minute state save retried kept rows: a server without --period held an
    alert a full disk refused until the next alert or its stop, and lost it in a crash."""
    import errno
    import time

    from moeguard.monitor.servesetup import retried_every

    alerts = tmp_path / "alerts.jsonl"
    write = alert_writer(alerts)
    real_write, full = os.write, [True]

    def disk(fd, data):
        if full[0] and os.readlink(f"/proc/self/fd/{fd}") == str(alerts):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", disk)
    with pytest.raises(OSError, match="No space left"):
        write("eve", {"alert": {"kind": "request", "p": 0.001}})
    assert alerts.read_text() == ""
    with retried_every(write, 0.05, periods=False):
        time.sleep(0.2)
        assert alerts.read_text() == ""          # still full: kept, tried again
        full[0] = False
        deadline = time.time() + 5
        while not alerts.read_text() and time.time() < deadline:
            time.sleep(0.05)
    assert json.loads(alerts.read_text())["client"] == "eve" and write.retry() == 0
    with retried_every(write, 0.05, periods=True):   # with periods the state save retries: no thread
        assert not [t for t in __import__("threading").enumerate() if t.name == "moeguard-alert-retry"]
