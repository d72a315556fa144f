"""Routing-capture overhead: forward with :class:`RoutingCapture` vs without, same batch, one run.

    .venv/bin/python benchmarks/capture_overhead.py [--repeats 15] [--batch 16] [--seq 256]

Plain and captured forwards alternate so drift (thermal, other load) hits both alike; the
ratio of medians is reported (goal: at most 1.05). The REAP capture (``norms=True``, which runs
experts one by one to read their output norms) is measured beside it for reference.
"""

from __future__ import annotations

import argparse

import torch

from _common import alternating_medians, write_result
from moeguard.models.hooks import RoutingCapture
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

    def fwd():
        model(input_ids=ids, attention_mask=mask, use_cache=False)

    def captured(norms: bool):
        def run():
            with RoutingCapture(model, norms=norms):
                fwd()
        return run

    with torch.no_grad():
        for _ in range(3):
            fwd()
        med = alternating_medians({"plain": fwd, "capture": captured(False), "capture_norms": captured(True)},
                                  args.repeats)
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
