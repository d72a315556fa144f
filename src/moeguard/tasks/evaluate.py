"""Score a causal LM on a task, through the plain Hugging Face API only.

Only ``model(input_ids=..., attention_mask=...).logits`` and ``model.generate`` are used, so
any ``*ForCausalLM`` works, including pruned or hooked MoE models. Every task result also
carries a trivial baseline (unigram / majority class / Lead-k) so a pruned model's score can
be read against "knows nothing about the input".
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from moeguard.errors import MoeguardError
from moeguard.tasks import metrics as M
from moeguard.tasks.base import Task, TaskKind
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task

SCHEMA_VERSION = 1
# Baselines are fit on at most this many train records: WikiText-103 or CNN/DailyMail train
# would otherwise dominate an audit's run time for a number that barely moves.
BASELINE_TRAIN_LIMIT = 20_000

KIND_METRICS: dict[TaskKind, tuple[str, ...]] = {
    TaskKind.LANGUAGE_MODELING: ("loss", "perplexity", "normalized_perplexity"),
    TaskKind.CLASSIFICATION: ("accuracy", "macro_f1"),
    TaskKind.SUMMARIZATION: M.ROUGE_TYPES,
}


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
        return _json_safe(dataclasses.asdict(self))


def evaluate_task(model: Any, tokenizer: Any, task: Task | str, *, limit: int | None = None,
                  batch_size: int = 16, reference: float | None = None, progress: Any = None,
                  baseline: bool = True, baseline_limit: int | None = BASELINE_TRAIN_LIMIT) -> TaskResult:
    """Evaluate ``model`` on the first ``limit`` eval records of ``task``.

    ``reference`` is a reference perplexity (language modeling only) that adds
    ``normalized_perplexity``. ``progress`` is an optional ``rich.progress.Progress``,
    advanced once per batch. The model's train/eval mode is restored afterwards.
    """
    task = get_task(task)
    if batch_size < 1:
        raise MoeguardError(f"batch size is {batch_size}", hint="pass a batch size of at least 1")
    if reference is not None and task.kind is not TaskKind.LANGUAGE_MODELING:
        raise MoeguardError(f"a reference perplexity was given for {task.kind.value} task '{task.name}'",
                            hint="pass reference only for language modeling tasks")
    if reference is not None and not reference > 0:
        raise MoeguardError(f"reference perplexity is {reference}", hint="pass a positive perplexity")
    _check_metric(task, reference)
    if task.max_length < 2:
        raise MoeguardError(f"task '{task.name}' has max_length {task.max_length}",
                            hint="set max_length to at least 2 tokens")
    records = load_records(task, "eval", limit=limit)
    train = None
    if baseline and "train" in task.splits:
        train = load_records(task, "train", limit=baseline_limit)

    started = time.perf_counter()
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            run = {TaskKind.LANGUAGE_MODELING: _language_modeling, TaskKind.CLASSIFICATION: _classification,
                   TaskKind.SUMMARIZATION: _summarization}[task.kind]
            metrics, n_tokens, base = run(model, tokenizer, task, records, train, batch_size,
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
                   model_name: str | None = None, baseline: bool = True) -> dict[str, Any]:
    """Evaluate every task and return the results document (schema: docs/tasks.md).

    ``references`` maps a language-modeling task name to its reference perplexity.
    """
    resolved = [get_task(t) for t in tasks]
    names = [t.name for t in resolved]
    if len(set(names)) != len(names):
        raise MoeguardError(f"task list {names} names a task twice", hint="list every task once")
    references = dict(references or {})
    unknown = sorted(set(references) - set(names))
    if unknown:
        raise MoeguardError(f"reference perplexities given for tasks not evaluated: {unknown}",
                            hint=f"use names from {names}")
    results = {t.name: evaluate_task(model, tokenizer, t, limit=limit, batch_size=batch_size,
                                     reference=references.get(t.name), progress=progress,
                                     baseline=baseline).to_dict() for t in resolved}
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

    Context and continuation are tokenized separately and concatenated, trailing context
    whitespace moving to the continuation (lm-evaluation-harness' convention), so a label's
    tokens are the same for every example. Over-long contexts lose tokens on the left.
    """
    bos = _bos(tokenizer)
    ctx_cache: dict[str, list[int]] = {}
    cont_cache: dict[str, list[int]] = {}
    items: list[tuple[list[int], int]] = []
    for context, continuation in requests:
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped):] + continuation
        if context not in ctx_cache:
            ctx_cache[context] = bos + _encode(tokenizer, context)
        if continuation not in cont_cache:
            cont_cache[continuation] = _encode(tokenizer, continuation)
        ctx, cont = ctx_cache[context], cont_cache[continuation]
        if not cont:
            raise MoeguardError(f"continuation {continuation!r} tokenizes to nothing",
                                hint="use a non-empty label verbalizer such as ' positive'")
        if len(cont) > max_length - 1:
            raise MoeguardError(f"continuation {continuation!r} is {len(cont)} tokens, max_length is {max_length}",
                                hint="shorten the verbalizer or raise max_length")
        # Nothing to condition on: score from the pad/eos token, as the harness does.
        ctx = ctx or [_pad_id(tokenizer)]
        full = (ctx + cont)[-(max_length + 1):]
        items.append((full, len(cont)))

    # Longest first: batches hold similar lengths (less padding) and OOM shows up at once.
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    scores = [0.0] * len(items)
    device = _device(model)
    pad = _pad_id(tokenizer)
    for begin in range(0, len(order), batch_size):
        idx = order[begin:begin + batch_size]
        inputs = [items[i][0][:-1] for i in idx]
        ids, mask = _pad(inputs, pad, left=False, device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, i in enumerate(idx):
            full, n_cont = items[i]
            end = len(full) - 1
            logp = F.log_softmax(logits[row, end - n_cont:end].float(), dim=-1)
            target = torch.tensor(full[-n_cont:], device=logp.device)
            scores[i] = logp.gather(-1, target[:, None]).sum().item()
        if ticker is not None:
            ticker.advance()
    return scores


# --------------------------------------------------------------------------- kinds

def _language_modeling(model, tokenizer, task, records, train, batch_size, reference, ticker):
    bos = _bos(tokenizer)
    step = task.max_length - 1  # windows overlap by one token so every token is predicted once
    windows = []
    for rec in records:
        ids = bos + _encode(tokenizer, rec["text"])
        windows += [ids[s:s + task.max_length] for s in range(0, len(ids) - 1, step)]
    if not windows:
        raise MoeguardError(f"the eval records of task '{task.name}' tokenize to fewer than 2 tokens each",
                            hint="use longer texts; perplexity needs tokens to predict")
    ticker.start(math.ceil(len(windows) / batch_size))
    device, pad = _device(model), _pad_id(tokenizer)
    nll, n_tokens = 0.0, 0
    for begin in range(0, len(windows), batch_size):
        ids, mask = _pad(windows[begin:begin + batch_size], pad, left=False, device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="none")
        keep = mask[:, 1:].reshape(-1).bool()
        nll += losses[keep].double().sum().item()
        n_tokens += int(keep.sum().item())
        ticker.advance()
    metrics = _lm_metrics(nll, n_tokens, reference)
    base = None
    if train is not None:
        vocab = len(tokenizer)
        train_tokens = (t for rec in train for t in _encode(tokenizer, rec["text"]))
        eval_tokens = [t for w in windows for t in w[1:]]
        base_nll = M.unigram_nll(train_tokens, eval_tokens, vocab)
        base = {"name": "unigram", "description": f"add-one unigram over {vocab} token ids, fit on the "
                f"train split ({len(train)} records)", "metrics": _lm_metrics(base_nll, n_tokens, reference)}
    return metrics, n_tokens, base


def _lm_metrics(nll: float, n_tokens: int, reference: float | None) -> dict[str, float]:
    ppl = M.perplexity(nll, n_tokens)
    out = {"loss": M.mean_nll(nll, n_tokens), "perplexity": ppl}
    if reference is not None:
        out["normalized_perplexity"] = M.normalized_perplexity(ppl, reference)
    return out


def _classification(model, tokenizer, task, records, train, batch_size, reference, ticker):
    labels = [(str(k), v) for k, v in task.labels.items()]
    requests = [(rec["input"], verbalizer) for rec in records for _, verbalizer in labels]
    ticker.start(math.ceil(len(requests) / batch_size))
    scores = loglikelihoods(model, tokenizer, requests, max_length=task.max_length,
                            batch_size=batch_size, ticker=ticker)
    golds = [rec["label"] for rec in records]
    preds = []
    for i in range(len(records)):
        row = scores[i * len(labels):(i + 1) * len(labels)]
        preds.append(labels[max(range(len(labels)), key=row.__getitem__)][0])  # ties: first label
    metrics = {"accuracy": M.accuracy(preds, golds), "macro_f1": M.macro_f1(preds, golds)}
    base = None
    if train is not None:
        majority = M.majority_label(rec["label"] for rec in train)
        constant = [majority] * len(golds)
        base = {"name": "majority_class", "description": f"always label {majority!r}, the most frequent "
                f"in the train split ({len(train)} records)",
                "metrics": {"accuracy": M.accuracy(constant, golds), "macro_f1": M.macro_f1(constant, golds)}}
    return metrics, None, base


def _summarization(model, tokenizer, task, records, train, batch_size, reference, ticker):
    # the prompt leaves room for the generated tokens inside max_length (lm-evaluation-harness'
    # max_length - max_gen_toks), so generation never runs past the model's context
    room = max(2, task.max_length - task.max_new_tokens)
    prompts = [_fit_prompt(tokenizer, rec, room) for rec in records]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    ticker.start(math.ceil(len(prompts) / batch_size))
    device, pad = _device(model), _pad_id(tokenizer)
    eos = _eos_ids(model, tokenizer)
    config = _generation_config(task, pad, eos, tokenizer)
    outputs = [""] * len(prompts)
    for begin in range(0, len(order), batch_size):
        idx = order[begin:begin + batch_size]
        ids, mask = _pad([prompts[i] for i in idx], pad, left=True, device=device)
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row, i in enumerate(idx):
            new = generated[row, ids.shape[1]:].tolist()
            cut = next((j for j, t in enumerate(new) if t in eos), len(new))
            outputs[i] = _first_line(tokenizer.decode(new[:cut], skip_special_tokens=True))
        ticker.advance()
    refs = [rec["references"] for rec in records]
    metrics = M.rouge(outputs, refs)
    base = None
    if train is not None:
        k = M.median_words(rec["target"] for rec in train)
        lead = [M.lead_words(rec["source_text"], k) for rec in records]
        base = {"name": f"lead_{k}", "description": f"the first {k} words of the source text; {k} is the "
                f"median target length in words on the train split ({len(train)} records)",
                "metrics": M.rouge(lead, refs)}
    return metrics, None, base


def _fit_prompt(tokenizer, rec: dict[str, Any], max_length: int) -> list[int]:
    """Prompt ids of at most ``max_length`` tokens.

    Cuts the end of the source text rather than the prompt's edges: the article's start
    carries most of a news summary and the instruction at the end must survive.
    """
    bos = _bos(tokenizer)
    ids = bos + _encode(tokenizer, rec["input"])
    excess = len(ids) - max_length
    source = rec.get("source_text") or ""
    if excess > 0 and source and source in rec["input"]:
        src_ids = _encode(tokenizer, source)
        keep = max(0, len(src_ids) - excess - 8)  # slack: re-tokenizing the cut may differ a little
        shorter = rec["input"].replace(source, tokenizer.decode(src_ids[:keep]), 1)
        ids = bos + _encode(tokenizer, shorter)
    if len(ids) > max_length:  # fallback: keep the end, where the instruction is
        ids = bos + ids[len(bos):][-(max_length - len(bos)):]
    return ids


def _generation_config(task: Task, pad: int, eos: list[int], tokenizer) -> Any:
    from transformers import GenerationConfig

    # A fresh config: a checkpoint's own sampling defaults (temperature, top_p) must not leak in.
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=task.max_new_tokens,
                            pad_token_id=pad, eos_token_id=eos or None, bos_token_id=tokenizer.bos_token_id)


