"""Score a causal LM on a task, through the plain Hugging Face API only.

Only ``model(input_ids=..., attention_mask=...).logits`` and ``model.generate`` are used, so
any ``*ForCausalLM`` works, including pruned or hooked MoE models. How a task is scored is
its kind's (``task.kind_spec.evaluate``, see ``moeguard.tasks.kinds``); this module runs it
and writes the result. Every task result also carries the kind's trivial baseline (unigram /
majority class / Lead-k) so a pruned model's score can be read against "knows nothing about
the input".
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moeguard.errors import MoeguardError
from moeguard.io import json_safe
from moeguard.models.families import text_config
from moeguard.tasks import tokens as T
from moeguard.tasks.base import Task
from moeguard.tasks.loaders import baseline_records, load_records
from moeguard.tasks.registry import get_task

SCHEMA_VERSION = 1
# Baselines are fit on at most this many train records: WikiText-103 or CNN/DailyMail train
# would otherwise dominate an audit's run time for a number that barely moves.
BASELINE_TRAIN_LIMIT = 20_000


@dataclasses.dataclass
class TaskResult:
    """One task's scores; ``to_dict`` is the per-task entry of the results JSON."""

    task: str
    kind: str
    metric: str
    score: float
    higher_is_better: bool
    metrics: dict[str, float]
    n_samples: int
    split: str
    n_tokens: int | None = None
    baseline: dict[str, Any] | None = None
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))


def fit_to_model(task: Task, model: Any) -> Task:
    """``task`` with its max_length cut to the positions the model was trained on: windows, prompts and
    generation past them (wikitext's 512 on a 256-position model) gave scores without meaning, with no
    error (rotary positions extrapolate silently). Said once per task and place."""
    positions = getattr(text_config(getattr(model, "config", None)), "max_position_embeddings", None)
    if not isinstance(positions, int) or positions < 2 or task.max_length <= positions:
        return task
    try:
        fitted = dataclasses.replace(task, max_length=positions)   # the kind checks the cut task again
    except MoeguardError as e:   # a summary's generated tokens leave no room in the model's context
        raise MoeguardError(f"task '{task.name}' is cut to the model's {positions} positions (max_position_embeddings, "
                            f"below its max_length {task.max_length}), and then {e.message}",
                            hint="lower the task's generation.max_new_tokens, or use a model with a longer "
                                 "context") from None
    import warnings

    warnings.warn(f"task '{task.name}' has max_length {task.max_length}, and the model has {positions} positions: "
                  f"its sequences are cut to {positions} tokens", stacklevel=3)
    return fitted


def evaluate_task(model: Any, tokenizer: Any, task: Task | str, *, limit: int | None = None,
                  batch_size: int = 16, reference: float | None = None, progress: Any = None,
                  baseline: bool = True, baseline_limit: int | None = BASELINE_TRAIN_LIMIT,
                  input_prefix: str = "", input_suffix: str = "") -> TaskResult:
    """Evaluate ``model`` on the first ``limit`` eval records of ``task``.

    ``input_prefix`` is prepended to every record's input, ``input_suffix`` appended
    (``route-attack`` measures what its hijack text does to the task).

    ``reference`` is a reference perplexity (language modeling only) that adds
    ``normalized_perplexity``. ``progress`` is an optional ``rich.progress.Progress``,
    advanced once per batch. The model's train/eval mode is restored afterwards.
    """
    task = fit_to_model(get_task(task), model)
    if batch_size < 1:
        raise MoeguardError(f"batch size is {batch_size}", hint="pass a batch size of at least 1")
    if reference is not None and not task.kind_spec.takes_reference:
        raise MoeguardError(f"a reference perplexity was given for {task.kind} task '{task.name}'",
                            hint="pass reference only for language modeling tasks")
    if reference is not None and not reference > 0:
        raise MoeguardError(f"reference perplexity is {reference}", hint="pass a positive perplexity")
    _check_metric(task, reference)
    if task.max_length < 2:
        raise MoeguardError(f"task '{task.name}' has max_length {task.max_length}",
                            hint="set max_length to at least 2 tokens")
    records = load_records(task, "eval", limit=limit)
    if input_prefix or input_suffix:
        records = [{**r, "input": input_prefix + r["input"] + input_suffix} for r in records]
    train = None
    if baseline and "train" in task.splits:
        train = baseline_records(task, baseline_limit)

    started = time.perf_counter()
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            metrics, n_tokens, base = task.kind_spec.evaluate(model, tokenizer, task, records, train, batch_size,
                                                              reference, _Ticker(progress, task.name))
    finally:
        model.train(was_training)
    primary = task.primary_metric
    baseline_doc = None
    if base is not None:
        baseline_doc = {**base, "score": base["metrics"].get(primary)}
    return TaskResult(task=task.name, kind=task.kind.value, metric=primary, score=metrics[primary],
                      higher_is_better=task.higher_is_better, metrics=metrics, n_samples=len(records),
                      split=str(task.splits["eval"]), n_tokens=n_tokens, baseline=baseline_doc,
                      elapsed_s=round(time.perf_counter() - started, 3))


