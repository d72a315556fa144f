"""`moeguard realign`, `recovery` and `strategies`: the re-alignment half of the attack."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli import ModelOpt, OverwriteOpt, SeedOpt, _console, _ints, _names, _progress, _run, _run_study, _seed, app
from moeguard.errors import MoeguardError

ModeOpt = Annotated[str, typer.Option("--mode", help="what fine-tuning may change: full, lora, router, experts")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="learning rate; default: the mode's (full 2e-4, lora 3e-3, router 5e-3, experts 2e-4)")]
EpochsOpt = Annotated[float, typer.Option("--epochs", help="passes over the labeled set per round")]
MinStepsOpt = Annotated[int, typer.Option("--min-steps", min=0, help="fewest optimizer steps per round")]
PoolOpt = Annotated[int, typer.Option("--pool-size", min=1, help="unlabeled pool: this many train records")]
EvalLimitOpt = Annotated[int, typer.Option("--eval-limit", min=1, help="eval records scored per round")]


def _finetune_config(mode, lr, epochs, min_steps, batch_size, seed, save_every=0, only=()):
    from moeguard.realign.engine import FinetuneConfig

    return FinetuneConfig(mode=mode, lr=lr, epochs=epochs, min_steps=min_steps, batch_size=batch_size, seed=seed,
                          save_every=save_every, only=tuple(only))


@app.command()
def realign(model: Annotated[str, typer.Option("--model", help="the pruned checkpoint to re-align")],
            task: Annotated[str, typer.Option("--task", help="task name or YAML path (its train split is the pool)")],
            out: Annotated[Path, typer.Option("--out", help="output directory: re-aligned checkpoint + learning curve")],
            strategy: Annotated[str, typer.Option("--strategy", help="active-learning strategy (see `moeguard strategies`)")] = "random",
            budget: Annotated[int, typer.Option("--budget", min=1, help="labels in total")] = 64,
            query_size: Annotated[int, typer.Option("--query-size", min=1, help="labels per round")] = 16,
            mode: ModeOpt = "full", lr: LrOpt = None, epochs: EpochsOpt = 4.0, min_steps: MinStepsOpt = 10,
            batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
            pool_size: PoolOpt = 1000, eval_limit: EvalLimitOpt = 200,
            original: Annotated[Optional[str], typer.Option("--original", help="the unpruned model (orphan strategy, retention); default: the source in the pruning record")] = None,
            full_score: Annotated[Optional[float], typer.Option("--full-score", help="the original model's score on the task (skips evaluating the original)")] = None,
            save_every: Annotated[int, typer.Option("--save-every", min=0, help="checkpoint the running fine-tune every N steps")] = 10,
            protocol: Annotated[Optional[Path], typer.Option("--protocol", help="a selective fine-tuning protocol (moeguard_protocol.json): only its modes and parameters are trained")] = None,
            overwrite: OverwriteOpt = False, seed: SeedOpt = 0) -> None:
    """Fine-tune a pruned model on actively chosen labels; writes the checkpoint and its learning curve.

    A killed run continues from its last checkpoint when started again with the same settings."""
    from moeguard.defense.protocol import Protocol
    from moeguard.io import check_output, resumable_dir, write_json
    from moeguard.models.loading import inspect, load_model
    from moeguard.realign.loop import ALConfig, label_pool, run_active_learning, schedule_for
    from moeguard.realign.strategies.base import get_strategy
    from moeguard.realign.strategies.orphan import orphan_shares
    from moeguard.report.recovery import realign_table
    from moeguard.tasks.evaluate import evaluate_task
    from moeguard.tasks.registry import get_task

    check_output(out, overwrite=overwrite)
    the_task = get_task(task)
    schedule = schedule_for(budget=budget, query_size=query_size)
    strat = get_strategy(strategy, the_task)
    proto = Protocol.load(protocol) if protocol is not None else None
    if proto is not None:
        proto.check_mode(mode)
    ft = _finetune_config(mode, lr, epochs, min_steps, batch_size, seed, save_every, proto.patterns if proto else ())
    pool = label_pool(the_task, pool_size=pool_size, budget=budget, seed=seed)
    ref, _, _ = inspect(model)
    record = _pruning_record(ref.path)
    original = original or (record or {}).get("source")
    if strat.needs_original and record is None:
        raise MoeguardError(f"strategy '{strategy}' needs the pruning plan and the original model; {model} has no "
                            "moeguard_pruning.json", hint="prune with `moeguard prune`, which records both")
    if original is not None:  # an unreadable original fails here, before the pruned model loads
        inspect(None if original == "embedded" else original)
    _seed(seed)
    cfg = ALConfig(strategy=strategy, schedule=schedule, pool_size=pool_size, eval_limit=eval_limit, seed=seed,
                   finetune=ft)
    settings = {"model": ref.name, "task": the_task.name, "original": original, "full_score": full_score,
                **cfg.to_dict()}
    m, tokenizer, _ = load_model(model)
    orphan = None
    if original is not None and (full_score is None or strat.needs_original):
        o, otok, _ = load_model(None if original == "embedded" else original)
        if full_score is None:
            full_score = evaluate_task(o, otok, the_task, limit=eval_limit, batch_size=32, baseline=False).score
        if strat.needs_original:
            share = orphan_shares(o, otok, the_task, record["keep"], int(record["original_num_experts"]))
            orphan = lambda: share(pool)  # noqa: E731
    with resumable_dir(out, overwrite=overwrite, settings=settings) as work, _progress() as progress:
        curve, trainable = run_active_learning(m, tokenizer, the_task, cfg, pool=pool, orphan_share=orphan,
                                               full_score=full_score, state_dir=work / "state", progress=progress,
                                               keep_trainable=True)
        final = trainable.merged()
        final.save_pretrained(work)
        from moeguard.models.tokenizer_files import save_tokenizer

        save_tokenizer(tokenizer, work)
        if record is not None:
            write_json(work / "moeguard_pruning.json", record)
        curve["model"], curve["run"] = ref.name, _run(settings)
        write_json(work / "learning_curve.json", curve)
        shutil.rmtree(work / "state")
    _console().print(realign_table(curve))
    last = curve["points"][-1]
    typer.echo(f"re-aligned with {last['labels']} labels: {curve['metric']} {last['score']:.4g}"
               + (f" ({last['retention']:.1f}% of the original)" if last["retention"] is not None else "")
               + f"; written to {out}")


def _pruning_record(path: Path | None) -> dict | None:
    from moeguard.io import read_json

    f = path / "moeguard_pruning.json" if path is not None else None
    if f is None or not f.exists():
        return None
    return read_json(f, what="pruning record", hint="re-run moeguard prune, or delete the file to re-align without it")


@app.command()
def recovery(task: Annotated[str, typer.Option("--task", help="task name or YAML path")],
             keep: Annotated[int, typer.Option("--keep", min=1, help="experts kept per layer")],
             out: Annotated[Path, typer.Option("--out", help="run directory to create")],
             model: ModelOpt = None,
             strategies: Annotated[str, typer.Option("--strategies", help="comma-separated strategies; random is added as the baseline")] = "random,orphan",
             budgets: Annotated[str, typer.Option("--budgets", help="label counts on the learning curve")] = "4,8,16,32,64,128,256",
             seeds: Annotated[int, typer.Option("--seeds", min=1, help="runs per strategy (seeds --seed, --seed+1, ...)")] = 3,
             method: Annotated[Optional[str], typer.Option("--method", help=f"attribution method; default: the best for the task in --sweep, else ablation")] = None,
             sweep: Annotated[Optional[Path], typer.Option("--sweep", help="sweep.json of `moeguard sweep`: picks the best method")] = None,
             samples: Annotated[int, typer.Option("--samples", min=1, help="attribution samples")] = 64,
             target: Annotated[float, typer.Option("--target", help="percent of the full model's score to reach")] = 95.0,
             mode: ModeOpt = "full", lr: LrOpt = None, epochs: EpochsOpt = 4.0, min_steps: MinStepsOpt = 10,
             batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
             pool_size: PoolOpt = 1000, eval_limit: EvalLimitOpt = 200,
             overwrite: OverwriteOpt = False, seed: SeedOpt = 0) -> None:
    """Recovery study: labels each strategy needs to re-align a pruned task, against random."""
    from moeguard.io import check_output
    from moeguard.models.loading import inspect, load_model
    from moeguard.realign.recovery import DEFAULT_METHOD, RecoveryConfig, best_method, preflight, run_recovery
    from moeguard.report.recovery import recovery_table, write_recovery
    from moeguard.tasks.registry import get_task

    check_output(out, overwrite=overwrite)
    if method is not None and sweep is not None:
        raise MoeguardError("give --method or --sweep, not both", hint="--sweep picks the method with the best AUC")
    name = get_task(task).name
    if sweep is not None:
        try:
            method = best_method(json.loads(Path(sweep).read_text()), name)
        except (OSError, ValueError) as e:
            raise MoeguardError(f"cannot read sweep {sweep}: {e}", hint="pass the sweep.json of `moeguard sweep`") from None
    names = _names(strategies, "--strategies")
    names = names if "random" in names else ["random", *names]
    _, config, family = inspect(model)
    cfg = RecoveryConfig(task=task, keep=keep, strategies=tuple(names), budgets=tuple(_ints(budgets, "--budgets")),
                         seeds=seeds, seed=seed, method=method or DEFAULT_METHOD, samples=samples,
                         pool_size=pool_size, eval_limit=eval_limit, target=target,
                         finetune=_finetune_config(mode, lr, epochs, min_steps, batch_size, seed))
    preflight(cfg, int(getattr(config, family.num_experts_key)), family.min_experts)
    _seed(seed)
    m, tokenizer, ref = load_model(model)
    doc = _run_study(out, overwrite, {"model": ref.name, **cfg.to_dict()}, ref.name,
                     lambda work, progress: run_recovery(m, tokenizer, cfg, progress=progress, job_dir=work / "jobs"),
                     write_recovery)
    _console().print(recovery_table(doc))
    best = doc["summary"]["best"]
    typer.echo(f"{len(doc['curves'])} runs in {doc['seconds']:.0f} s; "
               + (f"best strategy {best}" if best else "no strategy saves labels against random")
               + f"; written to {out}")


@app.command("strategies")
def strategies_(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Registered active-learning strategies and the task kinds they apply to."""
    from moeguard.realign.strategies.base import list_strategies

    rows = [{"name": s.name, "kinds": sorted(k.value for k in s.kinds), "description": s.description}
            for s in list_strategies()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['name']:<20} {', '.join(r['kinds']):<50} {r['description']}")
