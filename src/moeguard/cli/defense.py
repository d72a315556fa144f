"""`moeguard harden`, `attack`, `defend-eval` and `defenses`: the defense half."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli import (ModelOpt, OverwriteOpt, SeedOpt, _console, _ints, _names, _numbers, _progress, _run, _run_study, _task_names,
                          _seed, app)
from moeguard.errors import MoeguardError


def _floats(value: str, what: str) -> list[float]:
    return _numbers(value, what, float)


@app.command()
def harden(out: Annotated[Path, typer.Option("--out", help="output directory for the hardened checkpoint")],
           model: ModelOpt = None,
           method: Annotated[str, typer.Option("--method", help="defense (see `moeguard defenses`)")] = "entangle",
           tasks: Annotated[Optional[str], typer.Option("--tasks", help="the owner's tasks to keep (names or YAML paths); default: the embedded suite")] = None,
           steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="training steps")] = None,
           lr: Annotated[Optional[float], typer.Option("--lr", help="learning rate")] = None,
           keep: Annotated[Optional[int], typer.Option("--keep", min=1, help="experts per layer the simulated attacker keeps; default: half")] = None,
           balance: Annotated[Optional[float], typer.Option("--balance", help="weight of per-task routing balance")] = None,
           collapse: Annotated[Optional[float], typer.Option("--collapse", help="weight of the pruned-model collapse term")] = None,
           adversarial: Annotated[Optional[float], typer.Option("--adversarial", help="weight of the simulated prune-and-fine-tune term")] = None,
           inner_steps: Annotated[Optional[int], typer.Option("--inner-steps", min=1, help="simulated attacker's fine-tuning steps")] = None,
           authorized: Annotated[Optional[str], typer.Option("--authorized", help="selective: comma-separated parameter globs users may adapt")] = None,
           overwrite: OverwriteOpt = False, seed: SeedOpt = 0) -> None:
    """Continue training a model so that pruning its experts, then fine-tuning, recovers poorly."""
    from moeguard.defense.harden import config_for, get_defense, harden as run_harden, preflight
    from moeguard.defense.protocol import FILENAME, Protocol
    from moeguard.io import atomic_dir, check_output, write_json
    from moeguard.models.loading import inspect, load_model
    from moeguard.report.defense import harden_table

    check_output(out, overwrite=overwrite)
    spec = get_defense(method)
    cfg = config_for(method, tasks=tuple(_names(tasks, "--tasks")) if tasks else None, steps=steps, lr=lr, keep=keep,
                     balance=balance, collapse=collapse, adversarial=adversarial, inner_steps=inner_steps,
                     authorized_patterns=tuple(_names(authorized, "--authorized")) if authorized else None, seed=seed)
    ref, _, _ = inspect(model)
    _seed(seed)
    m, tokenizer, _ = load_model(model)
    preflight(m, cfg)
    with _progress() as progress:
        result = run_harden(m, tokenizer, cfg, progress=progress)
    settings = {"model": ref.name, **cfg.to_dict()}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        m.save_pretrained(tmp)
        from moeguard.models.tokenizer_files import save_tokenizer

        save_tokenizer(tokenizer, tmp)
        doc = {"schema": "moeguard.hardening/1", "source": ref.name, "method": method,
               "description": spec.description, **result, "run": _run(settings)}
        write_json(tmp / "moeguard_hardening.json", doc)
        if spec.protocol:
            Protocol(modes=("lora",), patterns=tuple(cfg.authorized_patterns), model=str(out),
                     note=f"issued by moeguard harden --method {method}: adapt with LoRA on these parameters only").save(tmp / FILENAME)
    _console().print(harden_table(doc))
    typer.echo(f"hardened with '{method}' in {result['seconds']:.0f} s; written to {out}")


@app.command("defenses")
def defenses_(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Registered hardening methods and their objective weights."""
    from moeguard.defense.harden import DEFENSES, get_defense

    get_defense("entangle")
    rows = [{"name": d.name, "description": d.description, "defaults": {k: (list(v) if isinstance(v, tuple) else v)
                                                                         for k, v in d.defaults.items()},
             "protocol": d.protocol} for d in DEFENSES.values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    t = Table(title="defenses")
    for c in ("name", "description", "defaults"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], r["description"], ", ".join(f"{k}={v}" for k, v in r["defaults"].items()))
    _console().print(t)


