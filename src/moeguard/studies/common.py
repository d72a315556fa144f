"""Jobs several studies share: pure functions of JSON arguments returning JSON.

Each takes the worker's :class:`~moeguard.studies.engine.Context` first; the model it gets is
shared with the other jobs of the process and is handed back unchanged.
"""

from __future__ import annotations

from typing import Any


def baseline_job(ctx, *, task: str, limits: list[int], seed: int) -> dict[str, Any]:
    """The full model's score on ``task`` at each eval limit, with the trivial baseline."""
    from moeguard.tasks.evaluate import evaluate_task

    model, tok = ctx.model()
    return {str(n): evaluate_task(model, tok, task, limit=n, batch_size=32, baseline=True).to_dict() for n in limits}


def attribution_job(ctx, *, task: str, methods: list[str], samples: int, seed: int,
                    reference: list[str] | None = None) -> dict[str, Any]:
    """Every method's expert scores for one task (one calibration context shared by all)."""
    from moeguard.attribution.run import make_context, score

    model, tok = ctx.model()
    c = make_context(model, tok, task, samples=samples, seed=seed, reference=reference, keep=ctx.scratch_for("attribution"))
    return {m: score(c, m).to_dict() for m in methods}


def detectability_of(runs: list[dict[str, Any]], *, score) -> dict[str, Any] | None:
    """If the attacker's best model (the run with the highest ``score(run)``, its final point)
    were stolen: its trace p-value and how many of its kept experts the trace names
    (docs/trace.md), with every traced run's verdicts. ``{"skipped": why}`` when the model could
    not be fingerprinted (``trace.api.tracer``); None when no run was traced (job files cached
    before trace existed, or every run diverged)."""
    traced = [r for r in runs if (r.get("after") or {}).get("trace") is not None and r.get("points")
              and score(r) is not None]
    if not traced:
        why = next((r["after"]["trace_skipped"] for r in runs if (r.get("after") or {}).get("trace_skipped")), None)
        return {"skipped": why} if why else None
    best = max(traced, key=score)
    return {"run": next(i for i, r in enumerate(runs) if r is best),   # index in ``runs``
            "strategy": best["strategy"], "seed": best["seed"], "labels": best["points"][-1]["labels"],
            **best["after"]["trace"],
            "all_derived": all(r["after"]["trace"]["verdict"] == "derived" for r in traced),
            "largest_p": max(r["after"]["trace"]["p_value"] for r in traced), "traced_runs": len(traced)}
