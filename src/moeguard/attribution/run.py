"""Score a task's experts with one registered method (the ``moeguard attribute`` job)."""

from __future__ import annotations

import json
import re
import time
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from moeguard.attribution.base import Scores, check_method_runs, get_method
from moeguard.attribution.context import Context
from moeguard.errors import MoeguardError, own_warning
from moeguard.models.adapter import MoEAdapter
from moeguard.tasks.batches import calibration_batches
from moeguard.tasks.registry import embedded_tasks, get_task
from moeguard.tasks.tokens import decoder_start


def default_reference(task_name: str) -> list[str]:
    """The embedded suite minus the task: general text the model also serves."""
    return [t.name for t in embedded_tasks() if t.name != task_name]


def make_context(model, tokenizer, task, *, samples: int = 64, batch_size: int = 8, seed: int = 0,
                 reference: Sequence[Any] | None = None, progress: Any = None,
                 options: dict[str, Any] | None = None, keep: Any = None) -> Context:
    """``keep``: a scratch folder keyed by everything the scores depend on (:attr:`Context.keep`)."""
    from moeguard.tasks.evaluate import fit_to_model

    # sequences cut to the model's positions, as evaluation cuts them (wikitext's 512 on a 256-position
    # model: attributed past the positions it was trained on, scored within them)
    task = fit_to_model(get_task(task), model)
    start = decoder_start(model)   # an encoder-decoder: its batches split into encoder and decoder rows
    batches = calibration_batches(tokenizer, task, samples=samples, batch_size=batch_size, seed=seed,
                                  decoder_start=start)
    ref_batches = []
    # Task objects (resolved at the edge) or names
    names = list(reference) if reference is not None else default_reference(task.name)
    if any(getattr(n, "name", n) == task.name for n in names):
        # the same seed and sample count draw the same batches: p = q, every contrastive score 0
        raise MoeguardError(f"the reference corpus includes the task '{task.name}' itself",
                            hint="name other tasks as the reference (the default is the rest of the embedded suite)")
    per = max(1, samples // max(1, len(names))) if names else 0
    for name in names:
        ref_batches += calibration_batches(tokenizer, fit_to_model(get_task(name), model), samples=per,
                                           batch_size=batch_size, seed=seed, decoder_start=start)
    return Context(model=model, tokenizer=tokenizer, adapter=MoEAdapter(model), task=task, batches=batches,
                   reference=ref_batches, seed=seed, progress=progress, options=dict(options or {}), keep=keep)


def check_removable(method: str, experts: int, min_experts: int) -> None:
    """Methods that remove one expert at a time need a layer of ``experts`` to route with one fewer:
    removing one would leave fewer than the router can route (k=0 on one expert, NaN weights under
    PhiMoE's sparsemixer at two), a state no pruning can reach, scored as if it were one."""
    from moeguard.attribution.base import METHODS

    least = max(1, min_experts)
    if get_method(method).removes_one and experts - 1 < least:
        others = [m.name for m in METHODS.items() if not m.removes_one]
        raise MoeguardError(f"method '{method}' removes one expert at a time, and this model's layers have {experts}: "
                            f"one fewer is below the {least} its router needs", hint=f"use {', '.join(others)} on it")


def score(ctx: Context, method: str) -> Scores:
    """Run ``method`` on the context's task; the model is left exactly as it was."""
    m = get_method(method)
    check_method_runs(m, ctx.adapter.family)
    if m.needs_reference and not ctx.reference:
        raise MoeguardError(f"method '{method}' needs a reference corpus and none was given",
                            hint="pass --reference with one or more task names")
    counts = {l.num_experts for l in ctx.adapter.layers}
    if len(counts) > 1:
        raise MoeguardError(f"the model's MoE layers have different expert counts {sorted(counts)} (a budget-pruned "
                            "checkpoint); attribution scores one count per layer", hint="attribute the unpruned model")
    check_removable(method, next(iter(counts)), ctx.adapter.family.min_experts)
    a = ctx.adapter

    def run() -> dict[str, Any]:
        torch.manual_seed(ctx.seed)
        started = time.perf_counter()
        was_training = ctx.model.training
        ctx.model.eval()  # router jitter, dropout and sparsemixer's training branch would make scores random
        try:
            with warnings.catch_warnings(record=True) as said:   # kept with the scores, said on every run
                out = m.fn(ctx)
        finally:
            ctx.model.train(was_training)
        if tuple(out.scores.shape) != (len(a.layers), a.num_experts):
            raise RuntimeError(f"method {method} returned scores of shape {tuple(out.scores.shape)}")
        for w in said:   # another library's, as it gave it (not kept: a resumed run need not repeat it)
            if not own_warning(w.category, w.filename):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        return {"scores": out.scores.detach().double().cpu().numpy(), "tokens": np.int64(out.tokens),
                "subsets": np.array(json.dumps({str(k): {str(l): v for l, v in per.items()}
                                                for k, per in out.subsets.items()})),
                "seconds": np.float64(time.perf_counter() - started),
                "said": np.array(json.dumps([str(w.message) for w in said if own_warning(w.category, w.filename)]))}

    # with a keep folder, a finished method's scores are kept whole (the methods that keep each batch's
    # term do so too): a job or command killed in a later method does not score this one again. score
    # seeds torch before each method, nothing after a method draws from the global generators, and no
    # method reads statistics another one captured (Context.routing_stats), so a skipped one changes
    # nothing downstream
    if ctx.keep is None:
        done = run()
    else:
        from moeguard import kept

        done = kept.arrays(ctx.keep, f"scores-{re.sub(r'[^A-Za-z0-9_.-]', '_', method)}", run,
                           key=[method, ctx.options, ctx.tokens_digest()])
    subsets = {int(k): {int(l): [int(e) for e in v] for l, v in per.items()}
               for k, per in json.loads(str(done["subsets"])).items()}
    for message in json.loads(str(done["said"])):   # moeguard's own (reconstruction's token cut), kept or not
        warnings.warn(message, stacklevel=2)
    settings = {"samples": sum(b.input_ids.shape[0] for b in ctx.batches), "seed": ctx.seed,
                "split": "train" if "train" in ctx.task.splits else "eval", **ctx.options}
    if m.needs_reference:
        settings["reference_samples"] = sum(b.input_ids.shape[0] for b in ctx.reference)
    return Scores(method=method, description=m.description, task=ctx.task.name,
                  model=getattr(ctx.model.config, "_name_or_path", "") or type(ctx.model).__name__,
                  samples=settings["samples"], tokens=int(done["tokens"]), layers=[l.index for l in a.layers],
                  num_experts=a.num_experts, top_k=a.top_k, scores=torch.from_numpy(done["scores"]),
                  subsets=subsets, settings=settings, comparable_across_layers=m.comparable_across_layers,
                  seconds=float(done["seconds"]))
