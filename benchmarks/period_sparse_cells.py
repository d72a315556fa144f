"""The period test in a sparse cell (``monitor/periodstats.py``): false alarms on benign periods and
detection of a few hijacked requests, where one cell of 2 x 4 is routed to by a small share of
requests, this code beside another commit's (``--before SRC``, in a subprocess of its own).

    .venv/bin/python benchmarks/period_sparse_cells.py [--before /tmp/before/src] [--out FILE]

Each draw: ``periods.Baseline`` (14 periods) fed 14 benign periods of 200 requests, then one more,
benign or with ``k`` requests moved to the sparse cell by ``size`` (their share of the layer's tokens
routed there). Every other cell is Gaussian noise; the sparse cell is 0 except in a ``rate`` share
of requests, which route 0.002-0.02 there. Alerts at 0.01. About 60 s per tree on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import write_result

RATES = (0.0005, 0.002, 0.004, 0.006, 0.01)   # 0.004-0.006: about 1 event a period, sparse some days
CAMPAIGNS = ((2, 0.2), (5, 0.05), (5, 0.2), (10, 0.02), (20, 0.01))
CELL = (1, 2)


def measure(benign_draws: int, campaign_draws: int, seed: int) -> dict:
    import numpy as np

    from moeguard.monitor import periods

    rng = np.random.default_rng(seed)

    def period(rate, hijacked=0, size=0.0, n=200):
        r = rng.normal(0, 0.05, (n, 2, 4)) + rng.normal(0, 0.003, (1, 2, 4))
        r[:, CELL[0], CELL[1]] = np.where(rng.uniform(size=n) < rate, rng.uniform(0.002, 0.02, n), 0.0)
        r[:hijacked, CELL[0], CELL[1]] += size
        return r.mean(0), r.var(0, ddof=1) / n, n

    def last(rate, hijacked=0, size=0.0):
        base = periods.Baseline(baseline=14, alpha=0.01, layers=[0, 1])
        for _ in range(14):
            base.judge({}, *period(rate))
        row: dict = {}
        base.judge(row, *period(rate, hijacked, size))
        return row

    out = {}
    for rate in RATES:
        benign = [last(rate) for _ in range(benign_draws)]
        got = {"benign_alert_rate": float(np.mean([bool(r.get("alert")) for r in benign])),
               "benign_p_below_0.05": float(np.mean([r["p"] <= 0.05 for r in benign])),
               "benign_smallest_p": float(min(r["p"] for r in benign))}
        for k, size in CAMPAIGNS:
            rows = [last(rate, k, size) for _ in range(campaign_draws)]
            got[f"hijacked_{k}_by_{size}_seen"] = float(np.mean([bool(r.get("alert")) and (r["layer"], r["expert"]) == CELL
                                                                 for r in rows]))
        out[str(rate)] = got
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, help="another commit's src folder (a git worktree's), run beside this one")
    ap.add_argument("--benign-draws", type=int, default=300)
    ap.add_argument("--campaign-draws", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--emit", action="store_true", help=argparse.SUPPRESS)   # the --before subprocess: print the numbers
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.emit:
        print(json.dumps(measure(a.benign_draws, a.campaign_draws, a.seed)))
        return
    t0 = time.perf_counter()
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "emit"},
              "now": measure(a.benign_draws, a.campaign_draws, a.seed)}
    if a.before:
        env = {**os.environ, "PYTHONPATH": str(a.before)}
        done = subprocess.run([sys.executable, __file__, "--emit", "--benign-draws", str(a.benign_draws),
                               "--campaign-draws", str(a.campaign_draws), "--seed", str(a.seed)],
                              env=env, capture_output=True, text=True, check=True)
        result["before"] = json.loads(done.stdout)
        result["before_commit"] = subprocess.run(["git", "-C", str(a.before), "rev-parse", "HEAD"], capture_output=True,
                                                 text=True).stdout.strip() or None
    result["seconds"] = round(time.perf_counter() - t0, 1)
    for tree in ("before", "now"):
        for rate, got in result.get(tree, {}).items():
            print(f"{tree:6} rate {rate:>6}  " + "  ".join(f"{k} {v:.3g}" for k, v in got.items()))
    print("written to", write_result("period_sparse_cells", result, a.out))


if __name__ == "__main__":
    main()