def _first_line(text: str) -> str:
    # Leading blank lines are skipped: "Summary:\n<text>" is a common completion shape.
    stripped = text.lstrip()
    return stripped.split("\n", 1)[0].strip()


# --------------------------------------------------------------------------- helpers

class _Ticker:
    def __init__(self, progress: Any, name: str):
        self.progress, self.name, self.id = progress, name, None

    def start(self, total: int) -> None:
        if self.progress is not None:
            self.id = self.progress.add_task(self.name, total=total)

    def advance(self) -> None:
        if self.progress is not None and self.id is not None:
            self.progress.advance(self.id)


def _check_metric(task: Task, reference: float | None) -> None:
    if task.primary_metric not in (allowed := KIND_METRICS[task.kind]):
        raise MoeguardError(f"task '{task.name}' asks for metric '{task.primary_metric}'",
                            hint=f"a {task.kind.value} task reports {', '.join(allowed)}")
    if task.primary_metric == "normalized_perplexity" and reference is None:
        raise MoeguardError(f"task '{task.name}' reports normalized_perplexity but no reference perplexity was given",
                            hint="pass the reference model's perplexity, or use metric: perplexity")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # always masked out, so any valid id will do


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        ids += value if isinstance(value, list) else ([] if value is None else [value])
    return list(dict.fromkeys(int(i) for i in ids))


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _pad(seqs: Sequence[list[int]], pad: int, *, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def _model_name(model) -> str:
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moeguard")
    except PackageNotFoundError:
        return "unknown"


def _json_safe(value: Any) -> Any:
    # JSON has no inf/nan: an overflowed perplexity is written as null.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
