"""The online monitor and `moeguard serve`: the hook scores a request exactly as the offline scorer
does, keeps bounded per-client state, and the endpoint answers real HTTP on localhost with 4xx
for bad requests and metrics that count every request."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.loading import load_model
from moeguard.monitor.online import RoutingMonitor
from moeguard.monitor.fit import build
from moeguard.monitor.score import score
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task


@pytest.fixture(scope="module")
def served():
    m, tok, _ = load_model(None)
    prompts = {t: [r["input"] for r in load_records(get_task(t), "eval", limit=120)] for t in ("arith-compare", "docstring-topic")}
    prof = build(m, tok, prompts, window=2, windows=400, seed=0, name="embedded")
    return m, tok, prof


def test_the_hook_scores_a_request_as_the_offline_scorer_does_and_is_removed(served):
    m, tok, prof = served
    prompt = load_records(get_task("arith-compare"), "eval", limit=150)[140]["input"]
    offline, _, _, _ = score(m, tok, prof, [{"id": 1, "client": "a", "time": 0, "prompt": prompt, "_t": 0.0}])
    mon = RoutingMonitor(m, prof, max_clients=2)
    with mon:
        with mon.request("a") as r:
            ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
            ids += tok(prompt, add_special_tokens=False)["input_ids"]
            m.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert r.result["p"] == pytest.approx(offline[0]["p"]) and r.result["window"] is None
    for k in ("load", "atypical", "unfamiliar", "surprise"):   # the same routing, embedding and token table
        assert r.result["statistics"][k] == pytest.approx(offline[0][k], abs=1e-3), k
    assert all(not l.router._forward_hooks for l in mon.adapter.layers) and not mon._pooled.module._forward_hooks
    # a full window (2 requests, as profiled) gets the offline window's statistics and p-value
    second = load_records(get_task("docstring-topic"), "eval", limit=150)[141]["input"]
    recs = [{"id": i, "client": "w", "time": i, "prompt": p, "_t": float(i)} for i, p in enumerate((prompt, second))]
    _, windows, _, _ = score(m, tok, prof, recs)
    with mon:
        for p_ in (prompt, second):
            with mon.request("w") as r:
                m(input_ids=torch.tensor([([tok.bos_token_id] if tok.bos_token_id is not None else [])
                                          + tok(p_, add_special_tokens=False)["input_ids"]]))
    assert r.result["window"]["p"] == pytest.approx(windows[0]["p"])
    for k in ("load", "atypical", "evidence", "drift"):
        assert r.result["window"]["statistics"][k] == pytest.approx(windows[0][k], abs=1e-3), k
    mon._clients.clear()
    # bounded: a third client evicts the least recent one, and its gauge goes with it
    with mon:
        for c in ("a", "b", "b", "c"):
            with mon.request(c):
                m(input_ids=torch.tensor([ids]))
    assert list(mon._clients) == ["b", "c"] and mon._clients["b"][1] == []    # b's window of 2 completed
    text = __import__("prometheus_client").generate_latest(mon.registry).decode()
    assert 'moeguard_client_anomaly{client="b"}' in text and 'client="a"' not in text
    assert "moeguard_requests_total 7.0" in text
    # what the windows lost: a's one request (evicted before its window of 2), and c's one waiting
    for metric, value in (("moeguard_clients_evicted_total", 1), ("moeguard_unwindowed_requests_total", 1),
                          ("moeguard_clients_tracked", 2), ("moeguard_requests_awaiting_look", 1)):
        assert f"{metric} {value}.0" in text, (metric, text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port, method, path, body=None, raw=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    c.request(method, path, body=data, headers={**({"Content-Type": "application/json"} if data is not None else {}),
                                                **(headers or {})})
    r = c.getresponse()
    out = r.status, r.read()
    c.close()
    return out


def test_serve_answers_real_http_with_4xx_for_bad_requests_and_counts_every_request(served, tmp_path):
    from moeguard.monitor.servesetup import alert_writer as _alert_writer
    from moeguard.monitor.serve import create_app

    m, tok, prof = served
    alerts = tmp_path / "alerts.jsonl"
    # 120 calibration requests: the request p floor is 2/121
    mon = RoutingMonitor(m, prof, alpha=0.05, on_result=_alert_writer(alerts))
    with mon:
        with _serving(create_app(m, tok, mon, client_id="user")) as port:
            benign = load_records(get_task("arith-compare"), "eval", limit=150)[130]["input"]  # not profiled
            # the options that would change the answer's shape, at their defaults, are taken
            status, body = _call(port, "POST", "/v1/completions", {"prompt": benign, "max_tokens": 4, "user": "alice",
                                                                    "n": 1, "stream": False, "echo": False, "logprobs": None})
            doc = json.loads(body)
            assert status == 200 and doc["object"] == "text_completion" and doc["usage"]["completion_tokens"] <= 4
            assert set(doc) == {"id", "object", "created", "model", "choices", "usage"}   # scores stay on the server
            # each answer says what is wrong: the field, or the limit
            bad = [({"prompt": 5}, 422, "prompt"), ({"prompt": "x", "max_tokens": "many"}, 422, "max_tokens"),
                   ({"prompt": "x", "max_tokens": 0}, 422, "max_tokens"), ({"max_tokens": 3}, 422, "prompt"),
                   ({"prompt": "x" * 9000}, 413, "prompt over 8000 characters"),
                   # answered as if absent before: an SDK asking for a stream got one JSON body
                   ({"prompt": "x", "stream": True}, 400, "stream is not supported: this endpoint answers one whole"),
                   ({"prompt": "x", "n": 2, "logprobs": 3}, 400, "n, logprobs are not supported"),
                   ({"prompt": "x", "n": True}, 400, "n is not supported")]
            for b, code, says in bad:
                status, reply = _call(port, "POST", "/v1/completions", b)
                assert status == code and says in json.dumps(json.loads(reply)["error"]), (b, status, reply)
            status, reply = _call(port, "POST", "/v1/completions", raw=b"{not json")
            assert status == 422 and json.loads(reply)["error"]["message"] == "invalid request body", reply
            # what JSON can say and Python cannot render or tokenize: answered 4xx, not 500
            for raw, code, says in ((rb'{"prompt": "ab\ud800"}', 400, "prompt is not valid Unicode (a lone surrogate)"),
                                    (rb'{"prompt": "hi", "user": "\ud800"}', 422, "user"),
                                    (b'{"prompt": "hi", "max_tokens": 1e400}', 422, "max_tokens")):
                status, reply = _call(port, "POST", "/v1/completions", raw=raw)
                assert status == code and says in json.dumps(json.loads(reply)["error"]), (raw, status, reply)
            status, reply = _call(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": "zz-secret"})
            assert status == 422 and b"max_tokens" in reply and b"zz-secret" not in reply   # where, never the value
            status, reply = _call(port, "POST", "/v1/completions", raw=b"{" + b" " * 70_000 + b"}")
            assert status == 413 and b"request body over" in reply and b"bytes" in reply, reply
            junk = " ".join(["zq ~~ %%"] * 30)
            for i in range(4):
                assert _call(port, "POST", "/v1/completions", {"prompt": junk, "user": "eve", "max_tokens": 1})[0] == 200
            status, metrics = _call(port, "GET", "/metrics")
            text = metrics.decode()
            assert status == 200 and "moeguard_requests_total 5.0" in text
            # every routed slot counted: each answered request's prefill tokens x top-k, per MoE layer
            counts = [float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                      if l.startswith("moeguard_expert_assignments_total{")]
            assert len(counts) == 4 * 8 and sum(counts) > 0 and sum(counts) % (4 * 2) == 0, counts
            assert _call(port, "GET", "/health") == (200, b'{"status":"ok"}')
    rows = [json.loads(l) for l in alerts.read_text().splitlines()] if alerts.exists() else []
    assert rows and all(r["client"] == "eve" for r in rows) and "zq" not in alerts.read_text()   # no prompt text
    assert all(r["layer"] in (0, 1, 2, 3) and r["experts"] and r["detail"] for r in rows), rows   # reasons, as offline


def test_windows_follow_the_address_not_the_user_a_client_picks_or_the_gateways_header(served):
    from moeguard.monitor.serve import _address, create_app

    m, tok, prof = served
    seen: list[str] = []
    mon = RoutingMonitor(m, prof, flush_every=1, on_result=lambda client, result: seen.append(client))
    prompt = load_records(get_task("arith-compare"), "eval", limit=150)[131]["input"]
    with mon:
        with _serving(create_app(m, tok, mon)) as port:        # the default: by address
            for i in range(3):   # a new name, and a new claimed address, each time: neither is believed
                assert _call(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1, "user": f"u{i}"},
                             headers={"X-Forwarded-For": f"203.0.113.{i}", "Forwarded": f"for=198.51.100.{i}"})[0] == 200
            _call(port, "GET", "/metrics")
    assert seen == ["127.0.0.1"] * 3
    seen.clear()
    with mon:
        with _serving(create_app(m, tok, mon, client_id="header:X-User-Id")) as port:
            status, body = _call(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1})
            assert status == 400 and "header x-user-id names the client" in json.loads(body)["error"]["message"]
            status, _ = _call(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1, "user": "mallory"},
                              headers={"X-User-Id": "team-7"})
            assert status == 200
            # sent twice (a gateway that appends its header to the client's own): refused, not the first believed
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            c.putrequest("POST", "/v1/completions")
            payload = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
            for k, v in (("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
                         ("X-User-Id", "admin"), ("X-User-Id", "team-7")):
                c.putheader(k, v)
            c.endheaders(payload)
            r = c.getresponse()
            assert r.status == 400 and "once" in json.loads(r.read())["error"]["message"]
            c.close()
            status, body = _call(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1},
                                 headers={"X-User-Id": "admin, team-7"})     # the same, joined on one line
            assert status == 400 and "no comma" in json.loads(body)["error"]["message"]
            _call(port, "GET", "/metrics")
    assert seen == ["team-7"]
    # IPv6: one subscriber's /56 (its delegated prefix) is one client, whichever /64 it sends from;
    # link-local addresses stay whole with their zone; an IPv4-mapped address is its IPv4 one
    assert _address("2001:db8:1:2::1") == _address("2001:db8:1:ff:ffff::9") == "2001:db8:1::/56"
    assert _address("2001:db8:1:100::1") != _address("2001:db8:1:2::1")
    assert _address("2001:db8:1:2::1", 64) == "2001:db8:1:2::/64"
    assert _address("fe80::1%eth0") == "fe80::1%eth0" != _address("fe80::1%eth1")
    assert _address("::ffff:10.0.0.7") == "10.0.0.7" and _address(None) == "unknown"


@contextlib.contextmanager
def _serving(app, **config):
    """``app`` served as `serve` runs it, on a free port; ``config``: more of ``uvicorn_config``'s settings."""
    import uvicorn

    port = _free_port()
    from moeguard.monitor.serve import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, log_level="critical", **config))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        t.join(timeout=10)


