"""``moeguard merge``: a merged checkpoint on disk, with the same properties as a pruned one: the
input is never modified, the output appears only when complete, a uniform K loads in vanilla
transformers, and ``moeguard_merging.json`` records which experts went into which merged expert
(trace's ground truth). Everything is checked against the config before any weights load.

The model is merged in memory (calibration needs it loaded); streaming for checkpoints larger
than memory is not built yet (docs/merging.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeguard.errors import MoeguardError
from moeguard.io import check_output

RECORD_NAME = "moeguard_merging.json"
SCHEMA = "moeguard.merging/1"


def write_merged(handle, out: Path, *, method: str, keep: int | None = None, scores: Path | None = None,
                 plan: Path | None = None, task=None, samples: int = 64, batch_size: int = 8, tokens: int = 256,
                 gate: str = "applied", seed: int = 0, overwrite: bool = False, progress=None,
                 settings: dict | None = None) -> dict[str, Any]:
    """Merge ``handle``'s model (a resolved ModelHandle) into ``out``; returns the record."""
    from moeguard.attribution.base import Scores
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.loading import meta_model
    from moeguard.pruning.merging.merge import merge_model, prepare
    from moeguard.pruning.merging.plan import read_plan
    from moeguard.provenance import run_record

    check_output(out, overwrite=overwrite)
    ref = handle.ref
    if ref.path is not None and Path(out).resolve() == ref.path.resolve():
        raise MoeguardError(f"--out {out} is the input checkpoint", hint="write the merged model to a new directory")
    s = Scores.load(scores) if scores is not None else None
    plan_data = read_plan(plan) if plan is not None else None
    prepared = prepare(MoEAdapter(meta_model(handle.config), family=handle.family), method=method, gate=gate,
                       keep=keep, scores=s, plan=plan_data, plan_origin=str(plan))
    task_obj = None
    if prepared["needs_data"]:
        from moeguard.edge import resolve_tasks

        name = task or (s.task if s is not None else None) or (plan_data or {}).get("task")
        if name is None:
            raise MoeguardError(f"merge method '{method}' needs calibration data and the plan names no task",
                                hint="pass --task NAME (see `moeguard tasks`)")
        task_obj = resolve_tasks([name], what="--task")[0]   # unreadable data fails before weights load
    from moeguard.pruning.apply import checkpoint_dtype, save_checkpoint
    from moeguard.tasks.batches import calibration_batches

    model, tokenizer, _ = handle.load(dtype=checkpoint_dtype(ref))
    batches = calibration_batches(tokenizer, task_obj, samples=samples, batch_size=batch_size, seed=seed) \
        if task_obj is not None else None
    merged, record = merge_model(model, prepared, batches=batches, tokens=tokens, seed=seed,
                                 task=task_obj.name if task_obj else None,
                                 scores_method=s.method if s is not None else None, progress=progress)
    del model
    uniform = len({len(v) for v in record["keep"].values()}) == 1
    record = {"schema": SCHEMA, "source": ref.name, **record,
              "loadable_by": "transformers" if uniform else
              "moeguard.models.loading.load_model (per-layer expert counts; vanilla transformers configs hold one count)",
              "run": run_record(settings or {})}
    save_checkpoint(merged, tokenizer, ref, Path(out), overwrite=overwrite, records={RECORD_NAME: record})
    return record
