"""The audit end to end at real dimensions, as the number of experts grows (issue 19's "growth
with E" for the whole audit, not only its stages).

    .venv/bin/python benchmarks/audit_growth.py [--presets olmoe-1b-7b@E8,olmoe-1b-7b,olmoe-1b-7b@E128]
                                               [--workdir /tmp/moeguard-scale] [--out JSON]

Each preset's synthetic checkpoint (``scale.py``'s writer: bf16, 2 layers, random weights; reused
when there) is audited by ``moeguard audit`` in its own process, with a small, fixed workload so
that only E changes (every preset routes top-8, as OLMoE does):
- two tasks (a perplexity task and a classification task), ``--samples`` calibration samples,
  ``gradient`` and ``frequency`` attribution, one keep level (a quarter of the experts),
  ``--eval-limit`` records;
- no deletion curves: every keep level from E - 1 down, E levels by construction (at E = 64 they
  made one task's sweep take 21 minutes);
- no recovery by default. ``--recovery`` adds it with a fixed small workload (the
  classification task, the ``random`` and ``orphan`` strategies, one budget of 8 labels, one seed,
  a pool of 16, full fine-tuning of the pruned model, which keeps E/4 experts) and writes
  ``audit_growth_recovery.json``. The recovery trains the *pruned* model, so it fits where full
  fine-tuning of the whole model does not.

Recorded per preset: the wall time, the peak RSS of the audit process (``wait4``), the time of
each stage (from its ``results.json`` stage log). Weights are random: costs only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_result
from scale import write

GB = 1 << 30


def stage_seconds(doc: dict) -> dict[str, float]:
    """Each stage's seconds, from the audit document's stage log."""
    return {st["stage"]: round(float(st["seconds"]), 1) for st in doc.get("stages") or [] if not st.get("cached")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="olmoe-1b-7b@E8,olmoe-1b-7b,olmoe-1b-7b@E128")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moeguard-scale"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tasks", default="stdlib-code,arith-compare")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--eval-limit", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--update", action="store_true", help="merge these presets into the existing result file")
    ap.add_argument("--recovery", action="store_true", help="run the recovery stage too (audit_growth_recovery.json)")
    ap.add_argument("--out")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = {}
    target = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{_name(args)}.json"
    if args.update and target.exists():
        rows = json.loads(target.read_text())["presets"]
    for preset in args.presets.split(","):
        ckpt, rec = write(preset, args.layers, args.workdir)
        config = json.loads((ckpt / "config.json").read_text())
        E = next(config[k] for k in ("num_experts", "num_local_experts") if k in config)
        keep = max(1, E // 4)
        with tempfile.TemporaryDirectory(prefix="audit-growth-", dir=args.workdir) as work:
            out = Path(work) / "audit"
            cmd = [sys.executable, "-m", "moeguard.cli", "audit", "--out", str(out), "--model", str(ckpt),
                   "--tasks", args.tasks, "--samples", str(args.samples), "--methods", "gradient,frequency",
                   "--keeps", str(keep), "--eval-limit", str(args.eval_limit), "--collateral-limit", str(args.eval_limit),
                   "--random-seeds", "1", "--physical-checks", "1", "--no-deletion-curves",
                   "--threads", str(args.threads)]
            cmd += (["--recovery-keep", str(keep),   # the sweep's E/4 (the default, max(top-k, E/4), is 8 of 8 at E = 8)
                     "--recovery-tasks", "arith-compare", "--strategies", "random,orphan", "--budgets", "8",
                     "--recovery-seeds", "1", "--pool-size", "16", "--recovery-eval-limit", str(args.eval_limit)]
                    if args.recovery else ["--no-recovery"])
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            print(f"{preset}: E={E}, keep {keep}", file=sys.stderr, flush=True)
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t
            err = proc.stderr.read()
            code = os.waitstatus_to_exitcode(status)
            row = {"experts": E, "keep": keep, "checkpoint_bytes": rec["bytes"], "wall_seconds": round(wall, 1),
                   "peak_rss_bytes": usage.ru_maxrss * 1024, "exit": code}
            if code:
                row["error"] = err.strip().splitlines()[-1:] if err.strip() else ["(no message)"]
            else:
                doc = json.loads((out / "results.json").read_text())
                row["stages"] = stage_seconds(doc)
        rows[preset] = row
        _write(rows, args)   # after every preset: a long run keeps what it measured
        print(f"  {wall:7.1f} s  peak {row['peak_rss_bytes'] / GB:5.2f} GiB  exit {code}  {row.get('stages', row.get('error'))}",
              file=sys.stderr, flush=True)
    print(f"written {_write(rows, args)}")


def _name(args) -> str:
    return "audit_growth_recovery" if args.recovery else "audit_growth"


def _write(rows: dict, args) -> Path:
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out", "update")}
    ok = sorted((r for r in rows.values() if not r.get("exit")), key=lambda r: r["experts"])
    base = ok[0]["wall_seconds"] if ok else 1.0
    for r in rows.values():
        r["wall_vs_fewest_experts"] = round(r["wall_seconds"] / base, 2)
    return write_result(_name(args), {"gpu": False, "note": "CPU figures only: no GPU was lent to this task",
                                      "settings": settings, "presets": rows}, args.out)


if __name__ == "__main__":
    main()
