"""`moeguard audit`: the whole attack as one resumable run, ending in a report."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli import _console, _progress, app
from moeguard.errors import MoeguardError

MARKER = "audit.json"

Str = Optional[str]
Int = Optional[int]


def _opt(name: str, help: str, **kw):
    return typer.Option(name, help=help, **kw)


@app.command()
def audit(out: Annotated[Path, _opt("--out", "run directory (created, or resumed when it holds this audit)")],
          model: Annotated[Str, _opt("--model", "checkpoint directory or hub id; default: the embedded model")] = None,
          tasks: Annotated[Str, _opt("--tasks", "comma-separated tasks or YAML paths; default: the embedded suite")] = None,
          config: Annotated[Optional[Path], _opt("--config", "audit.yaml with any of these settings (flags win)")] = None,
          methods: Annotated[Str, _opt("--methods", "attribution methods; default: all")] = None,
          keeps: Annotated[Str, _opt("--keeps", "experts-per-layer levels with collateral damage; default: N/4,N/2,3N/4")] = None,
          samples: Annotated[Int, _opt("--samples", "attribution samples per task")] = None,
          eval_limit: Annotated[Int, _opt("--eval-limit", "eval records per task in the sweep (default 64)")] = None,
          random_seeds: Annotated[Int, _opt("--random-seeds", "random rankings for the baseline band (default 3)")] = None,
          deletion_curves: Annotated[Optional[bool], _opt("--deletion-curves/--no-deletion-curves", "also every keep level from N-1 down to top-k (default: yes)")] = None,
          recovery: Annotated[Optional[bool], _opt("--recovery/--no-recovery", "run the recovery study (default: yes)")] = None,
          recovery_tasks: Annotated[Str, _opt("--recovery-tasks", "tasks for the recovery study; default: all")] = None,
          recovery_keep: Annotated[Int, _opt("--recovery-keep", "experts per layer the attacker keeps; default N/4")] = None,
          strategies: Annotated[Str, _opt("--strategies", "active-learning strategies (random is the baseline)")] = None,
          budgets: Annotated[Str, _opt("--budgets", "label counts on the learning curve, e.g. 8,32,128")] = None,
          recovery_seeds: Annotated[Int, _opt("--recovery-seeds", "runs per strategy")] = None,
          pool_size: Annotated[Int, _opt("--pool-size", "unlabeled pool of the attacker")] = None,
          recovery_eval_limit: Annotated[Int, _opt("--recovery-eval-limit", "eval records per recovery round")] = None,
          target: Annotated[Optional[float], _opt("--target", "percent of the full score the attacker wants back")] = None,
          defense: Annotated[Str, _opt("--defense", "also harden with this defense and compare (see `moeguard defenses`)")] = None,
          hardened: Annotated[Str, _opt("--hardened", "or compare this hardened checkpoint with --model")] = None,
          harden_steps: Annotated[Int, _opt("--harden-steps", "training steps of --defense")] = None,
          defense_tasks: Annotated[Str, _opt("--defense-tasks", "tasks the defense comparison attacks; default: the first")] = None,
          defense_budget: Annotated[Int, _opt("--defense-budget", "the attack harness's label budget (default 64)")] = None,
          defense_seeds: Annotated[Int, _opt("--defense-seeds", "seeds per attacker setting in the harness (default 1)")] = None,
          backend: Annotated[Str, _opt("--backend", "local (default) or ray")] = None,
          ray_address: Annotated[Str, _opt("--ray-address", "an existing Ray cluster; default: a local Ray")] = None,
          threads: Annotated[Int, _opt("--threads", "torch threads per job (and CPUs per Ray task)")] = None,
          gpus_per_job: Annotated[Optional[float], _opt("--gpus-per-job", "GPUs each Ray task asks for")] = None,
          dtype: Annotated[Str, _opt("--dtype", "weights dtype, e.g. bfloat16")] = None,
          device_map: Annotated[Str, _opt("--device-map", "accelerate device map, e.g. auto")] = None,
          overwrite: Annotated[bool, _opt("--overwrite", "start over in an existing run directory")] = False,
          seed: Annotated[Int, _opt("--seed", "random seed; the same seed gives the same numbers")] = None) -> None:
    """Run the audit: info, baseline, attribution, pruning sweep, recovery, (defense), report."""
    from moeguard.audit.config import build, load_yaml
    from moeguard.audit.jobs import make_backend
    from moeguard.audit.run import resolve, run_audit
    from moeguard.io import write_json

    flags = dict(model=model, tasks=tasks, methods=methods, keeps=keeps, samples=samples, eval_limit=eval_limit,
                 random_seeds=random_seeds, deletion_curves=deletion_curves, recovery=recovery, recovery_tasks=recovery_tasks,
                 recovery_keep=recovery_keep, strategies=strategies, budgets=budgets, recovery_seeds=recovery_seeds,
                 pool_size=pool_size, recovery_eval_limit=recovery_eval_limit, target=target, defense=defense,
                 hardened=hardened, harden_steps=harden_steps, defense_tasks=defense_tasks,
                 defense_budget=defense_budget, defense_seeds=defense_seeds, backend=backend, ray_address=ray_address,
                 threads=threads, gpus_per_job=gpus_per_job, dtype=dtype, device_map=device_map, seed=seed)
    cfg = build(load_yaml(config) if config is not None else {}, flags)
    _prepare(out, overwrite)
    cfg, info = resolve(cfg)
    import torch

    if cfg.dtype and not isinstance(getattr(torch, cfg.dtype, None), torch.dtype):
        raise MoeguardError(f"--dtype '{cfg.dtype}' is not a torch dtype", hint="e.g. bfloat16, float16, float32")
    runner = make_backend(cfg.backend, address=cfg.ray_address, gpus=cfg.gpus_per_job)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER, {"schema": "moeguard.audit-run/1", "config": cfg.to_dict()})
    command = " ".join(["moeguard", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("moeguard") else None
    try:
        with _progress() as progress:
            doc = run_audit(cfg, out, backend=runner, info=info, progress=progress, command=command)
    except KeyboardInterrupt:
        print(f"moeguard: interrupted; finished stages and jobs are kept in {out}: "
              "run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        runner.close()
    _summary(doc, out)


def _prepare(out: Path, overwrite: bool) -> None:
    """A new folder, or an audit run folder (resumed, or emptied with --overwrite); nothing else."""
    if not out.parent.exists():
        raise MoeguardError(f"output folder {out.parent} does not exist", hint=f"create it: mkdir -p {out.parent}")
    if not out.exists():
        return
    if not out.is_dir():
        raise MoeguardError(f"--out {out} is a file", hint="choose a directory path for the run")
    is_run = (out / MARKER).is_file()
    if not is_run and any(out.iterdir()):
        raise MoeguardError(f"--out {out} exists and is not an audit run directory",
                            hint="choose a new folder; moeguard only resumes or replaces its own runs")
    if is_run and overwrite:
        for name in ("stages", "jobs", "plots"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("results.json", "report.md", "report.html", MARKER):
            (out / name).unlink(missing_ok=True)


def _summary(doc: dict, out: Path) -> None:
    from rich.table import Table

    from moeguard.report.audit import risk_rows

    rows = risk_rows(doc)
    t = Table(title=f"Prunability risk of {doc['model']['name']}")
    for c in rows[0]:
        t.add_column(c, justify="left" if c in ("task", "risk", "metric", "best strategy") else "right")
    for r in rows:
        t.add_row(*[str(v) for v in r.values()])
    console = _console()
    console.print(t)
    stages = ", ".join(s["stage"] + (" (cached)" if s["cached"] else f" {s['seconds']:.0f} s") for s in doc["stages"])
    console.print(f"stages: {stages}; {doc['seconds']:.0f} s in all")
    console.print(f"report: {out / 'report.html'} (also report.md, results.json)")
