"""`moeguard scan`: a per-expert security scan (usage, criticality, weights, backdoor suspicion)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli.app import DeviceMapOpt, JsonOpt, ModelOpt, OverwriteOpt, SeedOpt, _console, _progress, app
from moeguard.io import dumps


@app.command("scan")
def scan(
        out: Annotated[Path, typer.Option("--out", help="folder for scan.json and scan.md")],
        tasks: Annotated[Optional[str], typer.Option("--tasks", help="comma-separated tasks (names or YAML paths) for usage, criticality and the benign contexts; default: the embedded suite")] = None,
        references: Annotated[Optional[str], typer.Option("--references", help="comma-separated scan folders (or scan.json files) of clean models of the same architecture: the null the suspicion is measured against; default: the expert's siblings")] = None,
        samples: Annotated[int, typer.Option("--samples", help="records per task for usage and criticality")] = 32,
        contexts: Annotated[int, typer.Option("--contexts", help="benign contexts the effect search appends tokens to")] = 4,
        context_tokens: Annotated[int, typer.Option("--context-tokens", help="tokens kept of each context")] = 16,
        candidates: Annotated[int, typer.Option("--candidates", help="strongest tokens per expert followed into chains")] = 8,
        chain: Annotated[int, typer.Option("--chain", help="tokens generated per chain")] = 6,
        reference_models: Annotated[Optional[str], typer.Option("--reference-models", help="comma-separated clean models sharing the tokenizer (the base model of a fine-tune, or other seeds): what they predict anyway does not count as evidence")] = None,
        threshold: Annotated[Optional[float], typer.Option("--threshold", help="suspicion that raises the backdoor flag; default: the calibrated one")] = None,
        model: ModelOpt = None, device_map: DeviceMapOpt = None, overwrite: OverwriteOpt = False, seed: SeedOpt = 0,
        as_json: JsonOpt = False) -> None:
    """Scan every expert: usage, criticality, weights against siblings, and backdoor suspicion without the trigger."""
    from moeguard.cli.app import _names, _seed, _task_names
    from moeguard.edge import embedded_or, resolve_model, task_inputs
    from moeguard.io import check_output
    from moeguard.scan.run import ScanConfig, load_references
    from moeguard.scan.run import scan as run_scan

    config = ScanConfig(samples=samples, contexts=contexts, context_tokens=context_tokens, candidates=candidates,
                        chain=chain, threshold=threshold, seed=seed)
    refs = load_references([Path(p) for p in _names(references, "--references")]) if references is not None else []
    ref_paths = _names(references, "--references") if references is not None else []
    ref_model_names = _names(reference_models, "--reference-models") if reference_models is not None else []
    check_output(out, overwrite=overwrite, inputs=(model, *ref_paths, *ref_model_names), kind="folder")
    handle = resolve_model(model, device_map=device_map)
    ref_models = [resolve_model(m, device_map=device_map) for m in ref_model_names]
    # its criticality calibrates on the train split (attribution), so that is read at the edge too
    task_list = embedded_or(_task_names(tasks, "--tasks") if tasks is not None else None, what="--tasks")
    check_output(out, overwrite=overwrite, inputs=task_inputs(task_list), kind="folder")
    _seed(seed)
    with _progress(stderr=as_json) as progress:
        doc = run_scan(handle, task_list, out, config=config, references=refs, reference_models=ref_models,
                       overwrite=overwrite, progress=progress)
    if as_json:
        typer.echo(dumps(doc, indent=2))
        return
    from rich.table import Table

    from moeguard.report.scan import flag_rows, suspect_rows

    s = doc["suspicion"]
    tab = Table(title=f"scan of {doc['model']}: most suspicious experts (null: {s['null']}, flag above {s['threshold']:g})")
    rows = suspect_rows(doc, top=5)
    for c in rows[0]:
        tab.add_column(c, justify="right" if c in ("suspicion", "score (nats)") else "left")
    for r in rows:
        tab.add_row(*r.values())
    _console().print(tab)
    for r in flag_rows(doc):
        typer.echo(f"{r['flag']}: {r['experts']}")
    typer.echo(f"scanned {len(doc['experts'])} experts in {doc['seconds']['total']:.0f} s; written to {out}")
