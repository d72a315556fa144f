"""Early looks at a client's window (``monitor profile --early``): a client is scored from its first
early length on, each look's p-value is adjusted for the several looks at one block (a benign block
alerts about alpha of the time, not once per look), a block alerts once, the online hook gives the
offline scorer's numbers, and bad lengths are one-line errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.loading import load_model
from moeguard.monitor import ladder
from moeguard.monitor.fit import build
from moeguard.monitor.profile import Profile
from moeguard.monitor.score import score
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task

TASKS = ("arith-compare", "docstring-topic")


@pytest.fixture(scope="module")
def setting():
    m, tok, _ = load_model(None)
    prompts = {t: [r["input"] for r in load_records(get_task(t), "eval", limit=120)] for t in TASKS}
    early = build(m, tok, prompts, window=8, seed=0, name="embedded", early=(4,))
    plain = build(m, tok, prompts, window=8, seed=0, name="embedded")
    return m, tok, early, plain


def _records(n_benign: int, n_junk: int) -> list[dict]:
    rng = random.Random(0)
    rows = [{"id": f"alice-{i}", "client": "alice", "time": i, "prompt": r["input"], "_t": float(i)}
            for i, r in enumerate(load_records(get_task("arith-compare"), "eval", limit=130)[120:120 + n_benign])]
    for i in range(n_junk):
        junk = " ".join(rng.choice(["zq", "xv", "##", "}{", "0x9f", "@@", "~~", "%%", "qqq", "lorem"]) for _ in range(40))
        rows.append({"id": f"eve-{i}", "client": "eve", "time": i, "prompt": junk, "_t": float(i)})
    return rows


def test_a_client_is_seen_from_its_first_early_look_and_each_block_alerts_once(setting):
    m, tok, early, plain = setting
    # eve sends 6 probing requests: no window of 8 ever sees them; the look at 4 does
    _, wins, alerts, summary = score(m, tok, plain, _records(8, 6))
    assert [w["client"] for w in wins] == ["alice"] and summary["unwindowed"] == {"requests": 6, "clients": 1}
    _, wins, alerts, summary = score(m, tok, early, _records(8, 6))
    assert [(w["client"], w["length"]) for w in wins] == [("alice", 4), ("alice", 8), ("eve", 4)], wins
    eve = [a for a in alerts if a["kind"] == "window"]
    assert [(a["client"], a["length"], a["requests"]) for a in eve] == [("eve", 4, [f"eve-{i}" for i in range(4)])], eve
    assert eve[0]["p_combined"] <= 0.01 and summary["early"] == [4] and summary["blocks"] == 2
    assert summary["unwindowed"] == {"requests": 2, "clients": 0}
    # alice's looks pass; each look reports its own p-value beside the adjusted one, which is larger
    assert all(w["p"] > 0.01 and w["p"] >= w["p_look"] for w in wins if w["client"] == "alice"), wins
    # 16 probing requests: two blocks, four looks, two alerts (each block's first look), not four
    _, wins, alerts, summary = score(m, tok, early, _records(0, 16))
    assert [w["length"] for w in wins] == [4, 8, 4, 8] and all(w["p"] <= 0.01 for w in wins)
    assert [a["requests"][0] for a in alerts if a["kind"] == "window"] == ["eve-0", "eve-8"]
    assert summary["alerts"]["window"] == 2 and summary["unwindowed"] == {"requests": 0, "clients": 0}
    assert summary["windows"] == 4 and summary["blocks"] == 2
    # a profile without early looks scores as before: one look, the full window, its p-value unadjusted
    recs = _records(8, 0)
    scores, wins, _, _ = score(m, tok, plain, recs)
    assert len(wins) == 1 and wins[0]["length"] == 8 and "p_look" not in wins[0]
    from moeguard.monitor.fit import observe

    hist, sums, ntok, surprise = observe(m, tok, [r["prompt"] for r in recs], tokens=plain.tokens)
    X = plain.space(sums, ntok)
    req_p = plain.p_values(plain.statistics(hist, X, surprise), "request")["combined"]
    direct = plain.p_values(plain.window_statistics(hist.mean(0)[None], [req_p], [X]), "window")["combined"][0]
    assert wins[0]["p"] == pytest.approx(direct) and [s["p"] for s in scores] == pytest.approx(list(req_p))


def test_the_adjusted_p_value_holds_a_benign_block_to_alpha_over_all_its_looks():
    from moeguard.monitor.fit import observe

    m, tok, _ = load_model(None)
    tasks = ("arith-compare", "docstring-topic", "code-naming", "record-summary")
    records = {t: [r["input"] for r in load_records(get_task(t), "eval")] for t in tasks}
    prof = build(m, tok, {t: r[:100] for t, r in records.items()}, seed=0, name="embedded", early=(4, 8))  # 16: the default
    ref = prof.null["window.ladder"]
    assert len(ref) == ladder.BENIGN_BLOCKS and prof.meta["benign_windows"] == ladder.BENIGN_BLOCKS
    # the benign blocks' own minima, adjusted, are (super-)uniform: at most alpha of them at or below
    # alpha, less only by the blocks tied at one value (look p-values are ranks, so they tie)
    ties = np.unique(ref, return_counts=True)[1].max() / len(ref)
    for alpha in (0.01, 0.05, 0.2):
        share = np.mean(ladder.adjust(prof.null, ref) <= alpha)
        assert alpha - ties - 1 / len(ref) <= share <= alpha, (alpha, share, ties)
    # fresh benign blocks of 16 (inputs the profile never saw), alternately one topic and mixed, as
    # the profile draws them: each block's smallest look p-value over the looks at 4, 8 and 16
    fresh = [(t, x) for t in tasks for x in records[t][100:]]
    hist, sums, ntok, surprise = observe(m, tok, [x for _, x in fresh], tokens=prof.tokens)
    X = prof.space(sums, ntok)
    req_p = prof.p_values(prof.statistics(hist, X, surprise), "request")["combined"]
    rng = np.random.default_rng(7)
    by_topic = [np.flatnonzero([t == u for t, _ in fresh]) for u in tasks]
    blocks = [rng.choice(by_topic[i // 2 % 4] if i % 2 == 0 else len(fresh), size=16, replace=False) for i in range(1200)]
    looks = ladder.looks(prof, blocks, hist, X, req_p)
    assert [n for n, *_ in looks] == [4, 8, 16]
    adjusted = np.min([wp["combined"] for _, _, _, wp, _ in looks], axis=0)
    unadjusted = np.min([wp["look"] for _, _, _, wp, _ in looks], axis=0)
    # near alpha of benign blocks alert over their three looks (8.5%: the calibration describes traffic
    # drawn like the profile's 50 calibration inputs a task, and these are other inputs); without the
    # adjustment, more
    assert 0.03 <= np.mean(adjusted <= 0.05) <= 0.10, np.mean(adjusted <= 0.05)
    assert np.mean(unadjusted <= 0.05) >= 1.3 * np.mean(adjusted <= 0.05), (np.mean(unadjusted <= 0.05), np.mean(adjusted <= 0.05))
    # `evidence` of full windows: 9.3% at 0.05 with each calibration request left out of its own null
    # (p_values(own=True)); the in-sample p-values it averaged before gave 12.9%
    assert np.mean(looks[2][3]["evidence"] <= 0.05) <= 0.10


def test_the_online_hook_looks_early_as_the_offline_scorer_does(setting, through_hook):
    from moeguard.monitor.online import RoutingMonitor

    m, tok, early, _ = setting
    recs = _records(0, 8)
    _, wins, _, _ = score(m, tok, early, recs)
    mon = RoutingMonitor(m, early, flush_every=1)
    results = through_hook(mon, m, tok, recs, client="eve")
    looked = [(i, x["window"]) for i, x in enumerate(results) if x["window"] is not None]
    assert [(i, w["length"]) for i, w in looked] == [(3, 4), (7, 8)]
    assert [w["length"] for w in wins] == [4, 8], wins   # the offline looks the loops below compare
    for (_, w), off in zip(looked, wins):
        assert w["p"] == pytest.approx(off["p"]) and w["statistics"]["drift"] == pytest.approx(off["drift"], abs=1e-3)
    for (_, w), off in zip(looked, wins):
        assert w["p_look"] == pytest.approx(off["p_look"])
    # both looks are at alpha; the block alerted at its first only
    assert looked[1][1]["p"] <= 0.01 and "alert" in looked[0][1] and "alert" not in looked[1][1]
    assert mon._clients["eve"][1] == []                               # the block completed: the next one starts


def test_the_default_early_looks_are_a_quarter_and_a_half_of_the_window():
    assert [ladder.default_early(w) for w in (2, 3, 4, 8, 16, 32)] == [(), (), (2,), (2, 4), (4, 8), (8, 16)]


def test_profiles_with_early_looks_round_trip_and_damaged_ones_are_refused(setting):
    _, _, early, plain = setting
    back = Profile.from_dict(json.loads(json.dumps(early.to_dict())), where="P.json")
    assert back.meta["early"] == [4] and ladder.lengths(back.meta) == (4, 8)
    assert "early" not in plain.to_dict() and ladder.lengths(plain.meta) == (8,)
    for damage in (lambda n: n.pop("window@4.drift"), lambda n: n.__setitem__("window@4.load", n["window@4.load"][:5]),
                   lambda n: n.__setitem__("window.ladder", [0.0] + n["window.ladder"][1:]), lambda n: n.pop("window.ladder")):
        d = early.to_dict()
        damage(d["null"])
        with pytest.raises(MoeguardError, match="P.json is a damaged routing profile \\(window, early looks, slices, layers or weights"):
            Profile.from_dict(d, where="P.json")
    d = early.to_dict()
    d["weights"] = "x"   # check_model read it as a mapping: an AttributeError, with a traceback, before
    with pytest.raises(MoeguardError, match="P.json is a damaged routing profile \\(window, early looks, slices, layers or weights"):
        Profile.from_dict(d, where="P.json")
    assert ladder.check_early(np.array([2, 4]), 8) == (2, 4)   # numpy integers, from an API caller
    with pytest.raises(MoeguardError, match=r"early window lengths \[8\] are outside 2..7"):
        ladder.check_early([8], 8)


@pytest.mark.parametrize("early, window, needle", [
    ("8", "8", "early window lengths [8] are outside 2..7 (windows of 8)"),
    ("1", "8", "early window lengths [1] are outside 2..7"),
    ("4,2", "8", "early window lengths [4, 2] repeat or are out of order"),
    ("x", "8", "--early 'x' is not a comma-separated list of integers"),
])
def test_bad_early_lengths_are_one_line_errors_before_any_work(tmp_path, capsys, early, window, needle):
    out = tmp_path / "P.json"
    assert main(["monitor", "profile", "--out", str(out), "--tasks", "arith-compare", "--limit", "40",
                 "--window", window, "--early", early]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err and not out.exists(), err


def test_the_cli_profiles_early_looks_and_score_says_what_no_look_saw(tmp_path, capsys):
    prof = tmp_path / "P.json"
    assert main(["monitor", "profile", "--out", str(prof), "--tasks", ",".join(TASKS), "--limit", "60"]) == 0
    assert "windows of 16 (looked at early after 4, 8 requests)" in capsys.readouterr().out   # the default
    doc = json.loads(prof.read_text())
    assert doc["early"] == [4, 8] and doc["run"]["settings"]["early"] == [4, 8]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "_t"}) + "\n" for r in _records(6, 3)))
    assert main(["monitor", "score", "--profile", str(prof), "--log", str(log), "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "9 requests from 2 clients, 1 windows" in out   # alice's look at 4
    assert "5 requests are in no window (each client's requests after its last window or early look; " \
           "1 client sent fewer than 4)" in out, out
