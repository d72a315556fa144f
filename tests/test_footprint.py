"""The memory check of ``monitor score`` (``footprint.py``): the arrays a run holds, counted from the
log, the profile and the --history's rows; a run that cannot fit is a one-line error, with the fix,
before any file of requests is read and before the model loads."""

from __future__ import annotations

import json

import numpy as np

from moeguard.cli import main
from moeguard.monitor import footprint, periodrequests, periods
from moeguard.monitor.ladder import lengths
from test_periods import DAY, _day, _history, setting  # noqa: F401 -- the module's fixture, built once here


def test_the_estimate_counts_each_array_score_holds():
    # DeepSeek-V3: 58 MoE layers x 256 experts, hidden size 7168, the profile's 64 dimensions
    cells, hidden, dim = 58 * 256, 7168, 64
    plain = footprint.estimate(requests=100_000, cells=cells, hidden=hidden, dim=dim)
    assert plain == 8 * 100_000 * (cells + hidden + dim + 2)
    # a profile of replies: the reply's histogram and surprise on top
    assert footprint.estimate(requests=10, cells=cells, hidden=hidden, dim=dim, replies=True) == \
        8 * 10 * (2 * cells + hidden + dim + 3)
    # --period with a history: its requests and the log's joined, and one period's residuals copied
    assert footprint.estimate(requests=10, cells=cells, hidden=hidden, dim=dim, held=140, largest_period=7) == \
        8 * (10 * (cells + hidden + dim + 2) + 150 * (dim + cells) + 7 * cells)
    # the mean histograms of the blocks at each look: at most 100 / 4 + 100 / 8 + 100 / 16 blocks reach them
    assert footprint.estimate(requests=100, cells=cells, hidden=hidden, dim=dim, looks=(4, 8, 16)) == \
        8 * (100 * (cells + hidden + dim + 2) + (25 + 12 + 6) * cells)


def test_the_limit_is_the_containers_where_it_is_smaller_than_the_machine(tmp_path, monkeypatch):
    machine = footprint.memory_limit()
    assert machine is not None and machine[0] > 2**20, machine
    small, unlimited = tmp_path / "memory.max", tmp_path / "other.max"
    small.write_text("1048576\n")
    unlimited.write_text("max\n")
    monkeypatch.setattr(footprint, "CGROUP_LIMITS", (str(tmp_path / "absent"), str(unlimited), str(small)))
    assert footprint.memory_limit() == (1048576, f"the container's memory limit ({small})")
    monkeypatch.setattr(footprint, "CGROUP_LIMITS", (str(unlimited),))
    got = footprint.memory_limit()
    assert got[1] == "this machine's memory" and got[0] > 1048576


def _no_replay(monkeypatch):
    def too_late(*a, **k):
        raise AssertionError("the model was loaded or the log replayed: the check came too late")

    monkeypatch.setattr("moeguard.models.handle.ModelHandle.load", too_late)
    monkeypatch.setattr("moeguard.monitor.score.score", too_late)


def test_a_score_that_cannot_fit_is_a_one_line_error_before_the_model_loads(setting, tmp_path, capsys, monkeypatch):
    import random

    _, _, prof = setting
    rows = _day(0, random.Random(0)) + _day(1, random.Random(1))
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(prof.to_dict()))
    L, E = prof.mean.shape
    need = footprint.estimate(requests=len(rows), cells=L * E, hidden=prof.space.hidden, dim=prof.space.dim,
                              looks=lengths(prof.meta))
    monkeypatch.setattr(footprint, "memory_limit", lambda: (need - 1, "this machine's memory"))
    _no_replay(monkeypatch)
    args = ["monitor", "score", "--profile", str(tmp_path / "p.json"), "--log", str(tmp_path / "log.jsonl"),
            "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(
        f"moeguard: error: scoring {len(rows)} requests on a model of {L} MoE layers x {E} experts holds at least "
        f"{need / 2**20:.1f} MiB of arrays ({8 * L * E / 1024:.1f} KiB a request for its routing as float64), more "
        f"than this machine's memory allows: {(need - 1) / 2**20:.1f} MiB"), err
    assert "Fix: score the log a part at a time" in err and "--history" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    # with --period, the fix is a day a run (the largest period's copy counts: a limit at the plain need fails)
    monkeypatch.setattr(footprint, "memory_limit", lambda: (need, "this machine's memory"))
    assert main([*args, "--period", "24h"]) == 2
    assert "a period's log a run, each given the run before's periods.jsonl as --history" in capsys.readouterr().err


