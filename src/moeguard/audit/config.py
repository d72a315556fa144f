"""The audit's settings: defaults, an optional YAML file, command-line flags on top.

Every field can be set in ``--config audit.yaml`` (same names as the flags, with
underscores); a flag given on the command line wins over the file. Fields left ``None``
are resolved against the model (keep levels from its expert count, tasks from the embedded
suite) and the resolved config is what the run saves and what stage keys hash.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from moeguard.errors import MoeguardError, suggest

SCHEMA = "moeguard.audit-config/1"


@dataclass(kw_only=True)
class AuditConfig:
    model: str | None = None                 # checkpoint dir or hub id; None: the embedded model
    tasks: list[str] | None = None           # None: the embedded suite
    seed: int = 0
    # attribution + pruning sweep
    methods: list[str] | None = None         # None: every registered method
    samples: int = 64                        # attribution calibration samples per task
    keeps: list[int] | None = None           # None: N/4, N/2, 3N/4
    eval_limit: int = 64                     # eval records of the pruned task (and the baseline)
    collateral_limit: int = 16                # eval records of each other task (collateral damage)
    random_seeds: int = 3
    deletion_curves: bool = True
    physical_checks: int = 1                 # per task
    # recovery (active-learning re-alignment of the pruned model)
    recovery: bool = True
    recovery_tasks: list[str] | None = None  # None: every task
    recovery_keep: int | None = None         # None: N/4 (at least the family's minimum)
    strategies: list[str] = field(default_factory=lambda: ["random", "orphan"])  # + cluster-uncertainty: stronger, 2x the cost
    budgets: list[int] = field(default_factory=lambda: [8, 32, 128])
    recovery_seeds: int = 2
    pool_size: int = 256
    recovery_eval_limit: int = 64          # = eval_limit: one full-model score per task
    target: float = 95.0
    # defense comparison (optional)
    defense: str | None = None               # a defense to harden with (see `moeguard defenses`)
    hardened: str | None = None              # or a hardened checkpoint made earlier
    harden_steps: int | None = None          # None: the defense's default
    defense_tasks: list[str] | None = None   # None: the first task
    defense_budget: int = 64
    defense_seeds: int = 1
    # execution
    backend: str = "local"
    ray_address: str | None = None
    threads: int | None = None               # torch threads per job; None: this machine's default
    gpus_per_job: float = 0.0
    dtype: str | None = None                 # e.g. bfloat16 for large checkpoints on GPU
    device_map: str | None = None            # e.g. auto (accelerate places the layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_LISTS = {f.name for f in fields(AuditConfig) if "list" in str(f.type)}


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise MoeguardError(f"audit config {path} does not exist", hint="pass a YAML file, e.g. --config audit.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MoeguardError(f"audit config {path} is not valid YAML: {str(exc).splitlines()[0]}",
                            hint="fix the file; keys are the audit's option names with underscores") from None
    if not isinstance(data, dict):
        raise MoeguardError(f"audit config {path} holds a {type(data).__name__}, expected a mapping",
                            hint="write `key: value` lines, e.g. `keeps: [2, 4]`")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build(file_values: dict[str, Any], flags: dict[str, Any]) -> AuditConfig:
    """Defaults < file < flags (a flag left ``None`` is not given)."""
    known = {f.name: f for f in fields(AuditConfig)}
    for k in file_values:
        if k not in known:
            raise MoeguardError(f"unknown audit setting '{k}'", hint=suggest(k, list(known)))
    values = {**file_values, **{k: v for k, v in flags.items() if v is not None}}
    for k, v in list(values.items()):
        values[k] = _coerce(k, v, known[k])
    return AuditConfig(**values)


def _coerce(name: str, value: Any, f) -> Any:
    if value is None:
        return None
    if name in _LISTS:
        if isinstance(value, str):
            value = [x.strip() for x in value.split(",") if x.strip()]
        if not isinstance(value, (list, tuple)):
            raise MoeguardError(f"audit setting '{name}' is {value!r}, expected a list",
                                hint=f"e.g. {name}: [a, b] in YAML, or a comma-separated flag")
        value = list(value)
        if "int" in str(f.type):
            try:
                value = [int(x) for x in value]
            except (TypeError, ValueError):
                raise MoeguardError(f"audit setting '{name}' is {value!r}, expected integers",
                                    hint=f"e.g. {name}: [2, 4]") from None
        else:
            value = [str(x) for x in value]
        if not value:
            raise MoeguardError(f"audit setting '{name}' is empty", hint="leave it out for the default")
        return value
    expected = str(f.type).split(" ")[0]
    try:
        if expected == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if expected == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if expected == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise MoeguardError(f"audit setting '{name}' is {value!r}, expected {expected}",
                            hint=f"set {name} to a {expected}") from None


def check(cfg: AuditConfig) -> None:
    """Value checks that need no model."""
    positive = ["samples", "eval_limit", "collateral_limit", "physical_checks", "recovery_seeds", "pool_size",
                "recovery_eval_limit", "defense_budget", "defense_seeds"]
    for name in positive:
        if getattr(cfg, name) < (0 if name == "physical_checks" else 1):
            raise MoeguardError(f"{name} is {getattr(cfg, name)}", hint=f"set {name} to at least 1")
    if cfg.random_seeds < 1:
        raise MoeguardError(f"random_seeds is {cfg.random_seeds}; the random band needs at least one ranking",
                            hint="set random_seeds to at least 1 (3 or more for a band)")
    if cfg.threads is not None and cfg.threads < 1:
        raise MoeguardError(f"threads is {cfg.threads}", hint="set threads to at least 1, or leave it out")
    if not 0 < cfg.target <= 100:
        raise MoeguardError(f"target is {cfg.target}", hint="a percentage in (0, 100]")
    if cfg.defense and cfg.hardened:
        raise MoeguardError("both defense and hardened are set",
                            hint="harden within the audit (--defense NAME) or compare a hardened checkpoint (--hardened PATH)")
    if "random" not in cfg.strategies:
        raise MoeguardError(f"strategies {cfg.strategies} lack 'random', the baseline every strategy is compared with",
                            hint="add random, e.g. --strategies random,orphan")
    if cfg.budgets != sorted(set(cfg.budgets)) or cfg.budgets[0] < 1:
        raise MoeguardError(f"budgets {cfg.budgets} are not increasing positive label counts", hint="e.g. 8,32,128")
