"""The audit on the local and the Ray backend, side by side in one run: wall time per stage,
the overhead Ray adds on one machine, and whether the numbers are identical.

    python benchmarks/audit_backends.py                   # a small audit of the embedded model
    python benchmarks/audit_backends.py --full            # the `make demo` audit (defaults)
    python benchmarks/audit_backends.py --resume-check    # also: re-run each, every stage cached

On one 2-core machine Ray cannot run jobs in parallel (each job asks for the audit's thread
count), so this measures its overhead; the speed-up comes on a cluster.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

SMALL = ["--tasks", "arith-compare,docstring-topic,record-summary", "--methods", "frequency,gate,reap,ablation",
         "--budgets", "8,32", "--recovery-seeds", "2", "--random-seeds", "2", "--eval-limit", "48",
         "--recovery-eval-limit", "48", "--pool-size", "128", "--samples", "32"]


from moeguard.audit.results import numbers_only  # noqa: E402


def one(backend: str, args: list[str], work: Path, resume_check: bool) -> dict:
    from moeguard.cli import main

    out = work / backend
    t0 = time.perf_counter()
    rc = main(["audit", "--out", str(out), "--backend", backend, "--seed", "0", *args])
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"audit on {backend} failed with exit code {rc}")
    doc = json.loads((out / "results.json").read_text())
    row = {"wall_seconds": round(wall, 1), "stages": {s["stage"]: s["seconds"] for s in doc["stages"]},
           "backend": doc["backend"], "levels": {t: e["risk"]["level"] for t, e in doc["tasks"].items()}}
    if resume_check:
        t0 = time.perf_counter()
        main(["audit", "--out", str(out), "--backend", backend, "--seed", "0", *args])
        again = json.loads((out / "results.json").read_text())
        row["rerun_wall_seconds"] = round(time.perf_counter() - t0, 1)
        row["rerun_all_cached"] = all(s["cached"] for s in again["stages"])
    row["_doc"] = doc
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="the default audit (as make demo runs it)")
    ap.add_argument("--resume-check", action="store_true")
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/audit_backends.json)")
    a = ap.parse_args()
    args = [] if a.full else SMALL
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="moeguard-audit-bench-"))
    rows = {}
    try:
        for backend in ("local", "ray"):
            rows[backend] = one(backend, args, work, a.resume_check)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    same = numbers_only(rows["local"].pop("_doc")) == numbers_only(rows["ray"].pop("_doc"))
    data = {"settings": {"args": args or "defaults (make demo)"}, "backends": rows, "identical_numbers": same,
            "ray_over_local_wall": round(rows["ray"]["wall_seconds"] / rows["local"]["wall_seconds"], 3)}
    path = write_result("audit_backends", data, a.out)
    print(json.dumps({k: v for k, v in data.items() if k != "settings"}, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
