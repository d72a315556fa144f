"""Task scores of pruned variants of one model, by masking, with every result cached.

Different methods often choose the same experts (at high keep counts almost always), so
results are keyed by the kept set itself and each distinct (plan, task, limit) runs once.
"""

from __future__ import annotations

from typing import Any

from moeguard.models.adapter import MoEAdapter
from moeguard.models.hooks import mask_experts
from moeguard.tasks.evaluate import TaskResult, evaluate_task


def retention(score: float | None, full: float | None, *, higher_is_better: bool) -> float | None:
    """Pruned score relative to the full model's, in percent, 100 = unchanged.

    Higher-is-better metrics: 100 * pruned / full. Perplexity: 100 * full / pruned, so that
    retention falls as perplexity rises (the study's normalized perplexity read as retention)."""
    if score is None or full is None:
        return None
    if higher_is_better:
        return 100.0 * score / full if full else None
    return 100.0 * full / score if score else None


def above_baseline(score: float | None, full: float | None, base: float | None, *, higher_is_better: bool) -> float | None:
    """Share of the full model's margin over the trivial baseline that survives, in percent
    (0 = no better than "knows nothing about the input"; can go negative)."""
    if score is None or full is None or base is None or full == base:
        return None
    if higher_is_better:
        return 100.0 * (score - base) / (full - base)
    import math
    lf, lb, ls = math.log(full), math.log(base), math.log(score)  # perplexities compare in log space
    return 100.0 * (lb - ls) / (lb - lf)


class MaskedEvaluator:
    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, adapter: MoEAdapter | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.adapter = adapter or MoEAdapter(model)
        self._cache: dict[tuple, TaskResult] = {}
        self.runs = 0
        self.hits = 0

    @staticmethod
    def key(keep: dict[int, list[int]] | None) -> tuple:
        return () if not keep else tuple(sorted((int(l), tuple(sorted(v))) for l, v in keep.items()))

    def __call__(self, task, keep: dict[int, list[int]] | None, *, limit: int, baseline: bool = False) -> TaskResult:
        name = task if isinstance(task, str) else task.name
        k = (self.key(keep), name, limit, baseline)
        if k in self._cache:
            self.hits += 1
            return self._cache[k]
        self.runs += 1
        if keep:
            with mask_experts(self.model, keep, adapter=self.adapter):
                result = evaluate_task(self.model, self.tokenizer, task, limit=limit, batch_size=self.batch_size,
                                       baseline=baseline)
        else:
            result = evaluate_task(self.model, self.tokenizer, task, limit=limit, batch_size=self.batch_size,
                                   baseline=baseline)
        self._cache[k] = result
        return result
