"""The moeguard command line: typed functions over the Python API, nothing more.

Bad input (a :class:`MoeguardError`) is one line on stderr and exit code 2; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.errors import MoeguardError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Audit and harden Mixture-of-Experts LLMs against unauthorized expert pruning.")
zoo_app = typer.Typer(no_args_is_help=True, help="Build the embedded model and suite.")
app.add_typer(zoo_app, name="zoo")

ModelOpt = Annotated[Optional[str], typer.Option("--model", help="checkpoint directory or hub id; default: the embedded model")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed; the same seed gives the same numbers")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing output")]

_state = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    _state["debug"] = debug


def _console():
    from rich.console import Console

    # pipes and CI logs get a readable width instead of rich's 80-column fallback
    return Console(stderr=False, width=None if sys.stdout.isatty() else 120)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False, console=_console())


def _seed(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


@app.command()
def info(model: ModelOpt = None, as_json: JsonOpt = False) -> None:
    """Family, layers, experts per layer, top-k, shared experts and parameter counts."""
    from moeguard.models.info import model_info

    data = model_info(model)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from moeguard.report.tables import info_table

    _console().print(info_table(data))


@app.command()
def tasks(as_json: JsonOpt = False) -> None:
    """Registered tasks: name, kind, source and metric."""
    from moeguard.tasks.registry import list_tasks

    rows = [{"name": t.name, "kind": t.kind.value, "source": _source_text(t), "metric": t.primary_metric,
             "description": t.description} for t in list_tasks()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
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
          overwrite: OverwriteOpt = False, seed: SeedOpt = 0) -> None:
    """Per-task metrics with the trivial baseline beside each."""
    from moeguard.io import check_output, write_json
    from moeguard.models.loading import load_model
    from moeguard.provenance import run_record
    from moeguard.report.tables import eval_table
    from moeguard.tasks.evaluate import evaluate_suite
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.registry import get_task
    from moeguard.zoo.train import embedded_tasks

    if out is not None:
        check_output(out, overwrite=overwrite)
    task_list = [get_task(t.strip()) for t in tasks.split(",") if t.strip()] if tasks else embedded_tasks()
    if not task_list:
        raise MoeguardError(f"--tasks '{tasks}' names no task", hint="see `moeguard tasks` for names")
    for t in task_list:  # fail on unreadable or empty data before loading any weights
        load_records(t, "eval", limit=1)
    _seed(seed)
    m, tokenizer, ref = load_model(model)
    with _progress() as progress:
        results = evaluate_suite(m, tokenizer, task_list, limit=limit, batch_size=batch_size,
                                 progress=progress, model_name=ref.name)
    results["run"] = run_record({"model": ref.name, "tasks": [t.name for t in task_list], "limit": limit,
                                 "batch_size": batch_size, "seed": seed})
    _console().print(eval_table(results))
    if out is not None:
        write_json(out, results, overwrite=overwrite)
        typer.echo(f"results written to {out}")


@zoo_app.command("train")
def zoo_train(out: Annotated[Path, typer.Option("--out", help="output checkpoint directory")] = Path("runs/embedded-model"),
              steps: Annotated[int, typer.Option("--steps", min=1)] = 1000,
              seed: SeedOpt = 0, overwrite: OverwriteOpt = False) -> None:
    """Re-make the embedded model from the embedded suite (deterministic for a seed)."""
    from moeguard.io import check_output
    from moeguard.zoo.recipe import Recipe
    from moeguard.zoo.train import train_embedded

    check_output(out, overwrite=overwrite)
    with _progress() as progress:
        card = train_embedded(out, recipe=Recipe(seed=seed, steps=steps), overwrite=overwrite, progress=progress)
    spec = card["specialization"]
    typer.echo(f"trained in {card['train_seconds']:.0f} s; final loss {card['loss_curve'][-1]}; "
               f"specialization (normalized task-expert MI) {spec['mean']:.3f} "
               f"vs {card['specialization_at_init']['mean']:.3f} at init; written to {out}")


@zoo_app.command("suite")
def zoo_suite(out: Annotated[Path, typer.Option("--out", help="output folder for the suite's data")],
              seed: SeedOpt = 0, overwrite: OverwriteOpt = False) -> None:
    """Rebuild the embedded suite's data from this interpreter's standard library."""
    from moeguard.io import atomic_dir
    from moeguard.tasks.embedded.build import build_suite

    with atomic_dir(out, overwrite=overwrite) as tmp:
        manifest = build_suite(tmp, seed=seed)
    typer.echo(f"suite with {len(manifest.get('tasks', manifest))} tasks written to {out}")


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except MoeguardError as e:
        if _state["debug"]:
            raise
        print(f"moeguard: error: {e.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moeguard: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.exceptions.Abort):
            print("moeguard: aborted", file=sys.stderr)
            return 130
        if isinstance(e, click.ClickException):
            e.show()
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