def evaluate_suite(model: Any, tokenizer: Any, tasks: Iterable[Task | str], *, limit: int | None = None,
                   batch_size: int = 16, references: dict[str, float] | None = None, progress: Any = None,
                   model_name: str | None = None, baseline: bool = True, cache: Path | None = None) -> dict[str, Any]:
    """Evaluate every task and return the results document (schema: docs/tasks.md).

    ``references`` maps a language-modeling task name to its reference perplexity. ``cache``: a
    folder where each task's result is kept as it finishes and read back on a resumed run (the
    caller keys the folder by everything the results depend on: ``io.resumable_scratch``).
    """
    resolved = [get_task(t) for t in tasks]
    names = [t.name for t in resolved]
    if len({n.casefold() for n in names}) != len(names):   # a case-insensitive file system shares their kept files
        raise MoeguardError(f"task list {names} names a task twice (compared ignoring case: names are file names)",
                            hint="list every task once")
    references = dict(references or {})
    unknown = sorted(set(references) - set(names))
    if unknown:
        raise MoeguardError(f"reference perplexities given for tasks not evaluated: {unknown}",
                            hint=f"use names from {names}")
    results = {}
    for t in resolved:
        kept = cache / f"task-{t.name}.json" if cache is not None else None   # a task name is a plain name
        if kept is not None and kept.exists():
            from moeguard.io import read_kept_json

            got = read_kept_json(kept)   # None: cut short by a power loss, evaluated again
            if isinstance(got, dict):
                results[t.name] = got
                continue
        results[t.name] = evaluate_task(model, tokenizer, t, limit=limit, batch_size=batch_size,
                                        reference=references.get(t.name), progress=progress,
                                        baseline=baseline).to_dict()
        if kept is not None:
            from moeguard.io import write_json

            write_json(kept, results[t.name], overwrite=True, sync=True)
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model_name or _model_name(model),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "moeguard_version": _version(),
        "settings": {"limit": limit, "batch_size": batch_size, "baseline": baseline},
        "tasks": results,
    }


