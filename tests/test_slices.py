"""Slices of all traffic (``monitor profile --slice N``): a campaign spread over client identities that
no window sees is seen in a slice, which names its identities; benign slices pass; the online hook
gives the offline scorer's numbers; the mix solver is exact; bad settings are one-line errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.loading import load_model
from moeguard.monitor import slices
from moeguard.monitor.fit import build
from moeguard.monitor.profile import Profile
from moeguard.monitor.routertap import SEPARATOR
from moeguard.monitor.score import score
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task

TASKS = ("arith-compare", "docstring-topic", "code-naming")
CAMPAIGN = "zq xv ## }{ 0x9f @@ ~~ %% qqq lorem ipsum"


@pytest.fixture(scope="module")
def setting():
    m, tok, _ = load_model(None)
    prompts = {t: [r["input"] for r in load_records(get_task(t), "eval", limit=120)] for t in TASKS}
    prof = build(m, tok, prompts, window=8, seed=0, name="embedded", slice_len=32)
    return m, tok, prof


def _traffic(campaign: int, total: int = 32, seed: int = 0, heavy: int = 0) -> list[dict]:
    """``total`` requests in time order: benign users (2 requests each, unseen eval inputs; the first
    ``heavy`` benign requests from one user, "heavy", all of one task) and ``campaign`` requests of one
    crafted text from identities that send 2 each."""
    rng = random.Random(seed)
    fresh = [r["input"] for t in TASKS for r in load_records(get_task(t), "eval")[120:]]
    kinds = ["attack"] * campaign + ["benign"] * (total - campaign)
    rng.shuffle(kinds)
    rows, counts = [], {"attack": 0, "benign": 0}
    for i, k in enumerate(kinds):
        j = counts[k]
        counts[k] += 1
        client = f"mallory-{j // 2}" if k == "attack" else "heavy" if j < heavy else f"user-{j // 2}"
        if client == "heavy":
            rows.append({"id": f"r{i}", "client": client, "time": i, "prompt": fresh[j], "_t": float(i)})
            continue
        prompt = CAMPAIGN + SEPARATOR + rng.choice(fresh) if k == "attack" else rng.choice(fresh)
        rows.append({"id": f"r{i}", "client": client, "time": i, "prompt": prompt, "_t": float(i)})
    return rows


def test_a_campaign_over_many_identities_is_seen_in_a_slice_that_names_them(setting):
    m, tok, prof = setting
    _, wins, alerts, summary = score(m, tok, prof, _traffic(16))
    assert not wins and summary["unwindowed"]["clients"] == 16   # every identity sent 2: no window sees one
    (row,) = summary["traffic_slices"]
    assert row["p"] <= 0.01 and row["clients"] == 16 and summary["alerts"]["slice"] == 1, row
    named = [t["client"] for t in row["top_clients"]]
    assert len(named) == slices.NAMED and all(c.startswith("mallory-") for c in named), named
    (alert,) = [a for a in alerts if a["kind"] == "slice"]
    assert alert["statistic"] == "slice_drift" and "32 requests of all traffic (16 clients)" in alert["detail"]
    assert "mallory-" in alert["detail"] and alert["requests"] == ["r0", "r31"]
    # benign traffic alone: two slices, no slice alert; a trailing partial slice is counted as unsliced
    _, _, alerts, summary = score(m, tok, prof, _traffic(0, total=70, seed=1))
    assert [t["p"] > 0.05 for t in summary["traffic_slices"]] == [True, True], summary["traffic_slices"]
    assert summary["slices"] == 2 and summary["unsliced"] == 6 and summary["alerts"]["slice"] == 0
    # a heavy benign user (12 requests of one task) is not named for its volume or self-similarity
    _, _, _, summary = score(m, tok, prof, _traffic(12, seed=3, heavy=12))
    named = [t["client"] for t in summary["traffic_slices"][0]["top_clients"]]
    assert "heavy" not in named and all(c.startswith("mallory-") for c in named), named
    # the campaign is what moves the slice: drift grows with its share
    d = [score(m, tok, prof, _traffic(k, seed=2))[3]["traffic_slices"][0]["drift"] for k in (0, 8, 16)]
    assert d[0] < d[1] < d[2], d


def test_the_online_hook_scores_slices_as_the_offline_scorer_does(setting, through_hook):
    from moeguard.monitor.online import RoutingMonitor

    m, tok, prof = setting
    recs = _traffic(16)
    offline = score(m, tok, prof, recs)[3]["traffic_slices"][0]
    mon = RoutingMonitor(m, prof, flush_every=8)
    got = [r["slice"] for r in through_hook(mon, m, tok, recs)]
    assert all(g is None for g in got[:-1]) and got[-1]["p"] == pytest.approx(offline["p"])
    assert got[-1]["drift"] == pytest.approx(offline["drift"], abs=1e-5) and got[-1]["alert"]["kind"] == "slice"
    assert [t["client"] for t in got[-1]["top_clients"]] == [t["client"] for t in offline["top_clients"]]
    text = __import__("prometheus_client").generate_latest(mon.registry).decode()
    assert 'moeguard_alerts_total{kind="slice",statistic="slice_drift"} 1.0' in text
    assert f"moeguard_traffic_anomaly {-np.log10(offline['p'])}" in text and not mon._slice


def test_slices_leave_every_other_null_as_it_was(setting):
    m, tok, prof = setting
    prompts = {t: [r["input"] for r in load_records(get_task(t), "eval", limit=120)] for t in TASKS}
    plain = build(m, tok, prompts, window=8, seed=0, name="embedded")
    assert set(prof.null) - set(plain.null) == {"slice.drift"}
    assert all(np.array_equal(plain.null[k], prof.null[k]) for k in plain.null)


def test_the_mix_of_real_overlapping_topics_is_found():
    from moeguard.monitor.embed import KernelReference

    rng = np.random.default_rng(1)
    base = rng.normal(size=(40, 8))
    refs = {"a": base, "a-again": base.copy(), "b": base[:20] + 0.05 * rng.normal(size=(20, 8)), "c": rng.normal(size=(30, 8)) + 2}
    kernel = KernelReference(refs=refs, bandwidth=8.0)
    assert np.linalg.eigvalsh(kernel.K).min() < 0          # the unbiased matrix is indefinite here
    x = np.concatenate([base[:10], rng.normal(size=(6, 8)) + 2])
    value, c, _ = slices.fit(kernel, x)
    nearest = np.bincount(kernel.means(x).argmax(1), minlength=4) / len(x)
    f = lambda v: v @ kernel.K @ v - 2 * v @ kernel.means(x).mean(0)   # noqa: E731
    assert f(c) <= f(nearest) + 1e-12 and c[3] > 0.2, c   # the fitted mix puts weight where the slice is


def test_the_mix_is_the_exact_minimum_over_the_simplex():
    from itertools import combinations

    rng = np.random.default_rng(0)
    f = lambda x: x @ K @ x - 2 * x @ m   # noqa: E731
    for _ in range(50):
        T = int(rng.integers(2, 7))
        A = rng.normal(size=(T, T + 2))
        K = A @ A.T / (T + 2) + 1e-9 * np.eye(T)
        m = K @ rng.dirichlet(np.ones(T)) + rng.normal(scale=0.3, size=T)
        c = slices.mix(K, m, np.full(T, 1 / T))
        # the reference, by enumeration: the minimum lies on some support S, where it solves the
        # equality-constrained problem on S (KKT: 2 K_S x + lam 1 = 2 m_S, sum x = 1); the best of
        # the nonnegative solutions over every S is the minimum (K is positive definite: one minimum)
        best = None
        for r in range(1, T + 1):
            for S in map(list, combinations(range(T), r)):
                kkt = np.block([[2 * K[np.ix_(S, S)], np.ones((r, 1))], [np.ones((1, r)), np.zeros((1, 1))]])
                x = np.zeros(T)
                x[S] = np.linalg.solve(kkt, np.r_[2 * m[S], 1.0])[:r]
                if (x >= -1e-12).all() and (best is None or f(x) < f(best)):
                    best = x
        assert abs(c.sum() - 1) < 1e-12 and (c >= 0).all() and f(c) <= f(best) + 1e-9, (f(c), f(best))
        assert np.abs(c - best).max() < 1e-6, (c, best)


def test_bad_slices_are_one_line_errors_and_damaged_profiles_are_refused(setting, tmp_path, capsys, monkeypatch):
    _, _, prof = setting

    def no_model(*a, **k):
        raise AssertionError("the model was resolved before --slice was checked")

    monkeypatch.setattr("moeguard.edge.resolve_model", no_model)
    for bad in ("1", "-4", "5000"):
        out = tmp_path / "P.json"
        assert main(["monitor", "profile", "--out", str(out), "--tasks", "arith-compare", "--limit", "40",
                     "--slice", bad]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"slice is {bad} requests" in err and not out.exists(), err
    back = Profile.from_dict(json.loads(json.dumps(prof.to_dict())), where="P.json")
    assert back.meta["slice"] == 32 and np.array_equal(back.null["slice.drift"], prof.null["slice.drift"])
    for damage in (lambda d: d["null"].pop("slice.drift"), lambda d: d["null"].__setitem__("slice.drift", [0.1]),
                   lambda d: d.__setitem__("slice", 1)):
        d = prof.to_dict()
        damage(d)
        with pytest.raises(MoeguardError, match="damaged routing profile \\(window, early looks, slices, layers or weights"):
            Profile.from_dict(d, where="P.json")


def test_the_cli_profiles_slices_and_score_writes_them(tmp_path, capsys):
    prof = tmp_path / "P.json"
    assert main(["monitor", "profile", "--out", str(prof), "--tasks", ",".join(TASKS), "--limit", "60",
                 "--window", "8", "--early", "none", "--slice", "32"]) == 0
    assert "windows of 8, slices of 32 requests of all traffic" in capsys.readouterr().out
    assert json.loads(prof.read_text())["run"]["settings"]["slice"] == 32
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "_t"}) + "\n" for r in _traffic(16)))
    out = tmp_path / "s"
    assert main(["monitor", "score", "--profile", str(prof), "--log", str(log), "--out", str(out)]) == 0
    assert "1 slice alerts (1 slices of all traffic)" in capsys.readouterr().out
    (row,) = [json.loads(l) for l in (out / "slices.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert row["p"] <= 0.01 and "traffic_slices" not in summary and summary["alerts"]["slice"] == 1
    assert "lorem" not in (out / "slices.jsonl").read_text() + (out / "alerts.jsonl").read_text()   # no prompt
