"""`moeguard audit`: model info -> baseline -> attribution -> pruning sweep -> recovery study
-> (defense comparison) -> results.json + report, as resumable stages.

Everything that touches the model's weights is a job (:mod:`.work`) run by the chosen
backend; the driver only plans (picks the best method, builds pruning plans) and writes.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from moeguard.audit.config import AuditConfig, check
from moeguard.audit.optional import (defense_attack, defense_stage, harden_stage, recovery_stage, scan_config,
                                     scan_references, scan_stage)
from moeguard.audit.results import assemble
from moeguard.audit.stages import StageStore
from moeguard.errors import MoeguardError
from moeguard.models.handle import ModelHandle
from moeguard.models.identity import weights_identity
from moeguard.models.placement import parse_memory
from moeguard.studies import run_studies, run_study
from moeguard.studies.engine import Backend, Job, Runtime, run_jobs
from moeguard.studies.recoverysummary import MIN_SEEDS

MARKER = "audit.json"  # marks a folder as an audit run: resumed, or emptied with overwrite


def resolve(cfg: AuditConfig) -> tuple[AuditConfig, ModelHandle]:
    """Fill the model-dependent defaults and check everything that can be checked before any
    weights are read; returns the resolved config and the model's handle (inspected once)."""
    import torch

    from moeguard.edge import resolve_grid, resolve_model, resolve_tasks
    from moeguard.realign.strategies.base import get_strategy

    check(cfg)
    if cfg.dtype and cfg.dtype not in ("float16", "bfloat16", "float32", "float64"):
        # int8 loaded nothing usable, float8 failed at the first matmul: both after the audit began
        said = "a torch dtype moeguard cannot compute in" if isinstance(getattr(torch, cfg.dtype, None), torch.dtype) \
            else "not a torch dtype"
        raise MoeguardError(f"dtype '{cfg.dtype}' is {said}", hint="use bfloat16, float16, float32 or float64")
    model = resolve_model(cfg.model, tasks=False)   # an encoder-decoder's tasks run through its seq2seq head
    if model.family.encoder_decoder:
        _check_encoder_decoder(cfg, model)
    if not cfg.scan and (cfg.scan_references or cfg.scan_reference_models):
        raise MoeguardError("scan references were given without scan", hint="add --scan, or drop the scan references")
    # names from here on (stages and jobs key results by them); a task from a YAML file is adopted
    # under its name, and reaches every worker through the runtime (run_audit)
    tasks, methods, keeps = resolve_grid(model, tasks=cfg.tasks, methods=cfg.methods, keeps=cfg.keeps)
    by_name = {t.name: t for t in tasks}
    names = list(by_name)
    if cfg.scan:   # a bad reference, tokenizer or context count fails now, not after the other stages' minutes
        from moeguard.scan.run import check_inputs

        # searched as the audit's scan will search (its config, as _scan makes it)
        check_inputs(model, tasks, config=scan_config(cfg), references=scan_references(cfg),
                     reference_models=[resolve_model(m) for m in cfg.scan_reference_models or []], flags="--scan-")
    # the attacker's keep for recovery, defaulted and checked only when recovery runs (or it is
    # given): OLMoE's top-8 at E = 8 has no default, and --no-recovery must not be refused for it
    rec_keep = cfg.recovery_keep
    if cfg.recovery or rec_keep is not None:
        rec_keep = model.check_keep(rec_keep if rec_keep is not None
                                    else max(model.min_keep, model.top_k, model.num_experts // 4))
    if cfg.recovery and "merge" in cfg.routes and rec_keep not in keeps:
        # the merged model re-aligned is the sweep's best at the recovery keep: without it there, the recovery
        # fell back to pruning's method and the first merge method, silently (the stronger one never re-aligned)
        raise MoeguardError(f"the merge route is swept at --keeps {keeps}, and recovery re-aligns the merged model at "
                            f"{rec_keep} experts per layer, which the sweep does not merge",
                            hint=f"add {rec_keep} to --keeps, or set --recovery-keep to one of them")
    rec_tasks = [t.name for t in resolve_tasks(cfg.recovery_tasks, check=False)] if cfg.recovery_tasks else names
    missing = [t for t in rec_tasks if t not in by_name]
    if missing:
        raise MoeguardError(f"recovery_tasks {missing} are not among the audited tasks {names}",
                            hint="add them to --tasks, or recover a subset of the audited tasks")
    if cfg.recovery:
        from moeguard.realign.loop import label_pool

        for t in rec_tasks:
            for s in cfg.strategies:
                get_strategy(s, by_name[t])
            label_pool(by_name[t], pool_size=cfg.pool_size, budget=cfg.budgets[-1], seed=cfg.seed, budget_flag="--budgets")
    defense_tasks = [t.name for t in resolve_tasks(cfg.defense_tasks, check=False)] if cfg.defense_tasks else names[:1]
    if cfg.defense:
        from moeguard.defense.harden import get_defense

        get_defense(cfg.defense)
        # the hardening trains on every audited task's train split: an eval-only task failed only at
        # the defense stage, after the other stages had run
        from moeguard.tasks.loaders import load_records

        for t in tasks:
            if "train" not in t.splits:
                raise MoeguardError(f"task '{t.name}' has no train split, and the defense stage hardens on every "
                                    "audited task's training data",
                                    hint="audit tasks with a train split, or drop --defense")
            load_records(t, "train", limit=1)
    if cfg.hardened:
        from moeguard.defense.protocol import FILENAME, Protocol
        from moeguard.studies.defend import check_pair

        hardened = resolve_model(cfg.hardened)
        check_pair(model, hardened)   # as defend-eval refuses it
        own = hardened.ref.path / FILENAME if hardened.ref.path is not None else None
        if own is not None and own.exists():   # read and checked as defend-eval does: it failed after every other stage
            from moeguard.realign.api import check_protocol_covers
            from moeguard.realign.engine import FinetuneConfig

            proto = Protocol.load(own)
            check_protocol_covers(hardened, FinetuneConfig(mode=proto.modes[0], only=tuple(proto.patterns)))
    missing = [t for t in defense_tasks if t not in by_name]
    if (cfg.defense or cfg.hardened) and missing:
        raise MoeguardError(f"defense_tasks {missing} are not among the audited tasks {names}",
                            hint="add them to --tasks, or compare on audited tasks")
    resolved = replace(cfg, tasks=names, methods=methods, keeps=keeps, recovery_keep=rec_keep, recovery_tasks=rec_tasks,
                       defense_tasks=defense_tasks, threads=cfg.threads or torch.get_num_threads())
    if cfg.defense or cfg.hardened:
        # the harness's grid now, as `moeguard attack` checks it: a bad mode failed only at the defense
        # stage, after every other stage had run
        from moeguard.studies.attack import preflight

        # every defense task, as defend-eval checks them: a later one's pool or train split failed only
        # in the defense stage, after every other stage had run
        grid = defense_attack(resolved, model.num_experts)
        for t in defense_tasks:
            preflight(replace(grid, task=t), model, budget_flag="--defense-budget")
    if cfg.defense:
        # the hardening's own checks on the meta model, as `moeguard harden` runs them before loading:
        # authorized patterns that match none of a family's parameters (DBRX's Wqkv, JetMoE's kv_proj)
        # failed only once the harden stage had loaded the model, after every other stage
        from moeguard.defense.harden import config_for, preflight as harden_preflight
        from moeguard.models.loading import meta_model

        harden_preflight(meta_model(model.config), config_for(cfg.defense, tasks=tuple(names), steps=cfg.harden_steps,
                                                              seed=cfg.seed), tasks=tasks)
    return resolved, model


def _check_encoder_decoder(cfg: AuditConfig, model) -> None:
    """The stages an encoder-decoder's audit cannot run yet, refused before any work: the merge
    route (merging averages fused expert tensors), the scan and the defenses (their passes are
    decoder-only)."""
    from moeguard.models.handle import check_merge_route

    check_merge_route(model.family, "merge" in cfg.routes)
    asked = [what for what, on in (("--scan", cfg.scan),
                                   ("--defense", bool(cfg.defense)), ("--hardened", bool(cfg.hardened))) if on]
    if asked:
        raise MoeguardError(f"{model.name} is a {model.family.name} encoder-decoder, whose audit runs the baseline, "
                            f"attribution, the pruning sweep, recovery and trace; {', '.join(asked)} not yet",
                            hint=f"leave out {', '.join(asked)}")


def audit_inputs(cfg: AuditConfig, config: Path | None = None) -> list:
    """The audit's local inputs as given: the model, the hardened checkpoint, the scan's references,
    task files and the config file (names and hub ids are skipped by the check)."""
    return [cfg.model, cfg.hardened, config, *(cfg.tasks or ()), *(cfg.recovery_tasks or ()),
            *(cfg.defense_tasks or ()), *(cfg.scan_references or ()), *(cfg.scan_reference_models or ())]


def prepare_run_dir(out: Path, *, overwrite: bool, clear: bool = True, inputs=()) -> None:
    """A new folder, or an audit run folder (resumed, or emptied with --overwrite); nothing else.
    ``clear=False`` only checks: the CLI checks first and empties the old run only once every other
    input (model, tasks, backend) has been resolved, so a mistyped option loses nothing. ``inputs``
    (``audit_inputs``): an --out that is or holds one of them, or lies in a model's folder, is refused
    (--overwrite emptied its stages: a hardened checkpoint an earlier audit wrote there, given back as
    --hardened, was deleted and the run failed at the defense stage)."""
    if inputs:
        _check_inputs(out, inputs)
    if not out.parent.exists():
        raise MoeguardError(f"output folder {out.parent} does not exist", hint=f"create it: mkdir -p {out.parent}")
    # a parent that is a file, or one this user cannot write: a traceback at the lock, after resolving
    if not out.parent.is_dir():
        raise MoeguardError(f"output {out} is inside {out.parent}, which is a file, not a folder",
                            hint="choose an --out inside a folder")
    if not out.exists() and not os.access(out.parent, os.W_OK | os.X_OK):
        raise MoeguardError(f"output folder {out.parent} is not writable by this user",
                            hint="choose an --out in a folder you can write, or fix its permissions")
    if not out.exists():
        return
    if not out.is_dir():
        raise MoeguardError(f"output {out} is a file", hint="choose a directory path for the run")
    is_run = (out / MARKER).is_file()
    if not is_run and any(out.iterdir()):
        raise MoeguardError(f"output {out} exists and is not an audit run directory",
                            hint="choose a new folder; moeguard only resumes or replaces its own runs")
    if is_run and overwrite and clear:
        for name in CLEARED[:3]:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (*CLEARED[3:], MARKER):
            (out / name).unlink(missing_ok=True)


# what --overwrite removes from a run folder (the rest, a config or notes beside the run, stays)
CLEARED = ("stages", "jobs", "plots", "results.json", "report.md", "report.html")


def _check_inputs(out: Path, inputs) -> None:
    """An input that is the run folder, or lies in what the audit clears or writes (a hardened
    checkpoint an earlier audit left in its stages, given back as --hardened: --overwrite deleted it,
    and the run failed at the defense stage), or a run folder inside a model's folder: one line."""
    from moeguard.io import check_outside_models, local_inputs

    run, inputs = out.resolve(), list(inputs)   # read twice
    held = [run / name for name in CLEARED]
    for given, inp in local_inputs(inputs):
        if inp == run or any(inp == h or h in inp.parents for h in held):
            raise MoeguardError(f"the audit's input {given} lies in what the run folder {out} writes (its "
                                f"{'/'.join(CLEARED[:3])} folders and reports)",
                                hint="copy the input out of the run folder, or choose another --out")
    check_outside_models(out, inputs)


def lock_run_dir(out: Path):
    """For the block: an exclusive lock on the audit run ``out`` (``.OUT.lock`` beside it: a folder
    not yet made, or being emptied), or a one-line error where another audit holds it. By the
    folder's real path: --out . and the same folder through a link take the one lock."""
    from moeguard.io import held

    real = out.resolve()
    return held(real.with_name(f".{real.name}.lock"), busy=f"another audit is running in {out}",
                hint="wait for it to finish (or stop it), or give this run another --out")


def mark_run_dir(out: Path, cfg: AuditConfig) -> None:
    """Make ``out`` an audit run directory (what :func:`prepare_run_dir` resumes), with its config."""
    from moeguard.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER, {"schema": "moeguard.audit-run/1", "config": cfg.to_dict()})


def run_audit(cfg: AuditConfig, out: Path, *, backend: Backend, model: ModelHandle, progress: Any = None,
              command: str | None = None) -> dict[str, Any]:
    """``cfg`` and ``model`` as :func:`resolve` returns them."""
    from moeguard.edge import data_stamps, file_tasks
    from moeguard.provenance import run_record
    from moeguard.tasks.registry import get_task

    started = time.perf_counter()
    store = StageStore(out)
    info = {**model.info, "num_experts": model.num_experts}
    audited = [get_task(t) for t in cfg.tasks]
    runtime = Runtime(model=cfg.model, dtype=cfg.dtype, device_map=cfg.device_map, threads=cfg.threads,
                      tasks=file_tasks(audited), task_data=data_stamps(audited),
                      max_memory=parse_memory(cfg.max_memory) if cfg.max_memory is not None else None,
                      ray_gpus=backend.gpus if backend.name == "ray" else None)
    # the thread count is how many cores, not what is computed: in no stage key, as in no job's scope
    # (with it, --threads or another machine's core count re-ran the hardening and the scan)
    placed = {k: v for k, v in runtime.to_dict().items() if k != "threads"}
    # the hardening and the scan load their own model here, in this process, wherever the jobs run
    here = {k: v for k, v in replace(runtime, ray_gpus=None).to_dict().items() if k != "threads"}
    ident = {"model": weights_identity(cfg.model), "runtime": placed}
    n_stages = 5 + bool(cfg.defense) + bool(cfg.defense or cfg.hardened) + bool(cfg.scan)
    overall = progress.add_task("audit", total=n_stages) if progress is not None else None

    def stage(name, settings, fn, upstream=()):
        if progress is not None:
            progress.update(overall, description=f"audit: {name}")
        r = store.run(name, settings, fn, upstream=list(upstream))
        if progress is not None:
            progress.advance(overall)
        return r

    def jobs(js: list[Job], label: str) -> list[dict[str, Any]]:
        return run_jobs(js, root=store.jobs, runtime=runtime, backend=backend, progress=progress, label=label)

    def study_run(study, study_cfg):
        return run_study(study, study_cfg, jobs=store.jobs, runtime=runtime, backend=backend, progress=progress)

    def studies_run(items, label):
        return run_studies(items, jobs=store.jobs, runtime=runtime, backend=backend, progress=progress, label=label)

    from moeguard.io import write_json

    s_model = stage("model", ident, lambda d: write_json(d / "model.json", info))

    # the recovery's limit whether or not recovery runs: --no-recovery re-ran every baseline evaluation
    limits = sorted({cfg.eval_limit, cfg.collateral_limit, cfg.recovery_eval_limit})
    base_settings = {"tasks": cfg.tasks, "limits": limits, "seed": cfg.seed}

    from moeguard.studies.sweep import SweepConfig, SweepStudy, SweepStudyConfig, attribution_phase, baseline_phase

    def baseline(d: Path) -> None:
        res = jobs(baseline_phase(cfg.tasks, limits, cfg.seed).jobs, "baseline")
        write_json(d / "baseline.json", dict(zip(cfg.tasks, res)))

    s_base = stage("baseline", base_settings, baseline, [s_model])

    attr_settings = {"tasks": cfg.tasks, "methods": cfg.methods, "samples": cfg.samples, "seed": cfg.seed}

    def attribution(d: Path) -> None:
        refs = {t: _reference(cfg, t) for t in cfg.tasks}
        res = jobs(attribution_phase(cfg.tasks, cfg.methods, cfg.samples, cfg.seed, refs).jobs, "attribution")
        for t, by_method in zip(cfg.tasks, res):
            for m, s in by_method.items():
                (d / "scores" / t).mkdir(parents=True, exist_ok=True)
                write_json(d / "scores" / t / f"{m}.json", s)

    s_attr = stage("attribution", attr_settings, attribution, [s_model])

    sweep_settings = {"tasks": cfg.tasks, "methods": cfg.methods, "keeps": cfg.keeps, "samples": cfg.samples,
                      "eval_limit": cfg.eval_limit, "collateral_limit": cfg.collateral_limit,
                      "random_seeds": cfg.random_seeds, "deletion_curves": cfg.deletion_curves,
                      "physical_checks": cfg.physical_checks, "seed": cfg.seed}
    if "merge" in cfg.routes:   # only then: a prune-only audit keeps its stage key (and its cached sweep)
        sweep_settings.update(routes=cfg.routes, merge_methods=cfg.merge_methods)
    capped = runtime.max_memory is not None   # offloaded, the physical checks are skipped: uncapped re-does them
    sweep_key = {**sweep_settings, "capped": True} if capped else sweep_settings

    def sweep(d: Path) -> None:
        from moeguard.studies.sweep import full_scores

        base = s_base.read("baseline.json")
        full = {t: full_scores(base[t][str(cfg.eval_limit)], base[t][str(cfg.collateral_limit)]) for t in cfg.tasks}
        scores = {t: {m: s_attr.read(f"scores/{t}/{m}.json") for m in cfg.methods} for t in cfg.tasks}
        study = SweepStudyConfig(sweep=SweepConfig(**sweep_settings), references={}, full=full, scores=scores,
                                 capped=capped)
        doc = study_run(SweepStudy(), study)
        doc.pop("scores")  # the attribution stage holds them
        doc["model"]["name"] = info["name"]
        write_json(d / "sweep.json", doc)

    s_sweep = stage("sweep", sweep_key, sweep, [s_base, s_attr])

    s_rec = None
    if cfg.recovery:
        rec_settings = {"tasks": cfg.recovery_tasks, "keep": cfg.recovery_keep, "strategies": cfg.strategies,
                        "budgets": cfg.budgets, "seeds": cfg.recovery_seeds, "pool_size": cfg.pool_size,
                        "eval_limit": cfg.recovery_eval_limit, "target": cfg.target, "seed": cfg.seed,
                        # the claim rule: a stage summarized before it (2-seed claims) is summarized again,
                        # from its cached jobs
                        "min_seeds": MIN_SEEDS}
        if "merge" in cfg.routes:   # then the merged model is re-aligned too (a prune-only key is unchanged)
            rec_settings.update(routes=cfg.routes, merge_methods=cfg.merge_methods)
        if cfg.recovery_mode != "full":   # likewise: full fine-tuning's key is as before the setting
            rec_settings["mode"] = cfg.recovery_mode
        if cfg.max_memory is not None:    # capped curves are untraced: never reused for an uncapped run
            rec_settings["traced"] = False
        s_rec = stage("recovery", rec_settings, lambda d: recovery_stage(cfg, d, s_base, s_attr, s_sweep, model, studies_run),
                      [s_base, s_attr, s_sweep])

    s_hard = s_def = None
    if cfg.defense:
        # the hardening's training state outlives the stage's folder (removed when a stage fails), so an
        # interrupted audit resumes the hardening where it stopped (keyed on its settings and weights)
        harden_state = store.jobs / "harden-state"
        harden_settings = {"defense": cfg.defense, "harden_steps": cfg.harden_steps, "tasks": cfg.tasks,
                           "seed": cfg.seed, "runtime": here}
        s_hard = stage("harden", harden_settings,
                       lambda d: harden_stage(cfg, d, runtime, model, progress, state=harden_state,
                                              final=store.stages / "harden"), [s_model])
        from moeguard import trainstate

        trainstate.clear(harden_state)   # the stage is complete (or was): nothing to resume
    if cfg.defense or cfg.hardened:
        def_settings = {"defense": cfg.defense, "hardened": weights_identity(cfg.hardened) if cfg.hardened else None,
                        "tasks": cfg.defense_tasks, "budget": cfg.defense_budget,
                        "seeds": cfg.defense_seeds, "eval_limit": cfg.recovery_eval_limit, "seed": cfg.seed,
                        "grid": [list(cfg.defense_modes), list(cfg.defense_lr_scales), list(cfg.defense_epochs)],
                        **({"routes": cfg.routes, "merge_methods": cfg.merge_methods} if "merge" in cfg.routes else {}),
                        "methods": cfg.methods, "samples": cfg.samples, "pool_size": cfg.pool_size,
                        "utility_tasks": cfg.tasks, "utility_limit": cfg.eval_limit, "target": cfg.target,
                        "runtime": placed}
        s_def = stage("defense", def_settings,
                      lambda d: defense_stage(cfg, d, runtime, model, study_run,
                                              hardened=s_hard.path if s_hard is not None else None),
                      [s for s in (s_model, s_hard) if s is not None])

    s_scan = None
    if cfg.scan:
        import hashlib
        import json

        refs = scan_references(cfg)
        scan_cfg = scan_config(cfg)
        scan_settings = {**scan_cfg.to_dict(), "tasks": cfg.tasks, "runtime": here,
                         # by content: a reference scan re-made in place changes the null
                         "references": [hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest() for r in refs],
                         "reference_models": [weights_identity(m) for m in cfg.scan_reference_models or []]}
        # the work folder by the weights too (the stage key has them through the model stage): a checkpoint
        # re-made at the same path must not find the old model's scan.json there
        key = hashlib.sha256(json.dumps({**scan_settings, "model": ident["model"]}, sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
        s_scan = stage("scan", scan_settings,
                       lambda d: scan_stage(d, store.jobs / f"scan-{key}", model, cfg, scan_cfg, refs, runtime, progress), [s_model])

    upstream = [s for s in (s_model, s_base, s_attr, s_sweep, s_rec, s_hard, s_def, s_scan) if s is not None]
    doc = assemble(cfg, info, {s.name: s for s in upstream}, backend=backend.describe())
    doc["stages"] = store.log
    doc["run"] = run_record(cfg.to_dict())
    if command:
        doc["run"]["command"] = command
    doc["seconds"] = round(time.perf_counter() - started, 1)
    if progress is not None:
        progress.update(overall, description="audit: report")

    from moeguard.report.audit import write_report

    write_report(doc, out, {s.name: s.path for s in upstream})
    if progress is not None:
        progress.update(overall, completed=n_stages, description="audit: done")
    return doc


def _reference(cfg: AuditConfig, task: str) -> list[str] | None:
    """Contrastive attribution's reference: the other audited tasks (None: the embedded default)."""
    others = [t for t in cfg.tasks if t != task]
    return others or None
