"""A request whose forward gives NaN (a float16 overflow, a damaged weight) has no p-value: numpy
sorts NaN past every benign value, so it was given the profile's smallest p-value and alerted as the
most anomalous request ('-log density nan'), its window and slice with it."""

from __future__ import annotations

import warnings

import pytest

from moeguard.errors import MoeguardError
from moeguard.models.loading import load_model
from moeguard.monitor.fit import build
from moeguard.monitor.online import RoutingMonitor
from moeguard.monitor.score import score
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task

TASKS = ("arith-compare", "docstring-topic")
MARK = " qqqqzzzz"


@pytest.fixture(scope="module")
def setting():
    m, tok, _ = load_model(None)
    pool = {t: [r["input"] for r in load_records(get_task(t), "train", limit=120)] for t in TASKS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a small profile's warnings
        prof = build(m, tok, pool, window=8, seed=0, name="embedded")
    marker = tok.encode(MARK, add_special_tokens=False)[0]

    def nan_at_marker(module, inputs, out):   # the token's embedding NaN: its row's hidden states and log-probs
        return out.masked_fill((inputs[0] == marker)[..., None], float("nan"))

    return m, tok, pool, prof, nan_at_marker


def _records(n: int = 8) -> list[dict]:
    prompts = [r["input"] for r in load_records(get_task(TASKS[0]), "eval", limit=n)]
    return [{"id": f"r{i}", "client": "alice", "time": i, "_t": float(i), "prompt": p} for i, p in enumerate(prompts)]


def test_a_request_with_a_nan_forward_is_refused_offline_and_not_scored_online(setting, through_hook):
    m, tok, pool, prof, nan_at_marker = setting
    recs = _records(9)   # 8 scored: one full window
    recs[3]["prompt"] += MARK
    hook = m.get_input_embeddings().register_forward_hook(nan_at_marker)
    try:
        with pytest.raises(MoeguardError) as e:
            score(m, tok, prof, recs)
        assert e.value.message.startswith("request 'r3' cannot be scored: the model's hidden states or token "
                                          "log-probabilities on it are NaN")
        assert "bfloat16 or float32" in e.value.hint
        results = through_hook(RoutingMonitor(m, prof, flush_every=1), m, tok, recs)
    finally:
        hook.remove()
    assert results[3] == {"error": "scoring failed: the model's hidden states or token log-probabilities on it are "
                                   "NaN (a float16 overflow, or a damaged weight its input reaches)"}
    clean = through_hook(RoutingMonitor(m, prof, flush_every=1), m, tok, recs[:3] + recs[4:])
    # the others are scored as without it: their p-values, and nothing of it in their client's window
    assert [r["p"] for r in results[:3] + results[4:]] == [r["p"] for r in clean]
    assert results[8]["window"] is not None and results[8]["window"] == clean[7]["window"]


def test_a_profile_of_a_nan_request_is_refused_before_it_is_written(setting):
    m, tok, pool, prof, nan_at_marker = setting
    bad = {t: list(v) for t, v in pool.items()}
    bad[TASKS[1]][5] += MARK
    hook = m.get_input_embeddings().register_forward_hook(nan_at_marker)
    try:
        with pytest.raises(MoeguardError, match="of the profile's benign requests cannot be measured: the model's "
                                                "hidden states"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build(m, tok, bad, window=8, seed=0, name="embedded")
    finally:
        hook.remove()
