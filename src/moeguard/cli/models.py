"""`moeguard info`, `tasks` and `eval`: what a model is, which tasks exist, and how it scores on them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli.app import DeviceMapOpt, JsonOpt, MaxMemoryOpt, ModelOpt, OverwriteOpt, SeedOpt, _console, _kept_on_interrupt, _progress, app
from moeguard.io import dumps


@app.command()
def info(model: ModelOpt = None, as_json: JsonOpt = False) -> None:
    """Family, layers, experts per layer, top-k, shared experts and parameter counts."""
    from moeguard.models.info import model_info

    data = model_info(model)
    if as_json:
        typer.echo(dumps(data, indent=2))
        return
    from moeguard.report.tables import info_table

    _console().print(info_table(data))


@app.command()
def families(as_json: JsonOpt = False,
             model_types: Annotated[Optional[str], typer.Option(
                 "--model-types", help="comma-separated model types to check; default: every MoE type in the "
                                       "installed transformers")] = None) -> None:
    """Built-in family specs, and whether each MoE model type of the installed transformers is
    built in, inferred and verified against its own router, or unsupported (and why)."""
    from moeguard.models.catalog import catalog, check_model_types

    types = check_model_types(model_types) if model_types is not None else None
    if as_json:
        typer.echo(dumps(catalog(types), indent=2))
        return
    with _progress() as progress:
        data = catalog(types, progress=progress)
    from moeguard.report.tables import families_tables

    for table in families_tables(data):
        _console().print(table)


@app.command()
def tasks(as_json: JsonOpt = False) -> None:
    """Registered tasks: name, kind, source and metric."""
    from moeguard.tasks.registry import list_tasks

    rows = [{"name": t.name, "kind": t.kind.value, "source": _source_text(t), "metric": t.primary_metric,
             "description": t.description} for t in list_tasks()]
    if as_json:
        typer.echo(dumps(rows, indent=2))
        return
    from moeguard.report.tables import tasks_table

    _console().print(tasks_table(rows))


def _source_text(task) -> str:
    s = task.source
    if s.type == "hub":
        return f"hub:{s.hub_name}" + (f"/{s.hub_config}" if s.hub_config else "")
    return f"{s.type}:{s.path}"


@app.command("eval")
def eval_(model: ModelOpt = None,
          tasks: Annotated[Optional[str], typer.Option("--tasks", help="comma-separated task names or YAML paths; default: the embedded suite")] = None,
          limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="evaluate at most N samples per task")] = None,
          batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
          out: Annotated[Optional[Path], typer.Option("--out", help="write results JSON here")] = None,
          device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None, overwrite: OverwriteOpt = False,
          seed: SeedOpt = 0) -> None:
    """Per-task metrics with the trivial baseline beside each."""
    from moeguard.report.tables import eval_table
    from moeguard.tasks.evalrun import run_eval

    from moeguard.cli.app import _names

    names = _names(tasks, "--tasks") if tasks is not None else None   # "", or a task named twice: one line
    with _kept_on_interrupt("tasks evaluated"):
        results = run_eval(model=model, tasks=names, limit=limit, batch_size=batch_size, out=out,
                           device_map=device_map, max_memory=max_memory, overwrite=overwrite, seed=seed,
                           progress=_progress)
    _console().print(eval_table(results))
    if out is not None:
        typer.echo(f"results written to {out}")
