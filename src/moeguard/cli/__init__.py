"""The moeguard command line: typed functions over the Python API, nothing more.

Over 400 lines for now: besides the model and data commands, it holds what every command
shares (the error handling, the study runner, the option helpers); moving each area's commands
into its own module is the remaining step of the CLI split.

Bad input (a :class:`MoeguardError`) is one line on stderr and exit code 2; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Callable, Optional

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
_python_format_warning = warnings.formatwarning


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
    from moeguard.edge import embedded_or
    from moeguard.io import check_output, write_json
    from moeguard.models.loading import load_model
    from moeguard.provenance import run_record
    from moeguard.report.tables import eval_table
    from moeguard.tasks.evaluate import evaluate_suite

    if out is not None:
        check_output(out, overwrite=overwrite)
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    if names == []:
        raise MoeguardError(f"--tasks '{tasks}' names no task", hint="see `moeguard tasks` for names")
    task_list = embedded_or(names, what="--tasks")  # fails on unreadable or empty data before any weights load
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


def _names(value: str | None, what: str) -> list[str]:
    names = [x.strip() for x in (value or "").split(",") if x.strip()]
    if value is not None and not names:
        raise MoeguardError(f"{what} '{value}' names nothing", hint=f"pass comma-separated {what.lstrip('-')}")
    return names


def _task_names(value: str | None, what: str) -> list[str]:
    """Task names from a comma-separated list of names or YAML paths, resolved once here: a file's
    task is adopted under its name, so the code below, which carries names, finds it."""
    from moeguard.edge import resolve_tasks

    return [t.name for t in resolve_tasks(_names(value, what), what=what, check=False)]


def _ints(value: str, what: str) -> list[int]:
    return _numbers(value, what, int, "integers", "2,4,6")


def _numbers(value: str, what: str, kind, noun: str = "numbers", example: str = "1e-4,1e-3") -> list:
    try:
        return [kind(x) for x in _names(value, what)]
    except ValueError:
        raise MoeguardError(f"{what} '{value}' is not a comma-separated list of {noun}", hint=f"e.g. {what} {example}") from None


BackendOpt = Annotated[str, typer.Option("--backend", help="where jobs run: local (this process) or ray")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="an existing Ray cluster; default: a local Ray")]


def _config_command(params: Callable[[], list]):
    """The command's signature is ``params()``: options generated from its config dataclass
    (see :mod:`moeguard.config`), so the command restates no default."""
    def wrap(fn):
        from moeguard.config import command

        return command(params())(fn)
    return wrap


def _run_study(out: Path, overwrite: bool, settings: dict, model, study, cfg, write, *, backend: str = "local",
               ray_address: str | None = None, tasks=()) -> dict:
    """A resumable study on the one engine: its jobs run on ``backend`` and are kept under
    ``.OUT.partial/jobs``; the document is stamped with the run record, written by
    ``write(doc, work)`` and renamed to ``out`` when done. ``model``: the resolved handle."""
    import torch

    from moeguard.edge import file_tasks
    from moeguard.io import resumable_dir
    from moeguard.studies import run_study
    from moeguard.studies.engine import Runtime, make_backend

    runner = make_backend(backend, address=ray_address)
    runtime = Runtime(model=model.arg, threads=torch.get_num_threads(), tasks=file_tasks(tasks))
    try:
        with resumable_dir(out, overwrite=overwrite, settings=settings) as work, _progress() as progress:
            doc = run_study(study, cfg, jobs=work / "jobs", runtime=runtime, backend=runner, progress=progress)
            if isinstance(doc.get("model"), dict):  # a sweep's model facts: name them
                doc["model"]["name"] = model.name
            else:
                doc["model"] = model.name
            doc["run"] = _run(settings)
            write(doc, work)
    finally:
        runner.close()
    return doc


@app.command()
def attribute(task: Annotated[str, typer.Option("--task", help="task name or YAML path")],
              method: Annotated[str, typer.Option("--method", help="attribution method (see `moeguard methods`)")],
              out: Annotated[Path, typer.Option("--out", help="scores JSON to write")],
              model: ModelOpt = None,
              samples: Annotated[int, typer.Option("--samples", min=1, help="calibration samples from the task's train split")] = 64,
              reference: Annotated[Optional[str], typer.Option("--reference", help="contrastive: comma-separated reference tasks; default: the rest of the embedded suite")] = None,
              batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
              overwrite: OverwriteOpt = False, seed: SeedOpt = 0) -> None:
    """Score every (layer, expert) for a task with one method; higher = more important."""
    from moeguard.attribution.base import get_method
    from moeguard.attribution.run import make_context, score
    from moeguard.edge import resolve_model, resolve_tasks
    from moeguard.io import check_output, write_json
    from moeguard.report.tables import scores_table

    check_output(out, overwrite=overwrite)
    get_method(method)
    refs = _names(reference, "--reference") if reference is not None else None
    resolve_tasks([task, *(refs or [])], what="--task")  # unreadable data fails before any weights load
    handle = resolve_model(model)
    _seed(seed)
    m, tokenizer, ref = handle.load()
    with _progress() as progress:
        ctx = make_context(m, tokenizer, task, samples=samples, batch_size=batch_size, seed=seed,
                           reference=refs, progress=progress)
        s = score(ctx, method)
    doc = s.to_dict()
    doc["model"] = ref.name
    doc["run"] = _run({"model": ref.name, "task": task, "method": method, "samples": samples, "seed": seed,
                       "reference": refs, "batch_size": batch_size})
    write_json(out, doc, overwrite=overwrite)
    _console().print(scores_table(doc))
    typer.echo(f"scores written to {out}")


@app.command()
def methods(as_json: JsonOpt = False) -> None:
    """Registered attribution methods."""
    from moeguard.attribution.base import list_methods

    rows = [{"name": m.name, "description": m.description, "needs_reference": m.needs_reference} for m in list_methods()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['name']:<15} {r['description']}")


@app.command()
def prune(out: Annotated[Path, typer.Option("--out", help="output checkpoint directory")],
          model: ModelOpt = None,
          scores: Annotated[Optional[Path], typer.Option("--scores", help="scores JSON from `moeguard attribute`")] = None,
          keep: Annotated[Optional[int], typer.Option("--keep", min=1, help="experts kept in every layer")] = None,
          keep_ratio: Annotated[Optional[float], typer.Option("--keep-ratio", min=0.0, max=1.0, help="share of each layer's experts kept")] = None,
          budget: Annotated[Optional[int], typer.Option("--budget", min=1, help="experts kept in total, allocated across layers by score")] = None,
          plan: Annotated[Optional[Path], typer.Option("--plan", help='explicit plan JSON {"keep": {"<layer>": [experts]}}')] = None,
          streaming: Annotated[Optional[bool], typer.Option("--streaming/--in-memory", help="default: streaming for a local checkpoint")] = None,
          plan_only: Annotated[bool, typer.Option("--plan-only", help="write only the plan JSON to --out")] = False,
          overwrite: OverwriteOpt = False, seed: SeedOpt = 0) -> None:
    """Physically remove experts: a smaller checkpoint vanilla transformers loads."""
    from moeguard.attribution.base import Scores
    from moeguard.io import check_output, write_json
    from moeguard.models.loading import inspect
    from moeguard.pruning.apply import write_pruned
    from moeguard.pruning.plan import PrunePlan, plan_from_scores

    if (scores is None) == (plan is None):
        raise MoeguardError("give exactly one of --scores or --plan", hint="e.g. --scores scores.json --keep 4")
    if plan is not None and any(x is not None for x in (keep, keep_ratio, budget)):
        raise MoeguardError("--keep/--keep-ratio/--budget go with --scores, not with --plan",
                            hint="an explicit plan already names the kept experts")
    check_output(out, overwrite=overwrite)
    _, config, family = inspect(model)
    if plan is not None:
        the_plan = PrunePlan.load(plan)
    else:
        s = Scores.load(scores)
        E = int(getattr(config, family.num_experts_key))
        if s.num_experts != E:
            raise MoeguardError(f"{scores} scores {s.num_experts} experts per layer, the model has {E}",
                                hint="attribute this model: moeguard attribute --model ... --out scores.json")
        the_plan = plan_from_scores(s, keep=keep, keep_ratio=keep_ratio, budget=budget, min_keep=family.min_experts)
    if plan_only:
        write_json(out, the_plan.to_dict(), overwrite=overwrite)
        typer.echo(f"plan ({the_plan.kept_total} experts kept, {the_plan.rule}) written to {out}")
        return
    _seed(seed)
    with _progress() as progress:
        record = write_pruned(model, the_plan, out, overwrite=overwrite, streaming=streaming, progress=progress,
                              settings={"model": model or "embedded", "scores": str(scores) if scores else None,
                                        "plan": str(plan) if plan else None, "keep": keep, "keep_ratio": keep_ratio,
                                        "budget": budget, "seed": seed})
    kept = ", ".join(f"{l}: {v}" for l, v in record["keep"].items())
    counts = sorted({len(v) for v in record["keep"].values()})
    typer.echo(f"pruned {record['original_num_experts']} -> {'/'.join(map(str, counts))} experts per layer "
               f"({record['method']}); kept {kept}; written to {out}")
    if len(counts) > 1:
        typer.echo("note: layers keep different expert counts; load it with moeguard (moeguard.models.loading."
                   "load_model, or any moeguard command's --model); vanilla transformers configs hold one count")


def _param(name: str, annotation, default=inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def _common(*, model: bool = True, backend: bool = True) -> list[inspect.Parameter]:
    """Options every study command has beside its config's: model, backend, overwrite."""
    ps = [_param("model", ModelOpt, None)] if model else []
    if backend:
        ps += [_param("backend", BackendOpt, "local"), _param("ray_address", RayAddressOpt, None)]
    return ps + [_param("overwrite", OverwriteOpt, False)]


