"""`moeguard harden`, `attack`, `defend-eval` and `defenses`: the defense half."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli import (ModelOpt, OverwriteOpt, SeedOpt, _config_command, _console, _ints, _names, _progress, _run,
                          _run_study, _seed, app)
from moeguard.errors import MoeguardError


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
             "protocol": d.protocol} for d in DEFENSES.items()]
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


def _attack_config(flags: dict, **fixed):
    """The attacker's settings from the command's flags (options generated from AttackConfig)."""
    from moeguard.config import build
    from moeguard.studies.attack import AttackConfig

    # build() reads only AttackConfig's fields from the flags; task and keep come resolved in ``fixed``
    return build(AttackConfig, {k: v for k, v in flags.items() if k not in fixed}, what="attack", **fixed)


def _attack_params():
    from moeguard.cli import _common, _out
    from moeguard.config import options
    from moeguard.studies.attack import AttackConfig

    return [*options(AttackConfig, only=["task", "keep"]), _out("output directory (attack.json, curves, plot)"),
            *_common(), *options(AttackConfig, exclude=("task", "keep"))]


@app.command()
@_config_command(_attack_params)
def attack(*, out: Path, model: Optional[str], backend: str, ray_address: Optional[str], overwrite: bool,
           **flags) -> None:
    """The strongest prune-and-re-align attacker: worst case over its settings, and a from-scratch baseline."""
    from moeguard.edge import resolve_model, resolve_tasks
    from moeguard.io import check_output
    from moeguard.report.defense import attack_table, write_attack
    from moeguard.studies.attack import AttackStudy, preflight

    check_output(out, overwrite=overwrite)
    the_task = resolve_tasks([flags["task"]], what="--task")[0]
    handle = resolve_model(model)
    cfg = _attack_config(flags, task=the_task.name, keep=flags["keep"])
    preflight(cfg, handle)
    doc = _run_study(out, overwrite, {"model": handle.name, **cfg.to_dict()}, handle, AttackStudy(), cfg, write_attack,
                     backend=backend, ray_address=ray_address, tasks=[the_task])
    _console().print(attack_table(doc))
    s = doc["summary"]
    u = s["uncertainty"]["realigned_retention"]
    spread = f" (per seed {u['min']:.1f}-{u['max']:.1f}%)" if u.get("n", 0) > 1 else ""
    typer.echo(f"attacker keeps {s['pruned_retention']:.1f}% after pruning and {s['realigned_retention']:.1f}% after "
               f"re-alignment with {cfg.budget} labels (worst case over {len(doc['runs'])} runs{spread}); written to {out}")


def _defend_params():
    from moeguard.cli import _common, _out, _param
    from moeguard.config import options
    from moeguard.studies.attack import AttackConfig

    return [_param("hardened", Annotated[str, typer.Option("--hardened", help="the hardened checkpoint (from `moeguard harden`)")]),
            _out("output directory (defense.json, plots)"),
            _param("base", Annotated[Optional[str], typer.Option("--base", help="the undefended model; default: the embedded model")], None),
            _param("tasks", Annotated[str, typer.Option("--tasks", help="comma-separated tasks to compare")], "arith-compare,docstring-topic"),
            _param("utility_tasks", Annotated[Optional[str], typer.Option("--utility-tasks", help="also compare full-model utility on these tasks")], None),
            _param("keeps", Annotated[Optional[str], typer.Option("--keeps", help="comma-separated experts-per-layer levels; default: half")], None),
            *options(AttackConfig, exclude=("task", "keep")),
            _param("protocol", Annotated[Optional[Path], typer.Option("--protocol", help="protocol file to measure; default: the hardened model's moeguard_protocol.json, if any")], None),
            *_common(model=False)]


@app.command("defend-eval")
@_config_command(_defend_params)
def defend_eval(*, hardened: str, out: Path, base: Optional[str], tasks: str, utility_tasks: Optional[str],
                keeps: Optional[str], protocol: Optional[Path], backend: str, ray_address: Optional[str],
                overwrite: bool, **flags) -> None:
    """Utility cost of a defense and the attacker's cost against it, base vs hardened, with plots."""
    import dataclasses

    from moeguard.defense.protocol import FILENAME, Protocol
    from moeguard.edge import resolve_model, resolve_tasks
    from moeguard.io import check_output
    from moeguard.report.defense import defense_table, write_defense
    from moeguard.studies.attack import preflight
    from moeguard.studies.defend import DefendEvalConfig, DefendEvalStudy

    check_output(out, overwrite=overwrite)
    task_list = resolve_tasks(_names(tasks, "--tasks"), what="--tasks")
    extra = resolve_tasks(_names(utility_tasks, "--utility-tasks"), what="--utility-tasks") if utility_tasks else []
    b, h = resolve_model(base), resolve_model(hardened)
    if (h.num_experts, h.num_layers) != (b.num_experts, b.num_layers):
        raise MoeguardError(f"--hardened has {h.num_layers} MoE layers of {h.num_experts} experts, --base "
                            f"{b.num_layers} of {b.num_experts}", hint="compare a model with its own hardened version")
    keep_levels = _ints(keeps, "--keeps") if keeps else [b.num_experts // 2]
    acfg = _attack_config(flags, task=task_list[0].name, keep=b.check_keep(keep_levels[0]))
    for t in task_list:
        for k in keep_levels:
            preflight(dataclasses.replace(acfg, task=t.name, keep=k), b)
    proto_path = protocol or (h.ref.path / FILENAME if h.ref.path is not None and (h.ref.path / FILENAME).exists()
                              else None)
    proto = Protocol.load(proto_path) if proto_path is not None else None
    cfg = DefendEvalConfig(tasks=tuple(t.name for t in task_list), keeps=tuple(keep_levels), attack=acfg,
                           utility_tasks=tuple(t.name for t in extra), base=b.arg, hardened=h.arg,
                           protocol={"modes": list(proto.modes), "patterns": list(proto.patterns)} if proto else None,
                           num_experts=b.num_experts)
    settings = {"base": b.name, "hardened": h.name, "protocol": str(proto_path) if proto_path else None,
                **cfg.to_dict()}

    def write(doc, work):
        doc["base"], doc["hardened"] = b.name, h.name
        write_defense(doc, work)

    doc = _run_study(out, overwrite, settings, h, DefendEvalStudy(), cfg, write, backend=backend,
                     ray_address=ray_address, tasks=[*task_list, *extra])
    _console().print(defense_table(doc))
    met = {k: v["met"] for k, v in doc["goals"].items() if isinstance(v, dict)}
    typer.echo("goals: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()) + f"; written to {out}")
