"""The paths a GPU run found building their batches on the CPU (benchmarks/results/gpu_smoke.json):
the hijack search and measure, the monitor's observe, and serve's generate, with the model on CUDA,
give what they give on the CPU. Skipped where no CUDA device is visible (CI, laptops);
benchmarks/gpu/smoke.sh runs every command on a GPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


@pytest.fixture(scope="module")
def both():
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.loading import load_model

    m, tok, _ = load_model(None)
    g = copy.deepcopy(m).to("cuda")
    return (m, MoEAdapter(m)), (g, MoEAdapter(g)), tok


def test_the_hijack_search_and_measure_run_on_the_gpu_as_on_the_cpu(both):
    from moeguard.monitor.hijack import HijackConfig, search
    from moeguard.monitor.hijackmeasure import measure
    from moeguard.monitor.routertap import allowed_tokens
    from moeguard.tasks.registry import get_task

    (c, ca), (g, ga), tok = both
    task = get_task("arith-compare")
    cfg = HijackConfig(layer=0, expert=2, seed=0, prefix_tokens=6, steps=4, candidates=16, topk=8,
                       train_inputs=4, eval_inputs=8, eval_limit=16)
    allowed = allowed_tokens(tok, c.get_input_embeddings().weight.shape[0])
    cpu = search(c, tok, ca, task, cfg, allowed=allowed)
    gpu = search(g, tok, ga, task, cfg, allowed=allowed)
    assert gpu["steps_run"] == cpu["steps_run"] and len(gpu["prefix_ids"]) == 6
    # the draws stay on the CPU: the same candidates; float differences could only flip a near tie
    assert abs(gpu["curve"][0]["success"] - cpu["curve"][0]["success"]) < 1e-6
    got, want = measure(g, tok, ga, task, cfg, cpu["prefix_text"]), measure(c, tok, ca, task, cfg, cpu["prefix_text"])
    assert abs(got["success"] - want["success"]) < 0.02 and got["task"]["score"] == want["task"]["score"]


def test_the_monitor_observes_on_the_gpu_as_on_the_cpu(both):
    from moeguard.monitor.fit import observe

    (c, ca), (g, ga), tok = both
    prompts = ["Is 41 greater than 17?", "def add(a, b):\n    return a + b"]
    hc, sc, nc, _ = observe(c, tok, prompts, batch_size=2, adapter=ca)
    hg, sg, ng, _ = observe(g, tok, prompts, batch_size=2, adapter=ga)
    assert (nc == ng).all() and np.allclose(hc, hg, atol=0.05) and np.allclose(sc, sg, rtol=1e-3, atol=1e-2)


def test_a_profile_builds_and_serve_answers_with_the_model_on_the_gpu(both):
    import json

    from test_serve import _call, _serving   # the serve tests' real-HTTP helpers

    from moeguard.monitor.online import RoutingMonitor
    from moeguard.monitor.fit import build
    from moeguard.monitor.serve import create_app
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.registry import get_task

    _, (g, _), tok = both
    prompts = {t: [r["input"] for r in load_records(get_task(t), "eval", limit=40)] for t in ("arith-compare", "docstring-topic")}
    prof = build(g, tok, prompts, window=2, windows=50, seed=0, name="embedded")
    with RoutingMonitor(g, prof, flush_every=1, max_delay_s=None) as mon, _serving(create_app(g, tok, mon)) as port:
        status, body = _call(port, "POST", "/v1/completions", {"prompt": "Is 4 greater than 3?", "max_tokens": 3})
        assert status == 200, body
        reply = json.loads(body)
        assert 1 <= reply["usage"]["completion_tokens"] <= 3 and reply["choices"][0]["text"], reply
        status, metrics = _call(port, "GET", "/metrics")
    assert status == 200 and b"moeguard_requests" in metrics