def _out(help_text: str) -> inspect.Parameter:
    return _param("out", Annotated[Path, typer.Option("--out", help=help_text)])


def _sweep_params():
    from moeguard.config import options
    from moeguard.studies.sweep import SweepConfig

    none = {"default": None}
    return [_out("run directory to create"), *_common(),
            *options(SweepConfig, overrides={"tasks": none, "methods": none, "keeps": none})]


@app.command()
@_config_command(_sweep_params)
def sweep(*, out: Path, model: Optional[str], backend: str, ray_address: Optional[str], overwrite: bool,
          **flags) -> None:
    """Knowledge-loss study: retention per task, method and keep level, against random rankings."""
    from moeguard.attribution.base import get_method, list_methods
    from moeguard.config import build
    from moeguard.edge import embedded_or, resolve_model
    from moeguard.io import check_output
    from moeguard.report.sweep import sweep_table, write_sweep
    from moeguard.studies.sweep import SweepConfig, SweepStudy, SweepStudyConfig

    check_output(out, overwrite=overwrite)
    task_list = embedded_or(_names(flags["tasks"], "--tasks") if flags["tasks"] else None, what="--tasks")
    method_list = _names(flags["methods"], "--methods") if flags["methods"] else [m.name for m in list_methods()]
    for m in method_list:
        get_method(m)
    handle = resolve_model(model)
    keep = flags["keeps"]
    keeps = [handle.check_keep(k) for k in _ints(keep, "--keep")] if keep else handle.default_keeps()
    names = [t.name for t in task_list]
    cfg = build(SweepConfig, {k: v for k, v in flags.items() if k not in ("tasks", "methods", "keeps")},
                what="sweep", tasks=names, methods=method_list, keeps=keeps)
    settings = {"model": handle.name, **dataclasses.asdict(cfg)}

    def write(doc, work):
        write_sweep(doc, doc.pop("scores"), work)

    study = SweepStudyConfig(sweep=cfg, references={t: None for t in names})
    doc = _run_study(out, overwrite, settings, handle, SweepStudy(), study, write, backend=backend,
                     ray_address=ray_address, tasks=task_list)
    _console().print(sweep_table(doc))
    done = [c for c in doc["physical_checks"] if "skipped" not in c]
    bad = [c for c in done if c["abs_diff"] > 1e-6 or c["params_physical"] != c["params_expected"]]
    typer.echo(f"{len(done)} physical-pruning checks, {len(bad)} mismatched, "
               f"{len(doc['physical_checks']) - len(done)} skipped; "
               f"{doc['evaluations']['run']} evaluations in {doc['seconds']:.0f} s; written to {out}")


