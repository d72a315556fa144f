"""`moeguard attribute`, `methods`, `prune` and `sweep`: the attribution and pruning half of the attack."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli.app import (DeviceMapOpt, JsonOpt, MaxMemoryOpt, ModelOpt, OverwriteOpt, SeedOpt, _common, _config_command, _console, _ints,
                              _kept_on_interrupt, _names, _out, _param, _placement, _progress, _run, _run_study, _seed, app)
from moeguard.config import SEED_MAX
from moeguard.errors import MoeguardError
from moeguard.io import dumps


@app.command()
def attribute(task: Annotated[str, typer.Option("--task", help="task name or YAML path")],
              method: Annotated[str, typer.Option("--method", help="attribution method (see `moeguard methods`)")],
              out: Annotated[Path, typer.Option("--out", help="scores JSON to write")],
              model: ModelOpt = None,
              samples: Annotated[int, typer.Option("--samples", min=1, help="calibration samples from the task's train split")] = 64,
              reference: Annotated[Optional[str], typer.Option("--reference", help="contrastive: comma-separated reference tasks; default: the rest of the embedded suite")] = None,
              batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
              device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None, overwrite: OverwriteOpt = False,
              seed: SeedOpt = 0) -> None:
    """Score every (layer, expert) for a task with one method; higher = more important."""
    from moeguard.attribution.base import check_method_runs, get_method, list_methods
    from moeguard.attribution.run import make_context, score
    from moeguard.edge import resolve_model, resolve_tasks, task_inputs
    from moeguard.io import check_output, write_json
    from moeguard.models.placement import parse_memory
    from moeguard.report.tables import scores_table

    check_output(out, overwrite=overwrite, inputs=(model,), kind="file")
    the_method = get_method(method)
    cap = parse_memory(max_memory, device_map=device_map) if max_memory is not None else None
    refs = _names(reference, "--reference") if reference is not None else None
    if refs is not None and not the_method.needs_reference:   # it was recorded (and its data read) for nothing
        from moeguard.errors import MoeguardError

        raise MoeguardError(f"--reference is read only by methods that compare with a reference corpus, and "
                            f"'{method}' does not", hint="drop --reference, or use a method that does: " + ", ".join(
                                m.name for m in list_methods() if m.needs_reference))
    # resolved once here (a YAML path is read once), and unreadable data fails before any weights load
    the_task, *ref_tasks = resolve_tasks([task, *(refs or [])], what="--task", scored=False)   # their data only
    check_output(out, overwrite=overwrite, kind="file", inputs=task_inputs([the_task, *ref_tasks]))
    if any(r.name == the_task.name for r in ref_tasks):   # before the weights load (make_context refuses it too)
        from moeguard.errors import MoeguardError

        raise MoeguardError(f"the reference corpus includes the task '{the_task.name}' itself",
                            hint="name other tasks as the reference (the default is the rest of the embedded suite)")
    # an encoder-decoder scores through its seq2seq head
    handle = resolve_model(model, tasks=False, device_map=device_map)
    handle.check_fits([the_task, *ref_tasks])
    check_method_runs(the_method, handle.family)
    counts = sorted(set(handle.experts_per_layer))
    if len(counts) > 1:   # as attribution refuses it, before the weights load
        from moeguard.errors import MoeguardError

        raise MoeguardError(f"the model's MoE layers have different expert counts {counts} (a budget-pruned "
                            "checkpoint); attribution scores one count per layer", hint="attribute the unpruned model")
    from moeguard.attribution.run import check_removable

    check_removable(the_method.name, counts[0], handle.family.min_experts)   # before the weights load too
    import torch

    from moeguard.io import resumable_scratch
    from moeguard.models.identity import weights_identity
    from moeguard.tasks.loaders import task_identity

    # the costly methods' finished batches are kept beside --out (.OUT.partial), so the same command resumes
    # after a kill; keyed by all the scores depend on: the weights, the task's definition and data, the
    # settings, where the weights sit (a GPU's sums are not the CPU's) and the threads (nor are 2 cores' 16's)
    with resumable_scratch(out, overwrite=overwrite, settings={
            "command": "attribute", "model": weights_identity(model),
            "task": task_identity(the_task), "reference": [task_identity(r) for r in ref_tasks] if refs is not None else None,
            "method": the_method.name, "samples": samples, "batch_size": batch_size, "seed": seed,
            "threads": torch.get_num_threads(), **_placement(handle, cap)}) as keep, _kept_on_interrupt("batches scored"):
        _seed(seed)
        m, tokenizer, ref = handle.load(max_memory=cap)
        with _progress() as progress:
            ctx = make_context(m, tokenizer, the_task, samples=samples, batch_size=batch_size, seed=seed,
                               reference=ref_tasks if refs is not None else None, progress=progress, keep=keep)
            s = score(ctx, method)
        doc = s.to_dict()
        doc["model"] = ref.name
        doc["run"] = _run({"model": ref.name, "task": the_task.name, "task_file": task if task != the_task.name else None,
                           "method": method, "samples": samples, "seed": seed,
                           "reference": refs, "batch_size": batch_size, "max_memory": cap, **_placement(handle, cap)})
        write_json(out, doc, overwrite=overwrite)
    _console().print(scores_table(doc))
    typer.echo(f"scores written to {out}")


@app.command()
def methods(as_json: JsonOpt = False) -> None:
    """Registered attribution methods."""
    from moeguard.attribution.base import list_methods

    rows = [{"name": m.name, "description": m.description, "needs_reference": m.needs_reference} for m in list_methods()]
    if as_json:
        typer.echo(dumps(rows, indent=2))
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
          overwrite: OverwriteOpt = False,
          # every command takes --seed; prune draws no random number, which its help says (it read "the same seed
          # gives the same numbers", a setting that set nothing)
          seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="recorded in the run record only: prune "
                                            "draws no random number (a plan gives the same checkpoint whatever the seed)")] = 0
          ) -> None:
    """Physically remove experts: a smaller checkpoint vanilla transformers loads."""
    from moeguard.edge import resolve_model
    from moeguard.io import check_output, write_json
    from moeguard.pruning.apply import write_pruned
    from moeguard.pruning.plan import plan_for

    # the model too (a local folder: an --out inside it would change it; write_pruned's check_apart covers the rest)
    check_output(out, overwrite=overwrite, inputs=(scores, plan, model), kind="file" if plan_only else "folder")
    handle = resolve_model(model, tasks=False)
    the_plan = plan_for(handle, scores=scores, plan=plan, keep=keep, keep_ratio=keep_ratio, budget=budget,
                        model_given=model is not None)
    if plan_only:
        from moeguard.models.adapter import MoEAdapter
        from moeguard.models.loading import meta_model
        from moeguard.models.prune import pruned_config
        from moeguard.pruning.plan import check_plan
        from moeguard.provenance import run_record

        if streaming is not None:   # nothing is written but the plan: the option would be ignored
            raise MoeguardError("--streaming/--in-memory choose how a checkpoint is written, and --plan-only writes "
                                "only the plan", hint="drop --streaming/--in-memory, or --plan-only")
        adapter = MoEAdapter(meta_model(handle.config), family=handle.family)
        # as a prune would: the plan's layers and experts, then what the family's config can express
        # (group-limited routing, one count per layer), so a written plan is one `prune --plan` accepts
        pruned_config(adapter, check_plan(the_plan, adapter))
        doc = {**the_plan.to_dict(), "run": run_record({"model": model or "embedded", "scores": str(scores) if scores else None,
                                                        "plan": str(plan) if plan else None, "keep": keep,
                                                        "keep_ratio": keep_ratio, "budget": budget})}
        write_json(out, doc, overwrite=overwrite)
        typer.echo(f"plan ({the_plan.kept_total} experts kept, {the_plan.rule}) written to {out}")
        return
    _seed(seed)
    with _progress() as progress:
        record = write_pruned(model, the_plan, out, overwrite=overwrite, streaming=streaming, progress=progress,
                              settings={"model": model or "embedded", "scores": str(scores) if scores else None,
                                        "plan": str(plan) if plan else None, "keep": keep, "keep_ratio": keep_ratio,
                                        "budget": budget, "seed": seed})
    from moeguard.report.tables import prune_table

    _console().print(prune_table(record))
    counts = sorted({len(v) for v in record["keep"].values()})
    typer.echo(f"pruned {record['original_num_experts']} -> {'/'.join(map(str, counts))} experts per layer "
               f"({record['method']}); written to {out}")
    if len(counts) > 1:
        typer.echo("note: layers keep different expert counts; load it with moeguard (moeguard.models.loading."
                   "load_model, or any moeguard command's --model); vanilla transformers configs hold one count")


def _sweep_params():
    from moeguard.config import options
    from moeguard.studies.sweep import SweepConfig

    none = {"default": None}
    return [_out("run directory to create"), *_common(),
            *options(SweepConfig, overrides={"tasks": none, "methods": none, "keeps": none}),
            _param("max_memory", MaxMemoryOpt, None)]


@app.command()
@_config_command(_sweep_params)
def sweep(*, out: Path, model: Optional[str], device_map: Optional[str], backend: str, ray_address: Optional[str], gpus_per_job: float,
          threads: Optional[int], overwrite: bool, max_memory: Optional[str], **flags) -> None:
    """Knowledge-loss study: retention per task, method and keep level, against random rankings.

    With --max-memory, each job's model is loaded under the cap (the other layers offloaded to disk),
    as the audit's sweep stage does; the physical-pruning checks are then skipped."""
    from moeguard.config import build
    from moeguard.edge import resolve_grid, resolve_model
    from moeguard.io import check_output
    from moeguard.models.handle import check_merge_route
    from moeguard.report.sweep import sweep_table, write_sweep
    from moeguard.studies.sweep import SweepConfig, SweepStudy, SweepStudyConfig

    check_output(out, overwrite=overwrite, inputs=(model,), kind="folder")
    cap = None
    if max_memory is not None:
        from moeguard.models.placement import parse_memory

        cap = parse_memory(max_memory, device_map=device_map)
    # an encoder-decoder's tasks run through its seq2seq head
    handle = resolve_model(model, tasks=False, device_map=device_map, devices_here=backend != "ray")
    grid = {k: flags.pop(k) for k in ("tasks", "methods", "keeps")}
    task_list, methods, keeps = resolve_grid(
        handle, tasks=_names(grid["tasks"], "--tasks") if grid["tasks"] is not None else None,
        methods=_names(grid["methods"], "--methods") if grid["methods"] is not None else None,
        keeps=_ints(grid["keeps"], "--keep") if grid["keeps"] is not None else None)
    names = [t.name for t in task_list]
    cfg = build(SweepConfig, flags, what="sweep", tasks=names, methods=methods, keeps=keeps)
    check_merge_route(handle.family, "merge" in cfg.routes)
    if cap is not None and "merge" in cfg.routes:
        from moeguard.studies.merge_route import refuse_capped_merge

        refuse_capped_merge(max_memory, flag="--max-memory", route_flag="--route")
    # the model as recovery --sweep can tell it from another folder (its path, not the name as typed)
    settings = {"model": handle.ref.recorded, **dataclasses.asdict(cfg), **_placement(handle, cap)}

    def write(doc, work):
        write_sweep(doc, doc.pop("scores"), work)

    if cap is not None:
        settings["max_memory"] = cap
    # capped: the physical checks are skipped, so the jobs are keyed apart from an uncapped run's
    study = SweepStudyConfig(sweep=cfg, references={t: None for t in names}, capped=cap is not None)
    doc = _run_study(out, overwrite, settings, handle, SweepStudy(), study, write, backend=backend,
                     ray_address=ray_address, gpus_per_job=gpus_per_job, tasks=task_list, max_memory=cap, threads=threads)
    _console().print(sweep_table(doc))
    if doc.get("routes"):
        from moeguard.report.sweep import routes_table

        _console().print(routes_table(doc))
    done = [c for c in doc["physical_checks"] if "skipped" not in c]
    from moeguard.studies.sweep import physical_check_agrees

    bad = [c for c in done if not physical_check_agrees(c)]
    typer.echo(f"{len(done)} physical-pruning checks, {len(bad)} mismatched, "
               f"{len(doc['physical_checks']) - len(done)} skipped; "
               f"{doc['evaluations']['run']} evaluations in {doc['seconds']:.0f} s; written to {out}")




