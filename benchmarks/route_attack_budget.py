"""How long a prefix the experts that resist route-attack need (issue 16): the command's own search
at growing budgets on the targets of ``results/route_attack.json`` that stayed under 90% held-out
success with 20 tokens.

    .venv/bin/python benchmarks/route_attack_budget.py [--budgets 40,80] [--steps-per-token N] [--out JSON]

Each budget runs ``moeguard.monitor.routeattack.run`` (the same search, steps, candidates, inputs
and seed as the source run; only ``prefix_tokens`` changes) on the targets still under 90%: a target
that reaches it stops there, so each target's entry gives the smallest budget tried that hijacks it.
The bounds benchmark (``route_attack_bounds.py``) found continuous prefixes that drive the router at
20 positions as broad mixtures of 15-55 tokens each; a longer discrete prefix is the attacker's way to
spread attention over more tokens. The per-layer table says what the goal's rule would read at each
budget (the goal itself fixes 20 tokens).

``--steps-per-token N`` sizes the search to the prefix: ``N * budget`` steps instead of the source's
(80 steps at 20 tokens is 4 per position; at 40 tokens the same 80 steps visit each position half as
often, which is what the first 40-token run measured).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from _common import RESULTS, write_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default=str(RESULTS / "route_attack.json"))
    ap.add_argument("--budgets", default="40,80")
    ap.add_argument("--work", help="keep each budget's route-attack folder here (resumable); default: a scratch folder")
    ap.add_argument("--steps-per-token", type=int, help="search steps per prefix position (default: the source's steps)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.steps_per_token is not None and args.steps_per_token < 1:
        ap.error(f"--steps-per-token must be >= 1, got {args.steps_per_token}")
    from moeguard.edge import resolve_model, resolve_tasks
    from moeguard.monitor.hijack import HijackConfig
    from moeguard.monitor.routeattack import GOAL_SUCCESS, outcome, run

    src = json.load(open(args.source))["route_attack"]
    budgets = [int(b) for b in args.budgets.split(",")]
    cfg = HijackConfig(**src["config"])
    torch.manual_seed(cfg.seed)
    handle = resolve_model(None)
    task = resolve_tasks([src["task"]])[0]
    base = {(t["layer"], t["expert"]): t["measured"] for t in src["targets"]}
    entries = {k: {"layer": k[0], "expert": k[1], "budgets": {str(cfg.prefix_tokens): _row(m)}} for k, m in base.items()}
    pending = [k for k, m in base.items() if m["success"] < GOAL_SUCCESS]
    runs = []
    for b in budgets:
        if not pending:
            break
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="moeguard-route-budget-"))
        t0 = time.perf_counter()
        try:   # run()'s folder resumes: a re-run with the same --work continues an interrupted budget
            steps = cfg.steps if args.steps_per_token is None else args.steps_per_token * b
            doc = run(handle, task, pending, replace(cfg, prefix_tokens=b, steps=steps), out=work / f"budget-{b}",
                      overwrite=bool(args.work))
        finally:
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
        seconds = time.perf_counter() - t0
        runs.append({"prefix_tokens": b, "steps": steps, "targets": len(pending), "seconds": round(seconds, 1),
                     "seconds_per_target": round(seconds / len(pending), 1)})
        for t in doc["targets"]:
            entries[(t["layer"], t["expert"])]["budgets"][str(b)] = {**_row(t["measured"]), "prefix_text": t["prefix_text"]}
        pending = [(t["layer"], t["expert"]) for t in doc["targets"] if t["measured"]["success"] < GOAL_SUCCESS]
        print(f"{b} tokens: {len(doc['targets']) - len(pending)} of {len(doc['targets'])} reach "
              f"{GOAL_SUCCESS:.0%}; {seconds:.0f} s", flush=True)
    tried = [cfg.prefix_tokens] + [r["prefix_tokens"] for r in runs]
    for e in entries.values():
        # an expert the inputs reach at >= 90% without the text is not hijacked by it (routeattack.outcome)
        hit = [int(b) for b, r in e["budgets"].items() if outcome(r) == "hijacked"]
        e["smallest_budget"] = min(hit) if hit else None
    layers = {}
    for (l, _), e in sorted(entries.items()):
        row = layers.setdefault(str(l), {"experts": 0, **{str(b): 0 for b in tried}})
        row["experts"] += 1
        for b in tried:
            row[str(b)] += e["smallest_budget"] is not None and e["smallest_budget"] <= b
    table = {l: {**r, "share_at": {b: round(r[str(b)] / r["experts"], 4) for b in map(str, tried)}} for l, r in layers.items()}
    path = write_result("route_attack_budget", {"source": Path(args.source).name, "task": task.name,
                                                "config": cfg.to_dict(), "budgets": tried, "runs": runs,
                                                "hijacked_by_budget": table,
                                                "targets": sorted(entries.values(), key=lambda e: (e["layer"], e["expert"]))},
                        args.out)
    for l, r in table.items():
        print(f"layer {l}: " + ", ".join(f"{r[str(b)]}/{r['experts']} at <= {b}" for b in tried))
    print(f"written to {path}")


def _row(m: dict) -> dict:
    return {"success": m["success"], "success_without_prefix": m["success_without_prefix"], "load_max": m["load_max"],
            "task_score": m["task"]["score"], "task_with_prefix": m["task"]["with_prefix"]}


if __name__ == "__main__":
    main()
