"""The audit's optional stages (``audit/run.py`` plans and keys them): the recovery study on each
task's best plan, the expert scan, and the defense comparison, with the settings resolve checks
before any of them runs (``scan_config``, ``defense_attack``).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from moeguard.audit.config import AuditConfig
from moeguard.audit.stages import StageResult
from moeguard.models.handle import ModelHandle
from moeguard.models.identity import weights_identity
from moeguard.studies.engine import Runtime


def scan_config(cfg: AuditConfig):
    """The scan stage's settings (one place: resolve checks reference scans against them)."""
    from moeguard.scan.run import ScanConfig

    return ScanConfig(samples=cfg.samples, contexts=cfg.scan_contexts, seed=cfg.seed)


def defense_attack(cfg: AuditConfig, E: int):
    """The attack harness the defense stage runs against base and hardened (one place: resolve checks it)."""
    from moeguard.studies.attack import AttackConfig

    return AttackConfig(task=cfg.defense_tasks[0], keep=E // 2, budget=cfg.defense_budget, seeds=cfg.defense_seeds,
                        methods=tuple(cfg.methods), modes=tuple(cfg.defense_modes),
                        lr_scales=tuple(cfg.defense_lr_scales), epochs=tuple(cfg.defense_epochs),
                        seed=cfg.seed, samples=cfg.samples, pool_size=cfg.pool_size,
                        eval_limit=cfg.recovery_eval_limit, target=cfg.target,
                        # the audit's routes: with merging, the harness attacks base and hardened by both
                        routes=tuple(cfg.routes), merge_methods=tuple(cfg.merge_methods))


def recovery_stage(cfg: AuditConfig, d: Path, s_base: StageResult, s_attr: StageResult, s_sweep: StageResult,
              model: ModelHandle, studies_run) -> None:
    """The recovery study of every recovery task, on the plan of its best method (by deletion AUC),
    all tasks' jobs side by side. With the merge route, each task's merged model (the sweep's best
    method and merge method at the recovery keep) is re-aligned too (``TASK.merge.json``): merging
    can overtake pruning after re-alignment, so the risk takes the stronger route after it."""
    from moeguard.attribution.base import Scores
    from moeguard.io import write_json
    from moeguard.pruning.plan import plan_from_scores
    from moeguard.realign.engine import FinetuneConfig
    from moeguard.studies.recovery import RecoveryConfig, RecoveryStudy

    sweep_doc, base = s_sweep.read("sweep.json"), s_base.read("baseline.json")
    items = []
    for t in cfg.recovery_tasks:
        method = _recovery_method(sweep_doc, t)
        plan = plan_from_scores(Scores.from_dict(s_attr.read(f"scores/{t}/{method}.json")), keep=cfg.recovery_keep,
                                min_keep=model.family.min_experts)
        items.append((RecoveryStudy(), RecoveryConfig(
            task=t, keep=cfg.recovery_keep, strategies=tuple(cfg.strategies), budgets=tuple(cfg.budgets),
            seeds=cfg.recovery_seeds, seed=cfg.seed, method=method, samples=cfg.samples, pool_size=cfg.pool_size,
            eval_limit=cfg.recovery_eval_limit, target=cfg.target,
            given_plan={str(l): v for l, v in plan.keep.items()},
            given_full=base[t][str(cfg.recovery_eval_limit)]["score"], finetune=FinetuneConfig(mode=cfg.recovery_mode),
            traced=cfg.max_memory is None)))
        if "merge" in cfg.routes:
            row = (((sweep_doc.get("routes") or {}).get(t) or {}).get(str(cfg.recovery_keep)) or {}).get("merge")
            # the sweep's best merge at the recovery keep (resolve refuses a recovery keep the sweep did not
            # merge at); none where no merge there had a retention (a full score of 0): pruning's method
            m_method, mm = (row["method"], row["merge_method"]) if row else (method, cfg.merge_methods[0])
            items.append((RecoveryStudy(), replace(
                items[-1][1], route="merge", merge_method=mm, method=m_method, given_plan=None,
                given_scores=s_attr.read(f"scores/{t}/{m_method}.json"))))
    (d / "recovery").mkdir(exist_ok=True)
    for (_, rc), doc in zip(items, studies_run(items, "recovery")):
        write_json(d / "recovery" / (f"{rc.task}.json" if rc.route == "prune" else f"{rc.task}.{rc.route}.json"), doc)


def _recovery_method(sweep_doc: dict, task: str) -> str:
    """The sweep's best method for ``task`` by deletion AUC; where no method has one (a full score of 0
    or not finite leaves every retention undefined) the study's default, else the first method the
    sweep ran, said in a warning. It was refused with a hint to pass --method, which the audit lacks,
    again at every resume."""
    from moeguard.errors import MoeguardError
    from moeguard.studies.recovery import DEFAULT_METHOD, best_method

    try:
        return best_method(sweep_doc, task)
    except MoeguardError:
        ran = sorted(m for m in (sweep_doc.get("faithfulness") or {}).get(task) or {} if m != "random")
        if not ran:
            raise
        method = DEFAULT_METHOD if DEFAULT_METHOD in ran else ran[0]
        import warnings

        warnings.warn(f"task '{task}': no attribution method has a deletion AUC (its full score is 0 or not finite, so "
                      f"every retention is undefined); its recovery study uses {method}", stacklevel=2)
        return method


