"""Early looks at a client's window (``monitor profile --early``): a client is scored from its first
early length on, each look's p-value is adjusted for the several looks at one block (a benign block
alerts about alpha of the time, not once per look), a block alerts once, the online hook gives the
offline scorer's numbers, and bad lengths are one-line errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.loading import load_model
from moeguard.monitor import ladder
from moeguard.monitor.profile import Profile, build
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
    assert eve[0]["p"] <= 0.01 and summary["early"] == [4]
    assert summary["unwindowed"] == {"requests": 2, "clients": 0}
    # alice's looks pass; each look reports its own p-value beside the adjusted one, which is larger
    assert all(w["p"] > 0.01 and w["p"] >= w["p_look"] for w in wins if w["client"] == "alice"), wins
    # 16 probing requests: two blocks, four looks, two alerts (each block's first look), not four
    _, wins, alerts, summary = score(m, tok, early, _records(0, 16))
    assert [w["length"] for w in wins] == [4, 8, 4, 8] and all(w["p"] <= 0.01 for w in wins)
    assert [a["requests"][0] for a in alerts if a["kind"] == "window"] == ["eve-0", "eve-8"]
    assert summary["alerts"]["window"] == 2 and summary["unwindowed"] == {"requests": 0, "clients": 0}
    # a profile without early looks scores exactly as before: one look, the full window, unadjusted
    _, wins, _, _ = score(m, tok, plain, _records(8, 0))
    assert len(wins) == 1 and wins[0]["length"] == 8 and "p_look" not in wins[0]


def test_the_adjusted_p_value_holds_a_benign_block_to_alpha_over_all_its_looks(setting):
    m, tok, early, _ = setting
    ref = early.null["window.ladder"]
    assert len(ref) == ladder.BENIGN_BLOCKS and early.meta["benign_windows"] == ladder.BENIGN_BLOCKS
    raw = np.array([ref[0], ref[19], 0.5, 1.0])
    want = [(1 + np.sum(ref <= r)) / (len(ref) + 1) for r in raw]
    assert np.allclose(ladder.adjust(early.null, raw), want) and np.all(np.diff(ladder.adjust(early.null, raw)) >= 0)
    # fresh benign blocks (a seed the profile never drew): each block's smallest look p-value
    from moeguard.monitor.profile import observe

    fresh = [r["input"] for t in TASKS for r in load_records(get_task(t), "eval")[120:]]   # never profiled
    hist, sums, ntok, surprise = observe(m, tok, fresh, tokens=early.tokens)
    X = early.space(sums, ntok)
    req_p = early.p_values(early.statistics(hist, X, surprise), "request")["combined"]
    rng = np.random.default_rng(7)
    blocks = [rng.choice(len(hist), size=8, replace=False) for _ in range(600)]
    looks = ladder.looks(early, blocks, hist, X, req_p)
    adjusted = np.min([wp["combined"] for _, _, _, wp, _ in looks], axis=0)
    unadjusted = np.min([wp["look"] for _, _, _, wp, _ in looks], axis=0)
    # about alpha of benign blocks alert over both looks; without the adjustment, clearly more
    assert 0.02 <= np.mean(adjusted <= 0.05) <= 0.08, np.mean(adjusted <= 0.05)
    assert np.mean(unadjusted <= 0.05) > 1.3 * np.mean(adjusted <= 0.05), (np.mean(unadjusted <= 0.05), np.mean(adjusted <= 0.05))


def test_the_online_hook_looks_early_as_the_offline_scorer_does(setting):
    from moeguard.monitor.online import RoutingMonitor

    m, tok, early, _ = setting
    recs = _records(0, 8)
    _, wins, _, _ = score(m, tok, early, recs)
    mon = RoutingMonitor(m, early, flush_every=1)
    results = []
    with mon:
        for r in recs:
            with mon.request("eve") as res:
                ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) \
                    + tok(r["prompt"], add_special_tokens=False)["input_ids"]
                m(input_ids=torch.tensor([ids]))
            results.append(res.result)
    looked = [(i, x["window"]) for i, x in enumerate(results) if x["window"] is not None]
    assert [(i, w["length"]) for i, w in looked] == [(3, 4), (7, 8)]
    for (_, w), off in zip(looked, wins):
        assert w["p"] == pytest.approx(off["p"]) and w["statistics"]["drift"] == pytest.approx(off["drift"], abs=1e-3)
    assert "alert" in looked[0][1] and "alert" not in looked[1][1]   # the block alerted at its first look only
    assert mon._clients["eve"][1] == []                               # the block completed: the next one starts


def test_the_default_early_looks_are_a_quarter_and_a_half_of_the_window():
    assert [ladder.default_early(w) for w in (2, 3, 4, 8, 16, 32)] == [(), (), (2,), (2, 4), (4, 8), (8, 16)]


def test_profiles_with_early_looks_round_trip_and_damaged_ones_are_refused(setting):
    _, _, early, plain = setting
    back = Profile.from_dict(json.loads(json.dumps(early.to_dict())), where="P.json")
    assert back.meta["early"] == [4] and ladder.lengths(back.meta) == (4, 8)
    assert "early" not in plain.to_dict() and ladder.lengths(plain.meta) == (8,)
    d = early.to_dict()
    del d["null"]["window@4.drift"]
    with pytest.raises(MoeguardError, match="P.json is a damaged routing profile \\(window, early looks or layers missing"):
        Profile.from_dict(d, where="P.json")
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
