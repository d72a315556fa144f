"""Measure a recorded route-attack run's texts again with the current ``measure`` (no search): the
fields both versions report must be equal, and the fields added since are filled in.

    .venv/bin/python benchmarks/route_attack_remeasure.py [--from benchmarks/results/route_attack_suffix.json]
                                                          [--out JSON]

Written for ``success_on_answer`` (a suffix's share of the model's own answer routed to E, the
answer it gives without the suffix teacher-forced after it), which the suffix run predates.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from _common import write_result

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="source", default=str(RESULTS / "route_attack_suffix.json"))
    ap.add_argument("--out")
    args = ap.parse_args()
    from moeguard.edge import resolve_model, resolve_tasks
    from moeguard.models.adapter import MoEAdapter
    from moeguard.monitor.hijack import HijackConfig
    from moeguard.monitor.hijackmeasure import measure
    from moeguard.tasks.evaluate import evaluate_task

    src = json.loads(Path(args.source).read_text())
    doc = src.get("route_attack", src)
    known = {f.name for f in fields(HijackConfig)}
    cfg = HijackConfig(**{k: v for k, v in doc["config"].items() if k in known})
    torch.manual_seed(cfg.seed)
    model, tok, _ = resolve_model(None).load()
    adapter = MoEAdapter(model)
    task = resolve_tasks([doc["task"]])[0]
    t0 = time.perf_counter()
    plain = evaluate_task(model, tok, task, limit=cfg.eval_limit, batch_size=32, baseline=False)
    rows, mismatched = [], []
    for t in doc["targets"]:
        got = measure(model, tok, adapter, task, replace(cfg, layer=t["layer"], expert=t["expert"]), t["prefix_text"],
                      plain=plain)
        old = t["measured"]
        differ = sorted(k for k in old if got.get(k) != old[k])
        if differ:
            mismatched.append({"layer": t["layer"], "expert": t["expert"], "fields": differ})
        rows.append({"layer": t["layer"], "expert": t["expert"], "success": got["success"],
                     "success_without": got["success_without_prefix"], **{k: got[k] for k in got if k not in old}})
    seconds = time.perf_counter() - t0
    path = write_result("route_attack_remeasure", {
        "source": str(Path(args.source).relative_to(Path(__file__).parent)) if Path(args.source).is_relative_to(Path(__file__).parent) else args.source,
        "source_commit": src.get("git_commit"), "position": cfg.position, "targets": rows,
        "recorded_fields_equal": not mismatched, "mismatched": mismatched, "seconds": round(seconds, 1)},
        args.out or str(RESULTS / f"route_attack_{cfg.position}_remeasured.json"))
    for r in rows:
        print(r)
    print(f"recorded fields equal: {not mismatched}; {seconds:.0f} s; written to {path}")


if __name__ == "__main__":
    main()
