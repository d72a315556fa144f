"""What every command shares: the typer app, common options, the console and progress bar,
list parsing, options generated from config dataclasses, and the error handling of ``main``.

Each area's commands live in their own module (:mod:`moeguard.cli.models`, ``pruning``,
``realign``, ``defense``, ``audit``, ``zoo``) and hold no logic: they parse, call the Python API
and print. Bad input (a :class:`MoeguardError`) is one line on stderr and exit code 2; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import contextlib
import inspect
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from moeguard.config import SEED_MAX
from moeguard.errors import MoeguardError, own_warning

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Audit and harden Mixture-of-Experts LLMs against unauthorized expert pruning.")
zoo_app = typer.Typer(no_args_is_help=True, help="Build the embedded model and suite.")
app.add_typer(zoo_app, name="zoo")

ModelOpt = Annotated[Optional[str], typer.Option("--model", help="checkpoint directory or hub id; default: the embedded model")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="random seed; the same seed gives the same numbers")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing output")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(
    "--device-map", help="where the weights go: auto (over the visible GPUs, then the CPU), cuda, cuda:N, cpu; "
    "default: the CPU (with --max-memory: auto)")]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(
    "--max-memory", help="cap on the host memory the weights take, e.g. 8GiB; accelerate's map fills the visible "
    "GPUs first, then host memory up to the cap, and offloads the layers past it to disk, read while they run")]

_state = {"debug": False}
_python_format_warning = warnings.formatwarning


@app.callback()
def _global_options(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
                    trust_inferred_family: Annotated[bool, typer.Option(
                        "--trust-inferred-family", help="use a family spec moeguard inferred but could not verify against "
                                                        "the model's own router (see `moeguard families`)")] = False) -> None:
    from moeguard.models.families import trust_inferred_families

    _state["debug"] = debug
    trust_inferred_families(trust_inferred_family)


def _console(*, stderr: bool = False):
    from rich.console import Console

    # pipes and CI logs get a readable width instead of rich's 80-column fallback
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    # no markup or emoji codes: tables carry data (a scan's decoded tokens, `x[i]`, `[/INST]`, paths), which
    # rich read as styles (dropped from the output) or as a closing tag (a MarkupError after the files were written)
    return Console(stderr=stderr, width=None if tty else 120, markup=False, emoji=False)


def _progress(*, stderr: bool = False):
    """Progress bars, on stdout beside the summary table; ``stderr=True`` under ``--json``, whose
    stdout is the JSON document alone."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False, console=_console(stderr=stderr))


def _seed(seed: int) -> None:
    from moeguard.config import seed_everything

    seed_everything(seed)


def _names(value: str | None, what: str) -> list[str]:
    names = [x.strip() for x in (value or "").split(",") if x.strip()]
    if value is not None and not names:
        raise MoeguardError(f"{what} '{value}' names nothing", hint=f"pass comma-separated {what.lstrip('-')}")
    from moeguard.config import repeated

    twice = repeated(names)
    if twice:   # a repeat doubled a study's jobs and paired one seed's rows with another's
        raise MoeguardError(f"{what} '{value}' names {', '.join(twice)} more than once",
                            hint=f"list each of {what.lstrip('-')} once")
    return names


def _task_names(value: str | None, what: str, *, scored: bool = True) -> list[str]:
    """Task names from a comma-separated list of names or YAML paths, resolved once here: a file's
    task is adopted under its name, so the code below, which carries names, finds it. ``scored``:
    the command scores them (a metric no command computes is refused); training reads their texts only."""
    from moeguard.edge import resolve_tasks

    return [t.name for t in resolve_tasks(_names(value, what), what=what, check=False, scored=scored)]


def _ints(value: str, what: str) -> list[int]:
    return _numbers(value, what, int, "integers", "2,4,6")


def _numbers(value: str, what: str, kind, noun: str = "numbers", example: str = "1e-4,1e-3") -> list:
    try:
        return [kind(x) for x in _names(value, what)]
    except ValueError:
        raise MoeguardError(f"{what} '{value}' is not a comma-separated list of {noun}", hint=f"e.g. {what} {example}") from None


BackendOpt = Annotated[str, typer.Option("--backend", help="where jobs run: local (this process) or ray")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="an existing Ray cluster; default: a local Ray")]
GpusPerJobOpt = Annotated[float, typer.Option("--gpus-per-job", min=0.0, help="GPUs each Ray task asks for (with --backend ray and a GPU --device-map)")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, max=4096, help="torch threads per job (and CPUs "
                                                   "per Ray task); default: this machine's cores")]


def _config_command(params: Callable[[], list]):
    """The command's signature is ``params()``: options generated from its config dataclass
    (see :mod:`moeguard.config`), so the command restates no default."""
    def wrap(fn):
        from moeguard.config import command

        return command(params())(fn)
    return wrap


def _run_study(out: Path, overwrite: bool, settings: dict, model, study, cfg, write, *, backend: str = "local",
               ray_address: str | None = None, tasks=(), max_memory: int | None = None, gpus_per_job: float = 0.0,
               threads: int | None = None) -> dict:
    """:func:`moeguard.studies.run_to_dir` with the command's progress bar."""
    from moeguard.edge import task_inputs
    from moeguard.io import check_output
    from moeguard.studies import run_to_dir

    # the tasks are resolved now: a task file or data folder as --out would be replaced by the run; and
    # the model's folder, here for every study command (a new one need not remember it)
    own = [str(model.ref.path)] if model.ref.path is not None else []
    check_output(out, overwrite=overwrite, kind="folder", inputs=[*task_inputs(tasks), *own])

    with _progress() as progress:
        return run_to_dir(study, cfg, out=out, model=model, settings=settings, write=write, backend=backend,
                          ray_address=ray_address, tasks=tasks, overwrite=overwrite, progress=progress,
                          max_memory=max_memory, gpus_per_job=gpus_per_job, threads=threads)