def _run(settings: dict) -> dict:
    from moeguard.provenance import run_record

    return run_record(settings)


@zoo_app.command("train")
def zoo_train(out: Annotated[Path, typer.Option("--out", help="output checkpoint directory")] = Path("runs/embedded-model"),
              steps: Annotated[int, typer.Option("--steps", min=1)] = 1000,
              tasks: Annotated[Optional[str], typer.Option("--tasks", help="train on these tasks instead of the embedded suite (names or YAML paths)")] = None,
              seed: SeedOpt = 0, overwrite: OverwriteOpt = False) -> None:
    """Re-make the embedded model from the embedded suite, or train the same recipe on other tasks."""
    from dataclasses import replace

    from moeguard.io import check_output
    from moeguard.zoo.recipe import EMBEDDED_RECIPE, Recipe
    from moeguard.zoo.train import train_embedded

    check_output(out, overwrite=overwrite)
    # rebuilding the embedded model keeps the recipe its shipped weights were made with
    recipe = replace(EMBEDDED_RECIPE if tasks is None else Recipe(), seed=seed, steps=steps)
    with _progress() as progress:
        card = train_embedded(out, recipe=recipe, overwrite=overwrite, progress=progress,
                              tasks=_task_names(tasks, "--tasks") if tasks else None)
    spec = card["specialization"]
    typer.echo(f"trained in {card['train_seconds']:.0f} s; final loss {card['loss_curve'][-1]}; "
               f"specialization (normalized task-expert MI) {spec['mean']:.3f} "
               f"vs {card['specialization_at_init']['mean']:.3f} at init; written to {out}")