@app.command()
def merge(out: Annotated[Path, typer.Option("--out", help="output checkpoint directory")],
          method: Annotated[str, typer.Option("--method", help="merge method (see `moeguard merge-methods`)")],
          model: ModelOpt = None,
          scores: Annotated[Optional[Path], typer.Option("--scores", help="scores JSON from `moeguard attribute`: the centres")] = None,
          keep: Annotated[Optional[int], typer.Option("--keep", min=1, help="experts per layer after merging")] = None,
          plan: Annotated[Optional[Path], typer.Option("--plan", help='merge plan {"clusters": {"<layer>": [[centre, ...], ...]}} or a pruning plan (its kept experts are the centres)')] = None,
          task: Annotated[Optional[str], typer.Option("--task", help="calibration task (default: the scores' task)")] = None,
          samples: Annotated[int, typer.Option("--samples", min=1, help="calibration samples from the task's train split")] = 64,
          tokens: Annotated[int, typer.Option("--tokens", min=1, help="tokens per layer every expert is run on (output similarity)")] = 256,
          gate: Annotated[str, typer.Option("--gate", help="router-weighted: 'applied' (the block's weights) or 'raw' (score before renormalization)")] = "applied",
          batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
          streaming: Annotated[Optional[bool], typer.Option("--streaming/--in-memory", help="default: streaming when the plan needs no data and the checkpoint is local")] = None,
          device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None,
          overwrite: OverwriteOpt = False, seed: SeedOpt = 0) -> None:
    """Merge experts instead of dropping them: each layer's experts clustered and averaged into K.
    With --max-memory, calibration runs on the model loaded under the cap and the plan streams onto the files."""
    from moeguard.edge import resolve_model
    from moeguard.pruning.merging.write import write_merged
    from moeguard.report.tables import merge_table

    handle = resolve_model(model, device_map=device_map)
    _seed(seed)
    cap = None
    if max_memory is not None:
        from moeguard.models.placement import parse_memory

        cap = parse_memory(max_memory, device_map=device_map)
    settings = {"model": handle.name, **_placement(handle, cap), "method": method, "scores": str(scores) if scores else None,
                "plan": str(plan) if plan else None, "keep": keep, "task": task, "samples": samples, "tokens": tokens,
                "gate": gate, "batch_size": batch_size, "seed": seed, **({"max_memory": cap} if cap is not None else {})}
    with _progress() as progress:
        record = write_merged(handle, out, method=method, keep=keep, scores=scores, plan=plan, task=task,
                              samples=samples, batch_size=batch_size, tokens=tokens, gate=gate, seed=seed,
                              overwrite=overwrite, progress=progress, settings=settings, streaming=streaming,
                              max_memory=cap, model_given=model is not None)
    _console().print(merge_table(record))
    counts = sorted({len(v) for v in record["keep"].values()})
    how = "streaming" if record["pruning"].get("method") == "streaming" else "in memory"
    typer.echo(f"merged {record['pruning']['original_num_experts']} -> {'/'.join(map(str, counts))} experts per layer "
               f"({record['plan']['why']}, {how}); written to {out}")


@app.command("merge-methods")
def merge_methods(as_json: JsonOpt = False) -> None:
    """Registered merge methods."""
    from moeguard.pruning.merging.base import MERGE_METHODS

    rows = [{"name": m.name, "description": m.description, "uses_gate": m.uses_gate} for m in MERGE_METHODS.items()]
    if as_json:
        typer.echo(dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['name']:<20} {r['description']}")