def test_serve_refuses_chunked_oversize_and_too_many_tokens_keeps_no_prompt_and_guards_metrics(served):
    from moeguard.monitor.serve import create_app
    from moeguard.tasks.tokens import _cache

    m, tok, prof = served

    def broken(client, result):
        raise OSError("disk full")
    mon = RoutingMonitor(m, prof, flush_every=1, on_result=broken, raise_errors=False)
    secret = "def unique_secret_name_%d(x): return x" % time.time_ns()
    with mon, _serving(create_app(m, tok, mon, metrics_token="s3cret")) as port:
        # a chunked body carries no Content-Length: it is counted as it arrives
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("POST", "/v1/completions", body=iter([b'{"prompt": "hi", "junk": "'] + [b"x" * 10_000] * 60 + [b'"}']),
                  headers={"Content-Type": "application/json"}, encode_chunked=True)
        r = c.getresponse()
        assert r.status == 413 and b"over 64000 bytes" in r.read()
        c.close()
        # under the character limit, over the model's 256 positions
        status, body = _call(port, "POST", "/v1/completions", {"prompt": " ".join(str(i) for i in range(400)), "max_tokens": 4})
        assert status == 413 and b"the model has 256: shorten the prompt or lower max_tokens" in body, body
        # a failing alert log: the client still gets its completion; the failure is counted
        assert _call(port, "POST", "/v1/completions", {"prompt": secret, "max_tokens": 2})[0] == 200
        assert not any(secret in memo for memo in _cache.values())               # the server kept no prompt
        assert _call(port, "GET", "/metrics")[0] == 401
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/metrics", headers={"Authorization": "Bearer wrong"})
        assert c.getresponse().status == 401
        c.close()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/metrics", headers={"Authorization": "bearer s3cret"})      # the scheme is case-insensitive
        r = c.getresponse()
        text = r.read().decode()
        c.close()
    assert r.status == 200 and "moeguard_requests_total 1.0" in text and "moeguard_callback_failures_total 1.0" in text


