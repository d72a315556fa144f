"""What ``moeguard eval`` does, for a library caller and the CLI alike: per-task metrics with the
trivial baseline beside each, optionally written to a file, each task's result kept for a rerun."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

from moeguard.errors import MoeguardError


def run_eval(*, model: str | None, tasks: list[str] | None, limit: int | None, batch_size: int, out: Path | None,
             device_map: str | None, max_memory: str | None, overwrite: bool, seed: int,
             progress: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, Any]:
    """Evaluate ``model`` on ``tasks`` (names or YAML paths; None: the embedded suite) and return the
    results document, written to ``out`` when given."""
    from moeguard.config import seed_everything
    from moeguard.edge import embedded_or, resolve_model, task_inputs
    from moeguard.io import check_output, write_json
    from moeguard.models.placement import parse_memory
    from moeguard.provenance import run_record
    from moeguard.tasks.evaluate import evaluate_suite

    if out is not None:
        check_output(out, overwrite=overwrite, kind="file", inputs=(model,))
    elif overwrite:
        raise MoeguardError("--overwrite replaces an existing --out, and no --out was given",
                            hint="pass --out PATH, or drop --overwrite")
    cap = parse_memory(max_memory, device_map=device_map) if max_memory is not None else None
    task_list = embedded_or(tasks, what="--tasks")  # fails on unreadable or empty data before any weights load
    from moeguard.config import repeated

    twice = repeated([t.name for t in task_list])
    if twice:   # a name and a YAML file of the same task: refused by evaluate_suite, after the weights loaded
        raise MoeguardError(f"--tasks names the task {twice[0]} twice", hint="list each task once")
    if out is not None:   # a task file or data folder as --out would be replaced by the results
        check_output(out, overwrite=overwrite, kind="file", inputs=task_inputs(task_list))
    # inspected before the resumable folder exists: a model that is no MoE, or has no config, leaves nothing
    # behind (an encoder-decoder evaluates through its seq2seq head)
    handle = resolve_model(model, tasks=False, device_map=device_map)
    handle.check_fits(task_list)
    settings = {"tasks": [t.name for t in task_list], "limit": limit, "batch_size": batch_size, "seed": seed,
                "max_memory": cap, **handle.placement_under(cap)}
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
        seed_everything(seed)
        m, tokenizer, ref = handle.load(max_memory=cap)
        with progress() as bar:
            results = evaluate_suite(m, tokenizer, task_list, limit=limit, batch_size=batch_size,
                                     progress=bar, model_name=ref.name, cache=cache)
        results["run"] = run_record({"model": ref.name, **settings})
        if out is not None:
            write_json(out, results, overwrite=overwrite)
    return results
