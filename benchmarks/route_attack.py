"""Routing hijack on the embedded model: every expert of every MoE layer, a prefix of at most 20
tokens (the issue's goal: >= 90% held-out routing success on at least half of each layer's experts).

    .venv/bin/python benchmarks/route_attack.py [--prefix-tokens 20] [--steps 80] [--task arith-compare] [--out JSON]
                                                [--position suffix [--follow-tokens 16]]

With ``--position suffix`` the crafted text follows the input and the model's reply is measured
(``results/route_attack_suffix.json``); the goal is stated for a prefix and judged only there.

Runs ``moeguard.monitor.routeattack.run`` (the command's own code) into a scratch folder and
records its document with the time per target; the experts that resist are listed per layer.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _common import write_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix-tokens", type=int, default=20)
    ap.add_argument("--position", default="prefix", help="prefix, or suffix (the model's reply follows it)")
    ap.add_argument("--follow-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--candidates", type=int, default=96)
    ap.add_argument("--task", default="arith-compare")
    ap.add_argument("--layers", default=None, help="comma-separated MoE layers (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    from moeguard.edge import resolve_model, resolve_tasks
    from moeguard.monitor.hijack import HijackConfig
    from moeguard.monitor.routeattack import run, targets

    torch.manual_seed(args.seed)
    handle = resolve_model(None)
    task = resolve_tasks([args.task])[0]
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    pairs = targets(handle, layers, None, True)
    cfg = HijackConfig(layer=pairs[0][0], expert=pairs[0][1], prefix_tokens=args.prefix_tokens, steps=args.steps,
                       candidates=args.candidates, seed=args.seed, position=args.position,
                       follow_tokens=args.follow_tokens)
    work = Path(tempfile.mkdtemp(prefix="moeguard-route-attack-"))
    t0 = time.perf_counter()
    try:
        doc = run(handle, task, pairs, cfg, out=work / "ra")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    s = doc["summary"]
    table = {l: {"hijacked": v["hijacked"], "resist": v["resist"], "share_hijacked": v["share_hijacked"]}
             for l, v in s["layers"].items()}
    path = write_result("route_attack" if args.position == "prefix" else f"route_attack_{args.position}", {"seconds": round(seconds, 1), "seconds_per_target": round(seconds / len(pairs), 1),
                                         "summary": s, "route_attack": doc}, args.out)
    for l, v in table.items():
        print(f"layer {l}: hijacked {v['hijacked']} ({100 * v['share_hijacked']:.0f}%), resist {v['resist']}")
    print(f"goal met: {s['goal']['met']}; {seconds:.0f} s; written to {path}")


if __name__ == "__main__":
    main()