def test_a_callback_that_reads_results_or_scrapes_does_not_hang_and_a_failed_batch_says_why(served):
    from prometheus_client import generate_latest

    m, tok, prof = served
    ids = torch.tensor([[tok.bos_token_id or 1] + tok("def add(a, b): return a + b", add_special_tokens=False)["input_ids"]])
    seen = []

    def nosy(client, result):      # scrapes (a scrape flushes) from inside the flush that called it
        seen.append((client, "moeguard_requests_total 2.0" in generate_latest(mon.registry).decode()))
    mon = RoutingMonitor(m, prof, flush_every=2, max_delay_s=None, on_result=nosy)
    done = threading.Event()

    def serve_two():
        with mon, torch.no_grad():
            for c in ("a", "b"):
                with mon.request(c):
                    m(input_ids=ids)
        done.set()
    threading.Thread(target=serve_two, daemon=True).start()
    assert done.wait(60), "a callback that scrapes the registry hung the monitor"
    assert seen == [("a", True), ("b", True)]
    mon = RoutingMonitor(m, prof, flush_every=1, max_delay_s=None)
    mon.profile = None     # scoring now raises: the request's result says so, the failure is counted
    with mon, torch.no_grad():
        with pytest.raises(AttributeError), mon.request("a") as ra:
            m(input_ids=ids)
    assert ra.result["error"].startswith("scoring failed: AttributeError")
    assert "moeguard_scoring_failures_total 1.0" in generate_latest(mon.registry).decode()
    # a server's monitor (raise_errors=False) raises nothing into the request; its callback still runs
    told = []
    mon = RoutingMonitor(m, prof, flush_every=1, max_delay_s=None, raise_errors=False,
                         on_result=lambda c, r: told.append((c, r)))
    mon.profile = None
    with mon, torch.no_grad():
        with mon.request("b") as rb:
            m(input_ids=ids)
    assert rb.result["error"].startswith("scoring failed") and told == [("b", rb.result)]