def _attack_config(task, keep, budget, budgets, methods, plans, strategies, modes, lr_scales, epochs, seeds, samples,
                   pool_size, eval_limit, target, scratch, seed):
    from moeguard.defense.attack import AttackConfig

    return AttackConfig(task=task, keep=keep, budget=budget, budgets=tuple(_ints(budgets, "--budgets")) if budgets else (),
                        methods=tuple(_names(methods, "--methods")) if methods else (),
                        plans=tuple(_names(plans, "--plans")), strategies=tuple(_names(strategies, "--strategies")),
                        modes=tuple(_names(modes, "--modes")), lr_scales=tuple(_floats(lr_scales, "--lr-scales")),
                        epochs=tuple(_floats(epochs, "--epochs")), seeds=seeds, samples=samples, pool_size=pool_size,
                        eval_limit=eval_limit, target=target, scratch=scratch, seed=seed)


BudgetOpt = Annotated[int, typer.Option("--budget", min=1, help="labels the attacker may use in total")]
BudgetsOpt = Annotated[Optional[str], typer.Option("--budgets", help="learning-curve points (comma-separated, ending at --budget); default: budget/64, /16, /4, budget")]
MethodsOpt = Annotated[Optional[str], typer.Option("--methods", help="attribution methods; default: every registered one")]
PlansOpt = Annotated[str, typer.Option("--plans", help="pruning plans: uniform, budgeted")]
StrategiesOpt = Annotated[str, typer.Option("--strategies", help="active-learning strategies the attacker tries")]
ModesOpt = Annotated[str, typer.Option("--modes", help="fine-tuning modes the attacker tries")]
LrScalesOpt = Annotated[str, typer.Option("--lr-scales", help="learning rates tried, as multiples of each mode's default")]
EpochsGridOpt = Annotated[str, typer.Option("--epochs", help="passes over the labels tried (the attacker's steps)")]
SeedsOpt = Annotated[int, typer.Option("--seeds", min=1, help="seeds per setting (label draws and training)")]
SamplesOpt = Annotated[int, typer.Option("--samples", min=1, help="attribution samples")]
PoolOpt = Annotated[int, typer.Option("--pool-size", min=1, help="unlabeled pool: this many train records")]
EvalLimitOpt = Annotated[int, typer.Option("--eval-limit", min=1, help="eval records per score")]
TargetOpt = Annotated[float, typer.Option("--target", help="percent of the full model's score the attacker aims at")]
ScratchOpt = Annotated[bool, typer.Option("--scratch/--no-scratch", help="run the from-scratch baseline")]


@app.command()
def attack(task: Annotated[str, typer.Option("--task", help="task name or YAML path")],
           keep: Annotated[int, typer.Option("--keep", min=1, help="experts per layer the attacker keeps")],
           out: Annotated[Path, typer.Option("--out", help="output directory (attack.json, curves, plot)")],
           model: ModelOpt = None, budget: BudgetOpt = 256, budgets: BudgetsOpt = None, methods: MethodsOpt = None,
           plans: PlansOpt = "uniform,budgeted", strategies: StrategiesOpt = "random", modes: ModesOpt = "full,lora",
           lr_scales: LrScalesOpt = "0.1,1,10", epochs: EpochsGridOpt = "4,16", seeds: SeedsOpt = 3,
           samples: SamplesOpt = 64, pool_size: PoolOpt = 1000, eval_limit: EvalLimitOpt = 200,
           target: TargetOpt = 95.0, scratch: ScratchOpt = True, overwrite: OverwriteOpt = False,
           seed: SeedOpt = 0) -> None:
    """The strongest prune-and-re-align attacker: worst case over its settings, and a from-scratch baseline."""
    from moeguard.defense.attack import preflight, run_attack
    from moeguard.io import check_output
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.loading import inspect, load_model, meta_model
    from moeguard.report.defense import attack_table, write_attack

    check_output(out, overwrite=overwrite)
    cfg = _attack_config(task, keep, budget, budgets, methods, plans, strategies, modes, lr_scales, epochs, seeds,
                         samples, pool_size, eval_limit, target, scratch, seed)
    ref, config, family = inspect(model)
    a = MoEAdapter(meta_model(config))
    preflight(cfg, a.num_experts, family.min_experts, len(a.layers))
    _seed(seed)
    m, tokenizer, _ = load_model(model)
    doc = _run_study(out, overwrite, {"model": ref.name, **cfg.to_dict()}, ref.name,
                     lambda work, progress: run_attack(m, tokenizer, cfg, progress=progress, job_dir=work / "jobs"),
                     write_attack)
    _console().print(attack_table(doc))
    s = doc["summary"]
    typer.echo(f"attacker keeps {s['pruned_retention']:.1f}% after pruning and {s['realigned_retention']:.1f}% after "
               f"re-alignment with {budget} labels (worst case over {len(doc['runs'])} runs); written to {out}")


