"""Monitoring replies: a profile built with reply_tokens scores the routing of the model's reply,
offline (`monitor score`), in the online hook and behind `serve`, alike; a reply forced onto one
expert is flagged with that layer and expert; a request without a reply gives no evidence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.loading import load_model
from moeguard.monitor import replies
from moeguard.monitor.online import RoutingMonitor
from moeguard.monitor.fit import build
from moeguard.monitor.profile import Profile
from moeguard.monitor.score import score
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task
from moeguard.tasks.tokens import bos_ids, encode

N = 4   # reply tokens profiled


@pytest.fixture(scope="module")
def profiled():
    m, tok, _ = load_model(None)
    prompts = {t: [r["input"] for r in load_records(get_task(t), "eval", limit=48)] for t in ("arith-compare", "docstring-topic")}
    return m, tok, build(m, tok, prompts, window=2, windows=100, seed=0, name="embedded", reply_tokens=N)


def _held_out(n: int = 3) -> list[str]:
    return [r["input"] for r in load_records(get_task("docstring-topic"), "eval", limit=160)[150:150 + n]]


def test_the_profile_holds_benign_replies_and_a_calibrated_null_for_them(profiled):
    m, tok, prof = profiled
    assert prof.request_statistics == ("load", "atypical", "unfamiliar", "surprise", "reply_load", "reply_atypical",
                                       "reply_surprise")
    assert prof.replies.max_tokens == N and prof.meta["reply_tokens"] == N
    assert set(prof.replies.topics) == {"arith-compare", "docstring-topic"}
    assert all(np.allclose(v.sum(1), 1.0) for v in prof.replies.topics.values())   # per layer, a histogram
    assert len(prof.null["request.reply_load"]) == 48            # the calibration half's replies
    assert prof.p_floor("request") == pytest.approx(7 / 49)      # Bonferroni over seven statistics now
    again = Profile.from_dict(json.loads(json.dumps(prof.to_dict())), where="p.json")
    assert all(np.array_equal(again.replies.spread[t], prof.replies.spread[t]) for t in prof.topics)
    assert again.request_statistics == prof.request_statistics
    with pytest.raises(MoeguardError, match="no reply histograms were given"):
        prof.statistics(np.tile(prof.mean, (1, 1, 1)), np.zeros((1, prof.space.dim)), np.zeros(1))


def test_a_reply_histogram_counts_the_positions_that_make_the_reply(profiled):
    m, tok, prof = profiled
    from moeguard.models.adapter import MoEAdapter
    from moeguard.monitor.tokens import RoutedIds

    a = MoEAdapter(m)
    prompt, reply = _held_out(1)[0], encode(tok, " the cat sat")[:N]
    ids = bos_ids(tok) + encode(tok, prompt)
    with torch.no_grad(), RoutedIds(a) as routed:
        m(input_ids=torch.tensor([ids + reply]))
    cells = routed.rows(1)[:, 0]                                     # [L, T, k]
    # the prompt's last position makes the reply's first token; the reply's last token makes nothing
    want = np.stack([np.bincount(cells[l, len(ids) - 1:len(ids) - 1 + len(reply)].ravel(), minlength=8)
                     for l in range(len(a.layers))]).astype(float)
    got, surprise = replies.observe(m, tok, [prompt, prompt], [reply, []], adapter=a, table=prof.tokens, max_tokens=N)
    assert np.allclose(got[0], want / want.sum(1, keepdims=True)) and not got[1].any()   # an empty reply: zeros
    # each position scored for the token fed there: the prompt's last, then the reply's but its last
    fed = np.array(ids[-1:] + reply[:-1])
    assert surprise[0] == pytest.approx(prof.tokens.surprise(fed, cells[:, len(ids) - 1:len(ids) - 1 + len(reply)]))
    # a prompt longer than the model's positions keeps its end, so the prompt and reply fit them
    long = "one two three four five six seven " * 80
    cut = replies.context(m, tok, long, N)
    assert len(cut) == m.config.max_position_embeddings - N + 1 and cut == (bos_ids(tok) + encode(tok, long))[-len(cut):]
    (made,) = replies.generate(m, tok, [long], N)
    assert 0 < len(made) <= N and len(cut) + len(made) - 1 <= m.config.max_position_embeddings


def _greedy(m, tok, prompt: str, n: int, ends) -> tuple[list[int], int]:
    """The model's greedy reply of at most ``n`` tokens, and its length up to its end of text."""
    ids = bos_ids(tok) + tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        new = m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    return new, next((i for i, t in enumerate(new) if t in ends), len(new))