def test_a_look_that_raises_keeps_the_client_tracked_so_eviction_still_removes_its_gauge(served, monkeypatch):
    from prometheus_client import generate_latest

    from moeguard.monitor import ladder

    m, tok, prof = served
    ids = torch.tensor([tok("def add(a, b): return a + b", add_special_tokens=False)["input_ids"]])
    mon = RoutingMonitor(m, prof, flush_every=1, max_delay_s=None, max_clients=1, raise_errors=False)
    first, window, real = min(mon.looks), prof.meta["window"], ladder.look
    calls = []

    def flaky(profile, n, *a, **k):   # the first full window's look fails
        calls.append(n)
        if n == window and calls.count(window) == 1:
            raise RuntimeError("a scoring bug")
        return real(profile, n, *a, **k)

    monkeypatch.setattr(ladder, "look", flaky)
    with mon, torch.no_grad():
        for _ in range(window + first):   # the failed block, then the next block's first look
            with mon.request("a"):
                m(input_ids=ids)
        assert calls == [*sorted(mon.looks), first] and "a" in mon._clients, (calls, list(mon._clients))
        assert len(mon._clients["a"][1]) == first % window    # the next block began (and was scored)
        assert 'client="a"' in generate_latest(mon.registry).decode()
        with mon.request("b"):          # the one client slot goes to b: a is evicted, its gauge with it
            m(input_ids=ids)
    assert list(mon._clients) == ["b"] and 'client="a"' not in generate_latest(mon.registry).decode()


def test_a_padded_request_is_scored_as_the_same_prompt_unpadded(served):
    m, tok, prof = served
    prompt = load_records(get_task("docstring-topic"), "eval", limit=150)[142]["input"]
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(prompt, add_special_tokens=False)["input_ids"]
    mon = RoutingMonitor(m, prof)
    with mon:
        with mon.request("plain") as plain:
            m(input_ids=torch.tensor([ids]))
        padded = torch.tensor([ids + [tok.pad_token_id] * 7])
        mask = torch.tensor([[1] * len(ids) + [0] * 7])
        with mon.request("padded") as r:
            m(input_ids=padded, attention_mask=mask)
    for k in ("load", "atypical", "unfamiliar", "surprise"):
        assert r.result["statistics"][k] == pytest.approx(plain.result["statistics"][k], abs=1e-4), k


@pytest.mark.parametrize("damage", [
    lambda d: d["kernel"].__setitem__("bandwidth", 0.0),
    lambda d: d["token_routing"]["tokens"].__setitem__(0, 10 ** 9),
    lambda d: d["embedding"].__setitem__("hidden", float("inf")),
    lambda d: d["null"]["request.load"].__setitem__(0, float("nan")),
    lambda d: d["embedding"].__setitem__("projection_f32_b64", "not base64!"),
    lambda d: d.__setitem__("sd", [[0.0] * 8] * 4),
])
def test_a_damaged_profile_is_one_line_never_a_traceback(served, damage):
    from moeguard.errors import MoeguardError
    from moeguard.monitor.profile import Profile

    _, _, prof = served
    d = json.loads(json.dumps(prof.to_dict()))
    damage(d)
    with pytest.raises(MoeguardError, match=r"P.json is a damaged routing profile"):
        Profile.from_dict(d, where="P.json")


