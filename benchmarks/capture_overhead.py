"""Routing-capture overhead: forward with :class:`RoutingCapture` vs without, same batch, one run.

    .venv/bin/python benchmarks/capture_overhead.py [--repeats 15] [--batch 16] [--seq 256]

Plain and captured forwards alternate so drift (thermal, other load) hits both alike; the
ratio of medians is reported (goal: at most 1.05). The REAP capture (``norms=True``, which runs
experts one by one to read their output norms) is measured beside it for reference.
"""

from __future__ import annotations

import argparse

import torch

from _common import capture_medians, write_result
from moeguard.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _, _ = load_model(None, with_tokenizer=False)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    mask[args.batch // 2:, args.seq * 3 // 4:] = 0  # padding, so the capture's masking path runs

    med = capture_medians(model, ids, mask, repeats=args.repeats, warmup=3)
    ratio = med["capture"] / med["plain"]
    result = {"model": "embedded", "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
              "median_seconds": med, "ratio_capture_vs_plain": ratio,
              "ratio_capture_norms_vs_plain": med["capture_norms"] / med["plain"],
              "goal": "capture <= 1.05x plain", "goal_met": ratio <= 1.05}
    path = write_result("capture_overhead", result, args.out)
    print(f"plain {med['plain']*1e3:.1f} ms, capture {med['capture']*1e3:.1f} ms ({ratio:.3f}x), "
          f"capture+norms {med['capture_norms']*1e3:.1f} ms ({result['ratio_capture_norms_vs_plain']:.2f}x); {path}")


if __name__ == "__main__":
    main()