def loglikelihoods(model: Any, tokenizer: Any, requests: Sequence[tuple[str, str]], *, max_length: int,
                   batch_size: int = 16, ticker: Any = None) -> list[float]:
    """Summed log-probability of each ``continuation`` given its ``context``.

    The continuation's tokens are those it has after its context in one string (``T.continuation``,
    lm-evaluation-harness' convention, trailing context whitespace moving to the continuation); the
    context is tokenized alone. Over-long contexts lose tokens on the left.
    ``ticker`` (optional) gets ``start`` with the number of batches, then ``advance`` per batch.
    """
    bos = T.bos_ids(tokenizer)
    ctx_cache: dict[str, list[int]] = {}
    items: list[tuple[list[int], int]] = []
    for context, continuation in requests:
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped):] + continuation
        if context not in ctx_cache:
            ctx_cache[context] = bos + T.encode(tokenizer, context)
        ctx, cont = ctx_cache[context], T.continuation(tokenizer, context, continuation)
        if not cont:
            raise MoeguardError(f"continuation {continuation!r} tokenizes to nothing",
                                hint="use a non-empty label verbalizer such as ' positive'")
        if len(cont) > max_length - 1:
            raise MoeguardError(f"continuation {continuation!r} is {len(cont)} tokens, max_length is {max_length}",
                                hint="shorten the verbalizer or raise max_length")
        # Nothing to condition on: score from the pad/eos token, as the harness does.
        ctx = ctx or [T.pad_id(tokenizer)]
        full = (ctx + cont)[-(max_length + 1):]
        items.append((full, len(cont)))
    start = T.decoder_start(model)
    if start is not None:
        return _seq2seq_loglikelihoods(model, tokenizer, items, start, batch_size=batch_size, ticker=ticker)

    # Requests whose model input is the same token sequence share one row: a classification task's
    # single-token verbalizers all follow the same context, so its C labels cost one forward, not C
    # (lm-evaluation-harness groups such requests the same way). The model is causal: the row's
    # logits are the ones each request would have had on its own.
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, (full, _) in enumerate(items):
        rows.setdefault(tuple(full[:-1]), []).append(i)
    inputs = list(rows)
    # Longest first: batches hold similar lengths (less padding) and OOM shows up at once.
    order = sorted(range(len(inputs)), key=lambda r: -len(inputs[r]))
    scores = [0.0] * len(items)
    device = T.model_device(model)
    pad = T.pad_id(tokenizer)
    if ticker is not None:
        ticker.start(math.ceil(len(order) / batch_size))
    for begin in range(0, len(order), batch_size):
        batch = [inputs[r] for r in order[begin:begin + batch_size]]
        ids, mask = T.pad_batch([list(seq) for seq in batch], pad, left=False, device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # [B, S, V]
        for row, seq in enumerate(batch):
            end = len(seq)
            for i in rows[seq]:
                full, n_cont = items[i]
                logp = F.log_softmax(logits[row, end - n_cont:end].float(), dim=-1)
                target = torch.tensor(full[-n_cont:], device=logp.device)
                scores[i] = logp.gather(-1, target[:, None]).sum().item()
        if ticker is not None:
            ticker.advance()
    return scores


def _seq2seq_loglikelihoods(model: Any, tokenizer: Any, items: list[tuple[list[int], int]], start: int, *,
                            batch_size: int, ticker: Any) -> list[float]:
    """An encoder-decoder scores each continuation through its seq2seq head: the encoder reads the
    context, the decoder the continuation after its start token (each request is its own row: the
    decoder inputs differ by continuation)."""
    from moeguard.tasks.batches import Example, collate
    from moeguard.tasks.kinds.base import IGNORE

    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    scores = [0.0] * len(items)
    device, pad = T.model_device(model), T.pad_id(tokenizer)
    if ticker is not None:
        ticker.start(math.ceil(len(order) / batch_size))
    for begin in range(0, len(order), batch_size):
        idx = order[begin:begin + batch_size]
        rows = [Example(items[i][0], [IGNORE] * (len(items[i][0]) - items[i][1]) + items[i][0][-items[i][1]:])
                for i in idx]
        b = collate(rows, pad, decoder_start=start).to(device)
        logits = model(**b.inputs()).logits   # [B, 1 + n_cont, V]: position j predicts continuation token j
        for row, i in enumerate(idx):
            full, n_cont = items[i]
            logp = F.log_softmax(logits[row, :n_cont].float(), dim=-1)
            target = torch.tensor(full[-n_cont:], device=logp.device)
            scores[i] = logp.gather(-1, target[:, None]).sum().item()
        if ticker is not None:
            ticker.advance()
    return scores


# --------------------------------------------------------------------------- helpers

class _Ticker:
    """What a kind's ``evaluate`` reports progress to: ``start(total)`` once, then ``advance()``."""

    def __init__(self, progress: Any, name: str):
        self.progress, self.name, self.id = progress, name, None

    def start(self, total: int) -> None:
        if self.progress is not None:
            self.id = self.progress.add_task(self.name, total=total)

    def advance(self) -> None:
        if self.progress is not None and self.id is not None:
            self.progress.advance(self.id)


def _check_metric(task: Task, reference: float | None) -> None:
    if task.primary_metric not in (allowed := task.kind_spec.metrics):
        raise MoeguardError(f"task '{task.name}' asks for metric '{task.primary_metric}'",
                            hint=f"a {task.kind} task reports {', '.join(allowed)}")
    if task.primary_metric == "normalized_perplexity" and reference is None:
        raise MoeguardError(f"task '{task.name}' reports normalized_perplexity but no reference perplexity was given",
                            hint="pass the reference model's perplexity, or use metric: perplexity")


def _model_name(model) -> str:
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moeguard")
    except PackageNotFoundError:
        return "unknown"
