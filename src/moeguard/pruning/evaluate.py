"""Task scores of pruned variants of one model, by masking, with every result cached.

Different methods often choose the same experts (at high keep counts almost always), so
results are keyed by the kept set itself and each distinct (plan, task, limit) runs once.
With a ``keep`` folder (a study job's scratch), each result is also kept on disk as it finishes,
and a job resumed after a kill reads it back instead of evaluating again.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from moeguard.models.adapter import MoEAdapter
from moeguard.models.hooks import mask_experts
from moeguard.tasks.evaluate import TaskResult, evaluate_task


class MaskedEvaluator:
    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, adapter: MoEAdapter | None = None,
                 keep: Path | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.adapter = adapter or MoEAdapter(model)
        # keyed by the caller with everything else the scores depend on (a job's scratch: its key and scope)
        self.keep = keep
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
        self.runs += 1   # one read back from an interrupted run's folder counts as run: it was, once
        kept = self._kept(k)
        result = kept.read() if kept is not None else None
        if result is None:
            with mask_experts(self.model, keep, adapter=self.adapter) if keep else contextlib.nullcontext():
                result = evaluate_task(self.model, self.tokenizer, task, limit=limit, batch_size=self.batch_size,
                                       baseline=baseline)
            if kept is not None:
                kept.write(result)
        self._cache[k] = result
        return result

    def _kept(self, k: tuple) -> "_Kept | None":
        return _Kept(self.keep, [k, self.batch_size]) if self.keep is not None else None


class _Kept:
    """One evaluation's result kept on disk (``kept.KeptJSON``, named by its key). Only results that
    JSON holds exactly are kept (a NaN score is written as null, which the caller would read as
    another value): those are evaluated again."""

    def __init__(self, folder: Path, key: Any):
        from moeguard.kept import document

        self.doc = document(folder, "eval", key)

    def read(self) -> TaskResult | None:
        value = self.doc.read()
        try:
            return TaskResult(**value) if isinstance(value, dict) else None
        except TypeError:   # a result of another moeguard's fields: evaluated again
            return None

    def write(self, result: TaskResult) -> None:
        self.doc.write(dataclasses.asdict(result), exact=True)
