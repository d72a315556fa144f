"""Active-learning strategies: which unlabeled samples the attacker pays to label next.

A strategy is a function ``select(query) -> indices`` registered (in :data:`STRATEGIES`) with
the task kinds it applies to, or for every kind. It sees the current (re-aligned so far)
model, the pool's *inputs* (never a label) and the indices already labeled; model-side
quantities are computed once per round and shared through :class:`Query`'s cached
properties, so a hybrid reuses what its parts computed. What differs per task kind (the
default uncertainty, the entropy) is the kind's (``task.kind_spec``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

import torch

from moeguard.errors import MoeguardError
from moeguard.realign import features as F
from moeguard.registry import Registry
from moeguard.tasks.base import Task, TaskKind
from moeguard.tasks.kinds import KINDS, get_kind


def _finite(values: torch.Tensor, what: str) -> torch.Tensor:
    """``values``, refused where a NaN or inf is in them: a model whose outputs are not finite (a pruned
    or re-aligned copy that diverged) ranked candidates in an arbitrary order, or failed in k-means's
    weighted draw with a traceback, on every rerun."""
    if not torch.isfinite(values).all():
        raise MoeguardError(f"the model's {what} on the pool's inputs are not finite (NaN or inf): the strategy "
                            "cannot rank candidates by them",
                            hint="check the model (`moeguard eval --model ...`); --strategy random reads no outputs")
    return values


@dataclass(kw_only=True)
class Query:
    model: Any
    tokenizer: Any
    task: Task
    pool: Sequence[dict[str, Any]]          # unlabeled records (inputs only)
    candidates: list[int]                   # pool indices not yet labeled
    labeled: list[int]
    k: int
    rng: random.Random
    batch_size: int = 32
    # routing-aware strategies: a callable giving each pool sample's share of original-model
    # routing that went to experts the pruning removed ([n] tensor), computed once per run
    orphan_share: Callable[[], torch.Tensor] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def _records(self, idx: Sequence[int]) -> list[dict[str, Any]]:
        return [self.pool[i] for i in idx]

    @cached_property
    def class_probs(self) -> torch.Tensor:
        """[len(candidates), C]"""
        return _finite(F.class_probs(self.model, self.tokenizer, self.task, self._records(self.candidates),
                                     batch_size=self.batch_size), "label probabilities")

    @cached_property
    def sequence_uncertainty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean NLL, mean entropy), each [len(candidates)]"""
        nll, entropy = F.sequence_uncertainty(self.model, self.tokenizer, self.task, self._records(self.candidates),
                                              batch_size=max(1, self.batch_size // 2))
        return _finite(nll, "token losses"), _finite(entropy, "token entropies")

    @cached_property
    def pool_embeddings(self) -> torch.Tensor:
        """[len(pool), H] for candidates and labeled samples (others are zeros, never read)."""
        idx = sorted(set(self.candidates) | set(self.labeled))
        emb = _finite(F.embeddings(self.model, self.tokenizer, self.task, self._records(idx), batch_size=self.batch_size),
                      "hidden states")
        out = torch.zeros(len(self.pool), emb.shape[1])
        out[idx] = emb
        return out

    def uncertainty(self) -> torch.Tensor:
        """The kind's default uncertainty per candidate, higher = less sure: label entropy for
        classification, mean token NLL otherwise (``task.kind_spec.uncertainty``)."""
        return self.task.kind_spec.uncertainty(self)

    def entropy(self) -> torch.Tensor:
        """Predictive entropy per candidate: over the labels for classification, mean next-token
        entropy otherwise (``task.kind_spec.entropy``)."""
        return self.task.kind_spec.entropy(self)

    def top(self, values: torch.Tensor) -> list[int]:
        """The k candidates with the highest values; ties broken by a seeded shuffle."""
        jitter = torch.tensor([self.rng.random() for _ in self.candidates], dtype=torch.float64)
        order = sorted(range(len(self.candidates)), key=lambda i: (-float(values[i]), float(jitter[i])))
        return [self.candidates[i] for i in order[:self.k]]


@dataclass(frozen=True)
class Strategy:
    name: str
    select: Callable[[Query], list[int]]
    description: str
    only: frozenset[str] | None = None  # the kind names it is limited to; None: every kind, also later ones
    needs_original: bool = False

    @property
    def kinds(self) -> frozenset[TaskKind]:
        """The registered task kinds this strategy applies to."""
        names = KINDS.names() if self.only is None else [n for n in self.only if n in KINDS]
        return frozenset(TaskKind(n) for n in names)

    def applies_to(self, kind: str) -> bool:
        return self.only is None or str(kind) in self.only


STRATEGIES: Registry[Strategy] = Registry("active-learning strategy", loader="moeguard.realign.strategies.registry",
                                          hint="see `moeguard strategies`")


def register_strategy(name: str, *, description: str, kinds=None, needs_original: bool = False,
                      overwrite: bool = False):
    """Decorator registering ``select(query)`` as strategy ``name``; ``kinds``: the task kind names
    it is limited to (``None``: every kind)."""
    only = None if kinds is None else frozenset(get_kind(k).name for k in kinds)

    def wrap(fn: Callable[[Query], list[int]]):
        STRATEGIES.add(name, Strategy(name, fn, description, only, needs_original), overwrite=overwrite)
        return fn
    return wrap


def get_strategy(name: str, task: Task | None = None) -> Strategy:
    """The strategy ``name``; with ``task``, also check that it applies to the task's kind."""
    s = STRATEGIES.get(name)
    if task is not None and not s.applies_to(task.kind):
        fits = [x.name for x in STRATEGIES.items() if x.applies_to(task.kind)]
        raise MoeguardError(f"strategy '{name}' applies to {', '.join(sorted(k.value for k in s.kinds))} tasks; "
                            f"'{task.name}' is {task.kind.value}", hint=f"use one of {', '.join(fits)}")
    return s


def list_strategies() -> list[Strategy]:
    """Every registered strategy, sorted by name."""
    return STRATEGIES.items()
