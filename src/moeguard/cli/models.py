"""`moeguard info`, `tasks` and `eval`: what a model is, which tasks exist, and how it scores on them."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli.app import DeviceMapOpt, JsonOpt, MaxMemoryOpt, ModelOpt, OverwriteOpt, SeedOpt, _console, _no_out, _progress, _seed, app
from moeguard.errors import MoeguardError
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
    from moeguard.models.catalog import catalog

    types = [t.strip() for t in model_types.split(",") if t.strip()] if model_types is not None else None
    if types == []:
        raise MoeguardError(f"--model-types '{model_types}' names no model type", hint="pass e.g. --model-types flint")
    if types is not None:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        import difflib

        unknown = [t for t in types if t not in CONFIG_MAPPING_NAMES]
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(CONFIG_MAPPING_NAMES), n=3, cutoff=0.6)
            raise MoeguardError(f"--model-types names {unknown}, which the installed transformers does not know",
                                hint=(f"did you mean {', '.join(close)}? " if close else "")
                                + "`moeguard families` lists every MoE model type")
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
    from moeguard.edge import embedded_or, resolve_model, task_inputs
    from moeguard.io import check_output, write_json
    from moeguard.models.placement import parse_memory
    from moeguard.provenance import run_record
    from moeguard.report.tables import eval_table
    from moeguard.tasks.evaluate import evaluate_suite

    if out is not None:
        check_output(out, overwrite=overwrite, kind="file", inputs=(model,))
    elif overwrite:
        _no_out()
    cap = parse_memory(max_memory, device_map=device_map) if max_memory is not None else None
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else None
    if names == []:
        raise MoeguardError(f"--tasks '{tasks}' names no task", hint="see `moeguard tasks` for names")
    task_list = embedded_or(names, what="--tasks")  # fails on unreadable or empty data before any weights load
    if out is not None:   # a task file or data folder as --out would be replaced by the results
        check_output(out, overwrite=overwrite, kind="file", inputs=task_inputs(task_list))
    # inspected before the resumable folder exists: a model that is no MoE, or has no config, leaves nothing
    # behind (an encoder-decoder evaluates through its seq2seq head)
    handle = resolve_model(model, tasks=False, device_map=device_map)
    device_map = handle.device_map
    settings = {"tasks": [t.name for t in task_list], "limit": limit, "batch_size": batch_size, "seed": seed,
                "max_memory": cap, **({"device_map": device_map} if device_map is not None else {})}
    with contextlib.ExitStack() as stack:
        cache = None
        if out is not None:
            from moeguard.io import resumable_scratch
            from moeguard.models.identity import weights_identity
            from moeguard.tasks.loaders import task_identity

            # each task's result is kept beside --out as it finishes: the same command resumes after a
            # kill, on the same weights, task definitions and data, and settings
            # not the cap's bytes: where the weights sit changes no score, so a run restarted under another cap resumes
            cache = stack.enter_context(resumable_scratch(out, overwrite=overwrite, settings={
                **{k: v for k, v in settings.items() if k != "max_memory"}, "model": weights_identity(model),
                "task_identity": [task_identity(t) for t in task_list]}))
        _seed(seed)
        m, tokenizer, ref = handle.load(max_memory=cap)
        try:
            with _progress() as progress:
                results = evaluate_suite(m, tokenizer, task_list, limit=limit, batch_size=batch_size,
                                         progress=progress, model_name=ref.name, cache=cache)
        except KeyboardInterrupt:
            if cache is None:
                raise
            import sys

            print(f"moeguard: interrupted; the tasks evaluated so far are kept in {cache}: run the same command "
                  f"again to resume", file=sys.stderr)
            raise SystemExit(130) from None
        results["run"] = run_record({"model": ref.name, **settings})
        if out is not None:
            write_json(out, results, overwrite=overwrite)
    _console().print(eval_table(results))
    if out is not None:
        typer.echo(f"results written to {out}")


