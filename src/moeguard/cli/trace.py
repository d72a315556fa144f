"""`moeguard fingerprint` and `trace`: after theft, prove a suspect was cut from your model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli.app import JsonOpt, ModelOpt, OverwriteOpt, SeedOpt, _console, _no_out, _progress, app
from moeguard.io import dumps


@app.command()
def fingerprint(out: Annotated[Path, typer.Option("--out", help="fingerprint folder to create")],
                model: ModelOpt = None, overwrite: OverwriteOpt = False, seed: SeedOpt = 0) -> None:
    """A compact, permutation-invariant signature of every expert (at most 1% of the checkpoint).
    Each MoE layer read is kept beside --out until the fingerprint is written: an interrupted run resumes."""
    from moeguard.io import check_output, lazy_scratch
    from moeguard.trace import fingerprint as make
    from moeguard.trace.fingerprint import digest

    check_output(out, overwrite=overwrite, inputs=(model,), kind="folder")
    with lazy_scratch(out, overwrite=overwrite, kind="folder") as keep:
        with _progress() as progress:
            fp = make(model, seed=seed, progress=progress, keep=keep)
        fp.save(out, overwrite=overwrite)
    size = sum(f.stat().st_size for f in out.iterdir())
    typer.echo(f"fingerprint of {fp.meta['model']} ({len(fp.layers)} MoE layers, {fp.H.size} hidden dimensions "
               f"sampled): {size / 1e3:.0f} kB, {100 * size / fp.meta['checkpoint_bytes']:.2f}% of the checkpoint; "
               f"sha256 {digest(out)}; written to {out}")


@app.command()
def trace(suspect: Annotated[str, typer.Option("--suspect", help="suspect checkpoint directory, hub id or .gguf file")],
          original: Annotated[Optional[str], typer.Option("--original", help="your fingerprint folder, or your checkpoint; default: the embedded model")] = None,
          out: Annotated[Optional[Path], typer.Option("--out", help="folder for trace.json, trace.md and the mapping plot")] = None,
          overwrite: OverwriteOpt = False, seed: SeedOpt = 0, as_json: JsonOpt = False) -> None:
    """Was the suspect cut from the original? A p-value, the experts it kept, and how it was changed.
    With --out, each MoE layer read is kept beside it until the report is written: an interrupted run resumes."""
    import contextlib

    from moeguard.io import atomic_dir, check_output, lazy_scratch
    from moeguard.report.trace import p_text, summary_rows, write_trace
    from moeguard.trace import trace as run

    if out is not None:
        check_output(out, overwrite=overwrite, inputs=(original, suspect,), kind="folder")
    elif overwrite:
        _no_out()
    with contextlib.ExitStack() as stack:
        keep = None if out is None else stack.enter_context(
            lazy_scratch(out, overwrite=overwrite, kind="folder"))
        with _progress(stderr=as_json) as progress:   # under --json stdout is the JSON document alone
            doc = run(original, suspect, seed=seed, progress=progress, keep=keep)
        if out is not None:
            with atomic_dir(out, overwrite=overwrite) as tmp:
                write_trace(doc, tmp)
    if as_json:
        typer.echo(dumps(doc, indent=2))
        return
    from rich.table import Table

    t = Table(title=f"trace of {doc['suspect']}")
    for c in ("layer", "experts", "p", "kept original experts", "merged"):
        t.add_column(c, justify="left" if c.startswith("kept") else "right")
    for r in summary_rows(doc):
        t.add_row(*r)
    _console().print(t)
    typer.echo(f"verdict: {doc['verdict']} (p = {p_text(doc['p_value'])}, derived when p <= {doc['alpha']})"
               + (f"; written to {out}" if out is not None else ""))
