"""Routing security: the hijack search (route-attack) finds prefixes that move routing, measures
them on held-out inputs sent as text, resumes, and refuses bad targets with one line."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.loading import load_model
from moeguard.monitor.hijack import HijackConfig, search
from moeguard.monitor.hijackmeasure import measure
from moeguard.monitor.routertap import RouterTap, allowed_tokens, check_target
from moeguard.tasks.registry import get_task

FAST = dict(prefix_tokens=6, steps=12, candidates=32, topk=16, train_inputs=4, eval_inputs=8, eval_limit=16)
FASTP = HijackConfig(layer=1, expert=2, **FAST)   # a prefix's measurement has no answer field


@pytest.fixture(scope="module")
def embedded():
    m, tok, _ = load_model(None)
    return m, tok, MoEAdapter(m)


def test_the_router_tap_stops_the_forward_and_always_removes_its_hook(embedded):
    m, tok, adapter = embedded
    router = adapter.layers[1].router
    ids = torch.tensor([tok.encode("a b c d")])
    with RouterTap(adapter, 1) as tap:
        logits, index = tap.run(m, input_ids=ids)
    assert logits.shape == (ids.shape[1], adapter.num_experts) and index.shape == (ids.shape[1], adapter.top_k)
    assert not router._forward_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with RouterTap(adapter, 1):
            raise RuntimeError("boom")
    assert not router._forward_hooks


def test_targets_are_checked_with_what_exists(embedded):
    _, _, adapter = embedded
    with pytest.raises(MoeguardError, match=r"layer 9 is not an MoE layer of this model \(its MoE layers: \[0, 1, 2, 3\]\)"):
        check_target(adapter, 9, 0)
    with pytest.raises(MoeguardError, match=r"expert 8 does not exist in layer 0 \(8 experts: 0..7\)"):
        check_target(adapter, 0, 8)


def test_the_search_moves_routing_to_the_target_and_the_text_attack_measures_it(embedded):
    m, tok, adapter = embedded
    task = get_task("arith-compare")
    allowed = allowed_tokens(tok, m.get_input_embeddings().weight.shape[0])
    cfg = HijackConfig(layer=0, expert=0, seed=0, **FAST)
    plain = measure(m, tok, adapter, task, cfg, prefix_text="")
    found = search(m, tok, adapter, task, cfg, allowed=allowed)
    assert len(found["prefix_ids"]) == 6 and tok.encode(found["prefix_text"], add_special_tokens=False) == found["prefix_ids"]
    assert found["curve"][0]["step"] == 0 and found["train_success"] > found["curve"][0]["success"]   # it moved
    got = measure(m, tok, adapter, task, cfg, found["prefix_text"])
    assert got["tokenization_exact"] == 1.0
    assert got["success"] > plain["success_without_prefix"] + 0.05, (got, plain)   # 12 steps move routing
    assert got["load_max"] >= got["normal_load_mean"] and got["task"]["metric"] == "accuracy"


def test_a_suffix_batch_targets_the_positions_that_make_the_reply():
    from moeguard.monitor.hijack import _Batch

    class Tok:
        bos_token_id, pad_token_id, eos_token_id = 1, 0, 2
        all_special_ids = [0, 1, 2]

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [{"a": 3, "\n": 9}[c] for c in text]}   # 9: the separator

    b = _Batch(Tok(), [[5, 6, 7, 9], [5, 9]], "suffix")   # a suffix's inputs end with the separator (_inputs)
    b.replies = [[30, 31, 2], [40]]
    ids, mask, target, starts = b.build([[20, 21]])
    # bos, input, separator, suffix, then the reply fed back but its last token (it makes nothing)
    assert ids[0].tolist() == [1, 5, 6, 7, 9, 20, 21, 30, 31] and starts == [5, 3]
    assert ids[1, :5].tolist() == [1, 5, 9, 20, 21] and mask[1].tolist() == [1] * 5 + [0] * 4
    assert target[0].nonzero().flatten().tolist() == [6, 7, 8]     # the suffix's last, then the reply's
    assert target[1].nonzero().flatten().tolist() == [4]
    p = _Batch(Tok(), [[5, 6, 7]], "prefix")
    ids, _, target, starts = p.build([[20, 21]])
    assert ids[0].tolist() == [1, 20, 21, 9, 5, 6, 7] and target[0].nonzero().flatten().tolist() == [4, 5, 6]


def test_a_reply_ends_at_its_end_of_text(monkeypatch):
    import moeguard.tasks.tokens as T
    from moeguard.monitor.hijack import reply

    class Tok:
        eos_token_id, pad_token_id = 2, 0

    monkeypatch.setattr(T, "greedy_generate", lambda model, config, input_ids, attention_mask:
                        torch.tensor([input_ids[0].tolist() + [7, 8, 2, 2, 2]]))
    assert reply(None, Tok(), [1, 5], 5) == [7, 8]          # the end of text is not a reply token
    monkeypatch.setattr(T, "greedy_generate", lambda model, config, input_ids, attention_mask:
                        torch.tensor([input_ids[0].tolist() + [7, 8, 9]]))
    assert reply(None, Tok(), [1, 5], 3) == [7, 8, 9]


def test_a_silenced_reply_hijacks_nothing_and_counts_zero_in_the_search():
    from moeguard.monitor.hijack import _scores

    # two rows of one suffix: one reply of 2 positions both routed to expert 3, one empty reply
    target = torch.tensor([[False, True, True], [False, False, False]])
    index = torch.tensor([[0, 1], [3, 1], [3, 2], [3, 1], [3, 1], [3, 1]])   # [B*T, k]
    logits = torch.zeros(6, 4)
    succ, _ = _scores(logits, index, target, 3, 2, per_input=True)
    assert succ.tolist() == [0.5]                      # 1.0 and 0 (not 1.0 over the one row that replied)
    succ, _ = _scores(logits, index, target, 3, 2)
    assert succ.tolist() == [1.0]                      # the prefix's token-weighted share, as before


def test_a_suffix_search_moves_the_routing_of_the_model_s_reply(embedded):
    m, tok, adapter = embedded
    task = get_task("arith-compare")
    allowed = allowed_tokens(tok, m.get_input_embeddings().weight.shape[0])
    cfg = HijackConfig(layer=1, expert=2, seed=0, position="suffix", follow_tokens=8, **FAST)
    found = search(m, tok, adapter, task, cfg, allowed=allowed)
    assert len(found["prefix_ids"]) == 6 and found["train_success"] > found["curve"][0]["success"]   # it moved
    got = measure(m, tok, adapter, task, cfg, found["prefix_text"])
    assert got["tokenization_exact"] == 1.0 and got["inputs"] == 8
    assert 1 <= got["reply_tokens_mean_without"] <= 8 and 1 <= got["reply_tokens_mean"] <= 8   # follow_tokens bounds them
    assert 0 <= got["success_on_answer"] <= 1 and "success_on_answer" not in measure(m, tok, adapter, task, FASTP, "")
    assert got["success"] > got["success_without_prefix"] + 0.05, got
    assert got["task"]["with_prefix"] != got["task"]["score"]   # the suffix sits between the question and its answer


def test_the_goal_is_judged_only_on_every_expert_of_every_layer():
    from moeguard.edge import resolve_model
    from moeguard.monitor.routeattack import summary, targets

    assert targets(resolve_model(None), [0, 0], 3, False) == [(0, 3)]      # a repeated layer is one target
    cfg = HijackConfig(layer=0, expert=0)
    hit = lambda l, e, s, without=0.1: {"layer": l, "expert": e,   # noqa: E731
                                         "measured": {"success": s, "success_without_prefix": without}}
    counts = {l: 8 for l in range(4)}
    half = [hit(l, e, 0.95 if e < 4 else 0.5) for l in range(4) for e in range(8)]
    assert summary(half, cfg, counts)["goal"]["met"] is True
    assert summary(half[:-1] + [hit(3, 3, 0.95)], cfg, counts)["goal"]["met"] is None   # expert 7 missing, 3 twice
    assert summary([r for r in half if r["layer"] == 0], cfg, counts)["goal"]["met"] is None   # one layer of four
    assert summary([hit(l, e, 0.95 if e < 3 else 0.5) for l in range(4) for e in range(8)], cfg, counts)["goal"]["met"] is False
    long = HijackConfig(layer=0, expert=0, prefix_tokens=40)
    assert summary(half, long, counts)["goal"]["met"] is False                # the goal's budget is 20 tokens
    suffix = HijackConfig(layer=0, expert=0, position="suffix")
    assert summary(half, suffix, counts)["goal"]["met"] is None               # the goal is stated for a prefix
    assert summary(half, suffix, counts)["position"] == "suffix"
    # an expert the inputs reach at >= 90% without the text (a model pruned to its top-k: every one) is not
    # hijacked: the goal was met by texts that changed nothing
    every = [hit(l, e, 1.0, without=1.0) for l in range(4) for e in range(8)]
    s = summary(every, cfg, counts)
    assert s["goal"]["met"] is False and s["layers"]["0"]["hijacked"] == [] and s["layers"]["0"]["share_hijacked"] == 0
    assert s["layers"]["0"]["routed_already"] == list(range(8)) and s["layers"]["0"]["resist"] == []
    mixed = summary([hit(0, 0, 0.95, without=0.92), hit(0, 1, 0.95), hit(0, 2, 0.5, without=0.97), hit(0, 3, 0.5)],
                    cfg, {0: 4})
    assert {k: mixed["layers"]["0"][k] for k in ("hijacked", "routed_already", "resist")} == \
        {"hijacked": [1], "routed_already": [0, 2], "resist": [3]}


def _measured(calls: list, real, *, interrupt_at: int | None = None):
    """route-attack's ``measure``, recording each target's expert in ``calls`` and interrupting (as
    Ctrl-C does) at call number ``interrupt_at``; the real one is ``.__wrapped__``."""
    def measure(*a, **k):
        calls.append(a[4].expert)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    measure.__wrapped__ = real
    return measure


def test_cli_runs_targets_resumably_and_draws_the_heat_map(tmp_path, capsys, monkeypatch):
    import moeguard.monitor.routeattack as ra

    out = tmp_path / "ra"
    args = ["route-attack", "--out", str(out), "--layer", "0", "--all", "--prefix-tokens", "3", "--steps", "1",
            "--candidates", "4"]
    calls = []
    monkeypatch.setattr(ra, "measure", _measured(calls, ra.measure, interrupt_at=3))
    assert main(args) == 130 and not out.exists()
    err = capsys.readouterr().err
    assert "interrupted; the work done so far is kept in" in err and ".ra.partial" in err, err
    assert len(list((tmp_path / ".ra.partial").glob("target-*.json"))) == 2
    monkeypatch.setattr(ra, "measure", _measured(calls, ra.measure.__wrapped__))
    capsys.readouterr()
    assert main(args) == 0
    assert calls[3:] == [2, 3, 4, 5, 6, 7]    # experts 0 and 1 were not searched again
    doc = json.loads((out / "route_attack.json").read_text())
    assert doc["schema"] == "moeguard.route-attack/1" and [t["expert"] for t in doc["targets"]] == list(range(8))
    assert (out / "route_attack_heatmap.png").stat().st_size > 5000 and not list(out.glob("target-*.json"))
    text = capsys.readouterr().out
    assert "layer 0: hijacked (>= 90%)" in text and "written to" in text
    assert main(args) == 2 and "already exists" in capsys.readouterr().err


def test_conflicting_or_missing_targets_are_one_line_errors(tmp_path, capsys):
    for extra, needle in ((["--all", "--expert", "1"], "--all and --expert were both given"),
                          ([], "no target expert"), (["--expert", "12"], "expert 12 does not exist in layer 0"),
                          (["--expert", "1", "--task", "stdlib-code"],
                           "language_modeling task 'stdlib-code' has running text, no inputs"),
                          (["--expert", "1", "--position", "middle"], "position 'middle' is not one of prefix, suffix"),
                          (["--expert", "1", "--position", "suffix", "--follow-tokens", "0"], "--follow-tokens is 0"),
                          (["--expert", "1", "--position", "suffix", "--task", "stdlib-code"],
                           "route-attack places its suffix after a task's input")):
        capsys.readouterr()
        assert main(["route-attack", "--out", str(tmp_path / "x"), "--layer", "0", *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "x").exists()


def test_the_default_profile_takes_every_embedded_task_running_text_included(tmp_path, capsys):
    """No --tasks: the embedded suite, whose language-modeling tasks send their texts as prompts."""
    prof = tmp_path / "P.json"
    assert main(["monitor", "profile", "--out", str(prof), "--limit", "8", "--window", "2"]) == 0
    doc = json.loads(prof.read_text())
    assert set(doc["tasks"]) >= {"arith-compare", "stdlib-code", "stdlib-docs"} and "stdlib-code" in doc["topics"]
    out = capsys.readouterr().out
    assert doc["requests"]["fit"] == 4 * len(doc["tasks"]) and "6 tasks" in out
    assert "seed 0 (the default): anyone with this model and these tasks can rebuild this profile" in out
    assert main(["monitor", "profile", "--out", str(tmp_path / "Q.json"), "--limit", "8", "--window", "2", "--seed", "7"]) == 0
    assert "profile of" in (out := capsys.readouterr().out) and "seed 0" not in out   # a seed of one's own: no note


def test_an_interrupted_profile_resumes_from_the_tasks_it_observed(tmp_path, monkeypatch, capsys):
    """Each task's half is kept as it finishes; the resumed profile equals an uninterrupted one,
    and a partial profile of other inputs is not reused."""
    from moeguard.monitor import fit as P

    args = ["monitor", "profile", "--tasks", "arith-compare,docstring-topic,stdlib-docs", "--limit", "8", "--window", "2"]
    assert main([*args, "--out", str(tmp_path / "whole.json")]) == 0
    calls, real, stop_at = [], P.observe, [3]

    def interrupted(*a, **k):
        calls.append(len(a[2]))
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(P, "observe", interrupted)
    capsys.readouterr()
    code = main([*args, "--out", str(tmp_path / "cut.json")])
    err = capsys.readouterr().err
    assert code == 130 and f"the tasks profiled so far are kept in {tmp_path / '.cut.json.partial'}: run the same command again to resume" in err, err
    kept = tmp_path / ".cut.json.partial"
    assert not (tmp_path / "cut.json").exists() and sorted(f.name for f in kept.glob(".*.npz")) == [".fit-0.npz", ".fit-1.npz"]
    calls.clear()
    stop_at[0] = 0                                    # no interruption now
    assert main([*args, "--out", str(tmp_path / "cut.json")]) == 0
    assert calls == [4, 4, 4, 4]                      # the third task's fit half, then the calibration halves
    whole, cut = (json.loads((tmp_path / f).read_text()) for f in ("whole.json", "cut.json"))
    assert whole.pop("run")["settings"] == cut.pop("run")["settings"] and whole == cut
    assert not kept.exists()
    # another seed draws other halves: its partial is not reused
    stop_at[0] = 2
    calls.clear()
    capsys.readouterr()
    code = main([*args, "--out", str(tmp_path / "other.json"), "--seed", "1"])
    assert code == 130 and "run the same command again to resume" in capsys.readouterr().err
    assert sorted(f.name for f in (tmp_path / ".other.json.partial").glob(".*.npz")) == [".fit-0.npz"]
    stop_at[0] = 0
    calls.clear()
    assert main([*args, "--out", str(tmp_path / "other.json"), "--seed", "2"]) == 0
    assert len(calls) == 6, calls


def _log(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_monitor_profiles_benign_traffic_and_alerts_on_probing_with_reasons(tmp_path, capsys, monkeypatch):
    import random

    from moeguard.tasks.loaders import load_records

    prof = tmp_path / "profile.json"
    assert main(["monitor", "profile", "--out", str(prof), "--tasks", "arith-compare,docstring-topic", "--limit", "100",
                 "--window", "8", "--early", "none"]) == 0   # full windows only (early looks: test_ladder.py)
    assert "windows of 8" in capsys.readouterr().out
    doc = json.loads(prof.read_text())
    assert doc["schema"] == "moeguard.routing-profile/2" and doc["requests"] == {"fit": 100, "calibration": 100}
    assert doc["run"]["settings"] == {"model": "embedded", "tasks": ["arith-compare", "docstring-topic"], "limit": 100,
                                      "window": 8, "seed": 0, "reply_tokens": 0} and doc["run"]["versions"]["torch"]
    # benign: later eval records of the profiled tasks, two single-topic clients; probing: random tokens
    rows, rng = [], random.Random(0)
    for c, t in (("alice", "arith-compare"), ("bob", "docstring-topic")):
        for i, r in enumerate(load_records(get_task(t), "eval", limit=116)[100:116]):
            rows.append({"id": f"{c}-{i}", "client": c, "time": i, "prompt": r["input"]})
    for i in range(16):
        junk = " ".join(rng.choice(["zq", "xv", "##", "}{", "0x9f", "@@", "~~", "%%", "qqq", "lorem"]) for _ in range(40))
        rows.append({"id": f"eve-{i}", "client": "eve", "time": f"2026-12-01T00:00:{i:02d}Z", "prompt": junk})
    log = _log(tmp_path / "log.jsonl", rows)
    out = tmp_path / "scored"
    assert main(["monitor", "score", "--profile", str(prof), "--log", str(log), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "48 requests from 3 clients, 6 windows" in text
    scores = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
    alerts = [json.loads(l) for l in (out / "alerts.jsonl").read_text().splitlines()]
    # the summary table: per level what was tested, how many alerted, and the smallest p-value it gives
    table = {r[0]: r[1:] for r in ([c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines()
                                   if line.startswith("│"))}
    n_req = sum(a["kind"] == "request" for a in alerts)
    assert table["request"] == ["48", str(n_req), f"{4 / 101:.2g}"]
    assert table["client window (8)"][:2] == ["6 looks, 6 windows", str(sum(a["kind"] == "window" for a in alerts))]
    benign = [s["p"] for s in scores if s["client"] != "eve"]
    probing = [s["p"] for s in scores if s["client"] == "eve"]
    summary = json.loads((out / "summary.json").read_text())
    floor = summary["p_floor"]["request"]
    assert summary["run"]["settings"] == {"profile": str(prof), "log": str(log), "model": "embedded", "window": 8,
                                          "alpha": 0.01, "log_prompts": False} and "git_commit" in summary["run"]
    assert floor == 4 / 101 and all(p == floor for p in probing) and sorted(benign)[16] > 0.1, (probing, benign)
    windows = [json.loads(l) for l in (out / "windows.jsonl").read_text().splitlines()]
    assert len(windows) == 6 and all((w["p"] <= 0.01) == (w["client"] == "eve") for w in windows), windows
    eve = [a for a in alerts if a["kind"] == "window" and a["client"] == "eve"]
    assert len(eve) == 2 and all(a["p"] <= 0.01 and a["layer"] in (0, 1, 2, 3) and a["experts"] for a in eve), eve
    assert not [a for a in alerts if a["kind"] == "window" and a["client"] != "eve"]   # single-topic users pass
    assert "prompt" not in (out / "scores.jsonl").read_text() and "lorem" not in (out / "alerts.jsonl").read_text()
    # interrupted while writing its outputs; what that attempt (or one with other flags: --period's files)
    # left is not carried into the resumed run's folder, only the replay's kept steps are
    from moeguard.monitor import score as scoring

    def cut(cache):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(scoring, "drop_replay", cut)
        assert main(["monitor", "score", "--profile", str(prof), "--log", str(log), "--out", str(tmp_path / "cut")]) == 130
    partial = tmp_path / ".cut.partial"
    assert (partial / "scores.jsonl").exists() and list(partial.glob(".replay-*.npz"))
    (partial / "periods.jsonl").write_text("stale\n")
    (partial / "period_requests").mkdir()
    (partial / "period_requests" / "3.npz").write_bytes(b"half a file")
    capsys.readouterr()
    assert main(["monitor", "score", "--profile", str(prof), "--log", str(log), "--out", str(tmp_path / "cut")]) == 0
    assert sorted(f.name for f in (tmp_path / "cut").iterdir()) == sorted(f.name for f in out.iterdir())
    assert (tmp_path / "cut" / "scores.jsonl").read_text() == (out / "scores.jsonl").read_text()
    # prompts only on request; a broken line is one error naming it
    assert summary["unwindowed"] == {"requests": 0, "clients": 0}
    # a client short of a window (and alice's 3 more) is counted as unseen by the windows
    more = [{"id": f"carol-{i}", "client": "carol", "time": i, "prompt": rows[i]["prompt"]} for i in range(5)]
    more += [{"id": f"alice-x{i}", "client": "alice", "time": 100 + i, "prompt": rows[i]["prompt"]} for i in range(3)]
    log2 = _log(tmp_path / "log2.jsonl", rows + more)
    capsys.readouterr()
    assert main(["monitor", "score", "--profile", str(prof), "--log", str(log2), "--out", str(tmp_path / "p"),
                 "--log-prompts"]) == 0
    assert "8 requests are in no window (each client's requests after its last full window; 1 client sent fewer than 8)" \
        in capsys.readouterr().out
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["unwindowed"] == {"requests": 8, "clients": 1}
    assert "lorem" in (tmp_path / "p" / "scores.jsonl").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    capsys.readouterr()
    assert main(["monitor", "score", "--profile", str(prof), "--log", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{bad}:2 is not valid JSON" in err and not (tmp_path / "b").exists()
    assert main(["monitor", "score", "--profile", str(prof), "--log", str(log), "--out", str(tmp_path / "w"),
                 "--window", "16"]) == 2
    assert "calibrated at 8 requests, not 16" in capsys.readouterr().err


def test_a_payload_after_the_model_positions_is_still_routed_and_counted(embedded):
    import numpy as np

    from moeguard.monitor.fit import histograms

    m, tok, adapter = embedded
    benign = " ".join(["Is 41 greater than 17?"] * 60)            # well over 256 tokens
    payload = " ".join(["zq ~~ %%"] * 40)
    ids = tok(benign + " " + payload, add_special_tokens=False)["input_ids"]
    assert len(ids) > 300
    h_long = histograms(m, tok, [benign + " " + payload])[0]
    head = tok.decode(ids[:200])
    h_head = histograms(m, tok, [head])[0]
    assert h_long.shape == (4, 8) and np.allclose(h_long.sum(-1), 1.0)
    # cut at 256 tokens this would be 0.09 from the head alone; the payload beyond moves it by ~1.4
    assert np.abs(h_long - h_head).sum() > 0.5


def test_drift_stays_near_zero_for_benign_topic_mixes_and_rises_for_a_selected_stream():
    import numpy as np

    from moeguard.monitor.embed import KernelReference

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2, 8))

    def draw(c, n, spread=0.6):
        x = c + spread * rng.standard_normal((n, 8))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    ref = KernelReference.fit({"a": draw(centres[0], 300), "b": draw(centres[1], 300)})
    single = [ref.drift(draw(centres[0], 16)) for _ in range(200)]
    mixed = [ref.drift(np.concatenate([draw(centres[0], 8), draw(centres[1], 8)])) for _ in range(200)]
    # a stream from one corner of topic a (selected, not sampled): the same topic, another distribution
    corner = centres[0] + 0.8 * rng.standard_normal(8)
    selected = [ref.drift(draw(corner, 16, spread=0.3)) for _ in range(50)]
    null = np.quantile(single + mixed, 0.99)
    assert abs(np.mean(single)) < 0.02 and abs(np.mean(mixed)) < 0.02, (np.mean(single), np.mean(mixed))
    assert np.mean(np.asarray(selected) > null) > 0.9, (null, selected[:5])


def test_a_prompt_embeds_the_same_alone_or_padded_in_a_batch(embedded):
    import numpy as np

    from moeguard.monitor.fit import observe

    m, tok, adapter = embedded
    prompts = ["Is 41 greater than 17?", "def add(a, b):\n    return a + b  # a longer prompt, so the first is padded"]
    h1, s1, n1, _ = observe(m, tok, prompts[:1], adapter=adapter)
    h2, s2, n2, _ = observe(m, tok, prompts, batch_size=2, adapter=adapter)
    assert n1[0] == n2[0] < n2[1]
    assert np.allclose(s1[0], s2[0], atol=1e-3) and np.allclose(h1[0], h2[0])


def test_a_profile_of_the_earlier_schema_is_refused_with_the_fix(tmp_path):
    from moeguard.monitor.profile import Profile

    with pytest.raises(MoeguardError, match=r"not a routing profile of this version \(schema 'moeguard.routing-profile/1'"):
        Profile.from_dict({"schema": "moeguard.routing-profile/1"}, where="old.json")


def test_token_surprise_sees_tokens_routed_where_benign_traffic_never_sends_them(monkeypatch):
    import numpy as np

    from moeguard.monitor import tokens as T

    rng = np.random.default_rng(0)
    L, E, k, V = 2, 8, 2, 50
    home = rng.integers(0, E - 2, size=(V, L))            # benign: token t at layer l goes to home, home + 1
    counts = T.TokenRoutingCounts(vocab=V, layers=L, experts=E)

    def route(ids, hijack=None):
        r = np.stack([np.stack([home[ids, l], home[ids, l] + 1], 1) for l in range(L)])   # [L, T, k]
        if hijack is not None:
            r[0, hijack, 0] = E - 1                         # the hijacked stretch: expert 7 at layer 0
        return r

    for _ in range(200):
        ids = rng.integers(0, V, size=40)
        counts.add(ids, route(ids))
    table = counts.table(k, bos=None)
    ids = rng.integers(0, V, size=60)
    benign = table.surprise(ids, route(ids))
    hijacked = table.surprise(ids, route(ids, hijack=slice(20, 40)))
    assert hijacked > benign + 3, (benign, hijacked)
    again = T.TokenRouting.from_dict(table.to_dict())   # stored and read back: the same scores
    assert again.surprise(ids, route(ids, hijack=slice(20, 40))) == pytest.approx(hijacked)
    # the table is bounded: with room for 10 tokens it keeps the 10 most frequent; the rest fall back
    monkeypatch.setattr(T, "MAX_CELLS", 10 * L * E)
    small = counts.table(k, bos=None)
    freq = counts.counts[:len(counts.rows)].sum((1, 2))
    top = sorted(np.array(list(counts.rows))[np.argsort(-freq, kind="stable")[:10]].tolist())
    assert small.tokens.tolist() == top


def test_one_request_p_values_and_token_scores_equal_the_batch_formulas():
    """The online hook's per-request shortcuts (bisect over the null, one flat take for token
    scores) give exactly what the batch path and the docstring's formula give."""
    import numpy as np

    from moeguard.monitor import tokens as T
    from moeguard.monitor.profile import STATISTICS, Profile

    rng = np.random.default_rng(1)
    null = {f"request.{s}": np.sort(rng.standard_normal(50).round(1)) for s in STATISTICS}
    prof = Profile(meta={}, mean=None, sd=None, topics={}, null=null, space=None, kernel=None, tokens=None)
    rows = {s: np.concatenate([rng.standard_normal(6), null[f"request.{s}"][[0, 7, -1]], [9.0, -9.0]]) for s in STATISTICS}
    batch = prof.p_values(rows, "request")
    for i in range(len(rows["load"])):             # ties with null values, beyond both ends
        one = prof.p_values({s: v[i:i + 1] for s, v in rows.items()}, "request")
        assert {k: float(v[0]) for k, v in one.items()} == {k: float(v[i]) for k, v in batch.items()}
    nan = prof.p_values({s: np.array([np.nan]) for s in STATISTICS}, "request")   # NaN: the batch path's answer
    assert float(nan["combined"][0]) == float(prof.p_values({s: np.array([np.nan, 0.0]) for s in STATISTICS},
                                                            "request")["combined"][0])

    L, E, k, V = 3, 8, 2, 40
    counts = T.TokenRoutingCounts(vocab=V, layers=L, experts=E)
    ids = rng.integers(0, V - 5, size=200)                 # tokens V-5.. never seen: the fallback row
    counts.add(ids, rng.integers(0, E, size=(L, 200, k)))
    table = counts.table(k, bos=None)
    q = np.concatenate([rng.integers(0, V, size=30), [V + 7]])          # one id past the vocabulary
    routed = rng.integers(0, E, size=(L, len(q), k))
    kept = {int(t): i for i, t in enumerate(table.tokens)}
    prior = (table.marginal + 1e-3 / E) / (1 + 1e-3)
    expect = []
    for j, t in enumerate(q.tolist()):
        c = table.counts[kept[t]] if t in kept else np.zeros((L, E))
        nll = -np.log((c + k * prior) / (c.sum(-1, keepdims=True) + k))
        expect.append(sum(nll[l, routed[l, j, i]] for l in range(L) for i in range(k)))
    assert np.allclose(table.token_scores(q, routed), expect, rtol=1e-12)


