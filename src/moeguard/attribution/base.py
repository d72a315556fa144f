"""Attribution scores (one number per (layer, expert) of a task) and the method registry.

A method is a function ``score(ctx) -> MethodOutput`` registered under a name. Higher score =
more important to the task. The scores file is the only thing pruning reads, so scoring and
planning stay separate (and a plan can be re-made from saved scores without the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from moeguard.errors import MoeguardError
from moeguard.io import read_json
from moeguard.registry import Registry

SCHEMA = "moeguard.attribution/1"


@dataclass(kw_only=True)
class Scores:
    method: str
    task: str
    model: str
    samples: int
    tokens: int                      # target tokens (loss-based methods) or routed tokens seen
    layers: list[int]                # decoder-layer index of each row
    num_experts: int
    top_k: int
    scores: torch.Tensor             # [L, E] float64, higher = more important
    # best kept subsets found by a search, by keep count then layer (reconstruction); the
    # planner uses them for a uniform keep when present
    subsets: dict[int, dict[int, list[int]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    description: str = ""
    # scores in the same unit in every layer (loss increase): a budget can compare them as they
    # are; otherwise each layer's scores are turned into shares of the layer first
    comparable_across_layers: bool = False

    def ranking(self, row: int) -> list[int]:
        """Experts of layer row ``row``, most important first (ties: lower index first)."""
        s = self.scores[row].tolist()
        return sorted(range(len(s)), key=lambda e: (-s[e], e))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "method": self.method, "description": self.description, "task": self.task,
            "model": self.model, "samples": self.samples, "tokens": self.tokens, "num_experts": self.num_experts,
            "top_k": self.top_k, "layers": self.layers,
            "scores": {str(l): [_num(v) for v in row] for l, row in zip(self.layers, self.scores.tolist())},
            "subsets": {str(k): {str(l): v for l, v in m.items()} for k, m in sorted(self.subsets.items())},
            "comparable_across_layers": self.comparable_across_layers,
            "settings": self.settings, "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "<scores>") -> "Scores":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise MoeguardError(f"{origin} is not a moeguard scores file (schema {data.get('schema') if isinstance(data, dict) else None!r})",
                                hint="make one with: moeguard attribute --model M --task T --method NAME --out scores.json")
        try:
            layers = [int(k) for k in data["scores"]]
            rows = [[float("nan") if v is None else float(v) for v in data["scores"][str(k)]] for k in layers]
            E = int(data["num_experts"])
            subsets = {int(k): {int(l): [_whole(e) for e in v] for l, v in m.items()}
                       for k, m in (data.get("subsets") or {}).items()}
            fields = dict(method=str(data["method"]), task=str(data["task"]), model=str(data.get("model", "")),
                          samples=int(data["samples"]), tokens=int(data.get("tokens", 0)), top_k=int(data["top_k"]),
                          settings=dict(data.get("settings") or {}), seconds=float(data.get("seconds", 0.0)),
                          description=str(data.get("description", "")))
        # any wrong type or value inside (a list for subsets, 'many' samples, a 400-digit score) is one line
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise MoeguardError(f"{origin} is malformed ({type(exc).__name__}: {str(exc)[:80]})",
                                hint="re-run moeguard attribute") from None
        if any(len(r) != E for r in rows):
            raise MoeguardError(f"{origin}: a layer's score list does not have {E} entries", hint="re-run moeguard attribute")
        # a subset is a best-k choice per layer: of k distinct experts of this model, for a layer it scores
        for k, m in subsets.items():
            if any(l not in layers or len(set(v)) != k or len(v) != k or not all(0 <= e < E for e in v) for l, v in m.items()):
                raise MoeguardError(f"{origin}: its {k}-expert subsets are not {k} distinct experts of the scored layers",
                                    hint="re-run moeguard attribute")
        return cls(layers=layers, num_experts=E, scores=torch.tensor(rows, dtype=torch.float64), subsets=subsets,
                   comparable_across_layers=bool(data.get("comparable_across_layers", False)), **fields)

    @classmethod
    def load(cls, path: str | Path) -> "Scores":
        path = Path(path)
        data = read_json(path, what="scores file",
                         hint="make one with: moeguard attribute --model M --task T --method NAME --out scores.json")
        return cls.from_dict(data, origin=str(path))


def _whole(e: Any) -> int:
    if type(e) is not int:
        raise ValueError(f"expert {str(e)[:20]} is not a whole number")
    return e


def _num(v: float):
    return None if not math.isfinite(v) else float(f"{v:.12g}")  # tiny loss deltas keep their digits


@dataclass
class MethodOutput:
    scores: torch.Tensor                          # [L, E]
    tokens: int
    subsets: dict[int, dict[int, list[int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., MethodOutput]
    description: str
    needs_reference: bool = False
    comparable_across_layers: bool = False
    # why the method cannot score an encoder-decoder (Switch), or None when it can
    causal_only: str | None = None
    # it removes one expert at a time (a layer must route with one fewer: attribution.run.check_removable)
    removes_one: bool = False


# importing ``moeguard.attribution.registry`` imports every method file, which registers itself
# "random": the sweep's random-rankings baseline sits beside the methods under that name (sweep.json's
# faithfulness, the audit's random_auc, the CSV's rows): a method of that name overwrote it, and the
# sweep's table then failed on the missing baseline
METHODS: Registry[Method] = Registry("attribution method", loader="moeguard.attribution.registry",
                                     reserved={"random": "the sweep's random-rankings baseline is reported under it "
                                                         "beside the methods"})


def register_method(name: str, description: str, *, needs_reference: bool = False,
                    comparable_across_layers: bool = False, causal_only: str | None = None, removes_one: bool = False,
                    overwrite: bool = False):
    def wrap(fn):
        METHODS.add(name, Method(name, fn, description, needs_reference, comparable_across_layers, causal_only,
                                 removes_one), overwrite=overwrite)
        return fn
    return wrap


def get_method(name: str) -> Method:
    return METHODS.get(name)


def runs_on(method: Method, family) -> bool:
    """Whether ``method`` can score models of ``family`` (an encoder-decoder: not the causal-only ones)."""
    return not (family.encoder_decoder and method.causal_only)


def check_method_runs(method: Method, family) -> None:
    """Refuse, before any weights load, a method that cannot score this family's models."""
    if not runs_on(method, family):
        able = ", ".join(m.name for m in list_methods() if runs_on(m, family))
        raise MoeguardError(f"method '{method.name}' does not score encoder-decoders ({family.name}): it {method.causal_only}",
                            hint=f"use one of {able}")


def list_methods() -> list[Method]:
    return METHODS.items()
