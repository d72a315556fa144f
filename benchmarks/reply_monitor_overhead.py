"""What monitoring replies costs a generating server: blocks of greedy generations (a prompt, then
``--tokens`` new tokens, as ``serve`` runs them) plain, under a prompt-only monitor, and under a
monitor whose profile scores replies (decode-step hooks), side by side in one run.

    .venv/bin/python benchmarks/reply_monitor_overhead.py [--repeats 20] [--tokens 16]

Each kind runs blocks of 16 requests in turn (``alternating_medians``: the order rotates every
repeat, so drift hits each alike). A monitored block attaches its monitor's hooks and removes them
(a flush of its batch included: exiting scores what waits), inside the timing: under a millisecond
against a block of about a second, and it keeps each kind's hooks off the others' blocks.
Reported: each kind's median block seconds and the ratios to the plain block.
"""

from __future__ import annotations

import argparse

import torch

from _common import alternating_medians, benign_prompts, write_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    from moeguard.models.loading import load_model
    from moeguard.monitor.online import RoutingMonitor
    from moeguard.monitor.fit import build
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.registry import get_task
    from moeguard.tasks.tokens import bos_ids

    torch.manual_seed(args.seed)
    m, tok, _ = load_model(None)
    prompts = benign_prompts()
    plain_profile = build(m, tok, prompts, window=16, seed=args.seed, name="embedded")
    reply_profile = build(m, tok, prompts, window=16, seed=args.seed, name="embedded", reply_tokens=args.tokens)
    held = [r["input"] for t in prompts for r in load_records(get_task(t), "eval", limit=108)[100:108]]   # 16
    ids = [torch.tensor([bos_ids(tok) + tok(p, add_special_tokens=False)["input_ids"]]) for p in held]

    def generate(x):
        return m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                          do_sample=False, pad_token_id=tok.pad_token_id)

    monitors = {"prompt_only": RoutingMonitor(m, plain_profile, max_delay_s=None),
                "replies": RoutingMonitor(m, reply_profile, max_delay_s=None)}

    def plain():
        with torch.no_grad():
            for x in ids:
                generate(x)

    def monitored(mon):
        def run():   # attached for its own block only: no other kind runs with its hooks
            with mon, torch.no_grad():
                for x in ids:
                    with mon.request("c") as r:
                        generate(x)
                        r.reply_tokens = args.tokens
        return run

    plain()                                                       # warm-up, untimed
    for mon in monitors.values():
        monitored(mon)()
    med = alternating_medians({"plain": plain, **{k: monitored(v) for k, v in monitors.items()}}, args.repeats)
    result = {"requests_per_block": len(ids), "new_tokens": args.tokens, "repeats": args.repeats,
              "block_s": {k: round(v, 4) for k, v in med.items()},
              "ratio_prompt_only": round(med["prompt_only"] / med["plain"], 4),
              "ratio_replies": round(med["replies"] / med["plain"], 4),
              "ratio_replies_over_prompt_only": round(med["replies"] / med["prompt_only"], 4)}
    path = write_result("reply_monitor_overhead", result, args.out)
    print(result, f"written to {path}")


if __name__ == "__main__":
    main()
