"""A profile from a deployment's own benign log (``monitor profile --log``): its nulls describe that
traffic (a wrapper every request carries, users' habits), where a task profile alarms on it; clients
split in two; topics from the records or clusters; resumed builds; one-line errors before weights."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.loading import load_model
from moeguard.monitor import fromlog
from moeguard.monitor.fit import build, observe
from moeguard.monitor.profile import Profile
from moeguard.monitor.routertap import SEPARATOR
from moeguard.monitor.score import score
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task

TASKS = ("arith-compare", "docstring-topic", "code-naming")
# what a deployment puts before every user text (a system prompt): nothing a task profile has seen
WRAPPER = "Request from the support desk. Please answer briefly.\n"
CAMPAIGN = "zq xv ## }{ 0x9f @@ ~~ %% qqq lorem ipsum"


def _pool(role: str = "train") -> dict[str, list[str]]:
    return {t: [r["input"] for r in load_records(get_task(t), role)] for t in TASKS}


def _users(pool, n: int, per: int, seed: int, topic: bool = False) -> list[dict]:
    """``n`` benign users of ``per`` requests, each with its own Dirichlet(0.5) taste for the tasks,
    interleaved in time; no item is sent twice (a log of repeated prompts calibrates on familiar ones)."""
    rng = np.random.default_rng(seed)
    left = {t: list(rng.permutation(len(v))) for t, v in pool.items()}
    rows = []
    for u in range(n):
        taste = rng.dirichlet([0.5] * len(TASKS))
        for j in range(per):
            t = TASKS[rng.choice(len(TASKS), p=taste)]
            rows.append({"id": f"{seed}-{u}-{j}", "client": f"user-{seed}-{u}", "time": j * 100 + u,
                         "_t": float(j * 100 + u), "prompt": WRAPPER + pool[t][left[t].pop()],
                         **({"topic": t} if topic else {})})
    return rows


@pytest.fixture(scope="module")
def setting():
    m, tok, _ = load_model(None)
    pool = _pool()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a small log: the few-blocks warning (tested below)
        own = fromlog.build(m, tok, _users(pool, 30, 16, 1), window=8, seed=0, name="embedded", slice_len=32, early=(2, 4))
    tasks = build(m, tok, {t: v[-120:] for t, v in pool.items()}, window=8, seed=0, name="embedded", slice_len=32, early=(2, 4))
    return m, tok, pool, own, tasks


def test_a_log_profile_learns_the_deployments_traffic_where_a_task_profile_alarms_on_it(setting):
    m, tok, pool, own, tasks = setting
    rng = random.Random(0)
    fresh = _pool("eval")                                 # items no profile read
    attack = [{"id": f"a{j}", "client": "mallory", "time": j * 100, "_t": float(j * 100),
               "prompt": WRAPPER + CAMPAIGN + SEPARATOR + rng.choice(fresh[TASKS[0]])} for j in range(16)]
    day2 = _users(fresh, 20, 16, 2) + attack           # other users, other items, the same deployment
    rates = {}
    for name, prof in (("own", own), ("tasks", tasks)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, looks, alerts, summary = score(m, tok, prof, day2)
        benign = {a["requests"][0] for a in alerts if a["kind"] == "window" and a["client"] != "mallory"}
        rates[name] = len(benign) / (summary["blocks"] - 2)    # mallory sent 2 blocks
        rates[name + "_slices"] = summary["alerts"]["slice"] / summary["slices"]
        rates[name + "_mallory"] = sum(a["kind"] == "window" and a["client"] == "mallory" for a in alerts)
    # the task profile never saw the wrapper: nearly every benign user's window is an alarm
    assert rates["tasks"] >= 0.5 and rates["tasks_slices"] >= 0.5, rates
    # the log profile calibrated on it (a small log of 15 calibration users: not the nominal 1%)
    assert rates["own"] <= 0.1 and rates["own_slices"] <= 0.1, rates
    assert rates["own_mallory"] == 2, rates               # the campaign is still seen, in both its blocks
    src = own.meta["source"]
    assert src["split"] == "clients" and src["topics"] == "clusters" and src["windows"] == "clients", src
    assert src["clients"] == {"fit": 15, "calibration": 15, "calibrating_windows": 15} and src["slices"] == "traffic"
    assert src["repeated"] == 0 and src["disjoint_blocks"] == 30
    assert own.meta["requests"] == {"fit": 240, "calibration": 240} and own.meta["early"] == [2, 4]
    # early looks adjusted by Sidak over three looks (windows are real users' runs), not by min-p
    u = np.arange(1, 2001) / 2001
    assert np.allclose(own.null["window.ladder"], 1 - (1 - u) ** (1 / 3))
    assert not np.allclose(tasks.null["window.ladder"], 1 - (1 - u) ** (1 / 3))


def test_clusters_recover_the_tasks_and_a_topic_field_names_them(setting):
    m, tok, pool, _, _ = setting
    log = _users(pool, 30, 16, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clustered = fromlog.build(m, tok, log, window=8, topics=3, seed=0, early=())
        named = fromlog.build(m, tok, _users(pool, 30, 16, 1, topic=True), window=8, seed=0, early=())
    assert list(clustered.topics) == ["cluster-0", "cluster-1", "cluster-2"]
    assert list(named.topics) == sorted(TASKS) and named.meta["source"]["topics"] == "field"
    # unseen items of each task go to one cluster, and each task to its own
    nearest = {}
    for t in TASKS:
        _, sums, ntok, _ = observe(m, tok, [WRAPPER + x for x in _pool("eval")[t][:40]])
        got = clustered.kernel.unfamiliar(clustered.space(sums, ntok))[1]
        nearest[t] = np.bincount(got, minlength=3)
    majority = {t: int(c.argmax()) for t, c in nearest.items()}
    assert len(set(majority.values())) == 3, nearest
    assert all(c.max() / c.sum() >= 0.85 for c in nearest.values()), nearest


def test_the_split_is_by_client_or_by_time_where_one_client_dominates():
    def rec(i, c):
        return {"id": i, "client": c, "time": i, "_t": float(i), "prompt": "x"}

    balanced = [rec(i, f"c{i % 10}") for i in range(100)]
    fit, cal, how = fromlog.split(balanced, window=4, rng=np.random.default_rng(0))
    assert how == "clients" and sorted(fit + cal) == list(range(100))
    assert not {balanced[i]["client"] for i in fit} & {balanced[i]["client"] for i in cal}
    assert len(fit) == 50
    heavy = [rec(i, "gateway" if i % 5 else f"c{i}") for i in range(100)]   # one client sends 80%
    fit, cal, how = fromlog.split(heavy, window=4, rng=np.random.default_rng(0))
    assert how == "time" and fit == list(range(50)) and cal == list(range(50, 100))
    # every run of a client's consecutive requests, at every start
    assert fromlog._client_blocks(["a", "b", "a", "a", "b", "a"], 2) == {"a": [[0, 2], [2, 3], [3, 5]], "b": [[1, 4]]}
    with pytest.raises(MoeguardError, match="the benign log holds 12 requests"):
        fromlog.split(balanced[:12], window=4, rng=np.random.default_rng(0))


def test_a_log_without_full_client_windows_falls_back_and_says_so(setting):
    m, tok, pool, _, _ = setting
    log = _users(pool, 60, 4, 3)                       # nobody sends a window of 8
    with pytest.warns(UserWarning, match="no calibration client sent 8 requests"):
        prof = fromlog.build(m, tok, log, window=8, seed=0, early=())
    assert prof.meta["source"]["windows"] == "drawn" and prof.meta["source"]["disjoint_blocks"] == 0
    with pytest.warns(UserWarning, match=r"benign windows come from 30 non-overlapping blocks of 15 calibration"):
        fromlog.build(m, tok, _users(pool, 30, 16, 1), window=8, seed=0, early=())


def test_a_resumed_build_reads_its_kept_chunks(setting, tmp_path, monkeypatch):
    m, tok, pool, _, _ = setting
    log = _users(pool, 30, 16, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = fromlog.build(m, tok, log, window=8, seed=0, early=())            # one chunk a half
        monkeypatch.setattr(fromlog, "CHUNK", 64)
        first = fromlog.build(m, tok, log, window=8, seed=0, cache=tmp_path, early=())
        assert sorted(p.name for p in tmp_path.iterdir()) == \
            [f".log-calibration-{i}.npz" for i in range(4)] + [f".log-fit-{i}.npz" for i in range(4)]
        # chunks change no number beyond float noise (a pooled hidden sum moved by 1e-5 in two rows of
        # 240: the same batches, run in another sequence of forwards)
        assert np.array_equal(first.mean, whole.mean) and set(first.null) == set(whole.null)
        assert all(np.allclose(first.null[k], whole.null[k], rtol=1e-5, atol=1e-8) for k in whole.null)

        def no_forward(*a, **k):
            raise AssertionError("a kept chunk was observed again")

        monkeypatch.setattr(fromlog, "observe", no_forward)
        again = fromlog.build(m, tok, log, window=8, seed=0, cache=tmp_path, early=())
    assert json.dumps(again.to_dict()) == json.dumps(first.to_dict())


def _log_file(path, rows):
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "_t"}) + "\n" for r in rows))
    return path


def test_bad_log_settings_are_one_line_errors_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was resolved before the log was checked")

    monkeypatch.setattr("moeguard.edge.resolve_model", no_model)
    pool = _pool()
    good = _log_file(tmp_path / "good.jsonl", _users(pool, 30, 16, 1))
    half = _users(pool, 30, 16, 1)
    for r in half[:5]:
        r["topic"] = "billing"
    named = [{**r, "topic": "general"} for r in _users(pool, 30, 16, 1)]
    rare = [{**r, "topic": "billing" if i < 2 else "general"} for i, r in enumerate(_users(pool, 30, 16, 1))]
    cases = [
        (["--log", str(good), "--tasks", "arith-compare"], "--log is given with --tasks"),
        (["--log", str(good), "--limit", "50"], "--log is given with --limit"),
        (["--tasks", "arith-compare", "--topics", "3"], "--topics 3 without --log"),
        (["--log", str(good), "--reply-tokens", "300"], "--reply-tokens is 300"),
        (["--log", str(good), "--topics", "99"], "--topics is 99"),
        (["--log", str(good), "--topics", "many"], "--topics is 'many'"),
        (["--log", str(good), "--slice", "512"], "--slice 512 needs at least 1024 calibration requests"),
        (["--log", str(_log_file(tmp_path / "short.jsonl", _users(pool, 2, 5, 1)))], "the benign log holds 10 requests"),
        (["--log", str(_log_file(tmp_path / "half.jsonl", half))], "5 of the log's 480 records have a topic"),
        (["--log", str(tmp_path / "absent.jsonl")], "absent.jsonl does not exist"),
        (["--log", str(_log_file(tmp_path / "named.jsonl", named)), "--topics", "3"],
         "--topics 3 with a log whose records name their topics"),
        (["--log", str(_log_file(tmp_path / "rare.jsonl", rare))], "topic ['billing'] has fewer than 4 requests"),
        (["--log", str(good), "--topics", "\u00b2"], "--topics is '\u00b2'"),
    ]
    for args, message in cases:
        out = tmp_path / "P.json"
        assert main(["monitor", "profile", "--out", str(out), "--window", "8", *args]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err and not out.exists(), (args, err)


def test_the_cli_profiles_a_log_and_scores_against_it(tmp_path, capsys):
    pool = _pool()
    log = _log_file(tmp_path / "benign.jsonl", _users(pool, 30, 16, 1))
    before = log.read_bytes()
    prof = tmp_path / "P.json"
    assert main(["monitor", "profile", "--out", str(prof), "--log", str(log), "--window", "8", "--early", "none"]) == 0
    out = capsys.readouterr().out
    assert "from 15 clients fitted" in out and "split by clients" in out and "15 clients' own blocks" in out, out
    doc = json.loads(prof.read_text())
    assert doc["source"]["log"] == str(log) and len(doc["source"]["sha256"]) == 64 and log.read_bytes() == before
    assert doc["run"]["settings"]["log"] == str(log) and doc["run"]["settings"]["topics"] == "auto"
    Profile.from_dict(doc, where="P.json")
    assert main(["monitor", "profile", "--out", str(prof), "--log", str(log), "--window", "8"]) == 2
    assert "exists" in capsys.readouterr().err
    day2 = _log_file(tmp_path / "day2.jsonl", _users(_pool("eval"), 10, 8, 2))
    assert main(["monitor", "score", "--profile", str(prof), "--log", str(day2), "--out", str(tmp_path / "s")]) == 0
    assert "80 requests from 10 clients, 10 windows" in capsys.readouterr().out


def test_logged_replies_are_profiled_as_logged_and_missing_ones_generated(setting, monkeypatch):
    from moeguard.monitor import replies

    m, tok, pool, _, _ = setting
    log = _users(pool, 16, 16, 1)       # 16 users of 16: 8 fit the profile, 8 calibrate it (128 requests each)
    for r in log:
        r["reply"] = "The answer is yes."
    generated = []
    real = replies.generate

    def counted(model, tokenizer, prompts, n, **kw):
        generated.extend(prompts)
        return real(model, tokenizer, prompts, n, **kw)

    monkeypatch.setattr(replies, "generate", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logged = fromlog.build(m, tok, log, window=8, seed=0, early=(), reply_tokens=4)
        assert not generated                             # every reply was logged: none made
        for r in log[::2]:
            del r["reply"]
        mixed = fromlog.build(m, tok, log, window=8, seed=0, early=(), reply_tokens=4)
    assert len(generated) == 128                          # exactly the records without one
    assert logged.replies is not None and logged.meta["reply_tokens"] == 4 and logged.replies.max_tokens == 4
    assert "request.reply_load" in logged.null and len(logged.null["request.reply_load"]) == 128
    # the same text for every reply: its routing varies only with the prompt before it, so the logged
    # replies' null is narrower than the mixed one's
    spread = lambda p: float(np.ptp(p.null["request.reply_surprise"]))   # noqa: E731
    assert spread(logged) < spread(mixed), (spread(logged), spread(mixed))
    # and it scores: a request with a logged reply against the profile
    sc, _, _, _ = score(m, tok, logged, [{**log[1], "id": "x", "client": "c"}])
    assert 0 < sc[0]["p"] <= 1 and "reply_load" in sc[0]


def test_the_online_hook_scores_a_log_profile_as_the_offline_scorer_does(setting, through_hook):
    from moeguard.monitor.online import RoutingMonitor

    m, tok, _, own, _ = setting                       # early looks at 2 and 4 of 8 (Sidak), slices of 32
    rng = random.Random(1)
    recs = [{"id": f"e{j}", "client": "eve", "time": j, "_t": float(j),
             "prompt": WRAPPER + CAMPAIGN + SEPARATOR + rng.choice(_pool("eval")[TASKS[1]])} for j in range(8)]
    recs += [{**r, "_t": float(8 + i), "time": 8 + i} for i, r in enumerate(_users(_pool("eval"), 3, 8, 5))]
    _, wins, _, summary = score(m, tok, own, recs)
    results = through_hook(RoutingMonitor(m, own, flush_every=1), m, tok, recs)
    looked = [x["window"] for x in results if x["window"] is not None]
    assert [w["length"] for w in looked] == [w["length"] for w in wins] and len(looked) == 12
    for w, off in zip(looked, wins):
        assert w["p"] == pytest.approx(off["p"]) and w["p_look"] == pytest.approx(off["p_look"])
    (sl,) = [x["slice"] for x in results if x["slice"] is not None]
    assert sl["p"] == pytest.approx(summary["traffic_slices"][0]["p"])
    assert wins[0]["p"] <= 0.01 or wins[1]["p"] <= 0.01      # eve's crafted block is seen by a look


def test_a_gateway_log_of_one_client_splits_by_time_and_says_how_few_users_calibrate(setting):
    m, tok, pool, _, _ = setting
    log = [{**r, "client": "gateway"} for r in _users(pool, 30, 16, 1)]   # no per-user identity
    with pytest.warns(UserWarning, match="non-overlapping blocks of 1 calibration client"):
        prof = fromlog.build(m, tok, log, window=8, seed=0, early=(2, 4))
    src = prof.meta["source"]
    assert src["split"] == "time" and src["clients"] == {"fit": 1, "calibration": 1, "calibrating_windows": 1}
    assert prof.meta["requests"] == {"fit": 240, "calibration": 240} and src["windows"] == "clients"


def test_a_client_is_its_ids_text_in_the_split_and_in_score(setting):
    """``1`` and ``"1"`` are one client, as the online hook and slices count it: the split keeps its
    requests on one side, and ``score`` makes one window of them, not two short ones."""
    rows = [{"id": i, "client": (i % 5 if i % 2 else str(i % 5)), "time": i, "_t": float(i), "prompt": f"p{i}"}
            for i in range(60)]
    fit, cal, how = fromlog.split(rows, window=4, rng=np.random.default_rng(0))
    side = {}
    for i in fit + cal:
        side.setdefault(str(rows[i]["client"]), set()).add(i in fit)
    assert how == "clients" and len(side) == 5 and all(len(s) == 1 for s in side.values()), side
    m, tok, pool, own, _ = setting
    log = [{"id": j, "client": 7 if j % 2 else "7", "time": j, "_t": float(j), "prompt": WRAPPER + pool["arith-compare"][j]}
           for j in range(8)]
    scores, looks, _, summary = score(m, tok, own, log)
    full = [w for w in looks if w["length"] == 8]
    assert {s["client"] for s in scores} == {"7"}, scores     # every output names it as its first request does
    assert summary["clients"] == 1 and summary["unwindowed"] == {"requests": 0, "clients": 0}, summary
    assert len(full) == 1 and full[0]["client"] == "7" and full[0]["requests"] == list(range(8)), full


def test_rare_field_topics_are_merged_into_other_with_a_warning(setting):
    """A long tail of rare apps: topics under 4 fit requests each, 4 or more together, become 'other'
    (the log's records are not changed); one that stays too rare is still an error (the bad-input test)."""
    m, tok, pool, _, _ = setting
    log = sorted(_users(pool, 30, 16, 1, topic=True), key=lambda r: r["_t"])
    fit, _, _ = fromlog.split(log, window=8, rng=np.random.default_rng(0))
    first = list(dict.fromkeys(log[i]["client"] for i in fit))[:2]      # two clients of the fit half
    for client, topic in zip(first, ("billing", "refunds")):
        for r in [r for r in log if r["client"] == client][:3]:
            r["topic"] = topic
    with pytest.warns(UserWarning, match=r"topics \['billing', 'refunds'\] had fewer than 4 requests in the fit half "
                                         r"and are merged into 'other'"):
        prof = fromlog.build(m, tok, log, window=8, seed=0, early=())
    assert list(prof.topics) == sorted([*TASKS, "other"]) and prof.meta["source"]["merged_topics"] == ["billing", "refunds"]
    assert sum(r["topic"] in ("billing", "refunds") for r in log) == 6       # the log itself is unchanged


def test_merging_rare_topics_before_any_weights_load():
    """A topic already named 'other' takes the rare ones; rare topics too few even together are an
    error that says how many they had (``_plan``, which ``check`` runs before the model loads)."""
    def rec(i, topic):
        return {"id": i, "client": f"c{i % 10}", "time": i, "_t": float(i), "prompt": f"p{i}", "topic": topic}

    log = [rec(i, "general" if i % 10 < 6 else "other") for i in range(200)]
    fit, _, _ = fromlog.split(sorted(log, key=lambda r: r["_t"]), window=4, rng=np.random.default_rng(0))
    fit_clients = list(dict.fromkeys(f"c{i % 10}" for i in fit))
    for r in [r for r in log if r["client"] == fit_clients[0]][:2]:
        r["topic"] = "billing"
    for r in [r for r in log if r["client"] == fit_clients[1]][:2]:
        r["topic"] = "refunds"
    records, *_, merged = fromlog._plan(log, window=4, slice_len=0, rng=np.random.default_rng(0))
    assert merged == ["billing", "refunds"] and {r["topic"] for r in records} == {"general", "other"}
    assert sum(r["topic"] == "billing" for r in log) == 2                    # copies: the log is unchanged
    alone = [{**r, "topic": "general"} for r in log]
    for r in [r for r in alone if r["client"] == fit_clients[0]][:1] + [r for r in alone if r["client"] == fit_clients[1]][:1]:
        r["topic"] = r["client"]                                              # two topics of 1 fit request each
    with pytest.raises(MoeguardError, match=r"have fewer than 4 requests in the fit half .*and 2 together in 'other'"):
        fromlog._plan(alone, window=4, slice_len=0, rng=np.random.default_rng(0))


def test_a_slice_counts_a_client_by_its_ids_text(setting):
    from moeguard.monitor import slices

    own = setting[3]
    x = own.kernel.refs[0][:6]
    row = slices.score(own, x, [1, "1", 1, "1", "a", "a"])
    assert row["clients"] == 2 and sorted(str(t["client"]) for t in row["top_clients"]) == ["1", "a"], row
    assert {t["client"]: t["requests"] for t in row["top_clients"]}[1] == 4, row     # named as first seen


def test_a_logged_prompt_with_a_token_past_the_embeddings_is_one_line_before_the_replay():
    """A tokenizer whose added tokens lie past the model's embeddings: the replay failed inside the
    model (an IndexError; a device-side assert on a GPU), at the same chunk on every rerun."""
    from moeguard.monitor.fit import check_vocab

    m, tok, _ = load_model(None)
    tok.add_tokens(["<zz_added_past_the_embeddings>"])
    texts = [("request 'a'", "def f(x):"), ("request 'b'", "x <zz_added_past_the_embeddings>")]
    with pytest.raises(MoeguardError, match=r"request 'b' holds a token \(id \d+\) the model has no embedding for "
                                            r"\(it has 4096\)"):
        check_vocab(m, tok, texts)
    check_vocab(m, tok, texts[:1])
