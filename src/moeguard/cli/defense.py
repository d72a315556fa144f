"""`moeguard harden`, `attack`, `defend-eval` and `defenses`: the defense half."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli.app import (DeviceMapOpt, ModelOpt, OverwriteOpt, _config_command, _console, _ints, _names, _progress, _run,
                              _placement, _run_study, _seed, _training_state, app)
from moeguard.io import dumps


def _harden_params():
    from moeguard.cli.app import _out, _param
    from dataclasses import fields

    from moeguard.config import meta, options
    from moeguard.defense.harden import SAVE_EVERY, HardenConfig

    # None = not given: the defense's own defaults (`moeguard defenses`) decide the weights
    theirs = {f.name: {"default": None, "help": f"{meta(f)['help']}; default: the defense's (see `moeguard defenses`)"}
              for f in fields(HardenConfig) if f.name in ("balance", "collapse", "adversarial", "authorized_patterns")}
    return [_out("output directory for the hardened checkpoint"), _param("model", ModelOpt, None),
            *options(HardenConfig, only=["method"]),
            *options(HardenConfig, exclude=("method", "seed"), unset=True, overrides=theirs),
            _param("device_map", DeviceMapOpt, None), _param("overwrite", OverwriteOpt, False),
            _param("save_every", Annotated[int, typer.Option("--save-every", min=1, help="save the training state every "
                                                             "N steps, which an interrupted run resumes from (changes no "
                                                             "number)")], SAVE_EVERY),
            *options(HardenConfig, only=["seed"])]


@app.command()
@_config_command(_harden_params)
def harden(*, out: Path, model: Optional[str], device_map: Optional[str], overwrite: bool, save_every: int,
           **flags) -> None:
    """Continue training a model so that pruning its experts, then fine-tuning, recovers poorly."""
    from moeguard.config import coerce
    from moeguard.defense.harden import HardenConfig, config_for, preflight
    from moeguard.edge import resolve_model
    from moeguard.io import check_output

    check_output(out, overwrite=overwrite, inputs=(model,), kind="folder")
    given = {k: coerce(HardenConfig, k, v) for k, v in flags.items() if v is not None}
    cfg = config_for(given.pop("method"), **given)
    handle = resolve_model(model, device_map=device_map)
    if cfg.keep is not None:  # before the weights load
        handle.check_keep(cfg.keep, what="--keep")
    from moeguard.models.loading import meta_model

    from moeguard.edge import resolve_tasks, task_inputs

    # resolved once, here: a task file is then known as an input (--out must not replace it), and a
    # task whose train and eval records overlap is said before it is hardened on what is scored
    tasks = resolve_tasks(cfg.tasks) if cfg.tasks else None
    # before the weights load: names and shapes are enough
    plan = preflight(meta_model(handle.config), cfg, tasks=tasks)

    # a task file or its data as --out would be replaced with the hardened model
    check_output(out, overwrite=overwrite, kind="folder", inputs=task_inputs(plan["tasks"]))
    from moeguard.defense.harden import harden as run_harden, save_hardened
    from moeguard.models.identity import weights_identity
    from moeguard.pruning.apply import weights_folder
    from moeguard.report.defense import harden_table

    # beside the output, until it is written: an interrupted run continues from its last saved step
    with _training_state(out, "harden", every=save_every) as state:
        _seed(cfg.seed)
        m, tokenizer, _ = handle.load()   # run_harden checks the loaded model again (its plan)
        with _progress() as progress:
            result = run_harden(m, tokenizer, cfg, progress=progress, checkpoint=state,
                                source=weights_identity(handle.arg), tasks=tasks, save_every=save_every)
        doc = save_hardened(out, m, tokenizer, cfg, result, source=handle.name, overwrite=overwrite,
                            like=weights_folder(handle.ref),
                            run=_run({"model": handle.name, **cfg.to_dict(), "save_every": save_every,
                                      **_placement(handle)}))
    _console().print(harden_table(doc))
    resumed = f" (resumed at step {result['resumed_from']} of {cfg.steps})" if result["resumed_from"] else ""
    typer.echo(f"hardened with '{cfg.method}' in {result['seconds']:.0f} s{resumed}; written to {out}")


@app.command("defenses")
def defenses_(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Registered hardening methods and their objective weights."""
    from moeguard.defense.harden import DEFENSES, get_defense

    get_defense("entangle")
    rows = [{"name": d.name, "description": d.description, "defaults": {k: (list(v) if isinstance(v, tuple) else v)
                                                                         for k, v in d.defaults.items()},
             "protocol": d.protocol} for d in DEFENSES.items()]
    if as_json:
        typer.echo(dumps(rows, indent=2))
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
    from moeguard.cli.app import _common, _out
    from moeguard.config import options
    from moeguard.studies.attack import AttackConfig

    return [*options(AttackConfig, only=["task", "keep"]), _out("output directory (attack.json, curves, plot)"),
            *_common(), *options(AttackConfig, exclude=("task", "keep"))]


