"""The online monitor and `moeguard serve`: the hook scores a request exactly as the offline scorer
does, keeps bounded per-client state, and the endpoint answers real HTTP on localhost with 4xx
for bad requests and metrics that count every request."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import torch

from moeguard.models.loading import load_model
from moeguard.monitor.online import RoutingMonitor
from moeguard.monitor.profile import build
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port, method, path, body=None, raw=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    c.request(method, path, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
    r = c.getresponse()
    out = r.status, r.read()
    c.close()
    return out


def test_serve_answers_real_http_with_4xx_for_bad_requests_and_counts_every_request(served, tmp_path):
    import uvicorn

    from moeguard.cli.monitor import _alert_writer
    from moeguard.monitor.serve import create_app

    m, tok, prof = served
    mon = RoutingMonitor(m, prof, alpha=0.05)   # 120 calibration requests: the request p floor is 2/121
    alerts = tmp_path / "alerts.jsonl"
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(m, tok, mon, on_result=_alert_writer(alerts)), host="127.0.0.1",
                                           port=port, log_level="warning", access_log=False))
    with mon:
        t = threading.Thread(target=server.run, daemon=True)
        t.start()
        try:
            for _ in range(100):
                if server.started:
                    break
                time.sleep(0.05)
            benign = load_records(get_task("arith-compare"), "eval", limit=150)[130]["input"]  # not profiled
            status, body = _call(port, "POST", "/v1/completions", {"prompt": benign, "max_tokens": 4, "user": "alice"})
            doc = json.loads(body)
            assert status == 200 and doc["object"] == "text_completion" and doc["usage"]["completion_tokens"] <= 4
            assert set(doc) == {"id", "object", "created", "model", "choices", "usage"}   # scores stay on the server
            bad = [({"prompt": 5}, 422), ({"prompt": "x", "max_tokens": "many"}, 422), ({"prompt": "x", "max_tokens": 0}, 422),
                   ({"max_tokens": 3}, 422), ({"prompt": "x" * 9000}, 413)]
            for b, code in bad:
                assert _call(port, "POST", "/v1/completions", b)[0] == code, b
            assert _call(port, "POST", "/v1/completions", raw=b"{not json")[0] == 422
            assert _call(port, "POST", "/v1/completions", raw=b"{" + b" " * 70_000 + b"}")[0] == 413
            junk = " ".join(["zq ~~ %%"] * 30)
            for i in range(4):
                assert _call(port, "POST", "/v1/completions", {"prompt": junk, "user": "eve", "max_tokens": 1})[0] == 200
            status, metrics = _call(port, "GET", "/metrics")
            text = metrics.decode()
            assert status == 200 and "moeguard_requests_total 5.0" in text
            assert text.count("moeguard_expert_assignments_total{") >= 8
            assert _call(port, "GET", "/health") == (200, b'{"status":"ok"}')
        finally:
            server.should_exit = True
            t.join(timeout=10)
    rows = [json.loads(l) for l in alerts.read_text().splitlines()] if alerts.exists() else []
    assert rows and all(r["client"] == "eve" for r in rows) and "prompt" not in alerts.read_text()
    assert all(r["layer"] in (0, 1, 2, 3) and r["experts"] and r["detail"] for r in rows), rows   # reasons, as offline


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
