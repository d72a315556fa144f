"""The test suite's wall time in one process against `make test`'s pytest-xdist workers, side by
side in one run: CI has 10 minutes on 2 cores, and this is the margin.

    python benchmarks/suite_workers.py                 # one run of each setting
    python benchmarks/suite_workers.py --repeats 2     # settings take turns (order rotates)

Settings:
- ``serial``: one pytest process, torch on two threads (the suite as it ran before workers);
- ``workers``: what `make test` runs: ``-n WORKERS --dist worksteal`` with OpenMP, MKL and
  OpenBLAS capped at one thread (and OpenMP's waiting passive) before Python starts;
- ``workers_uncapped`` (``--uncapped``): the workers without the caps, where two processes'
  OpenMP pools spin against each other.

Run it alone: a second torch job on the same cores slows both.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_env(name: str) -> dict[str, str]:
    """The Makefile's ``NAME := K=V ...`` environment: what `make test` sets, read rather than copied."""
    m = re.search(rf"^{name} := (.*)$", (ROOT / "Makefile").read_text(), re.M)
    if m is None:
        raise SystemExit(f"suite_workers: the Makefile has no '{name} :=' line (expected K=V pairs)")
    return dict(kv.split("=", 1) for kv in m.group(1).split())


CAPS = make_env("TESTENV")   # the thread caps
BASE = make_env("RUNENV")    # offline, and bytecode written


def settings(workers: int, uncapped: bool) -> dict[str, tuple[list[str], dict[str, str]]]:
    xdist = ["-n", str(workers), "--dist", "worksteal"]
    out = {"serial": (["-p", "no:xdist"], {}), "workers": (xdist, CAPS)}
    if uncapped:
        out["workers_uncapped"] = (xdist, {})
    return out


def summary(text: str) -> dict[str, int]:
    """Counts from pytest's last line ("1750 passed, 1 skipped, 2 xfailed ... in 288.0s")."""
    last = [l for l in text.strip().splitlines() if re.search(r"\d+ (passed|failed)", l)]
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|xfailed|errors?)", last[-1] if last else "")}


def one(python: str, args: list[str], env: dict[str, str]) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in CAPS}
    full.update(BASE, **env)
    t0 = time.perf_counter()
    p = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT, env=full,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 1), "returncode": p.returncode, **summary(p.stdout)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"), help="the venv's python")
    ap.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (make test's TEST_WORKERS)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each setting, taking turns")
    ap.add_argument("--uncapped", action="store_true", help="also time the workers without the thread caps")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/suite_workers.json)")
    a = ap.parse_args(argv)
    if a.workers < 1 or a.repeats < 1:
        print("suite_workers: --workers and --repeats must be at least 1", file=sys.stderr)
        return 2
    runs = settings(a.workers, a.uncapped)
    names = list(runs)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(a.repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            args, env = runs[name]
            r = one(a.python, args, env)
            results[name].append(r)
            print(f"{name:>17}: {r['wall_s']:7.1f} s  rc {r['returncode']}  "
                  f"{r.get('passed', 0)} passed, {r.get('failed', 0)} failed", flush=True)
    best = {n: min(r["wall_s"] for r in v) for n, v in results.items()}
    ratio = {n: round(best[n] / best["serial"], 3) for n in names}
    path = write_result("suite_workers", {
        "workers": a.workers, "repeats": a.repeats, "caps": CAPS, "runs": results,
        "best_wall_s": best, "ratio_to_serial": ratio, "ci_limit_s": 600,
        "all_passed": all(r["returncode"] == 0 for v in results.values() for r in v)}, a.out)
    print("\n".join(f"{n:>17}: best {best[n]:7.1f} s  {ratio[n]:.3f}x serial" for n in names))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
