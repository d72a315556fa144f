"""``moeguard merge``: a merged checkpoint on disk, with the same properties as a pruned one: the
input is never modified, the output appears only when complete, a uniform K loads in vanilla
transformers, and ``moeguard_merging.json`` records which experts went into which merged expert
(trace's ground truth). Everything is checked against the config before any weights load.

A plan that needs no data (explicit clusters with explicit weights, or ``average``) is applied by
streaming surgery on a local checkpoint's safetensors files, the weights never loaded (a
checkpoint larger than memory); one that needs calibration loads the model and merges in memory,
or, with ``max_memory``, loads it under that cap (accelerate's disk offload), calibrates, and
streams the plan it computed onto the safetensors files: a checkpoint larger than memory merged by
any method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeguard.errors import MoeguardError
from moeguard.io import check_output

RECORD_NAME = "moeguard_merging.json"
SCHEMA = "moeguard.merging/1"


def write_merged(handle, out: Path, **kwargs: Any) -> dict[str, Any]:
    """Merge ``handle``'s model (a resolved ModelHandle) into ``out``; returns the record.
    ``streaming=None``: streaming surgery when the plan needs no data and the checkpoint is local.
    ``max_memory`` (bytes): calibrate under that cap and stream the computed plan (local only).
    ``model_given=False``: the embedded model was the default, and scores of another are refused."""
    import contextlib

    from moeguard.kept import held_for

    out = Path(out)
    # the output's own checks first: a bad --out is its one line, not the lock file's, and no lock file
    # is made inside the model's folder
    check_output(out, overwrite=kwargs.get("overwrite", False), kind="folder")
    if handle.ref.path is not None:
        from moeguard.pruning.checkpoint import check_apart

        check_apart(handle.ref.path, out)
    plan_file = out.with_name(f".{out.name}.merge-plan.json")
    # one run at a time where a plan is kept beside --out (a capped merge), which another run would replace;
    # an in-memory merge keeps nothing there and takes no lock (a file system without locks still serves it)
    capped = kwargs.get("max_memory") is not None
    with held_for(out) if capped or plan_file.exists() else contextlib.nullcontext():
        record = _write_merged(handle, out, **kwargs)
        # the merged checkpoint is in place: a plan a killed capped run kept for it has no use left (this
        # run may have taken another path: in memory, or with other settings)
        plan_file.unlink(missing_ok=True)
    return record


def _write_merged(handle, out: Path, *, method: str, keep: int | None = None, scores: Path | None = None,
                  plan: Path | None = None, task=None, samples: int = 64, batch_size: int = 8, tokens: int = 256,
                  gate: str = "applied", seed: int = 0, overwrite: bool = False, progress=None,
                  settings: dict | None = None, streaming: bool | None = None,
                  max_memory: int | None = None, model_given: bool = True) -> dict[str, Any]:
    from moeguard.attribution.base import Scores
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.loading import meta_model
    from moeguard.pruning.merging.merge import merge_model, prepare
    from moeguard.pruning.merging.plan import read_plan
    from moeguard.provenance import run_record

    # the model: check_apart below; a file at --out is refused here, not after the merge
    check_output(out, overwrite=overwrite, kind="folder", inputs=(scores, plan, task if isinstance(task, str) else None))
    ref = handle.ref
    if ref.path is not None:
        from moeguard.pruning.checkpoint import check_apart

        check_apart(ref.path, Path(out))     # before anything is read or written: the input is never touched
    s = Scores.load(scores) if scores is not None else None
    if s is not None and not model_given:   # the embedded model by default: scores of another are refused
        from moeguard.pruning.plan import check_scores_model

        check_scores_model(s, scores, handle)
    plan_data = read_plan(plan) if plan is not None else None
    prepared = prepare(MoEAdapter(meta_model(handle.config), family=handle.family), method=method, gate=gate,
                       keep=keep, scores=s, plan=plan_data, plan_origin=str(plan))
    if max_memory is not None and (ref.path is None or streaming is False):
        why = f"hub id {ref.hub_id} is not a local checkpoint" if ref.path is None else "--in-memory was asked for"
        raise MoeguardError(f"--max-memory streams the merge onto the checkpoint's files, and {why}",
                            hint="download the checkpoint and pass its folder" if ref.path is None
                            else "drop --in-memory (a capped merge always streams)")
    can_stream = not prepared["needs_data"] and ref.path is not None
    if streaming and not can_stream and max_memory is None:
        why = (f"hub id {ref.hub_id} is not a local checkpoint" if ref.path is None else
               f"merge method '{method}' needs calibration data, which loads the model")
        raise MoeguardError(f"--streaming cannot merge here: {why}",
                            hint="give a merge plan with explicit clusters and weights (a record's 'plan') on a local "
                                 "checkpoint, or merge --in-memory")
    if task is not None and not prepared["needs_data"]:   # it would be recorded while nothing reads it
        raise MoeguardError(f"--task calibrates merges that need data, and this plan ({'explicit clusters and weights' if prepared['clusters'] else method}) needs none",
                            hint="drop --task")
    if can_stream and streaming is not False:
        return _streamed(handle, Path(out), prepared, overwrite=overwrite, progress=progress, settings=settings)
    task_obj = None
    if prepared["needs_data"]:
        from moeguard.edge import resolve_tasks

        name = task or (s.task if s is not None else None) or (plan_data or {}).get("task")
        if name is None:
            raise MoeguardError(f"merge method '{method}' needs calibration data and the plan names no task",
                                hint="pass --task NAME (see `moeguard tasks`)")
        try:
            task_obj = resolve_tasks([name], what="--task", scored=False)[0]   # unreadable data fails before weights load
        except MoeguardError as e:
            if task is not None or s is None or "unknown task" not in e.message:
                raise
            # the scores' task by name: one from a YAML file is registered only in the process that read it
            from moeguard.io import read_json

            run = read_json(Path(scores), what="--scores", hint="re-run moeguard attribute").get("run")
            settings = run.get("settings") if isinstance(run, dict) else None
            made = settings.get("task_file") if isinstance(settings, dict) else None
            raise MoeguardError(f"{scores} scores task '{name}', which is not a registered task here",
                                hint=f"pass --task {made} (the task file the scores were made with)" if made else
                                "pass --task NAME or the task's YAML file") from None
        from moeguard.edge import task_inputs

        check_output(out, overwrite=overwrite, kind="folder", inputs=task_inputs([task_obj]))
        handle.check_fits([task_obj])
    from moeguard.pruning.apply import checkpoint_dtype, loadable_by, save_checkpoint
    from moeguard.tasks.batches import calibration_batches
    from moeguard.tasks.evaluate import fit_to_model

    if max_memory is not None and ref.path is not None:   # the capped merge writes from these files
        from moeguard.pruning.checkpoint import check_merge_files

        check_merge_files(ref.path)   # before the offloaded load and the calibration, not after both
        from moeguard.models.identity import weights_identity
        from moeguard.tasks.loaders import task_identity

        kept = _KeptPlan(Path(out), {
            "weights": weights_identity(handle.arg), "dtype": str(checkpoint_dtype(ref)), "method": method,
            "gate": gate, "keep": keep, "scores": s.to_dict() if s is not None else None, "plan": plan_data,
            "task": task_identity(task_obj) if task_obj is not None else None, "samples": samples,
            "batch_size": batch_size, "tokens": tokens, "seed": seed, **handle.placement_under(max_memory)})
        found = kept.read()
        if found is not None:   # a capped merge killed while it wrote: its calibration is not redone
            merge_plan, cost = found
            return kept.done(_streamed(handle, Path(out), {**prepared, "clusters": merge_plan.clusters,
                                                           "weights": merge_plan.weights},
                                       overwrite=overwrite, progress=progress, settings=settings,
                                       merge_plan=merge_plan, calibration=cost))
    model, tokenizer, _ = handle.load(dtype=checkpoint_dtype(ref), max_memory=max_memory)
    # calibrated within the model's positions, as attribution and evaluation cut the task
    batches = calibration_batches(tokenizer, fit_to_model(task_obj, model), samples=samples, batch_size=batch_size,
                                  seed=seed) if task_obj is not None else None
    if max_memory is not None:   # calibrated under the cap; the merge itself streams, the weights never held
        from moeguard.pruning.merging.merge import plan_merge

        merge_plan, cost = plan_merge(model, prepared, batches=batches, tokens=tokens, seed=seed,
                                      task=task_obj.name if task_obj else None,
                                      scores_method=s.method if s is not None else None, progress=progress)
        del model
        import gc

        gc.collect()   # the offloaded model's folder (its size on disk) goes before the output is written
        kept.write(merge_plan, cost)
        return kept.done(_streamed(handle, Path(out), {**prepared, "clusters": merge_plan.clusters,
                                                       "weights": merge_plan.weights},
                                   overwrite=overwrite, progress=progress, settings=settings, merge_plan=merge_plan,
                                   calibration=cost))
    merged, record = merge_model(model, prepared, batches=batches, tokens=tokens, seed=seed,
                                 task=task_obj.name if task_obj else None,
                                 scores_method=s.method if s is not None else None, progress=progress,
                                 share_unchanged=True)   # the source is dropped: nothing to copy for it
    del model
    from moeguard.pruning.checkpoint import previous_records

    # as the streamed merge records them (inside its "pruning" part): the source's own records
    record = {"schema": SCHEMA, "source": ref.recorded, **record, "loadable_by": loadable_by(record["keep"]),
              "run": run_record(settings or {})}
    record["pruning"] = {**record.get("pruning", {}), **previous_records(ref.path)}
    save_checkpoint(merged, tokenizer, ref, Path(out), overwrite=overwrite, records={RECORD_NAME: record})
    return record


def _streamed(handle, out: Path, prepared: dict, *, overwrite: bool, progress, settings: dict | None,
              merge_plan=None, calibration: dict | None = None) -> dict:
    """Explicit clusters (and weights, or uniform ones) applied to the safetensors files; with
    ``merge_plan``, the plan a capped calibration computed (its record keeps how it was chosen)."""
    from moeguard.pruning.apply import loadable_by
    from moeguard.pruning.checkpoint import prune_checkpoint
    from moeguard.pruning.merging.operation import cluster_weights, merges_record
    from moeguard.pruning.merging.plan import MergePlan
    from moeguard.provenance import run_record

    clusters = prepared["clusters"]
    plan = {l: cluster_weights(l, gs, (prepared["weights"] or {}).get(l)) for l, gs in clusters.items()}
    weights = {l: [[float(x) for x in w] for _, _, w in p] for l, p in plan.items()}
    if merge_plan is None:
        merge_plan = MergePlan(clusters=clusters, weights=weights, num_experts=handle.num_experts,
                               method=prepared["method"].name, why="explicit clusters")
    keep = merge_plan.keep
    extra = {"schema": SCHEMA, "source": handle.ref.recorded,
             "merges": {str(l): merges_record(p, keep[l]) for l, p in sorted(plan.items())},
             "keep": {str(l): v for l, v in sorted(keep.items())}, "plan": merge_plan.to_dict(),
             "calibration": calibration or {"forward_passes": 0}, "loadable_by": loadable_by(keep),
             "run": run_record(settings or {})}
    return prune_checkpoint(handle.ref.path, out, keep, overwrite=overwrite, progress=progress, extra=extra, merge=plan)


class _KeptPlan:
    """A capped merge's calibrated plan, kept beside ``--out`` (``.OUT.merge-plan.json``) from the end
    of its calibration until the merged checkpoint is in place: a run killed while it wrote (a
    DeepSeek-scale checkpoint takes long) streams the kept plan again instead of loading the model
    under the cap and calibrating anew. Keyed by everything the plan depends on; JSON holds its
    floats exactly, so the streamed shards' stamps match and the finished shards are kept too."""

    def __init__(self, out: Path, key: dict[str, Any]):
        from moeguard.kept import KeptJSON

        # write_merged removes it once out is in place
        self.doc = KeptJSON(out.with_name(f".{out.name}.merge-plan.json"), key)

    def read(self):
        from moeguard.pruning.merging.plan import MergePlan

        doc = self.doc.read()
        try:
            p = doc["plan"]
            plan = MergePlan(clusters={int(l): g for l, g in p["clusters"].items()},
                             weights=None if p["weights"] is None else {int(l): w for l, w in p["weights"].items()},
                             num_experts=int(p["num_experts"]), method=p["method"], gate=p["gate"], task=p["task"],
                             scores_method=p["scores_method"], why=p["why"])
            return plan, doc["cost"]
        except (KeyError, TypeError, ValueError, AttributeError):   # absent, another run's, or of another form
            return None

    def write(self, plan, cost: dict[str, Any]) -> None:
        self.doc.write({"plan": plan.to_dict(), "cost": cost})

    def done(self, record):
        self.doc.drop()
        return record