@zoo_app.command("suite")
def zoo_suite(out: Annotated[Path, typer.Option("--out", help="output folder for the suite's data")],
              seed: SeedOpt = 0, overwrite: OverwriteOpt = False) -> None:
    """Rebuild the embedded suite's data from this interpreter's standard library."""
    from moeguard.io import atomic_dir
    from moeguard.zoo.suite import build_suite

    with atomic_dir(out, overwrite=overwrite) as tmp:
        manifest = build_suite(tmp, seed=seed)
    typer.echo(f"suite with {len(manifest.get('tasks', manifest))} tasks written to {out}")


from moeguard.cli import audit as _audit  # noqa: E402,F401  (registers its commands on app)
from moeguard.cli import defense as _defense  # noqa: E402,F401  (registers its commands on app)
from moeguard.cli import realign as _realign  # noqa: E402,F401  (registers its commands on app)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """moeguard's own warnings (a task too small to learn from, ...) as one line a user reads;
    other libraries' warnings keep Python's format, which names their source."""
    if f"{os.sep}moeguard{os.sep}" in str(filename) and issubclass(category, UserWarning):
        return f"moeguard: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    _state["debug"] = False  # set by the --debug callback of this call only
    saved, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = saved


def _main(argv: list[str] | None) -> int:
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="moeguard")
    except MoeguardError as e:
        if _state["debug"]:
            raise
        print(f"moeguard: error: {e.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moeguard: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as e:
        if _state["debug"] or not _is_usage_error(e):
            raise
        return _report_usage_error(e)
    return rv if isinstance(rv, int) else 0


def _click_names(e: Exception) -> set[str]:
    """Class names along the MRO that come from click. Matched by name, not by ``isinstance``:
    typer raises exceptions of click, or of its own vendored copy of click (typer >= 0.26), and
    these are different classes with the same names, so an ``import click`` check misses one."""
    return {c.__name__ for c in type(e).__mro__ if "click" in c.__module__}


def _is_usage_error(e: Exception) -> bool:
    return bool(_click_names(e) & {"Abort", "ClickException"})


def _report_usage_error(e: Exception) -> int:
    """One line on stderr for a click usage error (a missing option, a bad value, an unknown command)."""
    names = _click_names(e)
    if "Abort" in names:
        print("moeguard: aborted", file=sys.stderr)
        return 130
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None and getattr(ctx, "command_path", None) else "moeguard"
    if "NoArgsIsHelpError" in names or (ctx is not None and not str(e.format_message()).strip()):
        cmds = sorted(getattr(ctx.command, "commands", {}) or {}) if ctx is not None else []
        msg = "missing command" + (f"; commands: {', '.join(cmds)}" if cmds else "")
    else:
        msg = " ".join(str(e.format_message()).split())
    print(f"moeguard: error: {msg} (see `{where} --help`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
