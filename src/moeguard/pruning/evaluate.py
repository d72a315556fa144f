"""Task scores of pruned variants of one model, by masking, with every result cached.

Different methods often choose the same experts (at high keep counts almost always), so
results are keyed by the kept set itself and each distinct (plan, task, limit) runs once.
"""

from __future__ import annotations

from typing import Any

from moeguard.models.adapter import MoEAdapter
from moeguard.models.hooks import mask_experts
from moeguard.tasks.evaluate import TaskResult, evaluate_task


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
