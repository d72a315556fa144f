"""The audit's jobs: pure functions of JSON arguments returning JSON (see :mod:`.jobs`).

Each takes the worker's :class:`~moeguard.audit.jobs.Context` first; the model it gets is
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
    c = make_context(model, tok, task, samples=samples, seed=seed, reference=reference)
    return {m: score(c, m).to_dict() for m in methods}


def sweep_job(ctx, *, target: str, settings: dict[str, Any], scores: dict[str, Any], full: dict[str, Any],
              seed: int) -> dict[str, Any]:
    """The knowledge-loss sweep of one task (collateral damage measured on all of them);
    ``full``: every task's full-model scores from the baseline stage."""
    from moeguard.attribution.base import Scores
    from moeguard.pruning.sweep import SweepConfig, run_sweep

    model, tok = ctx.model()
    cfg = SweepConfig(**settings)
    given = {target: {m: Scores.from_dict(d) for m, d in scores.items()}}
    return run_sweep(model, tok, cfg, targets=[target], scores=given, full=full)


def recovery_job(ctx, *, task: str, keep: dict[str, list[int]], strategy: str, seed: int, budgets: list[int],
                 pool_size: int, eval_limit: int, full_score: float | None,
                 finetune: dict[str, Any] | None = None) -> dict[str, Any]:
    """One active-learning re-alignment of ``task`` on the model pruned to ``keep``."""
    from moeguard.audit.stages import digest
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.prune import prune_model
    from moeguard.realign.engine import FinetuneConfig
    from moeguard.realign.loop import ALConfig, label_pool, run_active_learning
    from moeguard.realign.strategies.base import get_strategy
    from moeguard.realign.strategies.orphan import orphan_shares
    from moeguard.tasks.registry import get_task

    model, tok = ctx.model()
    plan = {int(l): list(v) for l, v in keep.items()}
    pruned = ctx.derived(("pruned", digest(keep)), lambda: prune_model(model, plan)[0])
    t = get_task(task)
    ft = FinetuneConfig(**{**(finetune or {}), "seed": seed, "only": tuple((finetune or {}).get("only", ()))})
    al = ALConfig(strategy=strategy, schedule=tuple(budgets), pool_size=pool_size, eval_limit=eval_limit, seed=seed,
                  finetune=ft)
    pool = label_pool(t, pool_size=pool_size, budget=budgets[-1], seed=seed)
    share = None
    if get_strategy(strategy, t).needs_original:
        shares = orphan_shares(model, tok, t, plan, MoEAdapter(model).num_experts)
        share = lambda: shares(pool)  # noqa: E731
    curve, _ = run_active_learning(pruned, tok, t, al, pool=pool, orphan_share=share, full_score=full_score)
    return curve