def _param(name: str, annotation, default=inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def _common(*, model: bool = True, backend: bool = True) -> list[inspect.Parameter]:
    """Options every study command has beside its config's: model, device map, backend, overwrite."""
    ps = [_param("model", ModelOpt, None)] if model else []
    ps += [_param("device_map", DeviceMapOpt, None)]
    if backend:
        ps += [_param("backend", BackendOpt, "local"), _param("ray_address", RayAddressOpt, None),
               _param("gpus_per_job", GpusPerJobOpt, 0.0), _param("threads", ThreadsOpt, None)]
    return ps + [_param("overwrite", OverwriteOpt, False)]


def _no_out() -> None:
    """--overwrite given to a command whose --out is optional, without --out: it would do nothing."""
    raise MoeguardError("--overwrite replaces an existing --out, and no --out was given",
                        hint="pass --out PATH, or drop --overwrite")


@contextlib.contextmanager
def _kept_on_interrupt(what: str):
    """An interrupt inside the block names what its resumable folder kept: "the tasks evaluated so
    far are kept in ..." (:func:`_interrupted` says it, as for every command)."""
    try:
        yield
    except KeyboardInterrupt:
        _state["kept"] = what
        raise


@contextlib.contextmanager
def _training_state(out: Path, kind: str, every: int):
    """For a trainer that saves its state beside ``out`` (``.OUT.KIND-state``, every ``every`` steps):
    one run at a time to ``out``; an interrupt says whether a state was kept and exits 130; the
    state is removed only once the block completes (a failed save keeps what training did)."""
    from moeguard import trainstate
    from moeguard.io import one_run

    state = out.with_name(f".{out.name}.{kind}-state")
    # one run at a time to this --out: a second one's saves replaced the first's training state under it
    with one_run(out):
        try:
            yield state
        except KeyboardInterrupt:
            # before the first save there is nothing to resume from
            print(f"moeguard: interrupted; the training state is kept in {state} (saved every {every} steps): run the "
                  "same command again to resume" if state.exists() else "moeguard: interrupted before the first "
                  f"saved training state (every {every} steps); no output was written", file=sys.stderr)
            raise SystemExit(130) from None
        trainstate.clear(state)


def _placement(handle, max_memory: int | None = None) -> dict:
    """The run record's ``device_map`` entry, when one was given or a cap makes it auto (absent: the CPU)."""
    return handle.placement_under(max_memory)


def _out(help_text: str) -> inspect.Parameter:
    return _param("out", Annotated[Path, typer.Option("--out", help=help_text)])


def _run(settings: dict) -> dict:
    from moeguard.provenance import run_record

    return run_record(settings)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """moeguard's own warnings (a task too small to learn from, ...) as one line a user reads;
    other libraries' warnings keep Python's format, which names their source."""
    if own_warning(category, filename):
        return f"moeguard: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    from moeguard.models.families import trust_inferred_families

    _state["debug"] = False  # set by the --debug callback of this call only
    _state["kept"] = None    # what an interrupt's kept folder holds, said by the command that knows
    saved, warnings.formatwarning = warnings.formatwarning, _format_warning
    trusted = trust_inferred_families(False)   # the flag holds for this call only
    handlers = _terminate_as_interrupt()
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = saved
        trust_inferred_families(trusted)   # a library caller's own setting, as it was
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _terminate_as_interrupt() -> dict:
    """SIGTERM and SIGHUP (timeout, a scheduler's time limit, docker stop, a closed terminal) end the
    command as Ctrl-C does: temporary outputs are removed and resumable work is kept and named.
    Python's default for them exits without running a single ``finally``. Returns the handlers
    replaced (none off the main thread, where signals cannot be set)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    replaced = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        # ignored when the command started (nohup, trap '' HUP): it stays ignored, as asked (a closed
        # terminal ended a `nohup moeguard audit` or `serve` the user meant to outlive the session)
        if sig is None or signal.getsignal(sig) == signal.SIG_IGN:
            continue
        try:
            replaced[sig] = signal.signal(sig, interrupt)
        except ValueError:   # not the main thread
            break
    return replaced


def _main(argv: list[str] | None) -> int:
    from moeguard.io import forget_progress
    from moeguard.provenance import start_command

    forget_progress()   # an earlier call's left partial (a library caller's process) is not this call's
    start_command()     # nor the work from other versions an earlier call reused
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="moeguard")
    except MoeguardError as e:
        if _state["debug"]:
            raise
        from moeguard.io import kept_progress

        kept_progress()   # a refusal inside a resumable block leaves no folder holding only its settings stamp
        print(f"moeguard: error: {e.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as e:
        if _state["debug"] or not _is_usage_error(e):
            raise
        return _report_usage_error(e)
    if rv == 130:   # typer turns a KeyboardInterrupt inside a command into this exit code, silently
        return _interrupted()
    return rv if isinstance(rv, int) else 0


def _interrupted() -> int:
    from moeguard.io import kept_progress

    kept = kept_progress()   # a resumable command's finished steps survive the interrupt
    what = _state.get("kept") or "work done"
    print(f"moeguard: interrupted; the {what} so far {'is' if what == 'work done' else 'are'} kept in {kept}: run the "
          f"same command again to resume" if kept is not None else "moeguard: interrupted; no output was written",
          file=sys.stderr)
    return 130


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