def test_offline_score_the_online_hook_and_serve_score_a_reply_alike(profiled, tmp_path):
    m, tok, prof = profiled
    prompts = _held_out(3)
    recs = [{"id": i, "client": "a", "time": i, "prompt": p, "_t": float(i)} for i, p in enumerate(prompts)]
    offline, _, _, _ = score(m, tok, prof, recs)                     # each reply generated greedily
    # every reply here is there to compare (an empty one would compare -inf with -inf)
    assert all(np.isfinite(o[k]) for o in offline for k in ("reply_load", "reply_atypical", "reply_surprise")), offline
    got = []
    mon = RoutingMonitor(m, prof, flush_every=1, on_result=lambda c, r: got.append(r))
    from moeguard.tasks.tokens import eos_ids

    ends = set(eos_ids(m, tok))
    with mon, torch.no_grad():
        for p in prompts:
            ids = bos_ids(tok) + tok(p, add_special_tokens=False)["input_ids"]
            with mon.request("a") as r:
                out = m.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, pad_token_id=tok.pad_token_id)
                new = out[0, len(ids):].tolist()
                r.reply_tokens = next((i for i, t in enumerate(new) if t in ends), len(new))
    assert all(not l.router._forward_hooks for l in mon.adapter.layers)   # the decode hooks go with the rest
    assert not m.get_input_embeddings()._forward_pre_hooks
    assert len(got) == len(offline) == len(prompts), (len(got), len(offline))   # the loop below checks each
    for o, g in zip(offline, got):
        for k in prof.request_statistics:
            assert g["statistics"][k] == pytest.approx(o[k], abs=1e-3), k
        assert g["p"] == pytest.approx(o["p"])
    # behind the endpoint: the same reply statistics for the same prompt (serve sets the reply's length)
    from test_serve import _call, _serving

    from moeguard.monitor.serve import create_app

    served = []
    mon2 = RoutingMonitor(m, prof, flush_every=1, on_result=lambda c, r: served.append(r))
    with mon2, _serving(create_app(m, tok, mon2)) as port:
        status, body = _call(port, "POST", "/v1/completions", {"prompt": prompts[0], "max_tokens": 12})
        assert status == 200, body
    for k in prof.request_statistics:
        assert served[0]["statistics"][k] == pytest.approx(offline[0][k], abs=1e-3), k
    assert served[0]["p"] == pytest.approx(offline[0]["p"])
    # a client asking for fewer tokens than the profile's replies: the reply scored is still the N-token one
    # (a 2-token reply was scored against a null of 4-token ones), and the client gets its 2. A prompt whose
    # greedy reply runs all N tokens (most end after one)
    long = next(r["input"] for r in load_records(get_task("code-naming"), "eval", limit=160)[150:]
                if _greedy(m, tok, r["input"], N, ends)[1] == N)
    alone, _, _, _ = score(m, tok, prof, [{"id": 0, "client": "a", "time": 0, "prompt": long, "_t": 0.0}])
    with mon2, _serving(create_app(m, tok, mon2)) as port:
        status, body = _call(port, "POST", "/v1/completions", {"prompt": long, "max_tokens": 2})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2, body
    assert json.loads(body)["choices"][0]["text"] == tok.decode(_greedy(m, tok, long, N, ends)[0][:2])
    for k in ("reply_load", "reply_atypical", "reply_surprise"):
        assert served[1]["statistics"][k] == pytest.approx(alone[0][k], abs=1e-3), k
    # a caller that does not say the reply's length: every decode step counts, with one warning; here
    # no reply ends early (each reply is N tokens), so that is the same reply
    texts = ["def main():\n    ", "import os\nimport ", "The history of the city", "class Parser:\n    def "]
    full = [p for p in texts if len(replies.generate(m, tok, [p], N)[0]) == N]
    assert full, "no prompt here gets a reply of N tokens"
    expect, _, _, _ = score(m, tok, prof, [{"id": i, "client": "b", "time": i, "prompt": p, "_t": float(i)}
                                            for i, p in enumerate(full)])
    unset = []
    mon3 = RoutingMonitor(m, prof, flush_every=1, on_result=lambda c, r: unset.append(r))
    with pytest.warns(UserWarning, match="without reply_tokens set") as seen, mon3, torch.no_grad():
        for p in full:
            ids = bos_ids(tok) + tok(p, add_special_tokens=False)["input_ids"]
            with mon3.request("a"):
                m.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, pad_token_id=tok.pad_token_id)
    assert sum("without reply_tokens" in str(w.message) for w in seen) == 1
    assert [u["statistics"]["reply_load"] for u in unset] == pytest.approx([e["reply_load"] for e in expect], abs=1e-3)
    assert [u["statistics"]["reply_surprise"] for u in unset] == pytest.approx([e["reply_surprise"] for e in expect],
                                                                               abs=1e-3)
    with pytest.raises(MoeguardError, match="reply_tokens is -1"), mon3, torch.no_grad():
        with mon3.request("a") as r:
            m(input_ids=torch.tensor([ids]))
            r.reply_tokens = -1