def _stream(m, tok, mon, prompts):
    """Requests of every shape the hook meets: plain, generated, padded, two prompt rows in one
    request, and one called with embeddings (no ids); returns their RequestResults."""
    ids = [([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(p, add_special_tokens=False)["input_ids"]
           for p in prompts]
    out = []
    with mon, torch.no_grad():
        for i, x in enumerate(ids):
            embeds = m.get_input_embeddings()(torch.tensor([x]))      # before the request: its ids are not seen
            with mon.request(f"c{i % 3}") as r:
                if i % 5 == 1:
                    m.generate(torch.tensor([x]), max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
                elif i % 5 == 2:     # padded to a longer row
                    m(input_ids=torch.tensor([x + [tok.pad_token_id] * 5]), attention_mask=torch.tensor([[1] * len(x) + [0] * 5]))
                elif i % 5 == 3:     # two rows of one request, the shorter padded
                    y = ids[(i + 1) % len(ids)]
                    w = max(len(x), len(y))
                    m(input_ids=torch.tensor([x + [tok.pad_token_id] * (w - len(x)), y + [tok.pad_token_id] * (w - len(y))]),
                      attention_mask=torch.tensor([[1] * len(x) + [0] * (w - len(x)), [1] * len(y) + [0] * (w - len(y))]))
                elif i == 4:         # embeddings, no ids: surprise has nothing to read
                    m(inputs_embeds=embeds)
                else:
                    t = torch.tensor([x])
                    m(input_ids=t)
                    t.fill_(0)       # the caller reuses its buffer: the request keeps what it routed
            out.append(r)
    return out


def test_requests_scored_in_batches_get_what_each_scored_at_its_end_gets(served):
    m, tok, prof = served
    prompts = [r["input"] for t in ("arith-compare", "docstring-topic")
               for r in load_records(get_task(t), "eval", limit=150)[130:137]]
    got = {}
    for every in (1, 4, 100):
        mon = RoutingMonitor(m, prof, flush_every=every)
        with pytest.warns(UserWarning, match="called without input ids"):
            res = _stream(m, tok, mon, prompts)
        text = __import__("prometheus_client").generate_latest(mon.registry).decode()
        got[every] = ([r.result for r in res], mon._assigned.copy(),
                      [l for l in text.splitlines() if l.startswith(("moeguard_requests_total", "moeguard_client_anomaly{"))])
    results, assigned, metrics = got[1]
    assert results[4]["statistics"]["surprise"] == 0.0 and results[3]["statistics"]["surprise"] > 0
    assert sum(r["window"] is not None for r in results) == 6          # window 2: clients c0, c1, c2 complete 6
    assert "moeguard_requests_total 14.0" in metrics
    for every in (4, 100):
        other, a, met = got[every]
        assert met == metrics and np.array_equal(a, assigned)
        for r, o in zip(results, other):
            assert o["p"] == pytest.approx(r["p"], rel=1e-9) and (o["window"] is None) == (r["window"] is None)
            for k in r["statistics"]:
                assert o["statistics"][k] == pytest.approx(r["statistics"][k], rel=1e-9, abs=1e-12), k
            if r["window"]:
                assert o["window"]["p"] == pytest.approx(r["window"]["p"], rel=1e-9)


def test_a_batch_waits_until_full_a_read_or_a_scrape_and_reports_in_order(served):
    from prometheus_client import generate_latest

    m, tok, prof = served
    seen = []
    # no delay thread: a stalled machine must not score the waiting requests behind the test's back
    mon = RoutingMonitor(m, prof, flush_every=3, max_delay_s=None, on_result=lambda c, r: seen.append((c, r["p"])))
    ids = torch.tensor([[tok.bos_token_id or 1] + tok("def add(a, b): return a + b", add_special_tokens=False)["input_ids"]])
    with mon, torch.no_grad():
        rs = []
        for c in ("a", "b"):
            with mon.request(c) as r:
                m(input_ids=ids)
            rs.append(r)
        assert len(mon._pending) == 2 and seen == []                      # waiting: no scores yet
        assert "moeguard_requests_total 2.0" in generate_latest(mon.registry).decode()   # a scrape scores them
        assert [c for c, _ in seen] == ["a", "b"] and not mon._pending
        for c in ("c", "d", "e"):
            with mon.request(c) as r:
                m(input_ids=ids)
            rs.append(r)
        assert [c for c, _ in seen] == ["a", "b", "c", "d", "e"]           # the third filled the batch
        with mon.request("f") as r:
            m(input_ids=ids)
        assert len(mon._pending) == 1 and r.result["p"] == seen[-1][1] and seen[-1][0] == "f"   # a read scores it
    with mon.request("g") as failed:    # hooks detached: nothing ran through them, nothing to score
        pass
    assert failed.result == {} and len(seen) == 6
    # a callback that raises loses no result: every request of the batch is scored, the error raised once
    p_same_input = seen[0][1]    # every request here sends the same ids

    def broken(client, result):
        seen.append(client)
        raise OSError("disk full")
    mon = RoutingMonitor(m, prof, flush_every=2, max_delay_s=None, on_result=broken)
    with mon, torch.no_grad():
        with mon.request("x") as rx:
            m(input_ids=ids)
        with pytest.raises(OSError, match="disk full"), mon.request("y") as ry:
            m(input_ids=ids)
    assert seen[-2:] == ["x", "y"] and not mon._pending
    assert rx.result["p"] == pytest.approx(p_same_input) and ry.result["p"] == pytest.approx(p_same_input)
    from moeguard.errors import MoeguardError
    with pytest.raises(MoeguardError, match="flush_every is 0"):
        RoutingMonitor(m, prof, flush_every=0)
    with pytest.raises(MoeguardError, match="max_delay_s is -1"):
        RoutingMonitor(m, prof, max_delay_s=-1)


def test_a_request_no_batch_fills_is_scored_within_the_delay_bound(served):
    m, tok, prof = served
    seen = []
    mon = RoutingMonitor(m, prof, flush_every=100, max_delay_s=0.2, on_result=lambda c, r: seen.append((c, time.monotonic())))
    ids = torch.tensor([[tok.bos_token_id or 1] + tok("is 3 less than 4", add_special_tokens=False)["input_ids"]])
    with mon, torch.no_grad():
        ticker = mon._ticker
        with mon.request("quiet"):
            m(input_ids=ids)
        done = time.monotonic()
        while not seen and time.monotonic() - done < 5:
            time.sleep(0.02)
        assert seen and seen[0][0] == "quiet" and seen[0][1] - done < 1.0, seen    # no read, no scrape, no full batch
        assert ticker.is_alive() and not mon._pending
    assert not ticker.is_alive() and mon._ticker is None                         # stopped with the monitor
    quiet = RoutingMonitor(m, prof, flush_every=100, max_delay_s=None)
    with quiet, torch.no_grad():
        assert quiet._ticker is None
        with quiet.request("q"):
            m(input_ids=ids)
        time.sleep(0.3)
        assert len(quiet._pending) == 1                                            # unbounded: it waits


def test_serve_refuses_a_batch_below_one_or_a_delay_bound_not_above_zero_in_one_line(capsys, tmp_path):
    from moeguard.cli.app import main

    capsys.readouterr()
    code = main(["serve", "--profile", str(tmp_path / "P.json"), "--flush-every", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--flush-every is 0" in err and "pass at least 1" in err
    code = main(["serve", "--profile", str(tmp_path / "P.json"), "--max-delay", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--max-delay is 0" in err and "positive number of seconds" in err
    code = main(["serve", "--profile", str(tmp_path / "P.json"), "--max-waiting", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--max-waiting is 0" in err and "pass at least 1" in err


def test_serve_hands_uvicorn_max_waiting_and_a_margin_of_connections(served, capsys, tmp_path, monkeypatch):
    """The CLI computes uvicorn's connection limit (it was checked only through uvicorn_config itself)."""
    import uvicorn

    from moeguard.cli.app import main
    from moeguard.monitor.serve import SPARE_CONNECTIONS

    _, _, prof = served
    (tmp_path / "P.json").write_text(json.dumps(prof.to_dict()))
    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.append(
        (self.config.limit_concurrency, self.config.host, len(sockets or []))))
    capsys.readouterr()
    alerts = tmp_path / "alerts.jsonl"
    for _ in range(2):
        assert main(["serve", "--profile", str(tmp_path / "P.json"), "--port", str(_free_port()), "--max-waiting", "5",
                     "--alerts", str(alerts), "--alpha", "0.005"]) == 0
    assert seen == [(5 + SPARE_CONNECTIONS, "127.0.0.1", 1)] * 2, seen
    assert "moeguard: serve stopped" in capsys.readouterr().err
    # each start's settings, profile digest, versions and commit beside the alert log (which holds alerts only)
    from moeguard.io import file_sha256
    from moeguard.provenance import git_commit

    starts = [json.loads(l) for l in (tmp_path / "alerts.jsonl.starts.jsonl").read_text().splitlines()]
    assert len(starts) == 2 and alerts.read_text() == ""
    assert starts[0]["settings"]["profile_sha256"] == file_sha256(tmp_path / "P.json")
    assert starts[0]["settings"]["alpha"] == 0.005 and starts[0]["settings"]["client_id"] == "address"
    assert starts[0]["git_commit"] == git_commit() and starts[0]["versions"]["torch"] and starts[1]["started_at"]
    # a start record that cannot be written is one line, before the model loads
    from moeguard.models.handle import ModelHandle

    bad = tmp_path / "b.jsonl"
    (tmp_path / "b.jsonl.starts.jsonl").mkdir()
    monkeypatch.setattr(ModelHandle, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    capsys.readouterr()
    assert main(["serve", "--profile", str(tmp_path / "P.json"), "--port", str(_free_port()), "--alerts", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot append the start record {bad}.starts.jsonl" in err, err
    # a device or pipe as the alert log (/dev/stdout in a container): nothing is written beside it
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    from moeguard.monitor.servesetup import record_start

    record_start(fifo, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("fifo")) == ["fifo"]


def test_serve_refuses_exposed_metrics_another_models_profile_and_an_unwritable_alert_log(served, capsys, tmp_path):
    from moeguard.cli.app import main

    _, _, prof = served
    d = prof.to_dict()
    (tmp_path / "P.json").write_text(json.dumps(d))
    (tmp_path / "Q.json").write_text(json.dumps({**d, "model": "./my-finetune"}))
    (tmp_path / "dir").mkdir()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    free = _free_port()
    for args, needles in (
            (["--profile", str(tmp_path / "P.json"), "--host", "0.0.0.0"],
             ("--host 0.0.0.0 serves beyond this machine", "pass --metrics-token TOKEN")),
            (["--profile", str(tmp_path / "P.json"), "--host", "0.0.0.0", "--metrics-token", " "], ("--metrics-token is empty",)),
            (["--profile", str(tmp_path / "P.json"), "--metrics-token", "s\u00e9same"], ("beyond printable ASCII",)),
            (["--profile", str(tmp_path / "P.json"), "--client-id", "cookie"],
             ("--client-id is 'cookie'; expected 'address' (or 'address/N': IPv6 clients by their /N), 'user' or 'header:NAME'",
              "header:X-User-Id behind a gateway")),
            (["--profile", str(tmp_path / "P.json"), "--client-id", "header:"], ("--client-id is 'header:'",)),
            (["--profile", str(tmp_path / "P.json"), "--client-id", "user:"], ("--client-id is 'user:'",)),
            (["--profile", str(tmp_path / "P.json"), "--client-id", "address/16"], ("--client-id is 'address/16'",)),
            (["--profile", str(tmp_path / "P.json"), "--client-id", "address/\u00b2"], ("--client-id is 'address/\u00b2'",)),
            (["--profile", str(tmp_path / "P.json"), "--client-id", "header:X-Us\u00e9r"], ("--client-id is 'header:X-Us\u00e9r'",)),
            (["--profile", str(tmp_path / "Q.json"), "--port", str(free)],
             ("the profile was made for ./my-finetune, not embedded", "use the profiled model (--model)")),
            (["--profile", str(tmp_path / "P.json"), "--port", str(taken.getsockname()[1])],   # before the model loads
             (f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}", "pass another --port")),
            # appended to, the profile would be damaged for the next start
            (["--profile", str(tmp_path / "P.json"), "--alerts", str(tmp_path / "P.json")],
             (f"--alerts {tmp_path / 'P.json'} is (or is inside) the input {tmp_path / 'P.json'}: the server would write there",)),
            (["--profile", str(tmp_path / "P.json"), "--model", str(tmp_path / "dir"), "--period-log",
              str(tmp_path / "dir" / "config.json"), "--period", "1d"], ("--period-log", "is (or is inside) the input")),
            (["--profile", str(tmp_path / "P.json"), "--alerts", str(tmp_path / "dir")],
             (f"--alerts {tmp_path / 'dir'} cannot be written", "a file this user may append to"))):
        capsys.readouterr()
        code = main(["serve", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and all(n in err for n in needles), err
    taken.close()
    with socket.socket() as again:               # the refused start (Q.json) closed its socket: the port binds again
        again.bind(("127.0.0.1", free))
    from moeguard.monitor.servesetup import is_loopback as _loopback

    assert [_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "LOCALHOST", "localhost.", "::ffff:127.0.0.1")] == [True] * 7
    assert [_loopback(h) for h in ("0.0.0.0", "::", "", "10.0.0.5", "example.com")] == [False] * 5
    # [::1], which is_loopback takes, binds too (getaddrinfo refused the brackets), and a URL brackets it
    from moeguard.monitor.servesetup import listen, url_host

    if socket.has_ipv6:
        with listen("[::1]", 0) as bound:
            assert bound.family == socket.AF_INET6 and bound.getsockname()[0] == "::1"
    assert (url_host("[::1]"), url_host("::1"), url_host("127.0.0.1"), url_host("localhost")) == \
        ("[::1]", "[::1]", "127.0.0.1", "localhost")


def test_a_profile_of_other_routing_is_refused_before_a_log_is_replayed_or_a_hook_attached(served):
    from moeguard.testing import tiny_model

    _, tok, prof = served
    other = tiny_model("mixtral")                       # another layers x experts, the same name at the edge
    shape = (len(MoEAdapter(other).layers), MoEAdapter(other).num_experts)
    assert shape != prof.mean.shape
    want = rf"the profile has 4 MoE layers x 8 experts, the model {shape[0]} x {shape[1]}"
    with pytest.raises(MoeguardError, match=want):
        score(other, tok, prof, [{"id": 1, "client": "a", "time": 0, "prompt": "hi", "_t": 0.0}])
    with pytest.raises(MoeguardError, match=want):
        RoutingMonitor(other, prof)


def test_an_interrupted_score_resumes_from_the_requests_it_replayed(served, tmp_path, monkeypatch, capsys):
    from moeguard.cli.app import main
    from moeguard.monitor import score as S

    _, _, prof = served
    P = tmp_path / "P.json"
    P.write_text(json.dumps(prof.to_dict()))
    prompts = [r["input"] for r in load_records(get_task("arith-compare"), "eval", limit=200)[120:168]]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"id": i, "client": f"c{i % 3}", "time": i, "prompt": p}) + "\n"
                           for i, p in enumerate(prompts)))
    monkeypatch.setattr(S, "CHUNK", 16)                  # 48 requests: three steps
    args = ["monitor", "score", "--profile", str(P), "--log", str(log)]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    calls, real, stop_at = [], S.observe, [3]

    def interrupted_at_the_third(*a, **k):
        calls.append(len(a[2]))
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "observe", interrupted_at_the_third)
    capsys.readouterr()
    code = main([*args, "--out", str(tmp_path / "cut")])
    err = capsys.readouterr().err
    assert code == 130 and f"the requests replayed so far are kept in {tmp_path / '.cut.partial'}: run the same " \
                           "command again to resume" in err, err
    assert not (tmp_path / "cut").exists() and len(list((tmp_path / ".cut.partial").glob(".replay-*.npz"))) == 2
    calls.clear()
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    assert calls == [16]                                 # only the step not replayed before
    for name in ("scores.jsonl", "windows.jsonl", "alerts.jsonl"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    assert not list((tmp_path / "cut").glob(".replay-*")) and not (tmp_path / ".cut.partial").exists()
    # a partial replay of another log is not reused
    calls.clear()
    assert main([*args, "--out", str(tmp_path / "again")]) == 130
    assert len(list((tmp_path / ".again.partial").glob(".replay-*.npz"))) == 2
    log.write_text(log.read_text().replace('"c0"', '"c9"'))
    calls.clear()
    stop_at[0] = 0                                       # no interruption now
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    assert calls == [16, 16, 16], calls


def test_requests_waiting_for_the_model_hold_no_worker_thread_so_health_and_metrics_answer(served, monkeypatch):
    """Each waiting completion held one of the thread pool's 40 threads while it waited for the
    lock: 40 queued requests left /health and /metrics hanging behind the model. They now wait on
    the event loop; blank prompts get 400 as `monitor score` refuses them in a log."""
    from moeguard.monitor.serve import create_app

    m, tok, prof = served
    release, real = threading.Event(), m.generate

    def slow(*a, **k):
        release.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(m, "generate", slow)
    results = []
    with RoutingMonitor(m, prof) as mon:
        with _serving(create_app(m, tok, mon, client_id="user")) as port:
            assert _call(port, "POST", "/v1/completions", {"prompt": "   \n", "user": "a"})[0] == 400
            workers = [threading.Thread(target=lambda i=i: results.append(_call(
                port, "POST", "/v1/completions", {"prompt": f"{i} > 3?", "max_tokens": 1, "user": f"c{i % 4}"})[0]))
                for i in range(48)]
            for w in workers:
                w.start()
            time.sleep(1.0)   # every request has arrived and waits: one in generate, 47 for the model
            t0 = time.perf_counter()
            health = _call(port, "GET", "/health")
            status, metrics = _call(port, "GET", "/metrics")
            waited = time.perf_counter() - t0
            assert health == (200, b'{"status":"ok"}') and status == 200 and waited < 5, waited
            assert not results, "a request finished while the model was held"
            release.set()
            for w in workers:
                w.join(60)
            assert results == [200] * 48
            assert "moeguard_requests_total 48.0" in _call(port, "GET", "/metrics")[1].decode()
        # a bound on them: past max_waiting, 503 with Retry-After, and the count comes back down
        release.clear()
        results.clear()
        with _serving(create_app(m, tok, mon, client_id="user", max_waiting=3)) as port:
            workers = [threading.Thread(target=lambda i=i: results.append(_call(
                port, "POST", "/v1/completions", {"prompt": f"{i} > 3?", "max_tokens": 1, "user": "c"})[0]))
                for i in range(3)]
            for w in workers:
                w.start()
            time.sleep(1.0)
            status, reply = _call(port, "POST", "/v1/completions", {"prompt": "1 > 3?", "max_tokens": 1})
            assert status == 503 and b"3 requests are already at the model or waiting for it" in reply, reply
            release.set()
            for w in workers:
                w.join(60)
            assert results == [200] * 3
            assert _call(port, "POST", "/v1/completions", {"prompt": "1 > 3?", "max_tokens": 1})[0] == 200


def test_a_prompt_token_past_the_model_s_embeddings_is_400_and_the_server_serves_on(served):
    """A tokenizer whose added tokens lie past the model's embeddings (a checkpoint not resized): the
    id reached the model (on a GPU a device-side assert, and every later request failed with it)."""
    import copy

    from moeguard.monitor.serve import create_app

    m, tok, prof = served
    grown = copy.deepcopy(tok)
    grown.add_tokens(["<zz_added_past_the_embeddings>"])
    assert grown.convert_tokens_to_ids("<zz_added_past_the_embeddings>") >= m.get_input_embeddings().num_embeddings
    mon = RoutingMonitor(m, prof, flush_every=1, raise_errors=False)
    with mon, _serving(create_app(m, grown, mon)) as port:
        status, body = _call(port, "POST", "/v1/completions", {"prompt": "x <zz_added_past_the_embeddings>", "max_tokens": 2})
        assert status == 400 and b"the model has no embedding for (it has 4096)" in body, body
        status, _ = _call(port, "POST", "/v1/completions", {"prompt": "def f(x):", "max_tokens": 2})
        assert status == 200


def test_serve_decodes_greedily_whatever_the_checkpoint_s_generation_config_says(served):
    """A checkpoint's generation_config.json (repetition penalty, a ban on repeats, a minimum length)
    is applied by generate() even without sampling: the served reply must be the greedy one the
    profile's replies are made with (monitor/hijack.reply), not another decoding's."""
    import json as _json

    from moeguard.monitor.hijack import reply
    from moeguard.monitor.serve import create_app

    m, tok, prof = served
    prompt = "def add(a, b):"
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(prompt, add_special_tokens=False)["input_ids"]
    greedy = reply(m, tok, ids, 12)
    own = m.generation_config
    saved = (own.repetition_penalty, own.no_repeat_ngram_size, own.min_new_tokens)
    own.repetition_penalty, own.no_repeat_ngram_size, own.min_new_tokens = 50.0, 1, 12
    try:
        mon = RoutingMonitor(m, prof, flush_every=1, raise_errors=False)
        with mon, _serving(create_app(m, tok, mon)) as port:
            status, body = _call(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 12})
        assert status == 200, body
        assert _json.loads(body)["choices"][0]["text"] == tok.decode(greedy, skip_special_tokens=True)
    finally:
        own.repetition_penalty, own.no_repeat_ngram_size, own.min_new_tokens = saved
