"""`moeguard audit`: the whole attack as one resumable run, ending in a report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli.app import _console, _progress, app


def _audit_params():
    import inspect

    from moeguard.audit.config import AuditConfig
    from moeguard.config import options

    own = [inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[Path, typer.Option(
               "--out", help="run directory (created, or resumed when it holds this audit)")]),
           inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
               Optional[Path], typer.Option("--config", help="audit.yaml with any of these settings (flags win)")]),
           inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
               bool, typer.Option("--overwrite", help="start over in an existing run directory")])]
    # every setting's option comes from AuditConfig; None = not given, so the YAML file or the default decides
    return own + options(AuditConfig, unset=True)


def _audit_command():
    from moeguard.config import command

    @command(_audit_params())
    def audit(*, out: Path, config: Optional[Path] = None, overwrite: bool = False, **flags) -> None:
        """Run the audit: info, baseline, attribution, pruning sweep, recovery, (defense), report."""
        run(out=out, config=config, overwrite=overwrite, flags=flags)

    return audit


def run(*, out: Path, config: Optional[Path], overwrite: bool, flags: dict) -> None:
    from moeguard.audit.config import build, load_yaml
    from moeguard.audit.run import audit_inputs, lock_run_dir, mark_run_dir, prepare_run_dir, resolve, run_audit
    from moeguard.studies.engine import make_backend

    cfg = build(load_yaml(config) if config is not None else {}, flags)
    prepare_run_dir(out, overwrite=overwrite, clear=False, inputs=audit_inputs(cfg, config))
    cfg, handle = resolve(cfg)
    runner = make_backend(cfg.backend, address=cfg.ray_address, gpus=cfg.gpus_per_job, device_map=cfg.device_map,
                          max_memory=cfg.max_memory)   # checked (parsed) in resolve: only whether there is one is read
    try:
        # one audit to a run folder: a second one swept the first's temporary stage folders, shared its
        # hardening state, and with --overwrite emptied its stages under it
        with lock_run_dir(out):
            prepare_run_dir(out, overwrite=overwrite)     # now that nothing else can fail on bad input
            mark_run_dir(out, cfg)
            command = " ".join(["moeguard", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("moeguard") else None
            try:
                with _progress() as progress:
                    doc = run_audit(cfg, out, backend=runner, model=handle, progress=progress, command=command)
            except KeyboardInterrupt:
                print(f"moeguard: interrupted; finished stages and jobs are kept in {out}: "
                      "run the same command again to resume", file=sys.stderr)
                raise SystemExit(130) from None
    finally:
        runner.close()
    _summary(doc, out)


app.command("audit")(_audit_command())


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
