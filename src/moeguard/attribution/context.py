"""What every attribution method receives: the model, its MoE view and the task's batches."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from moeguard.models.adapter import MoEAdapter
from moeguard.models.hooks import RoutingCapture
from moeguard.tasks.batches import Batch
from moeguard.tasks.tokens import model_device


@dataclass(kw_only=True)
class Context:
    model: Any
    tokenizer: Any
    adapter: MoEAdapter
    task: Any                      # moeguard.tasks.base.Task
    batches: list[Batch]
    reference: list[Batch] = field(default_factory=list)   # contrastive methods' reference corpus
    seed: int = 0
    progress: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)    # shared between methods of one run
    # a scratch folder keyed by everything the scores depend on (the caller's: ``moeguard attribute``'s
    # ``.OUT.partial``, a study job's own): each batch's finished term is kept there, and a run resumed
    # after a kill reads it back instead of computing it again (None: nothing is kept)
    keep: Path | None = None

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def n_targets(self) -> int:
        return sum(b.n_targets for b in self.batches)

    def routing_stats(self, *, norms: bool = False, reference: bool = False):
        """Routing statistics over the task's (or the reference's) batches, computed once per run."""
        key = f"stats:{'ref' if reference else 'task'}:{norms}"
        if key not in self.cache:
            batches = self.reference if reference else self.batches
            # the head's [B, T, V] logits are never read here (1.2 GB per batch at Qwen3's vocabulary):
            # a causal LM computes the last position's only
            import inspect

            light = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
                type(self.model).forward).parameters else {}
            with torch.no_grad(), RoutingCapture(self.model, norms=norms, adapter=self.adapter) as cap:
                for b in self.track(batches, "routing capture"):
                    b = b.to(self.device)
                    self.model(**b.inputs(), use_cache=False, **light)
            # not shared with the plain statistics: the norms capture runs each expert in a loop of its
            # own, whose sums differ from the model's own experts' in the last bits (bf16, or top-k >= 3),
            # and a method whose scores are kept (run.score) skips its capture on a resumed run: frequency
            # after reap read reap's statistics in one run and its own in the resumed one
            self.cache[key] = cap.stats
        return self.cache[key]

    def batch_sum(self, label: str, compute: Callable[[Any], torch.Tensor], *, shape: tuple[int, ...],
                  key: Any = None) -> torch.Tensor:
        """The sum over the task's batches of ``compute(batch)`` (float64, ``shape``), added in batch
        order. With :attr:`keep`, each batch's term is kept there as it finishes (``label``, ``key``
        and the batch's own tokens name it) and read back on a resumed run: the same float64 values
        added in the same order, so a resumed sum equals an uninterrupted one bit for bit."""
        total = torch.zeros(shape, dtype=torch.float64)
        for i, batch in enumerate(self.track(self.batches, label)):
            total += self._kept_term(label, i, batch, key, compute)
        return total

    def _kept_term(self, label: str, i: int, batch, key: Any, compute) -> torch.Tensor:
        if self.keep is None:
            return compute(batch)
        from moeguard import kept

        term = kept.arrays(self.keep, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}-{i}",
                           lambda: {"term": compute(batch).double().cpu().numpy()},
                           key=[label, key, self.options, _batch_digest(batch)])["term"]
        return torch.from_numpy(term)

    def tokens_digest(self) -> str:
        """A digest of every calibration and reference batch's tokens (what a kept score was made on)."""
        if "tokens_digest" not in self.cache:
            h = hashlib.sha256()
            for batch in [*self.batches, None, *self.reference]:
                h.update(b"|" if batch is None else _batch_digest(batch).encode())
            self.cache["tokens_digest"] = h.hexdigest()
        return self.cache["tokens_digest"]

    def track(self, items, description: str):
        """Iterate with a progress bar when a rich Progress is attached."""
        return track(self.progress, items, description)


def _batch_digest(batch) -> str:
    tokens = hashlib.sha256()
    for t in (batch.input_ids, batch.attention_mask, batch.labels, getattr(batch, "decoder_input_ids", None)):
        if t is not None:   # an encoder-decoder's decoder rows too
            tokens.update(t.detach().cpu().contiguous().numpy().tobytes())
    return tokens.hexdigest()


def track(progress, items, description: str, *, keep: bool = False):
    """Iterate ``items`` with a bar on ``progress`` (a rich Progress, or None for none), each advanced once
    its turn of the loop is done (a ``continue`` included); ``keep``: the bar stays when done."""
    items = list(items)
    if progress is None:
        yield from items
        return
    tid = progress.add_task(description, total=len(items))
    try:
        for item in items:
            yield item
            progress.advance(tid)
    finally:
        if not keep:
            progress.remove_task(tid)
