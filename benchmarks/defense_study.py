"""The defense study: harden the embedded model, then attack base and hardened with the same harness.

    .venv/bin/python benchmarks/defense_study.py [--methods entangle,selective] [--tasks arith-compare,docstring-topic]
        [--keeps 4] [--seeds 3] [--budgets 16,64,256] [--work /tmp/moeguard-defense-study]

For each method it runs the CLI exactly as a user would (`moeguard harden`, timed, with the
peak RSS of the child), then `moeguard defend-eval` against the embedded model (the attack
harness's full grid: full and LoRA, learning rates 0.1x/1x/10x the mode default, 4 and 16
epochs, every attribution method, uniform and budgeted plans, 3 seeds, the from-scratch
baseline), and records utility, the worst-case retention before and after re-alignment, the
area between the attacker's and the from-scratch curves, the extra labels, the protocol
measurement and the issue's goals, as defend-eval judged them. Finished steps are skipped
when the script is re-run with the same --work and the same arguments for that step.
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

UTILITY = "arith-compare,docstring-topic,record-summary,code-naming,stdlib-docs,stdlib-code"


def moeguard(*args: str) -> tuple[float, float]:
    """Run the CLI; (wall seconds, this child's own peak RSS in MB). RUSAGE_CHILDREN's maximum is over
    every child so far: selective's figure would have held entangle's harden and defend-eval peaks."""
    exe = str(Path(sys.executable).with_name("moeguard"))
    t0 = time.perf_counter()
    proc = subprocess.Popen([exe, *args])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, [exe, *args])
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def reusable(done: Path, stamp: Path, command: list[str]) -> bool:
    """A finished step is reused only when it ran with these arguments (a re-run with --seeds 10 and the
    same --work kept the 3-seed numbers and stored them under settings that said 10) and by this code
    (provenance.maker: the commit, the versions, and the source's digest where the commit does not name it;
    a step of another commit was reused and stamped as made now)."""
    from moeguard.provenance import maker

    if not (done.exists() and stamp.exists()):
        return False
    kept = json.loads(stamp.read_text())
    return kept.get("command") == command and kept.get("maker") == maker()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="entangle,selective")
    ap.add_argument("--tasks", default="arith-compare,docstring-topic")
    ap.add_argument("--keeps", default="4")
    ap.add_argument("--seeds", default="3")
    ap.add_argument("--modes", default="full,lora", help="the attacker's fine-tuning modes")
    ap.add_argument("--budget", default="256")
    ap.add_argument("--budgets", default="16,64,256")
    ap.add_argument("--eval-limit", default="200")
    ap.add_argument("--work", default="/tmp/moeguard-defense-study")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from _common import RESULTS, part_made
    from moeguard.provenance import maker

    previous = Path(args.out) if args.out else RESULTS / "defense_study.json"
    # methods studied in earlier invocations (with other tasks) are kept beside this one's
    results = {"methods": json.loads(previous.read_text()).get("methods", {}) if previous.exists() else {}}
    for method in args.methods.split(","):
        hardened = work / method
        timing = work / f"{method}.timing.json"
        harden = ["harden", "--method", method, "--out", str(hardened), "--overwrite"]
        if not reusable(hardened / "moeguard_hardening.json", timing, harden):
            wall, rss = moeguard(*harden)
            timing.write_text(json.dumps({"wall_s": wall, "peak_rss_mb": rss, "command": harden, "maker": maker(),
                                          "made": part_made()}))
        h = json.loads((hardened / "moeguard_hardening.json").read_text())
        ev = work / f"eval-{method}"
        ev_timing = work / f"eval-{method}.timing.json"
        evaluate = ["defend-eval", "--hardened", str(hardened), "--tasks", args.tasks, "--utility-tasks", UTILITY,
                    "--keeps", args.keeps, "--seeds", args.seeds, "--modes", args.modes, "--budget", args.budget,
                    "--budgets", args.budgets, "--eval-limit", args.eval_limit, "--out", str(ev), "--overwrite"]
        # a hardening made again makes its evaluation stale too
        if not reusable(ev / "defense.json", ev_timing, evaluate) or ev_timing.stat().st_mtime < timing.stat().st_mtime:
            ev_wall, _ = moeguard(*evaluate)
            ev_timing.write_text(json.dumps({"wall_s": ev_wall, "command": evaluate, "maker": maker(), "made": part_made()}))
        d = json.loads((ev / "defense.json").read_text())
        cells = {}
        for task, by in d["attacks"].items():
            for keep, v in by.items():
                cells[f"{task}@{keep}"] = {
                    who: {**{k: v[who]["summary"].get(k) for k in (
                        "pruned_retention", "realigned_retention", "realigned_above_baseline", "labels_to_target",
                        "auc", "scratch_retention", "scratch_auc", "area_between", "no_better_than_scratch",
                        "diverged_runs")},
                          "attacker_pick": {k: v[who]["attribution"]["best"][k] for k in ("method", "plan")},
                          # every plan the attacker weighed, so the README's per-plan figures can be checked here
                          "candidates": [{k: c.get(k) for k in ("method", "plan", "route", "retention", "unbuildable")}
                                         for c in v[who]["attribution"].get("candidates", [])],
                          "worst_case": {k: v[who]["worst_case"][k] for k in ("labels", "retention", "argbest")},
                          "runs": len(v[who]["runs"])}
                    for who in ("base", "hardened")} | {"extra_labels": v["extra_labels"]}
        results["methods"][method] = {
            # when its steps were made (reused ones: by this same code, an earlier run); methods kept from earlier
            # runs keep theirs: the file's stamp is the last run's
            "made": {"harden": json.loads(timing.read_text()).get("made"), "evaluate": json.loads(ev_timing.read_text()).get("made")},
            "settings": vars(args),
            "harden": {"seconds_in_loop": h["seconds"], **(json.loads(timing.read_text()) if timing.exists() else {}),
                       "summary": h["summary"], "config": h["config"]},
            "utility": d["utility"], "cells": cells, "protocol": d.get("protocol"), "goals": d["goals"],
            # defense.json carries no timing: the wall clock of the command, as for harden
            "defend_eval_seconds": json.loads(ev_timing.read_text())["wall_s"] if ev_timing.exists() else None,
        }
        write_result("defense_study", results, args.out)
    print(json.dumps({m: v["goals"] for m, v in results["methods"].items()}, indent=1))


if __name__ == "__main__":
    main()
