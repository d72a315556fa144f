"""Screened ablation (``ablation-screened``) against exact ``ablation`` on the embedded model: how far
its scores and the plans they give are from the exact ones, and what it costs.

    python benchmarks/ablation_screen.py [--samples 32] [--tasks arith-compare,stdlib-code,docstring-topic]
                                         [--model DIR --keeps 16,32 --screens 16,32]

``--model`` takes another checkpoint (a real-dimension synthetic one from ``scale.py``, e.g.
``/tmp/moeguard-scale/olmoe-1b-7b-L2`` with 64 experts); ``--keeps`` the keep levels whose plans
are compared (default 2 and 4, the embedded model's).

Per task and screen size: Spearman over every (layer, expert) score, the share of each layer's
kept experts that match exact ablation's at keep 2 and 4 (the plan `prune --keep` would write),
and seconds against the exact run's, measured side by side in one process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402


def kept_overlap(a, b, keep: int) -> float:
    """Mean over layers of |top-keep of a  and  top-keep of b| / keep."""
    import torch

    return float(sum(len(set(torch.topk(a[r], keep).indices.tolist()) & set(torch.topk(b[r], keep).indices.tolist()))
                     for r in range(a.shape[0])) / (keep * a.shape[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="arith-compare,stdlib-code,docstring-topic")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--screens", default="2,4")
    ap.add_argument("--keeps", default="2,4")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from moeguard.analysis import spearman
    from moeguard.attribution.run import make_context, score
    from moeguard.models.loading import load_model

    torch.manual_seed(0)
    model, tok, _ = load_model(args.model)
    keeps = [int(x) for x in args.keeps.split(",")]
    rows = []
    for task in args.tasks.split(","):
        ctx = make_context(model, tok, task, samples=args.samples, seed=0)
        t = time.perf_counter()
        exact = score(ctx, "ablation").scores
        exact_s = time.perf_counter() - t
        t = time.perf_counter()
        grad = score(ctx, "gradient").scores
        grad_s = time.perf_counter() - t
        for screen in [int(x) for x in args.screens.split(",")]:
            ctx.options["screen"] = screen
            t = time.perf_counter()
            s = score(ctx, "ablation-screened").scores
            secs = time.perf_counter() - t
            rows.append({"task": task, "screen": screen, "experts": int(exact.shape[1]),
                         "spearman_vs_ablation": round(spearman(exact.flatten().tolist(), s.flatten().tolist()), 4),
                         "gradient_spearman_vs_ablation": round(spearman(exact.flatten().tolist(), grad.flatten().tolist()), 4),
                         **{f"kept_match_keep{k}": round(kept_overlap(s, exact, k), 4) for k in keeps},
                         **{f"gradient_kept_match_keep{k}": round(kept_overlap(grad, exact, k), 4) for k in keeps},
                         "seconds": round(secs, 2), "exact_seconds": round(exact_s, 2), "gradient_seconds": round(grad_s, 2),
                         "time_ratio_vs_exact": round(secs / exact_s, 3)})
            print(rows[-1])
    path = write_result("ablation_screen", {"model": args.model or "embedded", "samples": args.samples, "rows": rows},
                        args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