@pytest.mark.parametrize("line,needle", [
    (b'{"id": 1, "client": "a", "time": 1' + b"0" * 400 + b', "prompt": "x"}', "time 10000000000000000000 is not a finite number"),
    (b'{"id": 1, "client": "a", "time": NaN, "prompt": "x"}', "time nan is not a finite number"),
    (b'{"id": 1, "client": "a", "time": -Infinity, "prompt": "x"}', "time -inf is not a finite number"),
    (b'{"id": 1' + b"0" * 5000 + b', "client": "a", "time": 1, "prompt": "x"}', "is not usable JSON"),
    (b"[" * 100_000, "is not usable JSON (nested too deeply to read)"),   # RecursionError, a traceback before
    (b'{"id": 1, "client": "a", "time": 1, "prompt": "caf\xe9"}', "is not UTF-8 (byte"),
    # valid JSON no tokenizer takes: it failed in the replay, after the model loaded
    (b'{"id": 1, "client": "a", "time": 1, "prompt": "hi \\ud800"}', "prompt is not valid Unicode (a lone surrogate)"),
    # a client name the period tests hash: a traceback after the whole replay
    (b'{"id": 1, "client": "\\ud800", "time": 1, "prompt": "hi"}', "client is not valid Unicode (a lone surrogate)"),
    (b'{"id": "\\udfff", "client": "a", "time": 1, "prompt": "hi"}', "id is not valid Unicode (a lone surrogate)"),
])
def test_a_log_line_python_cannot_take_as_it_is_is_one_error_naming_it(tmp_path, line, needle):
    from moeguard.monitor.score import read_log

    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"id": 0, "client": "a", "time": 0, "prompt": "fine"}\n' + line + b"\n")
    with pytest.raises(MoeguardError, match=re.escape(f"{log}:2") + ".*" + re.escape(needle)):
        read_log(log)