@app.command("defend-eval")
def defend_eval(hardened: Annotated[str, typer.Option("--hardened", help="the hardened checkpoint (from `moeguard harden`)")],
                out: Annotated[Path, typer.Option("--out", help="output directory (defense.json, plots)")],
                base: Annotated[Optional[str], typer.Option("--base", help="the undefended model; default: the embedded model")] = None,
                tasks: Annotated[str, typer.Option("--tasks", help="comma-separated tasks to compare")] = "arith-compare,docstring-topic",
                utility_tasks: Annotated[Optional[str], typer.Option("--utility-tasks", help="also compare full-model utility on these tasks")] = None,
                keeps: Annotated[Optional[str], typer.Option("--keeps", help="comma-separated experts-per-layer levels; default: half")] = None,
                budget: BudgetOpt = 256, budgets: BudgetsOpt = None, methods: MethodsOpt = None,
                plans: PlansOpt = "uniform,budgeted", strategies: StrategiesOpt = "random", modes: ModesOpt = "full,lora",
                lr_scales: LrScalesOpt = "0.1,1,10", epochs: EpochsGridOpt = "4,16", seeds: SeedsOpt = 3,
                samples: SamplesOpt = 64, pool_size: PoolOpt = 1000, eval_limit: EvalLimitOpt = 200,
                target: TargetOpt = 95.0, scratch: ScratchOpt = True,
                protocol: Annotated[Optional[Path], typer.Option("--protocol", help="protocol file to measure; default: the hardened model's moeguard_protocol.json, if any")] = None,
                overwrite: OverwriteOpt = False, seed: SeedOpt = 0) -> None:
    """Utility cost of a defense and the attacker's cost against it, base vs hardened, with plots."""
    import dataclasses

    from moeguard.defense.attack import preflight
    from moeguard.defense.evaluate import DefendEvalConfig, defend_eval as run_eval
    from moeguard.defense.protocol import FILENAME, Protocol
    from moeguard.io import check_output
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.loading import inspect, load_model, meta_model
    from moeguard.report.defense import defense_table, write_defense
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.registry import get_task

    check_output(out, overwrite=overwrite)
    task_names = _task_names(tasks, "--tasks")
    extra_tasks = _task_names(utility_tasks, "--utility-tasks") if utility_tasks else []
    for t in task_names + extra_tasks:
        load_records(get_task(t), "eval", limit=1)
    bref, bconfig, family = inspect(base)
    href, hconfig, _ = inspect(hardened)
    a = MoEAdapter(meta_model(bconfig))
    ha = MoEAdapter(meta_model(hconfig))
    if (ha.num_experts, len(ha.layers)) != (a.num_experts, len(a.layers)):
        raise MoeguardError(f"--hardened has {len(ha.layers)} MoE layers of {ha.num_experts} experts, --base "
                            f"{len(a.layers)} of {a.num_experts}", hint="compare a model with its own hardened version")
    keep_levels = _ints(keeps, "--keeps") if keeps else [a.num_experts // 2]
    acfg = _attack_config(task_names[0], keep_levels[0], budget, budgets, methods, plans, strategies, modes, lr_scales,
                          epochs, seeds, samples, pool_size, eval_limit, target, scratch, seed)
    for t in task_names:
        for k in keep_levels:
            preflight(dataclasses.replace(acfg, task=t, keep=k), a.num_experts, family.min_experts, len(a.layers))
    proto_path = protocol or (href.path / FILENAME if href.path is not None and (href.path / FILENAME).exists() else None)
    proto = Protocol.load(proto_path) if proto_path is not None else None
    cfg = DefendEvalConfig(tasks=tuple(task_names), keeps=tuple(keep_levels), attack=acfg,
                           utility_tasks=tuple(extra_tasks))
    settings = {"base": bref.name, "hardened": href.name, "protocol": str(proto_path) if proto_path else None,
                **cfg.to_dict()}
    _seed(seed)
    bm, tokenizer, _ = load_model(base)
    hm, _, _ = load_model(hardened)

    def run(work, progress):
        doc = run_eval(bm, hm, tokenizer, cfg, protocol=proto, progress=progress, job_dir=work / "jobs")
        doc["base"], doc["hardened"] = bref.name, href.name
        return doc

    doc = _run_study(out, overwrite, settings, href.name, run, write_defense)
    _console().print(defense_table(doc))
    met = {k: v["met"] for k, v in doc["goals"].items() if isinstance(v, dict)}
    typer.echo("goals: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()) + f"; written to {out}")