def test_a_logged_reply_is_scored_in_place_of_the_greedy_one_and_an_empty_one_gives_no_evidence(profiled):
    m, tok, prof = profiled
    p = _held_out(1)[0]
    greedy = replies.generate(m, tok, [p], N)[0]
    text = tok.decode(greedy)
    base = {"id": 0, "client": "a", "time": 0, "prompt": p, "_t": 0.0}
    (made,), _, _, _ = score(m, tok, prof, [base])
    assert encode(tok, text) == greedy and np.isfinite(made["reply_load"])   # the text is those tokens again
    (logged,), _, _, _ = score(m, tok, prof, [{**base, "reply": text}])
    assert all(logged[k] == made[k] for k in prof.request_statistics) and logged["p"] == made["p"]
    (other,), _, _, _ = score(m, tok, prof, [{**base, "reply": " zq zq zq zq"}])   # another reply: other scores
    assert other["reply_load"] != made["reply_load"]
    (empty,), _, _, _ = score(m, tok, prof, [{**base, "reply": ""}])
    assert empty["reply_load"] == empty["reply_atypical"] == empty["reply_surprise"] == -np.inf
    # no reply is p = 1 for every reply statistic, one row (the online hook's path) or several
    for n in (1, 2):
        reply = np.zeros((n, *prof.mean.shape))
        reply[1:] = prof.replies.topics["arith-compare"]
        s = prof.statistics(np.stack([prof.topics["arith-compare"]] * n), np.zeros((n, prof.space.dim)), np.zeros(n),
                            reply, np.zeros(n))
        ps = prof.p_values(s, "request")
        assert ps["reply_load"][0] == ps["reply_atypical"][0] == ps["reply_surprise"][0] == 1.0, n


def test_a_calibration_input_without_a_reply_keeps_the_profile_loadable(monkeypatch, tmp_path):
    from moeguard.io import dumps, strict_loads

    m, tok, _ = load_model(None)
    real = replies.generate

    def some_silent(model, tokenizer, prompts, n, **kw):   # every third benign input gets no reply
        return [[] if i % 3 == 0 else r for i, r in enumerate(real(model, tokenizer, prompts, n, **kw))]
    monkeypatch.setattr(replies, "generate", some_silent)
    prompts = {"arith-compare": [r["input"] for r in load_records(get_task("arith-compare"), "eval", limit=24)]}
    prof = build(m, tok, prompts, window=2, windows=20, seed=0, name="embedded", reply_tokens=N)
    null = prof.null["request.reply_load"]
    assert np.isfinite(null).all() and (null == -np.finfo(np.float64).max).sum() == 4   # 4 of 12 silent
    again = Profile.from_dict(strict_loads(dumps(prof.to_dict())), where="p.json")   # as written and read
    assert np.array_equal(again.null["request.reply_load"], null)


