"""`moeguard realign`, `recovery` and `strategies`: the re-alignment half of the attack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli.app import (DeviceMapOpt, MaxMemoryOpt, OverwriteOpt, SeedOpt, _config_command, _console, _names, _progress, _run,
                              _placement, _run_study, _seed, app)
from moeguard.errors import MoeguardError
from moeguard.io import dumps

PoolOpt = Annotated[int, typer.Option("--pool-size", min=1, help="unlabeled pool: this many train records")]
EvalLimitOpt = Annotated[int, typer.Option("--eval-limit", min=1, help="eval records scored per round")]


def _realign_params():
    from moeguard.cli.app import _param
    from moeguard.config import options
    from moeguard.realign.engine import FinetuneConfig

    return [_param("model", Annotated[str, typer.Option("--model", help="the pruned checkpoint to re-align")]),
            _param("task", Annotated[str, typer.Option("--task", help="task name or YAML path (its train split is the pool)")]),
            _param("out", Annotated[Path, typer.Option("--out", help="output directory: re-aligned checkpoint + learning curve")]),
            _param("strategy", Annotated[str, typer.Option("--strategy", help="active-learning strategy (see `moeguard strategies`)")], "random"),
            _param("budget", Annotated[int, typer.Option("--budget", min=1, help="labels in total")], 64),
            _param("query_size", Annotated[int, typer.Option("--query-size", min=1, help="labels per round")], 16),
            *options(FinetuneConfig, only=["mode", "lr", "epochs", "min_steps", "batch_size", "save_every"],
                     overrides={"save_every": {"default": 10}}),
            _param("pool_size", PoolOpt, 1000), _param("eval_limit", EvalLimitOpt, 200),
            _param("original", Annotated[Optional[str], typer.Option("--original", help="the unpruned model (orphan strategy, retention); default: the source in the pruning record")], None),
            _param("full_score", Annotated[Optional[float], typer.Option("--full-score", help="the original model's score on the task (skips evaluating the original)")], None),
            _param("protocol", Annotated[Optional[Path], typer.Option("--protocol", help="a selective fine-tuning protocol (moeguard_protocol.json): only its modes and parameters are trained")], None),
            _param("device_map", DeviceMapOpt, None), _param("overwrite", OverwriteOpt, False), _param("seed", SeedOpt, 0)]


@app.command()
@_config_command(_realign_params)
def realign(*, model: str, task: str, out: Path, strategy: str, budget: int, query_size: int, pool_size: int,
            eval_limit: int, original: Optional[str], full_score: Optional[float], protocol: Optional[Path],
            device_map: Optional[str], overwrite: bool, seed: int, **ft_flags) -> None:
    """Fine-tune a pruned model on actively chosen labels; writes the checkpoint and its learning curve.

    A killed run continues from its last checkpoint when started again with the same settings."""
    from moeguard.config import build
    from moeguard.defense.protocol import Protocol
    from moeguard.edge import resolve_model, resolve_tasks, task_inputs
    from moeguard.io import check_output
    from moeguard.realign.api import realign_checkpoint
    from moeguard.realign.engine import FinetuneConfig
    from moeguard.realign.loop import ALConfig, schedule_for
    from moeguard.report.recovery import realign_table

    check_output(out, overwrite=overwrite, inputs=(model, original, protocol), kind="folder")
    the_task = resolve_tasks([task], what="--task")[0]   # its eval split is read too, before any weights load
    check_output(out, overwrite=overwrite, inputs=task_inputs([the_task]), kind="folder")
    schedule = schedule_for(budget=budget, query_size=query_size)
    proto = Protocol.load(protocol) if protocol is not None else None
    if proto is not None:
        proto.check_mode(ft_flags["mode"])
    ft = build(FinetuneConfig, ft_flags, what="fine-tuning", seed=seed, only=proto.patterns if proto else ())
    handle = resolve_model(model, tasks=False, device_map=device_map)   # an encoder-decoder trains through its seq2seq head
    handle.check_fits([the_task])
    _seed(seed)
    al = ALConfig(strategy=strategy, schedule=schedule, pool_size=pool_size, eval_limit=eval_limit, seed=seed,
                  finetune=ft)
    settings = {"model": handle.name, "task": the_task.name, "original": original, "full_score": full_score,
                **al.to_dict(), **_placement(handle)}
    with _progress() as progress:
        curve = realign_checkpoint(model=handle, task=the_task, out=out, al=al, original=original,
                                   full_score=full_score, overwrite=overwrite, progress=progress, run=_run(settings))
    _console().print(realign_table(curve))
    last = curve["points"][-1]
    typer.echo(f"re-aligned with {last['labels']} labels: {curve['metric']} "
               + ("not a finite number" if last["score"] is None else f"{last['score']:.4g}")
               + (f" ({last['retention']:.1f}% of the original)" if last["retention"] is not None else "")
               + f"; written to {out}")


def _recovery_params():
    from moeguard.cli.app import _common, _out, _param
    from moeguard.config import options
    from moeguard.realign.engine import FinetuneConfig
    from moeguard.studies.recovery import RecoveryConfig

    return [*options(RecoveryConfig, only=["task", "keep"]), _out("run directory to create"), *_common(),
            *options(RecoveryConfig, exclude=("task", "keep"), overrides={"method": {"default": None}}),
            _param("sweep", Annotated[Optional[Path], typer.Option(
                "--sweep", help="sweep.json of `moeguard sweep`: picks the best method")], None),
            *options(FinetuneConfig, only=["mode", "lr", "epochs", "min_steps", "batch_size"]),
            _param("max_memory", MaxMemoryOpt, None)]


@app.command()
@_config_command(_recovery_params)
def recovery(*, out: Path, model: Optional[str], device_map: Optional[str], backend: str, ray_address: Optional[str], gpus_per_job: float,
             threads: Optional[int], overwrite: bool, sweep: Optional[Path], max_memory: Optional[str], **flags) -> None:
    """Recovery study: labels each strategy needs to re-align a pruned task, against random.

    With --max-memory (and --mode lora), the pruned copy is streamed to disk and loaded under the
    cap, the adapters train over its offloaded weights, and the re-aligned models are not traced."""
    from moeguard.config import build
    from moeguard.edge import resolve_model, resolve_tasks
    from moeguard.io import check_output, read_json
    from moeguard.realign.engine import FinetuneConfig
    from moeguard.report.recovery import recovery_table, write_recovery
    from moeguard.studies.recovery import (DEFAULT_METHOD, RecoveryConfig, RecoveryStudy, best_method, check_capped,
                                           preflight)

    check_output(out, overwrite=overwrite, inputs=(model, sweep), kind="folder")
    cap = None
    if max_memory is not None:
        from moeguard.models.placement import parse_memory

        cap = parse_memory(max_memory, device_map=device_map)
        check_capped(max_memory, mode=flags["mode"], merge=flags.get("route") == "merge")
    method = flags.pop("method")
    if method is not None and sweep is not None:
        raise MoeguardError("give --method or --sweep, not both", hint="--sweep picks the method with the best AUC")
    the_task = resolve_tasks([flags.pop("task")], what="--task")[0]
    names = _names(flags.pop("strategies"), "--strategies")
    names = names if "random" in names else ["random", *names]
    # an encoder-decoder trains through its seq2seq head; Ray workers check their own devices
    handle = resolve_model(model, tasks=False, device_map=device_map, devices_here=backend != "ray")
    handle.check_fits([the_task])
    chosen = {}
    if sweep is not None:
        from moeguard.io import file_sha256

        method = best_method(read_json(sweep, what="sweep", hint="pass the sweep.json of `moeguard sweep`"),
                             the_task.name, model=handle.ref)
        chosen = {"method_from": {"sweep": str(sweep), "sha256": file_sha256(sweep)}}   # which sweep chose it
    ft = build(FinetuneConfig, {k: flags.pop(k) for k in ("mode", "lr", "epochs", "min_steps", "batch_size")},
               what="fine-tuning", seed=flags["seed"])
    cfg = build(RecoveryConfig, flags, what="recovery", task=the_task.name, strategies=tuple(names),
                method=method or DEFAULT_METHOD, finetune=ft, traced=cap is None)
    preflight(cfg, handle)
    settings = {"model": handle.name, **cfg.to_dict(), **chosen, **({"max_memory": cap} if cap is not None else {}),
                **_placement(handle, cap)}
    doc = _run_study(out, overwrite, settings, handle, RecoveryStudy(), cfg, write_recovery, backend=backend,
                     ray_address=ray_address, gpus_per_job=gpus_per_job, tasks=[the_task], max_memory=cap,
                     threads=threads)
    _console().print(recovery_table(doc))
    s = doc["summary"]
    if s["saves_labels"]:
        verdict = f"{s['saves_labels']} saves labels against random (95% interval above zero, {s['seeds']} seeds)"
    elif (s.get("seeds") or 0) < s["min_seeds"]:
        verdict = (f"no claim on saving labels from {s.get('seeds') or 0} seeds (a claim needs {s['min_seeds']}: "
                   f"--seeds {s['min_seeds']})")
    else:
        verdict = "no strategy saves labels against random (no savings interval lies above zero)"
    typer.echo(f"{len(doc['curves'])} runs; {verdict}; written to {out}")


@app.command("strategies")
def strategies_(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Registered active-learning strategies and the task kinds they apply to."""
    from moeguard.realign.strategies.base import list_strategies

    rows = [{"name": s.name, "kinds": sorted(k.value for k in s.kinds), "description": s.description}
            for s in list_strategies()]
    if as_json:
        typer.echo(dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['name']:<20} {', '.join(r['kinds']):<50} {r['description']}")
