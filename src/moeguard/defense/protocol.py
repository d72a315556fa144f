"""The selective fine-tuning protocol file: which parameters of a released model may be adapted, and how.

The owner's ``moeguard harden --method selective`` writes ``moeguard_protocol.json`` next to
the weights; the user's ``moeguard realign --protocol FILE`` refuses any other mode and trains
only the authorized parameters (LoRA adapters only on authorized modules). Enforcement is
moeguard's, i.e. cooperative: an attacker with the weights can ignore the file, which is why
the selective defense also *trains* the model so that unauthorized full fine-tuning of a
pruned copy recovers poorly, and ``defend-eval`` measures both paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeguard.errors import MoeguardError, suggest
from moeguard.io import read_json

SCHEMA = "moeguard.protocol/1"
FILENAME = "moeguard_protocol.json"


@dataclass(frozen=True, kw_only=True)
class Protocol:
    modes: tuple[str, ...]        # fine-tuning modes allowed (see `moeguard realign --mode`)
    patterns: tuple[str, ...]     # fnmatch globs over parameter names that may change
    model: str | None = None      # what it was issued for (informational)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "modes": list(self.modes), "authorized_parameters": list(self.patterns),
                "model": self.model, "note": self.note}

    def save(self, path: str | Path) -> Path:
        from moeguard.io import write_json

        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, *, origin: str = "<protocol>") -> "Protocol":
        from moeguard.realign.modes import MODES

        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            got = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise MoeguardError(f"{origin} is not a moeguard protocol (schema {got!r}, expected {SCHEMA!r})",
                                hint="pass the moeguard_protocol.json that `moeguard harden --method selective` wrote")
        modes, patterns = data.get("modes"), data.get("authorized_parameters")
        if not isinstance(modes, list) or not modes or not all(isinstance(m, str) for m in modes):
            raise MoeguardError(f"{origin}: 'modes' is {modes!r}", hint="give a non-empty list, e.g. [\"lora\"]")
        for m in modes:
            if m not in MODES:
                raise MoeguardError(f"{origin}: unknown mode '{m}'", hint=suggest(m, list(MODES)))
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise MoeguardError(f"{origin}: 'authorized_parameters' is {patterns!r}",
                                hint="give a non-empty list of parameter-name globs, e.g. [\"*.self_attn.*\"]")
        return cls(modes=tuple(modes), patterns=tuple(patterns), model=data.get("model"), note=data.get("note", ""))

    @classmethod
    def load(cls, path: str | Path) -> "Protocol":
        p = Path(path)
        if p.is_dir():
            p = p / FILENAME
        data = read_json(p, what="protocol file", hint="pass the moeguard_protocol.json that harden wrote")
        return cls.from_dict(data, origin=str(p))

    def check_mode(self, mode: str) -> None:
        if mode not in self.modes:
            raise MoeguardError(f"the protocol does not authorize --mode {mode}",
                                hint=f"it allows {', '.join(self.modes)}; pass --mode {self.modes[0]}")