def test_a_reply_forced_onto_one_expert_is_flagged_with_its_layer_and_expert(profiled):
    m, tok, prof = profiled
    L, E = prof.mean.shape
    # a reply whose every position picks the expert benign replies use least (top-2: half of each
    # position's picks); benign replies can be concentrated too (a yes/no answer routes alike every time)
    # (against the replies to prompts of the request's own topic: an arith-compare prompt here)
    benign = prof.replies.topics["arith-compare"]
    l, e = divmod(int(benign.argmin()), E)
    forced = benign.copy()
    forced[l] = 0.5 / (E - 1)
    forced[l, e] = 0.5
    h = np.stack([prof.topics["arith-compare"]] * 2)
    r = np.stack([benign, forced])
    s = prof.statistics(h, prof.kernel.refs[0][:2], np.zeros(2), r, np.zeros(2))
    ps = prof.p_values(s, "request")
    # as far out as the most extreme benign reply (this small profile has one that used an expert its
    # fit half never did), and the benign mean reply is not out at all
    assert s["reply_load"][1] >= prof.null["request.reply_load"].max() and ps["reply_load"][0] > 0.2, ps["reply_load"]
    assert ps["reply_load"][1] <= 2 / 49
    why = prof.reason(s, ps, 1, h[1], r[1])
    assert why["statistic"] in ("reply_load", "reply_atypical") and why["layer"] == prof.meta["layers"][l], why
    assert e in why["experts"] and "reply" in why["detail"], why
    load = prof.replies.reason(s, ps, 1, r[1], "reply_load", layers=prof.meta["layers"])
    assert load["experts"] == [e] and f"expert {e} computed 50% of the reply" in load["detail"], load


def test_the_cli_profiles_replies_scores_them_and_refuses_bad_settings_in_one_line(tmp_path, capsys):
    prof = tmp_path / "p.json"
    assert main(["monitor", "profile", "--out", str(prof), "--tasks", "arith-compare", "--limit", "16", "--window", "2",
                 "--reply-tokens", "3"]) == 0
    assert "replies of at most 3 tokens" in capsys.readouterr().out
    doc = json.loads(prof.read_text())
    assert doc["replies"]["max_tokens"] == 3 and doc["run"]["settings"]["reply_tokens"] == 3
    log = tmp_path / "log.jsonl"
    rows = [{"id": i, "client": "c", "time": i, "prompt": "is 7 larger than 3?"} for i in range(2)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows + [{**rows[0], "id": 9, "reply": ""}]))
    assert main(["monitor", "score", "--profile", str(prof), "--log", str(log), "--out", str(tmp_path / "s")]) == 0
    scores = [json.loads(l) for l in (tmp_path / "s" / "scores.jsonl").read_text().splitlines()]
    assert [type(s["reply_load"]).__name__ for s in scores] == ["float", "float", "NoneType"]   # no reply: null
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["replies"] == {"max_tokens": 3, "logged": 1, "without_reply": 1}
    capsys.readouterr()
    assert main(["monitor", "profile", "--out", str(tmp_path / "q.json"), "--reply-tokens", "300"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--reply-tokens is 300" in err and "Fix:" in err \
        and "pass 0 (prompts only) or 1 to 256" in err, err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "reply": 5}) + "\n")
    assert main(["monitor", "score", "--profile", str(prof), "--log", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{bad}:1: reply must be a string" in err, err
    # a damaged reply section is the profile's one-line error, not a traceback
    doc["replies"]["spread"]["arith-compare"] = [[1.0]]
    prof.write_text(json.dumps(doc))
    assert main(["monitor", "score", "--profile", str(prof), "--log", str(log), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "damaged routing profile" in err, err