def test_a_log_that_repeats_ids_is_read_whole_and_says_which(tmp_path):
    from moeguard.monitor.score import read_log

    log = tmp_path / "log.jsonl"
    rows = [{"id": i, "client": "a", "time": i, "prompt": "fine"} for i in (0, 1, 2)] + \
        [{"id": "1", "client": "b", "time": 5, "prompt": "again"}, {"id": 2, "client": "a", "time": 6, "prompt": "retry"}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning) as said:
        got = read_log(log)
    assert len(got) == 5 and [r["prompt"] for r in got] == [r["prompt"] for r in rows]
    (w,) = [str(x.message) for x in said]
    assert w.startswith(f"2 records of {log} repeat the id of an earlier one (the first: id '1' at lines 2 and 4)"), w
    log.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # unique ids: no warning
        read_log(log)


def test_route_attack_json_is_the_document_alone_on_stdout(tmp_path, capsys):
    capsys.readouterr()
    assert main(["route-attack", "--out", str(tmp_path / "ra"), "--layer", "0", "--expert", "0", "--steps", "0",
                 "--prefix-tokens", "2", "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)                       # the progress bars went to stderr
    assert doc["targets"][0]["layer"] == 0 and "route-attack" in captured.err


def test_a_suffix_run_says_so_in_its_document_table_and_heat_map(tmp_path, capsys, monkeypatch):
    import moeguard.report.routing as routing

    titles = []
    real = routing.hijack_heatmap

    def heatmap(doc, out):
        titles.append(doc["config"]["position"])
        return real(doc, out)

    monkeypatch.setattr(routing, "hijack_heatmap", heatmap)
    capsys.readouterr()
    out = tmp_path / "ra"
    assert main(["route-attack", "--out", str(out), "--layer", "0", "--expert", "1", "--position", "suffix",
                 "--steps", "0", "--prefix-tokens", "2", "--follow-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "suffix 2 tokens, replies of 4 tokens" in text and "without suffix" in text
    doc = json.loads((out / "route_attack.json").read_text())
    assert doc["config"]["position"] == "suffix" and doc["config"]["follow_tokens"] == 4
    assert doc["summary"]["position"] == "suffix" and doc["summary"]["goal"]["met"] is None
    m = doc["targets"][0]["measured"]
    assert 0 <= m["reply_tokens_mean"] <= 4 and 0 <= m["reply_tokens_mean_without"] <= 4
    assert titles == []                                   # one target: no heat map
    assert main(["route-attack", "--out", str(tmp_path / "rb"), "--layer", "0", "--all", "--position", "suffix",
                 "--steps", "0", "--prefix-tokens", "2", "--follow-tokens", "2"]) == 0
    assert titles == ["suffix"] and (tmp_path / "rb" / "route_attack_heatmap.png").stat().st_size > 5000


def test_the_monitor_refuses_a_model_with_different_expert_counts_per_layer(embedded):
    """A budget-pruned checkpoint: a request's histogram is one [layers, experts] array."""
    from moeguard.models.prune import prune_model
    from moeguard.monitor.fit import build

    m, tok, adapter = embedded
    small, _ = prune_model(m, {adapter.layers[0].index: [0, 1, 2, 3]})
    with pytest.raises(MoeguardError, match=r"same number of experts in every MoE layer; this model has \{0: 4, 1: 8"):
        build(small, tok, {"a": ["x y", "y z", "z w", "w x"]}, window=2)


def _cmp_task(folder, name: str, n: int):
    """A local arith task of ``n`` records per split, its YAML in ``folder``."""
    data = folder / f"{name}-data"
    data.mkdir()
    for split in ("train", "eval"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"input": f"Is {i} greater than {i % 7}?", "label": int(i > i % 7)}) + "\n"
                                                     for i in range(n)))
    f = folder / f"{name}.yaml"
    f.write_text(f"name: {name}\nkind: classification\nsource: {{type: local, path: {name}-data, format: jsonl}}\n"
                 "fields: {input: input, label: label}\nsplits: {train: train, eval: eval}\n"
                 "labels: {0: ' no', 1: ' yes'}\nprompt: '{input} Answer:'\n")
    return f, data


def test_a_window_larger_than_the_calibration_requests_there_are_is_refused_before_the_load(tmp_path, capsys, monkeypatch):
    """The check counted --limit's half, not the inputs the task has: a 10-record task passed with
    --window 16, and every benign window repeated its 5 calibration requests."""
    import moeguard.models.handle as handle

    f, _ = _cmp_task(tmp_path, "ten-cmp", 10)
    monkeypatch.setattr(handle.ModelHandle, "load", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["monitor", "profile", "--tasks", str(f), "--window", "16", "--out", str(tmp_path / "P.json")]) == 2
    err = capsys.readouterr().err
    assert "--window is 16; benign windows are drawn from at most 5 calibration requests" in err and len(err.splitlines()) == 1


def test_a_profile_matches_the_same_weights_however_named_and_refuses_other_routing(embedded, tmp_path, monkeypatch):
    from moeguard.models.identity import weights_digest
    from moeguard.monitor.fit import build

    m, tok, adapter = embedded
    ckpt = tmp_path / "ckpt"
    m.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    prompts = {"a": [f"Is {i} greater than 3?" for i in range(8)], "b": [f"def f{i}(x): return x" for i in range(8)]}
    prof = build(m, tok, prompts, window=2, windows=20, seed=0, name="./ckpt")
    prof.meta["weights"] = weights_digest(str(ckpt))
    monkeypatch.chdir(tmp_path)
    prof.check_model("ckpt/", weights_digest("ckpt/"))          # the name typed differs: the same weights
    import shutil

    shutil.copytree(ckpt, tmp_path / "copy")
    prof.check_model("copy", weights_digest("copy"))           # a copy (other times) is the same weights
    with torch.no_grad():
        m.get_input_embeddings().weight[0, 0] += 1.0
    try:
        m.save_pretrained(ckpt)                                # re-saved at the same path: other weights
        with pytest.raises(MoeguardError, match=r"the profile was made for other weights \(\./ckpt\) than \./ckpt's"):
            prof.check_model("./ckpt", weights_digest("./ckpt"))
    finally:
        with torch.no_grad():
            m.get_input_embeddings().weight[0, 0] -= 1.0
    old = type(prof)(**{**prof.__dict__, "meta": {k: v for k, v in prof.meta.items() if k != "weights"}})
    with pytest.raises(MoeguardError, match=r"the profile was made for \./ckpt, not ckpt"):   # no digest: the name
        old.check_model("ckpt", weights_digest("ckpt"))
    prof.meta["top_k"] = 3
    with pytest.raises(MoeguardError, match="the profile was made with top-3 routing, the model routes top-2"):
        prof.check_routing(adapter)


def test_a_route_attack_resumed_after_its_task_file_changed_starts_over(tmp_path, monkeypatch):
    import moeguard.monitor.routeattack as ra

    f, data = _cmp_task(tmp_path, "ra-cmp", 40)
    out = tmp_path / "ra"
    args = ["route-attack", "--out", str(out), "--task", str(f), "--layer", "0", "--all", "--prefix-tokens", "2",
            "--steps", "0", "--candidates", "2"]
    calls = []
    monkeypatch.setattr(ra, "measure", _measured(calls, ra.measure, interrupt_at=2))
    assert main(args) == 130 and len(list((tmp_path / ".ra.partial").glob("target-*.json"))) == 1
    rows = (data / "eval.jsonl").read_text().splitlines()
    (data / "eval.jsonl").write_text("\n".join(rows[1:]) + "\n")   # another held-out set: other measurements
    monkeypatch.setattr(ra, "measure", _measured(calls, ra.measure.__wrapped__))
    assert main(args) == 0
    assert calls[2:] == list(range(8))     # expert 0's target, measured on the old inputs, was not kept


def test_a_profile_of_a_task_without_a_train_file_is_made(tmp_path, capsys):
    """The edge read one train record of every local task; benign traffic is eval records only, so a
    task with no train file is fine here (it was refused)."""
    f, data = _cmp_task(tmp_path, "evalonly-cmp", 40)
    (data / "train.jsonl").unlink()
    out = tmp_path / "P.json"
    assert main(["monitor", "profile", "--tasks", str(f), "--limit", "40", "--window", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"] == ["evalonly-cmp"]


def test_a_route_attack_kept_to_a_vocabulary_crafts_from_it_alone(tmp_path):
    from moeguard.edge import resolve_model, resolve_tasks
    from moeguard.monitor.routeattack import run

    handle, task = resolve_model(None), resolve_tasks(["arith-compare"])[0]
    vocab = list(range(200, 260))
    cfg = HijackConfig(layer=1, expert=2, **{**FAST, "steps": 3, "candidates": 8})
    doc = run(handle, task, [(1, 2)], cfg, out=tmp_path / "ra", vocabulary=vocab)
    (target,) = doc["targets"]
    assert target["prefix_ids"] and set(target["prefix_ids"]) <= set(vocab), target["prefix_ids"]
    with pytest.raises(MoeguardError, match="the vocabulary leaves 0 usable tokens"):
        run(handle, task, [(1, 2)], cfg, out=tmp_path / "rb", vocabulary=[10**9])


def test_a_route_attack_task_without_train_inputs_is_refused_before_the_load(tmp_path, capsys, monkeypatch):
    """It failed after the weights loaded and the vocabulary was scanned, leaving a partial folder."""
    from moeguard.models.handle import ModelHandle

    f, data = _cmp_task(tmp_path, "notrain-cmp", 20)
    f.write_text(f.read_text().replace("splits: {train: train, eval: eval}", "splits: {eval: eval}"))
    monkeypatch.setattr(ModelHandle, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    capsys.readouterr()
    assert main(["route-attack", "--out", str(tmp_path / "ra"), "--task", str(f), "--layer", "0", "--expert", "0",
                 "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "train" in err and "notrain-cmp" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / ".ra.partial").exists() and not (tmp_path / "ra").exists()


def test_a_route_attack_target_file_cut_short_is_searched_again_and_temporaries_do_not_reach_the_output(tmp_path, monkeypatch):
    import moeguard.monitor.routeattack as ra

    out, partial = tmp_path / "ra", tmp_path / ".ra.partial"
    args = ["route-attack", "--out", str(out), "--layer", "0", "--all", "--prefix-tokens", "2", "--steps", "0",
            "--candidates", "2"]
    calls = []
    monkeypatch.setattr(ra, "measure", _measured(calls, ra.measure, interrupt_at=2))
    assert main(args) == 130
    (kept,) = partial.glob("target-*.json")
    kept.write_text(kept.read_text()[:40])                      # a power loss cut it short
    (partial / ".target-0-5.json.tmp1234").write_text("{")     # a kill inside a write left its temporary
    monkeypatch.setattr(ra, "measure", _measured(calls, ra.measure.__wrapped__))
    assert main(args) == 0                                      # before: a JSONDecodeError traceback, every rerun
    assert calls[2:] == list(range(8))                          # expert 0 was searched and measured again
    assert sorted(p.name for p in out.iterdir()) == ["route_attack.json", "route_attack_heatmap.png"]


class _KilledProgress:
    """A progress display whose ``at``-th step advance is a kill (``at`` 0: never); it records the step
    a search's bar started at."""

    def __init__(self, at: int = 0):
        self.at, self.advanced, self.started = at, 0, None

    def add_task(self, *a, completed: int = 0, **k):
        self.started = completed
        return 0

    def advance(self, *a, **k):
        self.advanced += 1
        if self.advanced == self.at:
            raise KeyboardInterrupt

    def update(self, *a, **k):
        pass


@pytest.mark.parametrize("position, layer, expert", [("prefix", 1, 3), ("suffix", 2, 0)])   # no 100% success within 5 steps
def test_a_search_killed_after_a_step_resumes_from_it_to_the_uninterrupted_result(embedded, tmp_path, position, layer,
                                                                                  expert):
    """A target's search keeps its state as each step ends (the text, the best so far, the curve and the
    candidates' generator): a kill loses at most a step, not the target's whole search (minutes on a
    real checkpoint, and `--all` searches every expert of every layer)."""
    from moeguard.kept import KeptJSON

    m, tok, adapter = embedded
    task = get_task("arith-compare")
    allowed = allowed_tokens(tok, m.get_input_embeddings().weight.shape[0])
    cfg = HijackConfig(layer=layer, expert=expert, seed=1, position=position,
                       **{**FAST, "steps": 5, "candidates": 12, "train_inputs": 2, "follow_tokens": 4})
    whole = search(m, tok, adapter, task, cfg, allowed=allowed)
    assert whole["steps_run"] == 5 and whole["steps_moved"] == 5
    keep = KeptJSON(tmp_path / ".search.json", cfg.to_dict())
    with pytest.raises(KeyboardInterrupt):
        search(m, tok, adapter, task, cfg, allowed=allowed, keep=keep, progress=_KilledProgress(3))
    assert keep.read()["next"] == 3
    resumed = _KilledProgress()
    assert search(m, tok, adapter, task, cfg, allowed=allowed, keep=keep, progress=resumed) == whole
    assert resumed.started == 3 and resumed.advanced == 2            # steps 3 and 4 only (step 5 ends it)
    # a state of other settings is not read: searched from the start
    other = KeptJSON(tmp_path / ".search.json", {**cfg.to_dict(), "candidates": 11})
    fresh = _KilledProgress()
    search(m, tok, adapter, task, replace(cfg, candidates=11), allowed=allowed, keep=other, progress=fresh)
    assert fresh.started == 0


def test_route_attack_killed_inside_a_target_s_search_resumes_it_to_the_uninterrupted_targets(tmp_path, monkeypatch):
    from moeguard.kept import KeptJSON

    args = ["route-attack", "--layer", "0", "--expert", "1", "--prefix-tokens", "4", "--steps", "4", "--candidates", "8"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    real, kept, armed = KeptJSON.write, [], [True]

    def killed_after_the_second_step(self, value, **kw):
        done = real(self, value, **kw)
        if self.path.name.startswith(".search-"):
            kept.append(value["next"])
            if armed[0] and len(kept) == 2:
                raise KeyboardInterrupt
        return done

    monkeypatch.setattr(KeptJSON, "write", killed_after_the_second_step)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    state = tmp_path / ".cut.partial" / ".search-0-1.json"
    assert json.loads(state.read_text())["value"]["next"] == 2
    kept.clear()
    armed[0] = False
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    assert kept == [3, 4]                                           # steps 2 and 3 only (step 4 ends the search)
    a, b = (json.loads((tmp_path / f / "route_attack.json").read_text()) for f in ("straight", "cut"))
    assert a["targets"] == b["targets"] and not list((tmp_path / "cut").glob(".*"))


def test_a_search_state_with_a_loss_that_is_no_finite_number_is_kept_and_read_back(tmp_path):
    """A suffix whose replies all end at once scores an infinite loss; the state of every later step
    held it in its curve, JSON could not hold it exactly, and no later step was kept."""
    import math

    from moeguard.kept import KeptJSON
    from moeguard.monitor.hijack import _decoded, _encoded

    state = {"next": 3, "curve": [{"step": 0, "loss": math.inf}, {"step": 1, "loss": 1.25}],
             "best": {"loss": -math.inf, "evasion": [1.0, 1.0]}, "prefix": [5, 6]}
    keep = KeptJSON(tmp_path / ".search.json", "k")
    assert keep.write(_encoded(state), exact=True)
    assert _decoded(keep.read()) == state
    assert math.isnan(_decoded(_encoded({"x": [math.nan]}))["x"][0])
