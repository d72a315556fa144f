"""What the clients' test (``monitor score --period-clients``) costs for one period, by the period's
size and the model's cells: the time and peak memory of what ``periods.score_periods`` does for a
period whose baseline holds ``--baseline`` periods of the same size in the run.

    .venv/bin/python benchmarks/period_clients_cost.py [--grid 1000:32,4000:256,16000:32:0.3,...] [--out JSON]

The inputs are synthetic, made here: the test's cost depends on the sizes of its arrays, not on
what they hold. Each request has an embedding (``--dim`` values, unit length, around one of 64
topics, as the profile's space gives them), a residual in every (layer, expert) cell and a client
(clients of 4-48 requests). A grid entry's third field, a share, makes that share of the period's
requests exact copies of baseline requests (a log of templated prompts and retries: ``nearest``
selects those rows again without their copies). The steps timed are ``score_periods``' own calls, in its order (the baseline's residuals gathered
a cell at a time since 2026-12-06, ``pool_at``; before, ``pool``: copied whole first):

- ``baseline``: ``periodclients.Earlier`` over the baseline periods (the null clients' matches);
- ``match``: ``Earlier.match``, each of the period's requests' ``K`` nearest baseline requests;
- ``test``: ``periodclients.clients_test`` in every cell;
- ``match_argpartition`` (not in the total): the same matching with numpy's one-core ``argpartition``,
  as ``nearest`` selected until 2026-12-06, in the same run for the ratio (``match_speedup``); its
  matches are checked to be the same sets;
- ``keep`` and ``read_back``: the period's requests written to ``period_requests/`` and read back
  (``periodrequests.save`` and ``read``), what a daily run adds to keep them for the next (``file_mib``).

Peak memory is tracemalloc's (numpy's arrays are traced) over baseline, match and test, above what the inputs
hold. It does not see torch's: ``torch.topk`` in ``nearest`` returns [rows, K] indices and keeps a
buffer of about 16 bytes a pool row per thread (3.4 MiB at a pool of 224,000). The model's replay of the requests, which a run also pays (about a forward pass per request),
is not here. ``pairs``: period requests x baseline requests, what ``match`` grows with.
"""

from __future__ import annotations

import argparse
import hashlib
import time
import tracemalloc

import numpy as np

from _common import write_result


def synthetic(n: int, days: int, cells: int, dim: int, rng: np.random.Generator) -> tuple[list, list, np.ndarray]:
    """``days`` + 1 periods of ``n`` requests: embeddings [n, dim] each, clients [n] each, residuals [(days + 1) n, cells]."""
    topics = rng.normal(size=(64, dim))
    xs, who = [], []
    for d in range(days + 1):
        x = topics[rng.integers(0, 64, n)] + 0.5 * rng.normal(size=(n, dim))
        xs.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        sizes = []
        while sum(sizes) < n:
            sizes.append(int(rng.integers(4, 49)))
        who.append([f"d{d}-c{c}" for c, s in enumerate(sizes) for _ in range(s)][:n])
    return xs, who, 0.05 * rng.normal(size=((days + 1) * n, cells))


