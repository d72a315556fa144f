"""Recovery under a memory cap: an audit with the recovery study (`--recovery-mode lora`) on a
real-dimension synthetic checkpoint, uncapped and under `--max-memory` at a quarter of its float32
weights. Records each run's wall time, peak anonymous and file-backed resident memory (sampled
from /proc, as benchmarks/offload.py does), the capped run's throughput against the uncapped one,
and whether the two audits' recovery numbers are equal (the capped run cannot trace: it says why).

    python benchmarks/offload_recovery.py [--preset olmoe-1b-7b] [--layers 2] [--cap-share 0.25]

Run it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from offload import run_measured  # noqa: E402
from scale import write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moeguard-scale"))
    ap.add_argument("--preset", default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--cap-share", type=float, default=0.25, help="the cap as a share of the float32 weights")
    ap.add_argument("--keep", type=int, default=16, help="experts per layer the pruning and recovery keep")
    ap.add_argument("--budgets", default="4,8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from moeguard.audit.results import numbers_only

    ckpt, rec = write(args.preset, args.layers, args.workdir)
    fp32 = rec["bytes"] * 2   # the synthetic checkpoint is bfloat16; commands compute in float32
    cap_bytes = int(fp32 * args.cap_share)
    moeguard = [sys.executable, "-m", "moeguard.cli"]
    audit = ["audit", "--model", str(ckpt), "--tasks", "arith-compare", "--methods", "frequency",
             "--keeps", str(args.keep), "--recovery-keep", str(args.keep),
             "--random-seeds", "1", "--eval-limit", "8", "--samples", "4", "--physical-checks", "0",
             "--no-deletion-curves", "--recovery-mode", "lora", "--strategies", "random", "--budgets", args.budgets,
             "--recovery-seeds", "1", "--pool-size", "16", "--recovery-eval-limit", "8", "--threads", "2"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"uncapped": run_measured(moeguard + [*audit, "--out", f"{tmp}/a"]),
                "capped": run_measured(moeguard + [*audit, "--out", f"{tmp}/b", "--max-memory", str(cap_bytes)])}
        docs = {k: json.loads((Path(tmp) / d / "results.json").read_text()) for k, d in (("uncapped", "a"),
                                                                                       ("capped", "b"))
                if (Path(tmp) / d / "results.json").exists()}
        leftovers = sorted(str(p) for pat in ("moeguard-offload-*", "moeguard-pruned-*")
                           for p in Path(tempfile.gettempdir()).glob(pat))
    for r in runs.values():
        r["peak_anon_over_cap"] = round(r["peak_anon_bytes"] / cap_bytes, 2)
    equal = None
    stages = {}
    if len(docs) == 2:
        recs = {k: {t: {**e["recovery"]} for t, e in d["tasks"].items()} for k, d in docs.items()}
        skipped = {t: r.pop("detectability", None) for t, r in recs["capped"].items()}
        for r in recs["uncapped"].values():
            r.pop("detectability", None)
        equal = numbers_only(recs["uncapped"]) == numbers_only(recs["capped"])
        stages = {k: {s["stage"]: s["seconds"] for s in d["stages"]} for k, d in docs.items()}
    result = {
        "checkpoint": {"path": str(ckpt), "preset": args.preset, "layers": args.layers, "bytes_on_disk": rec["bytes"],
                       "float32_bytes": fp32},
        "max_memory_bytes": cap_bytes, "cap_share_of_float32": args.cap_share,
        "settings": " ".join(audit[3:]),
        "runs": runs,
        "capped_over_uncapped_seconds": round(runs["capped"]["seconds"] / runs["uncapped"]["seconds"], 2),
        "capped_over_uncapped_recovery_seconds": (round(stages["capped"]["recovery"] / stages["uncapped"]["recovery"], 2)
                                                  if stages else None),
        "capped_over_uncapped_peak_anon": round(runs["capped"]["peak_anon_bytes"] / runs["uncapped"]["peak_anon_bytes"], 2),
        "recovery_numbers_equal": equal,
        "capped_trace": skipped if len(docs) == 2 else None,
        "stage_seconds": stages,
        "temporary_folders_left": leftovers,
    }
    path = write_result("offload_recovery", result, args.out)
    for name, r in runs.items():
        print(f"{name}: rc {r['rc']}, {r['seconds']} s, peak anon {r['peak_anon_bytes'] / 2**30:.2f} GiB "
              f"(file-backed {r['peak_file_bytes'] / 2**30:.2f} GiB)")
    print(f"cap {cap_bytes / 2**30:.2f} GiB ({args.cap_share:.0%} of {fp32 / 2**30:.2f} GiB float32); capped/uncapped "
          f"time {result['capped_over_uncapped_seconds']}x, peak anon {result['capped_over_uncapped_peak_anon']}x; "
          f"recovery numbers equal: {equal}; written to {path}")


if __name__ == "__main__":
    main()
