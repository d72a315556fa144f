"""Does watching a client longer catch task extraction? ``drift`` (a window's squared MMD from benign
use, ``monitor/embed.py``) at horizons of 16 to 128 requests, with the topic mix of the monitor
(each request's nearest topic) and the best-fitting one (``_fitted_mix.py``), side by side.

    .venv/bin/python benchmarks/routing_monitor_horizon.py [--requests 128] [--out JSON]

- **Profile**: as ``routing_monitor.py`` (200 inputs per topic: the embedded tasks' train records,
  and ``../shared/data``'s real text when present), window 16.
- **Clients** of ``--requests`` requests, drawn from inputs the profile never saw (the tasks' train
  records 200-1,400; other real-text items), without repeats:
  - benign: 30 single-topic users (3 per topic), 30 mixed users;
  - *focused* benign users, 30 each: a single-topic user who only asks about the half (or the
    quarter) of the topic nearest an anchor request, as real users have habits. The benchmark's
    other benign users are i.i.d. draws from a topic; these are the harder negatives a long
    horizon meets;
  - extraction, 12 each: a random sample of one task's inputs, and the attack harness's
    ``entropy`` and ``coreset`` active learning choosing ``--requests`` of a pool of 5x as many.
- The first ``n`` requests of each client are one window of ``n``; each attack's AUROC on the raw
  statistic (higher = more anomalous, ties half) against each benign group, and the focused users'
  own AUROC against i.i.d. benign users (how strongly the statistic flags a benign habit).
- **Bias**: each topic's mean statistic over its i.i.d. single-topic users at the longest horizon
  (0 for an unbiased statistic).
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from _common import write_result
from _fitted_mix import fitted_drift
from routing_monitor import real_text

HORIZONS = (16, 32, 64, 128)


def auroc(benign, attack) -> float:
    """P(attack statistic > benign statistic), ties half."""
    b, a = np.asarray(benign), np.asarray(attack)
    return float((a[:, None] > b[None, :]).mean() + (a[:, None] == b[None, :]).mean() / 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    from moeguard.models.loading import load_model
    from moeguard.monitor.fit import build, observe
    from moeguard.realign.strategies.base import Query, get_strategy
    from moeguard.tasks.loaders import load_records
    from moeguard.zoo.train import embedded_tasks

    N = args.requests
    rng = random.Random(args.seed)
    nrng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    m, tok, _ = load_model(None)

    def prompt_of(r):
        return (r.get("input") or r.get("text") or "")[:1200].strip()

    tasks = {t.name: t for t in embedded_tasks()}
    records = {name: [r for r in load_records(t, "train") if prompt_of(r)] for name, t in tasks.items()}
    topics = {name: ([prompt_of(r) for r in rs[:200]], [prompt_of(r) for r in rs[200:1400]]) for name, rs in records.items()}
    topics.update(real_text(200, 1200, rng))
    prof = build(m, tok, {k: v[0] for k, v in topics.items()}, window=16, seed=args.seed, name="embedded")
    emb = {}
    for k, (_, held) in topics.items():
        _, sums, ntok, _ = observe(m, tok, held)
        emb[k] = prof.space(sums, ntok)
    names = [k for k in topics if len(emb[k]) >= N]
    groups: dict[str, list[np.ndarray]] = {k: [] for k in (
        "benign-single-topic", "benign-mixed", "benign-focused-half", "benign-focused-quarter",
        "extraction", "extraction-entropy", "extraction-coreset")}
    for i in range(30):
        t = names[i % len(names)]
        X = emb[t]
        groups["benign-single-topic"].append(X[nrng.choice(len(X), N, replace=False)])
        mix = nrng.integers(0, len(names), N)
        groups["benign-mixed"].append(np.stack([emb[names[j]][nrng.integers(len(emb[names[j]]))] for j in mix]))
        for frac, key in ((0.5, "benign-focused-half"), (0.25, "benign-focused-quarter")):
            near = np.argsort(((X - X[nrng.integers(len(X))]) ** 2).sum(1))[:int(len(X) * frac)]
            groups[key].append(X[nrng.choice(near, N, replace=len(near) < N)])
    task_names = [t for t in tasks if t in names]
    for i in range(12):
        t = task_names[i % len(task_names)]
        groups["extraction"].append(emb[t][nrng.choice(len(emb[t]), N, replace=False)])
        for strategy in ("entropy", "coreset"):
            ix = nrng.choice(len(emb[t]), min(len(emb[t]), 5 * N), replace=False)
            pool = [records[t][200 + j] for j in ix]
            q = Query(model=m, tokenizer=tok, task=tasks[t], pool=pool, candidates=list(range(len(pool))), labeled=[],
                      k=N, rng=random.Random(args.seed * 1000 + i))
            picked = np.asarray(get_strategy(strategy, tasks[t]).select(q))
            nrng.shuffle(picked)                       # sent in no particular order
            groups[f"extraction-{strategy}"].append(emb[t][ix[picked]])
    statistics = {"fitted_mix": lambda x: fitted_drift(prof.kernel, x), "nearest_topic": prof.kernel.drift}
    benign_sets = {"iid_benign": ("benign-single-topic", "benign-mixed"), "single_topic": ("benign-single-topic",),
                   "focused_half": ("benign-focused-half",), "focused_quarter": ("benign-focused-quarter",)}
    results: dict[str, dict] = {}
    bias: dict[str, dict] = {}
    for sname, fn in statistics.items():
        results[sname] = {}
        for n in (h for h in HORIZONS if h <= N):
            value = {g: [fn(x[:n]) for x in xs] for g, xs in groups.items()}
            row = {}
            for g in ("extraction", "extraction-entropy", "extraction-coreset", "benign-focused-half",
                      "benign-focused-quarter"):
                row[g] = {b: round(auroc(sum((value[k] for k in ks), []), value[g]), 4)
                          for b, ks in benign_sets.items() if g not in ks and not (g.startswith("benign") and b.startswith("focused"))}
            results[sname][str(n)] = row
            if n == max(h for h in HORIZONS if h <= N):
                per = {}
                for j, v in enumerate(value["benign-single-topic"]):
                    per.setdefault(names[j % len(names)], []).append(v)
                bias[sname] = {"horizon": n, "mean_by_topic": {t: round(float(np.mean(v)), 4) for t, v in per.items()},
                               "spread_within_topic": round(float(np.mean([np.std(v) for v in per.values()])), 4)}
    path = write_result("routing_monitor_horizon", {
        "requests_per_client": N, "topics": names, "clients": {g: len(v) for g, v in groups.items()},
        "auroc": results, "benign_bias": bias, "seconds": round(time.perf_counter() - t0, 1)}, args.out)
    for sname in results:
        for n, row in results[sname].items():
            print(f"{sname:13s} n={n:>3s} " + "  ".join(f"{g}: {v['iid_benign']:.3f}/{v.get('focused_half', float('nan')):.3f}"
                                                        for g, v in row.items() if g.startswith("extraction")))
    print(f"(AUROC against i.i.d. benign users / focused-half users) written to {path}")


if __name__ == "__main__":
    main()