def argpartition_nearest(x: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
    """``periodclients.nearest`` as it selected before 2026-12-06 (numpy's ``argpartition``, one core),
    its rows sorted: the reference the ``topk`` selection is timed and checked against."""
    from moeguard.monitor import periodclients

    pn = (pool**2).sum(1)
    out = np.full((len(x), k), -1, dtype=np.int64)
    rows = max(32, min(512, periodclients.CHUNK_VALUES // max(1, len(pool))))
    for s in range(0, len(x), rows):
        q = x[s:s + rows]
        qn = (q**2).sum(1)[:, None]
        d2 = q @ pool.T
        d2 *= -2
        d2 += pn
        d2[d2 + qn <= 1e-9 * (qn + pn)] = np.inf
        idx = np.argpartition(d2, k - 1, axis=1)[:, :k]
        idx[np.isinf(np.take_along_axis(d2, idx, 1))] = -1
        out[s:s + rows] = idx
    return np.sort(out, axis=1)


def one(n: int, cells: int, *, days: int, dim: int, seed: int, repeats: float = 0.0) -> dict:
    # imported here, not inside the first timed step: ``nearest`` selects with torch, and the test's
    # moderated t imports scipy.stats (about 3 s the first time: the files before 2026-12-06's
    # period_clients_cost_skip.json carry it in their first row's ``test``)
    import scipy.stats  # noqa: F401
    import torch  # noqa: F401

    from moeguard.monitor import periodclients

    rng = np.random.default_rng([seed, n, cells])
    xs, who, flat = synthetic(n, days, cells, dim, rng)
    copies = rng.choice(n, size=int(round(repeats * n)), replace=False)
    xs[days][copies] = np.concatenate(xs[:days])[rng.integers(0, days * n, len(copies))]
    at = np.arange(days * n)                                # the baseline's requests, as score_periods holds them
    idx = np.arange(days * n, (days + 1) * n)               # the period's
    seconds: dict[str, float] = {}
    tracemalloc.start()
    t = time.perf_counter()
    before = periodclients.Earlier(xs[:days], who[:days])
    seconds["baseline"] = time.perf_counter() - t
    t = time.perf_counter()
    nn = before.match(xs[days])
    seconds["match"] = time.perf_counter() - t
    t = time.perf_counter()
    row: dict = {}
    periodclients.clients_test(row, before, nn, r=flat[idx], clients=who[days], pool_r=flat, pool_at=at, alpha=0.01,
                               cells=[[0, c] for c in range(cells)])
    seconds["test"] = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t = time.perf_counter()
    reference = argpartition_nearest(xs[days], before.pool, periodclients.K)
    seconds["match_argpartition"] = time.perf_counter() - t
    if not np.array_equal(reference, np.sort(nn, axis=1)):   # -1s (no match left) sort first in both
        raise SystemExit(f"{n} requests: topk and argpartition matched different requests")
    import tempfile
    from pathlib import Path

    from moeguard.monitor import periodrequests

    shape = (1, cells)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [{"index": 0, "start": "0", "requests": n, "neighbours": "", "state": {}}]
        t = time.perf_counter()
        periodrequests.save(Path(tmp), rows, x=xs[days], resid=flat[idx].reshape(n, *shape), clients=who[days],
                            parts={0: np.arange(n)}, baseline=days, digest="", history=None)
        seconds["keep"] = time.perf_counter() - t
        t = time.perf_counter()
        back = periodrequests.read(Path(tmp) / "periods.jsonl", rows, dim=dim, shape=shape)
        seconds["read_back"] = time.perf_counter() - t
        size = (Path(tmp) / periodrequests.REQUESTS_FOLDER / "0.npz").stat().st_size
        assert np.array_equal(back[0][1].reshape(n, cells), flat[idx])
    return {"requests": n, "repeats": repeats, "baseline_requests": days * n, "cells": cells, "pairs": n * days * n,
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "seconds_test_total": round(sum(v for k, v in seconds.items() if k not in ("keep", "read_back", "match_argpartition")), 2),
            "match_speedup": round(seconds["match_argpartition"] / seconds["match"], 2),
            "file_mib": round(size / 2**20, 1),
            "peak_mib": round(peak / 2**20, 1), "inputs_mib": round((flat.nbytes + sum(x.nbytes for x in xs)) / 2**20, 1),
            "clients_p": row.get("clients_p"), "nn_sha": hashlib.sha256(nn.tobytes()).hexdigest()[:16],
            "null_nn_sha": hashlib.sha256(before._nn.tobytes()).hexdigest()[:16]}   # the null's matches (skip)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="1000:32,1000:256,4000:256,16000:32,16000:32:0.3,16000:256,32000:256",
                    help="requests a period:(layer, expert) cells (32 the embedded model's, 256 Mixtral's)[:share of "
                         "the period's requests that repeat a baseline request], comma-separated")
    ap.add_argument("--baseline", type=int, default=14, help="baseline periods in the run")
    ap.add_argument("--dim", type=int, default=64, help="the profile's embedding size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for pair in args.grid.split(","):
        n, cells, *share = pair.split(":")
        r = one(int(n), int(cells), days=args.baseline, dim=args.dim, seed=args.seed, repeats=float(share[0]) if share else 0.0)
        rows.append(r)
        print(f"{r['requests']:6d} requests ({r['repeats']:.0%} repeats), {r['cells']:4d} cells: {r['seconds_test_total']:7.1f} s {r['seconds']}, peak {r['peak_mib']} MiB "
              f"(inputs {r['inputs_mib']} MiB), file {r['file_mib']} MiB, match {r['match_speedup']}x argpartition", flush=True)
    print("\n| requests a period | repeats | cells | seconds | match | match by argpartition | test | peak MiB | kept file MiB, write / read s |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['requests']} | {r['repeats']:.0%} | {r['cells']} | {r['seconds_test_total']} | {r['seconds']['match']} | "
              f"{r['seconds']['match_argpartition']} | {r['seconds']['test']} | "
              f"{r['peak_mib']} | {r['file_mib']}, {r['seconds']['keep']} / {r['seconds']['read_back']} |")
    path = write_result("period_clients_cost", {"setting": {"baseline": args.baseline, "dim": args.dim, "seed": args.seed},
                                                "rows": rows}, args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
