"""Online monitor overhead: one request's forward with :class:`RoutingMonitor` (hooks, scoring,
metrics) against the plain forward, side by side in one run, as ``capture_overhead.py`` does.

    .venv/bin/python benchmarks/monitor_overhead.py [--repeats 30] [--seq 128] [--batch 1]

Plain and monitored forwards alternate so drift hits both alike; the ratio of medians is the
goal's number (<= 1.05). The monitored time is the request (hooks counting, scoring, metrics);
the hooks are attached just outside it, as a server attaches them once. A served request is one prompt, so batch 1 is the case that matters
and the hardest for the ratio (the forward is shortest); batch 8 is measured beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import write_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out")
    args = ap.parse_args()
    from moeguard.models.loading import load_model
    from moeguard.monitor.online import RoutingMonitor
    from moeguard.monitor.profile import build
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.registry import get_task

    torch.manual_seed(0)
    model, tok, _ = load_model(None)
    prompts = {t: [r["input"] for r in load_records(get_task(t), "eval", limit=100)] for t in ("arith-compare", "docstring-topic")}

    def measure(m, batches) -> dict:
        """Plain against monitored forwards of ``m`` (profiled on ``prompts``), alternating."""
        prof = build(m, tok, prompts, window=16, seed=0, name="embedded")
        mon = RoutingMonitor(m, prof)
        res = {}
        with torch.no_grad():
            for batch in batches:
                ids = torch.randint(0, m.config.vocab_size, (batch, args.seq))
                times = {"plain": [], "monitored": []}
                for _ in range(3):
                    m(input_ids=ids, use_cache=False)
                for i in range(args.repeats):
                    for name in (("plain", "monitored") if i % 2 == 0 else ("monitored", "plain")):
                        if name == "plain":
                            t = time.perf_counter()
                            m(input_ids=ids, use_cache=False)
                            times[name].append(time.perf_counter() - t)
                            continue
                        with mon:  # attached for the monitored forward only (a server attaches once, at start)
                            t = time.perf_counter()
                            with mon.request(f"client-{i % 4}"):
                                m(input_ids=ids, use_cache=False)
                            times[name].append(time.perf_counter() - t)
                med = {k: statistics.median(v) for k, v in times.items()}
                res[f"batch_{batch}"] = {"median_seconds": med, "ratio": med["monitored"] / med["plain"],
                                         "added_ms": 1e3 * (med["monitored"] - med["plain"])}
        return res

    out = measure(model, (1, 8))
    # the monitor's cost is per request, not per FLOP: the same request on a wider model of the
    # same family (random weights, hidden 1024: ~0.3 B parameters) shows what the ratio becomes
    from transformers import AutoModelForCausalLM

    wide_cfg = model.config.__class__(**{**model.config.to_dict(), "hidden_size": 1024, "intermediate_size": 2816,
                                         "num_attention_heads": 16, "num_key_value_heads": 4})
    wide = AutoModelForCausalLM.from_config(wide_cfg).eval()
    out["wide_model"] = {"hidden_size": 1024, "parameters": sum(p.numel() for p in wide.parameters()),
                         **measure(wide, (1,))}
    ratio = out["batch_1"]["ratio"]
    path = write_result("monitor_overhead", {"model": "embedded", "seq": args.seq, "repeats": args.repeats, **out,
                                             "goal": "monitored <= 1.05x plain (batch 1, one served request)",
                                             "goal_met": ratio <= 1.05}, args.out)
    for k, v in [(k, v) for k, v in out.items() if k.startswith("batch")] + [("wide batch_1", out["wide_model"]["batch_1"])]:
        print(f"{k}: plain {v['median_seconds']['plain'] * 1e3:.2f} ms, monitored {v['median_seconds']['monitored'] * 1e3:.2f} ms "
              f"({v['ratio']:.3f}x, +{v['added_ms']:.2f} ms)")
    print(f"written {path}")


if __name__ == "__main__":
    main()
