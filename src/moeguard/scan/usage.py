"""How each expert is used and how much each task needs it.

- **Usage:** the expert's share of routing slots per task (the attribution context's calibration
  batches), its mean output norm when routed, and dormant / dead flags.
- **Criticality:** the mean per-token loss increase on each task when the expert alone is masked
  (re-routed to the next best, as pruning would), from the attribution ``ablation`` method.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeguard.tasks.base import Task


def usage_and_criticality(model, tokenizer, tasks: list[Task], *, samples: int, seed: int,
                          progress=None, keep=None) -> dict[str, dict[str, Any]]:
    """Per task: ``share`` [L, E] (slot shares, rows sum to 1), ``tokens`` [L], ``norm_sum`` and
    ``counts`` [L, E] (for output norms over all tasks), ``criticality`` [L, E] (nats per token)
    and ``layers`` (decoder indices). ``keep``: a folder keyed by everything else the numbers
    depend on, where each task's ablation keeps its finished batches (a killed scan resumes there)."""
    from moeguard.attribution.run import make_context, score

    out = {}
    bar = progress.add_task("scan: usage and criticality", total=len(tasks)) if progress else None
    for task in tasks:
        # no reference corpus: ablation does not use one, and building it costs forwards
        ctx = make_context(model, tokenizer, task, samples=samples, batch_size=8, seed=seed, reference=[],
                           keep=keep / task.name if keep is not None else None)
        stats = ctx.routing_stats(norms=True)
        crit = score(ctx, "ablation")
        out[task.name] = {
            "layers": [l.layer for l in stats.layers],
            "share": stats.frequency().numpy(),
            "counts": np.stack([l.counts.numpy() for l in stats.layers]),
            "norm_sum": np.stack([l.norm_sum.numpy() for l in stats.layers]),
            "criticality": crit.scores.numpy(),
            "tokens": crit.tokens,
        }
        if bar is not None:
            progress.advance(bar)
    return out
