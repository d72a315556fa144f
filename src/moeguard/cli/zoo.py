"""`moeguard zoo train` and `zoo suite`: rebuild the embedded model and its task suite."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from moeguard.cli.app import OverwriteOpt, SeedOpt, _console, _progress, _task_names, _training_state, zoo_app
import typer


DEFAULT_OUT = Path("runs/embedded-model")


@zoo_app.command("train")
def zoo_train(out: Annotated[Path, typer.Option("--out", help="output checkpoint directory")] = DEFAULT_OUT,
              steps: Annotated[int, typer.Option("--steps", min=1)] = 1000,
              tasks: Annotated[Optional[str], typer.Option("--tasks", help="train on these tasks instead of the embedded suite (names or YAML paths)")] = None,
              seed: SeedOpt = 0, overwrite: OverwriteOpt = False) -> None:
    """Re-make the embedded model from the embedded suite, or train the same recipe on other tasks."""
    from dataclasses import replace

    from moeguard.io import check_output
    from moeguard.zoo.recipe import EMBEDDED_RECIPE, Recipe
    from moeguard.zoo.train import train_embedded

    if out == DEFAULT_OUT and not out.parent.exists():   # the default's folder (git-ignored) is absent in a fresh clone
        try:
            out.parent.mkdir()
        except OSError as e:
            from moeguard.errors import MoeguardError

            raise MoeguardError(f"cannot create {out.parent} for the default --out ({e.strerror})",
                                hint="pass --out PATH in a folder you can write") from None
    check_output(out, overwrite=overwrite, kind="folder")
    # rebuilding the embedded model keeps the recipe its shipped weights were made with
    recipe = replace(EMBEDDED_RECIPE if tasks is None else Recipe(), seed=seed, steps=steps)
    # "" is refused, not the suite; training never scores: any metric is fine (normalized_perplexity was refused)
    names = _task_names(tasks, "--tasks", scored=False) if tasks is not None else None
    if names:
        from moeguard.edge import task_inputs
        from moeguard.tasks.registry import get_task

        check_output(out, overwrite=overwrite, kind="folder", inputs=task_inputs([get_task(n) for n in names]))
    # beside the output, until it is written: an interrupted run continues from its last saved step
    with _training_state(out, "zoo", every=50) as state:
        with _progress() as progress:
            card = train_embedded(out, recipe=recipe, overwrite=overwrite, progress=progress, tasks=names,
                                  checkpoint=state)
    spec = card["specialization"]
    from moeguard.report.tables import zoo_train_table

    _console().print(zoo_train_table(card))
    resumed = f" (resumed at step {card['resumed_from']} of {steps})" if card.get("resumed_from") else ""
    typer.echo(f"trained in {card['train_seconds']:.0f} s{resumed}; final loss {card['loss_curve'][-1]}; "
               f"specialization (normalized task-expert MI) {spec['mean']:.3f} "
               f"vs {card['specialization_at_init']['mean']:.3f} at init; written to {out}")


@zoo_app.command("suite")
def zoo_suite(out: Annotated[Path, typer.Option("--out", help="output folder for the suite's data")],
              python_stdlib: Annotated[Optional[Path], typer.Option("--python-stdlib", help="standard-library folder to read (default: this interpreter's)")] = None,
              seed: SeedOpt = 0, overwrite: OverwriteOpt = False) -> None:
    """Rebuild the embedded suite's data from a Python standard library (``python -m moeguard.zoo.suite`` too)."""
    from moeguard.io import atomic_dir, check_output
    from moeguard.zoo.suite import build_suite
    from moeguard.zoo.suite.builder import check_stdlib

    # the standard library read is an input: --out there (or above it) with --overwrite replaced it
    from moeguard.zoo.suite.stdlib_scan import default_stdlib

    check_output(out, overwrite=overwrite, kind="folder", inputs=(python_stdlib or default_stdlib(),))
    check_stdlib(python_stdlib)            # before the scan
    with atomic_dir(out, overwrite=overwrite) as tmp:
        manifest = build_suite(tmp, seed=seed, python_stdlib=python_stdlib)
        from moeguard.io import write_json
        from moeguard.provenance import run_record

        # beside MANIFEST.json, not in it: the manifest is the data's, byte-for-byte the same on every rebuild
        write_json(tmp / "run.json", run_record({"seed": seed, "python_stdlib": str(python_stdlib) if python_stdlib else None}))
    from rich.table import Table

    from moeguard.zoo.suite.common import SPLITS

    table = Table("task", *SPLITS, "KiB")
    total = 0
    for task, info in manifest["tasks"].items():
        size = sum(v["bytes"] for v in info["splits"].values())
        total += size
        table.add_row(task, *(str(info["splits"][sp]["records"]) for sp in SPLITS), f"{size / 1024:.0f}")
    _console().print(table)
    typer.echo(f"suite with {len(manifest['tasks'])} tasks ({total / 1024:.0f} KiB) written to {out}")