def test_a_historys_kept_requests_count_before_any_is_read(setting, tmp_path, capsys, monkeypatch):
    """A --history of 5 kept periods of 40 requests: they are counted from its rows, and a limit that the
    log alone fits in but not with them refuses, naming them and a smaller --baseline."""
    import random

    _, _, prof = setting
    path = _history(tmp_path, prof, lambda rows: rows)
    hist = [json.loads(line) for line in path.read_text().splitlines()]
    rng = np.random.default_rng(0)
    L, E = prof.mean.shape
    x, r = rng.normal(size=(200, prof.space.dim)), rng.normal(0, 0.05, (200, L, E))
    kept = periodrequests.save(tmp_path, hist, x=x, resid=r, clients=[f"u{i % 9}" for i in range(200)],
                               parts={int(k): i for k, i in zip(*periods.members(np.repeat(np.arange(5) * DAY, 40) + 1.0, DAY))},
                               baseline=14, digest=prof.neighbours.digest, history=None)
    assert kept["periods"] == 5
    log = _day(0, random.Random(0))
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (tmp_path / "p.json").write_text(json.dumps(prof.to_dict()))
    alone = footprint.estimate(requests=len(log), cells=L * E, hidden=prof.space.hidden, dim=prof.space.dim,
                               largest_period=len(log), looks=lengths(prof.meta))
    monkeypatch.setattr(footprint, "memory_limit", lambda: (alone, "the container's memory limit (/x)"))
    _no_replay(monkeypatch)
    read = []
    real_read = periodrequests.read
    monkeypatch.setattr(periodrequests, "read", lambda *a, **k: (read.append(1), real_read(*a, **k))[1])
    assert main(["monitor", "score", "--profile", str(tmp_path / "p.json"), "--log", str(tmp_path / "log.jsonl"),
                 "--out", str(tmp_path / "out"), "--period", "24h", "--history", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "; and the 200 requests of the --history's 5 baseline periods), more than " \
        "the container's memory limit (/x) allows" in err, err
    assert err.rstrip().endswith("; a smaller --baseline brings fewer requests") and not read and len(hist) == 5


def test_statistics_in_smaller_blocks_are_the_same_to_the_bit(setting, monkeypatch):
    """``Profile.statistics`` takes the divergences from every topic in blocks of rows sized by their
    [rows, topics, L, E] temporaries (a many-expert model's are large): any block size gives every
    statistic the same bits."""
    from moeguard.monitor import profile as profile_mod

    _, _, prof = setting
    rng = np.random.default_rng(0)
    L, E = prof.mean.shape
    h = rng.dirichlet(np.ones(E), size=(50, L))
    x = rng.normal(size=(50, prof.space.dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    whole = prof.statistics(h, x, rng.random(50))
    topics = prof._topic_stack.size
    monkeypatch.setattr(profile_mod, "BLOCK_VALUES", 7 * topics)          # blocks of 7 rows
    blocks = prof.statistics(h, x, whole["surprise"])
    assert set(blocks) == set(whole)
    for k in whole:
        assert blocks[k].dtype == whole[k].dtype and np.array_equal(blocks[k], whole[k]), k
    monkeypatch.setattr(profile_mod, "BLOCK_VALUES", 1)                   # never fewer than one row
    assert all(np.array_equal(v, whole[k]) for k, v in prof.statistics(h, x, whole["surprise"]).items())


def test_a_profile_of_other_routing_is_refused_before_the_model_loads_or_a_history_is_read(setting, tmp_path, capsys,
                                                                                            monkeypatch):
    """``monitor score`` checks the profile's routing (layers, experts, top-k) against the model's
    config before anything loads: it was checked after the model and the history's kept requests."""
    _, _, prof = setting
    (tmp_path / "log.jsonl").write_text(json.dumps({"id": 0, "client": "a", "time": 0, "prompt": "hello"}) + "\n")
    (tmp_path / "p.json").write_text(json.dumps({**prof.to_dict(), "top_k": 3}))
    _no_replay(monkeypatch)
    monkeypatch.setattr("moeguard.monitor.periodhistory.read_history", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the history was read before the profile was checked")))
    assert main(["monitor", "score", "--profile", str(tmp_path / "p.json"), "--log", str(tmp_path / "log.jsonl"),
                 "--out", str(tmp_path / "out"), "--period", "24h", "--history", str(tmp_path / "log.jsonl")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "the profile was made with top-3 routing, the model routes top-2" in err, err


def test_a_profile_of_a_task_too_small_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Each task needs 4 benign inputs (half fit, half calibrate): that was checked after the model
    loaded, and left an empty partial profile behind."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "validation.jsonl").write_text("".join(json.dumps({"q": f"is {i} odd?", "l": i % 2}) + "\n"
                                                            for i in range(3)))
    (tmp_path / "t.yaml").write_text("name: tiny\nkind: classification\nsource: {type: local, path: d, format: jsonl}\n"
                                     "fields: {input: q, label: l}\nlabels: {0: \" no\", 1: \" yes\"}\n")
    _no_replay(monkeypatch)
    assert main(["monitor", "profile", "--out", str(tmp_path / "p.json"), "--tasks", str(tmp_path / "t.yaml"),
                 "--window", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "task 'tiny' gives 3 benign inputs" in err and "at least 4 per task" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "t.yaml"]   # no partial profile left


def test_a_period_run_refuses_times_no_period_can_place_before_the_model_loads(setting, tmp_path, capsys, monkeypatch):
    """A log in milliseconds lands in the year 50,000, and 1.7e308 overflowed a period's index after the
    whole replay: with --period, one line first. Without it a time only orders requests: read as it is."""
    from moeguard.monitor.score import read_log

    _, _, prof = setting
    (tmp_path / "p.json").write_text(json.dumps(prof.to_dict()))
    for t, said in ((1733529600000, "time 1733529600000"), (1.7e308, "time 1.7e+308")):
        log = tmp_path / "log.jsonl"
        log.write_text(json.dumps({"id": 0, "client": "a", "time": 5, "prompt": "hello"}) + "\n"
                       + json.dumps({"id": "r-1", "client": "a", "time": t, "prompt": "hello"}) + "\n")
        assert [r["_t"] for r in read_log(log)] == [5.0, float(t)]
        _no_replay(monkeypatch)
        assert main(["monitor", "score", "--profile", str(tmp_path / "p.json"), "--log", str(log),
                     "--out", str(tmp_path / "out"), "--period", "24h"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and f"request 'r-1' has {said}, outside the years 1-9999 as seconds since " \
            "1970: --period cannot place it" in err and "not milliseconds" in err, err