@app.command()
@_config_command(_attack_params)
def attack(*, out: Path, model: Optional[str], device_map: Optional[str], backend: str, ray_address: Optional[str], gpus_per_job: float,
           threads: Optional[int], overwrite: bool, **flags) -> None:
    """The strongest prune-and-re-align attacker: worst case over its settings, and a from-scratch baseline."""
    from moeguard.edge import resolve_model, resolve_tasks
    from moeguard.io import check_output
    from moeguard.report.defense import attack_table, write_attack
    from moeguard.studies.attack import AttackStudy, preflight

    check_output(out, overwrite=overwrite, inputs=(model,), kind="folder")
    the_task = resolve_tasks([flags["task"]], what="--task")[0]
    handle = resolve_model(model, device_map=device_map, devices_here=backend != "ray")
    handle.check_fits([the_task])
    cfg = _attack_config(flags, task=the_task.name, keep=flags["keep"])
    preflight(cfg, handle)
    doc = _run_study(out, overwrite, {"model": handle.name, **cfg.to_dict(), **_placement(handle)}, handle, AttackStudy(), cfg, write_attack,
                     backend=backend, ray_address=ray_address, gpus_per_job=gpus_per_job, tasks=[the_task], threads=threads)
    _console().print(attack_table(doc))
    s = doc["summary"]
    u = s["uncertainty"]["realigned_retention"]
    spread = f" (per seed {u['min']:.1f}-{u['max']:.1f}%)" if u.get("n", 0) > 1 else ""
    pct = lambda x: "an unknown share" if x is None else f"{x:.1f}%"   # noqa: E731 -- None: no finite reference score
    typer.echo(f"attacker keeps {pct(s['pruned_retention'])} after pruning and {pct(s['realigned_retention'])} after "
               f"re-alignment with {cfg.budget} labels (worst case over {len(doc['runs'])} runs{spread}); written to {out}")


def _defend_params():
    from moeguard.cli.app import _common, _out, _param
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
                keeps: Optional[str], protocol: Optional[Path], device_map: Optional[str], backend: str,
                ray_address: Optional[str], gpus_per_job: float, threads: Optional[int], overwrite: bool, **flags) -> None:
    """Utility cost of a defense and the attacker's cost against it, base vs hardened, with plots."""
    from moeguard.edge import resolve_model, resolve_tasks
    from moeguard.io import check_output
    from moeguard.report.defense import defense_table, write_defense
    from moeguard.studies.defend import DefendEvalStudy, resolve

    check_output(out, overwrite=overwrite, inputs=(base, hardened, protocol), kind="folder")
    task_list = resolve_tasks(_names(tasks, "--tasks"), what="--tasks")
    extra = resolve_tasks(_names(utility_tasks, "--utility-tasks"), what="--utility-tasks") if utility_tasks is not None else []
    b, h = (resolve_model(m, device_map=device_map, devices_here=backend != "ray") for m in (base, hardened))
    for handle in (b, h):
        handle.check_fits([*task_list, *extra])
    cfg, proto_path = resolve(base=b, hardened=h, tasks=task_list, utility_tasks=extra,
                              keeps=_ints(keeps, "--keeps") if keeps is not None else None,
                              attack=_attack_config(flags, task=task_list[0].name, keep=1), protocol=protocol)
    from moeguard.io import file_sha256
    from moeguard.models.identity import weights_identity

    # both models' weights (the jobs' scope covers only the hardened one's), and the protocol's bytes
    settings = {"base": b.name, "hardened": h.name, "protocol": str(proto_path) if proto_path else None,
                "weights": {"base": weights_identity(b.arg), "hardened": weights_identity(h.arg)},
                "protocol_sha256": file_sha256(proto_path) if proto_path else None, **cfg.to_dict(), **_placement(h)}

    def write(doc, work):
        doc["base"], doc["hardened"] = b.name, h.name
        write_defense(doc, work)

    doc = _run_study(out, overwrite, settings, h, DefendEvalStudy(), cfg, write, backend=backend,
                     ray_address=ray_address, gpus_per_job=gpus_per_job, tasks=[*task_list, *extra], threads=threads)
    _console().print(defense_table(doc))
    met = {k: v["met"] for k, v in doc["goals"].items() if isinstance(v, dict)}
    said = {True: "met", False: "MISSED", None: "not measured"}
    typer.echo("goals: " + ", ".join(f"{k} {said[v]}" for k, v in met.items()) + f"; written to {out}")
