"""Run sweep, recovery, attack and defend-eval on small settings in this process, counting
tokenizer calls; the documents are what ``compare_numbers.py`` compares before and after a refactor.

    python benchmarks/small_studies.py --work /tmp/new            # this checkout
    PYTHONPATH=/tmp/old/src python benchmarks/small_studies.py --work /tmp/old-run   # another one

Writes ``WORK/<study>/...`` and ``WORK/counts.json`` ({study: tokenizer calls, seconds}).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SMALL = {
    "sweep": ["sweep", "--tasks", "arith-compare,docstring-topic", "--methods", "frequency,gate,ablation",
              "--keep", "2,4", "--samples", "16", "--eval-limit", "32", "--collateral-limit", "16",
              "--random-seeds", "3", "--physical-checks", "1"],
    "recovery": ["recovery", "--task", "arith-compare", "--keep", "2", "--strategies", "random,orphan",
                 "--budgets", "8,16", "--seeds", "2", "--samples", "16", "--pool-size", "64", "--eval-limit", "32",
                 "--method", "frequency", "--epochs", "2", "--min-steps", "2"],
    "attack": ["attack", "--task", "arith-compare", "--keep", "4", "--budget", "16", "--methods", "frequency,gate",
               "--modes", "full,lora", "--lr-scales", "1", "--epochs", "2", "--seeds", "2", "--samples", "16",
               "--pool-size", "64", "--eval-limit", "32"],
    "harden": ["harden", "--method", "entangle", "--tasks", "arith-compare,docstring-topic", "--steps", "4"],
    "defend-eval": ["defend-eval", "--tasks", "arith-compare", "--keeps", "4", "--budget", "16",
                    "--methods", "frequency", "--modes", "full", "--lr-scales", "1", "--epochs", "2", "--seeds", "2",
                    "--samples", "16", "--pool-size", "64", "--eval-limit", "32"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--only", default=",".join(SMALL))
    args = ap.parse_args()
    from transformers import PreTrainedTokenizerBase

    from moeguard.cli import main as cli

    calls = {"n": 0}
    for name in ("__call__", "encode"):
        original = getattr(PreTrainedTokenizerBase, name)

        def counted(self, *a, _f=original, **k):
            calls["n"] += 1
            return _f(self, *a, **k)
        setattr(PreTrainedTokenizerBase, name, counted)
    args.work.mkdir(parents=True, exist_ok=True)
    counts = {}
    for study in args.only.split(","):
        argv = [*SMALL[study], "--out", str(args.work / study)]
        if study == "defend-eval":
            argv += ["--hardened", str(args.work / "harden")]
        calls["n"] = 0
        t0 = time.perf_counter()
        rc = cli(argv)
        counts[study] = {"rc": rc, "tokenizer_calls": calls["n"], "seconds": round(time.perf_counter() - t0, 1)}
        print(study, counts[study], flush=True)
    (args.work / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")


if __name__ == "__main__":
    main()
