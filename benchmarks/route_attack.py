"""Routing hijack on the embedded model: every expert of every MoE layer, a prefix of at most 20
tokens (the issue's goal: >= 90% held-out routing success on at least half of each layer's experts).

    .venv/bin/python benchmarks/route_attack.py [--prefix-tokens 20] [--steps 80] [--task arith-compare] [--out JSON]
                                                [--position suffix [--follow-tokens 16]]

With ``--position suffix`` the crafted text follows the input and the model's reply is measured
(``results/route_attack_suffix.json``); the goal is stated for a prefix and judged only there.

``--benign-vocab K``: the crafted text may use only the K tokens most frequent in the routing
monitor benchmark's benign profile texts (its topics' inputs, tokenized): an attacker who keeps the
text's own tokens ordinary, against the monitor's token statistics. ``--targets L:E,...`` runs
those targets only.

``--evade-p P``: the attacker holds the routing monitor benchmark's own profile (the same topics,
seed and window, prompt statistics) and keeps each request's monitor p-value at or above P where it
can (``moeguard.monitor.evasion``): the adaptive attacker, the worst case for the monitor. Written
with ``_evading`` in the name. ``--evade-profile-seed S`` (S other than ``--seed``): the attacker
builds the same kind of profile with its own seed instead (other real-text samples, other
fit/calibration split, other random projection): an attacker who knows how the monitor works and
which tasks it serves, but not the owner's profile (``_evading_own_profile`` in the name).

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
    ap.add_argument("--benign-vocab", type=int, default=None, help="only the K tokens most frequent in benign traffic")
    ap.add_argument("--targets", default=None, help="comma-separated layer:expert pairs (default: every expert)")
    ap.add_argument("--evade-p", type=float, default=0.0, help="screen candidates by the monitor's p-value")
    ap.add_argument("--evade-profile-seed", type=int, default=None, help="the attacker's own profile seed (default: --seed)")
    ap.add_argument("--evade-order", default="evasion", help="evasion (first) or hijack (routing success up to 90% first)")
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
    if args.targets:
        pairs = [tuple(int(x) for x in p.split(":")) for p in args.targets.split(",")]
    vocabulary = _benign_vocabulary(args.benign_vocab, args.seed) if args.benign_vocab else None
    cfg = HijackConfig(layer=pairs[0][0], expert=pairs[0][1], prefix_tokens=args.prefix_tokens, steps=args.steps,
                       candidates=args.candidates, seed=args.seed, position=args.position,
                       follow_tokens=args.follow_tokens, evade_p=args.evade_p, evade_order=args.evade_order)
    own = args.evade_profile_seed is not None and args.evade_profile_seed != args.seed
    evade = _monitor_profile(args.evade_profile_seed if own else args.seed) if args.evade_p else None
    work = Path(tempfile.mkdtemp(prefix="moeguard-route-attack-"))
    t0 = time.perf_counter()
    try:
        doc = run(handle, task, pairs, cfg, out=work / "ra", vocabulary=vocabulary, evade=evade)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    s = doc["summary"]
    table = {l: {"hijacked": v["hijacked"], "routed_already": v["routed_already"], "resist": v["resist"],
                 "share_hijacked": v["share_hijacked"]}
             for l, v in s["layers"].items()}
    name = "route_attack" if args.position == "prefix" else f"route_attack_{args.position}"
    tags = [("_benign_vocab", vocabulary is not None), ("_evading", evade is not None),
            ("_own_profile", evade is not None and own), ("_hijack_first", evade is not None and args.evade_order == "hijack")]
    path = write_result(name + "".join(t for t, on in tags if on), {
        "seconds": round(seconds, 1), "seconds_per_target": round(seconds / len(pairs), 1),
        **({"benign_vocab": args.benign_vocab} if vocabulary else {}),
        **({"evade_profile_seed": args.evade_profile_seed} if evade and own else {}), "summary": s, "route_attack": doc}, args.out)
    for l, v in table.items():
        print(f"layer {l}: hijacked {v['hijacked']} ({100 * v['share_hijacked']:.0f}%), routed there already "
              f"{v['routed_already']}, resist {v['resist']}")
    if evade is not None:
        for r in doc["targets"]:
            m = r["measured"]
            print(f"layer {r['layer']} expert {r['expert']}: success {m['success']:.3f}, monitor passes "
                  f"{m['monitor']['passing']:.2f} at p >= {args.evade_p} (median p {m['monitor']['p_median']:.3f}; "
                  f"without the text {m['monitor']['p_median_without']:.3f})")
    print(f"goal met: {s['goal']['met']}; {seconds:.0f} s; written to {path}")


def _monitor_profile(seed: int):
    """The routing monitor benchmark's prompt-only profile (``routing_monitor.py``'s topics, window and seed)."""
    import random

    from routing_monitor import WINDOW, benign_topics

    from moeguard.models.loading import load_model
    from moeguard.monitor.fit import build

    m, tok, _ = load_model(None)
    topics = benign_topics(random.Random(seed))
    return build(m, tok, {k: v[0] for k, v in topics.items()}, window=WINDOW, seed=seed, name="embedded")


def _benign_vocabulary(k: int, seed: int) -> list[int]:
    """The ``k`` token ids most frequent in the routing monitor benchmark's benign profile texts."""
    import random
    from collections import Counter

    from routing_monitor import benign_topics

    from moeguard.models.loading import load_model
    from moeguard.tasks.tokens import encode

    _, tok, _ = load_model(None)
    texts = [x for profile, _ in benign_topics(random.Random(seed)).values() for x in profile]
    counts = Counter(i for x in texts for i in encode(tok, x))
    return [i for i, _ in counts.most_common(k)]


if __name__ == "__main__":
    main()