def scan_references(cfg: AuditConfig) -> list[dict]:
    from moeguard.scan.run import load_references

    return load_references([Path(p) for p in cfg.scan_references or []])


def scan_stage(d: Path, work: Path, model: ModelHandle, cfg: AuditConfig, scan_cfg, refs: list[dict], runtime: Runtime,
          progress) -> None:
    """The per-expert scan of the audited model. It runs in ``work`` (under jobs/, which outlives
    an interrupted stage, so a killed scan resumes from its finished parts), then is copied into
    the stage folder (``scan/scan.json``)."""
    import torch

    from moeguard.edge import resolve_model
    from moeguard.scan.run import scan
    from moeguard.studies.engine import Context
    from moeguard.tasks.registry import get_task

    Context.release()   # the studies' models out of memory first: the scan loads its own (and its references)

    torch.set_num_threads(runtime.threads)
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    ref_models = [resolve_model(m) for m in cfg.scan_reference_models or []]
    from moeguard.io import whole_json

    if not whole_json(work / "scan.json"):   # a damaged one (a kill mid-write) is scanned again, not copied on
        scan(model, [get_task(t) for t in cfg.tasks], work, config=scan_cfg, references=refs, reference_models=ref_models,
             dtype=dtype, device_map=cfg.device_map, overwrite=True, progress=progress)
    else:   # a finished scan the stage did not record (a kill before its done.json, or the stage deleted)
        import json

        from moeguard.provenance import maker_of, reusing

        reusing(str(work / "scan.json"), maker_of(json.loads((work / "scan.json").read_text()).get("run")),
                fix=f"delete {work}")
    shutil.copytree(work, d / "scan")


def harden_stage(cfg: AuditConfig, d: Path, runtime: Runtime, model: ModelHandle, progress, *, state: Path,
                 final: Path) -> None:
    """Harden the audited model with ``cfg.defense`` and save it as `moeguard harden` does, into
    ``d/hardened``; its protocol names ``final``, where the stage's folder is renamed to.

    A stage of its own: the defense comparison that follows (its jobs keyed by this checkpoint's
    identity, times included) can fail or change settings without the hardening running again."""
    import torch

    from moeguard.defense.harden import config_for, harden, save_hardened
    from moeguard.io import write_json
    from moeguard.models.loading import load_model
    from moeguard.pruning.apply import weights_folder

    from moeguard.studies.engine import Context

    Context.release()   # the studies' models out of memory first: this stage trains a full copy of its own
    torch.set_num_threads(runtime.threads)
    dtype = getattr(torch, runtime.dtype) if runtime.dtype else None
    torch.manual_seed(cfg.seed)
    hardened, tok, _ = load_model(cfg.model, dtype=dtype, device_map=runtime.device_map)
    hcfg = config_for(cfg.defense, tasks=tuple(cfg.tasks), steps=cfg.harden_steps, seed=cfg.seed)
    log = harden(hardened, tok, hcfg, progress=progress, checkpoint=state, source=weights_identity(cfg.model),
                 save_every=cfg.harden_save_every)
    # as `moeguard harden` writes it: with its record and, for a defense with one, the protocol users
    # adapt under (without it a later defend-eval or realign on this folder skipped the protocol)
    from moeguard.provenance import run_record

    # with its run record, as `moeguard harden` writes it (it was {}: no versions, commit or settings in a
    # checkpoint that may be copied out and handed to defend-eval or realign)
    save_hardened(d / "hardened", hardened, tok, hcfg, log, source=model.name, like=weights_folder(model.ref),
                  named=final / "hardened",
                  run=run_record({"model": model.name, **hcfg.to_dict(), "save_every": cfg.harden_save_every,
                                  "device_map": runtime.device_map, "dtype": runtime.dtype,
                                  "stage": "the audit's harden stage"}))
    write_json(d / "hardening.json", {"method": cfg.defense, "config": hcfg.to_dict(), **log})


def defense_stage(cfg: AuditConfig, d: Path, runtime: Runtime, model: ModelHandle, study_run, *,
                  hardened: Path | None = None) -> None:
    """The defend-eval study on the audit's backend: base and hardened under the same attack
    harness. ``hardened``: the harden stage's folder (else ``cfg.hardened`` is compared)."""
    from moeguard.defense.protocol import FILENAME, Protocol
    from moeguard.io import write_json
    from moeguard.models.loading import resolve as resolve_ref
    from moeguard.studies.defend import DefendEvalConfig, DefendEvalStudy

    # the harden stage's checkpoint or the one given: the protocol it was saved with, where it has one
    hardened_ref = str(hardened / "hardened") if hardened is not None else cfg.hardened
    folder = resolve_ref(hardened_ref).path
    proto = None
    if folder is not None and (folder / FILENAME).exists():
        p = Protocol.load(folder / FILENAME)
        proto = {"modes": list(p.modes), "patterns": list(p.patterns)}
    E = model.num_experts
    attack = defense_attack(cfg, E)
    dcfg = DefendEvalConfig(tasks=tuple(cfg.defense_tasks), keeps=(E // 2,), attack=attack,
                            utility_tasks=tuple(cfg.tasks), utility_limit=cfg.eval_limit, base=cfg.model,
                            hardened=hardened_ref, protocol=proto, num_experts=E)
    doc = study_run(DefendEvalStudy(), dcfg)
    doc["base"], doc["hardened"] = model.name, cfg.defense or cfg.hardened
    write_json(d / "defense.json", doc)

