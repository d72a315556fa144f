"""The recovery study on real data: SST-2 (classification) and SciTLDR (summarization).

    .venv/bin/python benchmarks/recovery_shared.py [--shared ../shared/data] [--zoo-model DIR]

Uses the zoo model of the knowledge-loss benchmark (the embedded recipe trained on the SST-2,
WikiText-103 and SciTLDR train splits; ``benchmarks/knowledge_loss.py`` trains and caches it)
and the local-file task definitions in ``examples/tasks``, capped at the recipe's 256-token
context. Skipped, with the reason recorded, when the data or the model is absent.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import write_result
from knowledge_loss import ROOT, shared_tasks
from recovery_study import case_summary, goals

STRATEGIES = {"sst2-local": ["random", "margin", "cluster-uncertainty", "orphan"],
              "scitldr-local": ["random", "nll", "cluster-uncertainty", "orphan"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--zoo-model", type=Path, default=Path(tempfile.gettempdir()) / "moeguard-zoo-shared")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "moeguard-recovery-shared")
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--budgets", default="4,8,16,32,64,128")
    ap.add_argument("--pool-size", type=int, default=300)
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--tasks", default=",".join(STRATEGIES), help="a subset of " + ", ".join(STRATEGIES))
    ap.add_argument("--out")
    args = ap.parse_args()
    if not args.shared.is_dir() or not (args.zoo_model / "config.json").exists():
        missing = args.shared if not args.shared.is_dir() else args.zoo_model
        write_result("recovery_shared", {"skipped": f"{missing} not present (run benchmarks/knowledge_loss.py first)"},
                     args.out)
        return
    torch.set_num_threads(2)
    from moeguard.edge import file_tasks, resolve_tasks
    from moeguard.studies import run_local
    from moeguard.studies.recovery import RecoveryConfig, RecoveryStudy

    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = {p.stem: p for p in shared_tasks(args.shared, args.workdir)}
    cases, started = [], time.perf_counter()
    for name in args.tasks.split(","):
        strategies = STRATEGIES[name]
        task = resolve_tasks([str(paths[name])])[0]
        cfg = RecoveryConfig(task=task.name, keep=args.keep, strategies=tuple(strategies), seeds=args.seeds,
                             budgets=tuple(int(b) for b in args.budgets.split(",")), pool_size=args.pool_size,
                             eval_limit=args.eval_limit)
        t0 = time.perf_counter()
        doc = run_local(RecoveryStudy(), cfg, model=str(args.zoo_model), jobs=args.workdir / f"{name}-keep{args.keep}",
                        threads=2, tasks=file_tasks([task]))
        doc["seconds"] = round(time.perf_counter() - t0, 1)
        cases.append(case_summary(doc))
        c = cases[-1]
        print(f"{name}: full {c['full_score']:.1f}, pruned {c['pruned_retention']:.1f}%; " + "; ".join(
            f"{n} {v['labels_to_target']}" for n, v in c["strategies"].items()), flush=True)
        write_result("recovery_shared", {"settings": {k: str(v) for k, v in vars(args).items()},
                                         "cases": cases, "goals": goals(cases, args.seeds),
                                         "seconds": round(time.perf_counter() - started, 1)}, args.out)


if __name__ == "__main__":
    main()
