"""The audit's settings: defaults, an optional YAML file, command-line flags on top.

Every field can be set in ``--config audit.yaml`` (same names as the flags, with
underscores); a flag given on the command line wins over the file. The fields are the one
declaration of each setting: the command's options are generated from them. Fields left ``None``
are resolved against the model (keep levels from its expert count, tasks from the embedded
suite) and the resolved config is what the run saves and what stage keys hash.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeguard.config import SEED_MAX, build as config_build, default_of, like, setting, validate
from moeguard.defense.harden import SAVE_EVERY
from moeguard.errors import MoeguardError
from moeguard.studies.attack import AttackConfig
from moeguard.studies.sweep import SweepConfig

SCHEMA = "moeguard.audit-config/1"


@dataclass(kw_only=True)
class AuditConfig:
    """Every audit setting, once: the command line's options, the YAML file's keys and their
    checks all come from these fields (see :mod:`moeguard.config`)."""

    model: str | None = setting(None, help="checkpoint directory or hub id; default: the embedded model")
    tasks: list[str] | None = setting(None, help="comma-separated tasks or YAML paths; default: the embedded suite")
    seed: int = setting(0, min=0, max=SEED_MAX, help="random seed; the same seed gives the same numbers")
    # attribution + pruning sweep
    methods: list[str] | None = setting(None, help="attribution methods; default: all")
    samples: int = like(SweepConfig, "samples")
    keeps: list[int] | None = setting(None, min=1, help="experts-per-layer levels with collateral damage; default: N/4,N/2,3N/4")
    eval_limit: int = like(SweepConfig, "eval_limit", help="eval records of the pruned task (and the baseline)")
    # the audit's sweep is a cheaper pass than the command's: fewer collateral records, rankings, checks
    collateral_limit: int = like(SweepConfig, "collateral_limit", 16)
    random_seeds: int = like(SweepConfig, "random_seeds", 3, min=1)
    deletion_curves: bool = like(SweepConfig, "deletion_curves")
    physical_checks: int = like(SweepConfig, "physical_checks", 1, help="points per task re-scored on physically pruned copies")
    # the second compression route: the risk takes the stronger of pruning and merging per task
    routes: list[str] = like(SweepConfig, "routes")
    merge_methods: list[str] = like(SweepConfig, "merge_methods")
    # recovery (active-learning re-alignment of the pruned model)
    recovery: bool = setting(True, negative="--no-recovery", help="run the recovery study")
    recovery_tasks: list[str] | None = setting(None, help="tasks for the recovery study; default: all")
    recovery_keep: int | None = setting(None, min=1, help="experts per layer the attacker keeps; default: N/4")
    recovery_mode: str = setting("full", help="what the attacker's fine-tuning may change: full, lora, router, "
                                              "experts (under --max-memory: lora, its adapters in memory)")
    # + cluster-uncertainty: stronger, 2x the cost
    strategies: list[str] = setting(factory=lambda: ["random", "orphan"],
                                    help="active-learning strategies (random is the baseline)")
    budgets: list[int] = setting(factory=lambda: [8, 32, 128], min=1, help="label counts on the learning curve")
    recovery_seeds: int = setting(2, min=1, help="runs per strategy")
    pool_size: int = setting(256, min=1, help="unlabeled pool of the attacker")
    recovery_eval_limit: int = setting(64, min=1, help="eval records per recovery round")
    target: float = setting(95.0, help="percent of the full score the attacker wants back")
    # defense comparison (optional)
    defense: str | None = setting(None, help="also harden with this defense and compare (see `moeguard defenses`)")
    hardened: str | None = setting(None, help="or compare this hardened checkpoint with --model")
    harden_steps: int | None = setting(None, min=1, help="training steps of --defense; default: the defense's")
    harden_save_every: int = setting(SAVE_EVERY, min=1, help="save the hardening's training state every N steps, which an "
                                     "interrupted audit resumes from (changes no number)")
    defense_tasks: list[str] | None = setting(None, help="tasks the defense comparison attacks; default: the first")
    defense_budget: int = setting(64, min=1, help="the attack harness's label budget")
    defense_seeds: int = setting(1, min=1, help="seeds per attacker setting in the harness")
    # the harness's grid, as `moeguard attack` takes it
    defense_modes: tuple[str, ...] = like(AttackConfig, "modes")
    defense_lr_scales: tuple[float, ...] = like(AttackConfig, "lr_scales")
    defense_epochs: tuple[float, ...] = like(AttackConfig, "epochs")
    # per-expert security scan (optional; `moeguard scan`)
    scan: bool = setting(False, negative="--no-scan", help="also scan every expert: usage, criticality, weights and backdoor suspicion")
    scan_references: list[str] | None = setting(None, help="scan folders of clean models of the same architecture: the scan's suspicion null; default: siblings")
    scan_reference_models: list[str] | None = setting(None, help="clean models sharing the tokenizer whose predictions the scan discounts (see `moeguard scan`)")
    scan_contexts: int = setting(4, min=1, help="benign contexts the scan's backdoor search appends tokens to")
    # execution
    backend: str = setting("local", help="where jobs run: local or ray")
    ray_address: str | None = setting(None, help="an existing Ray cluster; default: a local Ray")
    threads: int | None = setting(None, min=1, max=4096, help="torch threads per job (and CPUs per Ray task); default: this machine's")
    gpus_per_job: float = setting(0.0, min=0, help="GPUs each Ray task asks for")
    dtype: str | None = setting(None, help="weights dtype, e.g. bfloat16 for large checkpoints on GPU")
    device_map: str | None = setting(None, help="accelerate device map, e.g. auto")
    max_memory: str | None = setting(None, help="cap on the host memory the weights take, e.g. 8GiB (visible GPUs "
                                     "first, the rest offloaded to disk); the model, baseline, attribution, sweep "
                                     "and (with --recovery-mode lora) recovery stages")

    def __post_init__(self) -> None:
        validate(self)
        # the merge route's settings, checked here (before any stage runs) with the sweep's own rule
        from moeguard.studies.sweep import check_routes

        check_routes(self.routes, self.merge_methods)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise MoeguardError(f"audit config {path} does not exist", hint="pass a YAML file, e.g. --config audit.yaml")
    try:
        from moeguard.io import strict_yaml

        data = strict_yaml(path.read_text(encoding="utf-8")) or {}   # a repeated key is refused, not the last kept
    except UnicodeDecodeError as exc:
        raise MoeguardError(f"audit config {path} is not UTF-8 (byte {exc.start})", hint="save the file as UTF-8") from None
    except OSError as exc:
        raise MoeguardError(f"audit config {path} cannot be read ({exc.strerror})", hint="check the file's permissions") from None
    except yaml.YAMLError as exc:
        raise MoeguardError(f"audit config {path} is not valid YAML: {str(exc).splitlines()[0]}",
                            hint="fix the file; keys are the audit's option names with underscores") from None
    if not isinstance(data, dict):
        raise MoeguardError(f"audit config {path} holds a {type(data).__name__}, expected a mapping",
                            hint="write `key: value` lines, e.g. `keeps: [2, 4]`")
    keys = [str(k).replace("-", "_") for k in data]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:   # 'eval-limit:' and 'eval_limit:' are one option: the last would win silently
        raise MoeguardError(f"audit config {path} sets {twice[0]} twice (with '-' and with '_')",
                            hint="keep one of the two lines")
    return dict(zip(keys, data.values()))


def build(file_values: dict[str, Any], flags: dict[str, Any]) -> AuditConfig:
    """Defaults < file < flags (a flag left ``None`` is not given)."""
    return config_build(AuditConfig, flags, what="audit", base=file_values)


# settings of a stage that is off, with the flag that turns it on: set (other than their defaults) they were
# ignored in silence. Said, not refused: a stage is switched off by adding its flag to a command that set them
_STAGE_SETTINGS = {
    "recovery": (("recovery_tasks", "recovery_keep", "recovery_mode", "budgets", "recovery_seeds", "strategies"), "recovery",
                 "drop --no-recovery"),
    # the defense comparison's attacker labels from the same pool, scored on the same eval limit
    "recovery and defense": (("pool_size", "recovery_eval_limit"), "recovery or defense or hardened",
                             "drop --no-recovery, or pass --defense NAME or --hardened PATH"),
    "defense": (("defense_tasks", "defense_budget", "defense_seeds", "defense_modes", "defense_lr_scales",
                 "defense_epochs"), "defense or hardened", "pass --defense NAME or --hardened PATH"),
    "scan": (("scan_contexts",), "scan", "pass --scan"),
}


def _check_unused(cfg: AuditConfig) -> None:
    field_of = {f.name: f for f in dataclasses.fields(AuditConfig)}
    for stage, (names, on, fix) in _STAGE_SETTINGS.items():
        if any(getattr(cfg, k) for k in on.split(" or ")):
            continue
        given = [k for k in names if getattr(cfg, k) != default_of(field_of[k])]
        if given:
            import warnings

            off = f"the {stage} stages are off" if " and " in stage else f"the {stage} stage is off"
            warnings.warn(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set, and {off}: "
                          f"{'it has' if len(given) == 1 else 'they have'} no effect ({fix} to run it)", stacklevel=3)
    # refused: nothing hardens without a defense (harden_steps beside --hardened re-ran the whole comparison, as it
    # is in the stage's key; harden_save_every was accepted and ignored)
    given = {k: getattr(cfg, k) for k in ("harden_steps", "harden_save_every")
             if getattr(cfg, k) != default_of(field_of[k])}
    if given and not cfg.defense:
        names = " and ".join(given)
        raise MoeguardError(f"{' and '.join(f'{k} {v}' for k, v in given.items())} set{'s' if len(given) == 1 else ''} "
                            "the hardening, and no --defense hardens in this audit"
                            + (" (--hardened names a checkpoint already hardened)" if cfg.hardened else ""),
                            hint=f"leave {names} out" if cfg.hardened else
                            f"pass --defense NAME to harden within the audit, or leave {names} out")


def check(cfg: AuditConfig) -> None:
    """Value checks that need no model."""
    if not 0 < cfg.target <= 100:
        raise MoeguardError(f"target is {cfg.target}", hint="a percentage in (0, 100]")
    if cfg.defense and cfg.hardened:
        raise MoeguardError("both defense and hardened are set",
                            hint="harden within the audit (--defense NAME) or compare a hardened checkpoint (--hardened PATH)")
    if cfg.recovery:
        from moeguard.realign.modes import get_mode

        get_mode(cfg.recovery_mode)
    if cfg.device_map is not None:
        from moeguard.models.placement import check_device_map

        # on Ray the workers load the model and check their own devices; the defense and scan stages load it here
        here = cfg.backend != "ray" or bool(cfg.defense or cfg.hardened or cfg.scan)
        check_device_map(cfg.device_map, what="device_map", on_this_machine=here)
    if cfg.max_memory is not None:
        from moeguard.models.placement import parse_memory

        parse_memory(cfg.max_memory, what="max_memory", device_map=cfg.device_map, map_flag="device_map")
        needs = [name for name, on in (("defense", cfg.defense or cfg.hardened), ("scan", cfg.scan)) if on]
        if needs:
            # each fine-tunes or edits a copy of the model in memory, which the cap is there to avoid
            raise MoeguardError(f"max_memory {cfg.max_memory} is set with the {', '.join(needs)} stage(s), which need "
                                f"the model or a copy of it in memory",
                                hint="leave out --defense, --hardened and --scan to audit a model larger than memory; "
                                "run those stages where the model fits")
        if "merge" in cfg.routes:   # the sweep's merge points too, with recovery or without
            from moeguard.studies.merge_route import refuse_capped_merge

            refuse_capped_merge(cfg.max_memory, flag="max_memory", route_flag="--route")
        if cfg.recovery:
            from moeguard.studies.recovery import check_capped

            # (the merge route is refused above, for the sweep's merge points too)
            check_capped(cfg.max_memory, mode=cfg.recovery_mode, mode_flag="--recovery-mode",
                         otherwise=", or --no-recovery")
    _check_unused(cfg)
    if cfg.recovery and "random" not in cfg.strategies:   # off, they are said unused (_check_unused), not refused
        raise MoeguardError(f"strategies {cfg.strategies} lack 'random', the baseline every strategy is compared with",
                            hint="add random, e.g. --strategies random,orphan")
    if cfg.budgets != sorted(set(cfg.budgets)) or cfg.budgets[0] < 1:
        raise MoeguardError(f"budgets {cfg.budgets} are not increasing positive label counts", hint="e.g. 8,32,128")
