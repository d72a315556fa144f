"""``language_modeling``: perplexity of running text.

Each record is cut into windows of ``max_length`` tokens that overlap by one token, so every
token after the first is predicted exactly once; training reads long texts the same way.
Baseline: an add-one unigram over the tokenizer's vocabulary, fit on the train split.
"""

from __future__ import annotations

import math
from typing import Any

from moeguard.errors import MoeguardError
from moeguard.tasks import metrics as M
from moeguard.tasks import tokens as T
from moeguard.tasks.kinds.base import IGNORE, Example, TaskKindSpec, register_kind
from moeguard.tasks.loaders import cell_text


class LanguageModeling(TaskKindSpec):
    name = "language_modeling"
    description = "perplexity of running text (overlapping windows of max_length tokens)"
    required_fields = ("text",)
    metrics = ("loss", "perplexity", "normalized_perplexity")
    primary_metric = "perplexity"
    lower_is_better = ("loss", "perplexity", "normalized_perplexity")
    baseline = "unigram"
    takes_reference = True
    prompted = False
    record_needs = "text"
    unlabeled_fields = ("text",)
    running_text = True

    def record(self, task, row, split, where):
        text = cell_text(row[task.fields["text"]])
        # Blank rows (WikiText has many) carry no tokens to predict.
        return {"text": text} if text.strip() else None

    def evaluate(self, model, tokenizer, task, records, train, batch_size, reference, ticker):
        import torch.nn.functional as F

        bos = T.bos_ids(tokenizer)
        step = task.max_length - 1  # windows overlap by one token so every token is predicted once
        windows = []
        for rec in records:
            ids = bos + T.encode(tokenizer, rec["text"])
            windows += [ids[s:s + task.max_length] for s in range(0, len(ids) - 1, step)]
        if not windows:
            raise MoeguardError(f"the eval records of task '{task.name}' tokenize to fewer than 2 tokens each",
                                hint="use longer texts; perplexity needs tokens to predict")
        ticker.start(math.ceil(len(windows) / batch_size))
        device, pad = T.model_device(model), T.pad_id(tokenizer)
        nll, n_tokens = 0.0, 0
        start = T.decoder_start(model)
        for begin in range(0, len(windows), batch_size) if start is None else ():
            ids, mask = T.pad_batch(windows[begin:begin + batch_size], pad, left=False, device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="none")
            keep = mask[:, 1:].reshape(-1).bool()
            nll += losses[keep].double().sum().item()
            n_tokens += int(keep.sum().item())
            ticker.advance()
        if start is not None:   # an encoder-decoder: the same tokens predicted through the seq2seq head
            nll, n_tokens = _seq2seq_nll(model, windows, start, pad, device, batch_size, ticker)
        metrics = lm_metrics(nll, n_tokens, reference)
        base = None
        if train is not None:
            vocab = len(tokenizer)
            train_tokens = (t for rec in train for t in T.encode(tokenizer, rec["text"]))
            eval_tokens = [t for w in windows for t in w[1:]]
            base_nll = M.unigram_nll(train_tokens, eval_tokens, vocab)
            base = {"name": "unigram", "description": f"add-one unigram over {vocab} token ids, fit on the "
                    f"train split ({len(train)} records)", "metrics": lm_metrics(base_nll, n_tokens, reference)}
        return metrics, n_tokens, base

    def examples(self, tokenizer, task, record):
        ids = T.bos_ids(tokenizer) + T.encode(tokenizer, record["text"])
        step = task.max_length - 1
        out = []
        for s in range(0, len(ids) - 1, step):
            w = ids[s:s + task.max_length]
            out.append(Example(w, [IGNORE] + w[1:]))
        return out

    def training_text(self, task, record):
        return record["text"]

    def input_ids(self, tokenizer, task, record):
        return (T.bos_ids(tokenizer) + T.encode(tokenizer, record["text"]))[:task.max_length]


def _seq2seq_nll(model, windows: list[list[int]], start: int, pad: int, device, batch_size: int,
                 ticker) -> tuple[float, int]:
    """Summed NLL and count of every window token but the first, through an encoder-decoder's
    seq2seq head: the encoder reads the window's first token, the decoder predicts the rest
    (``tasks.batches.seq2seq_split``), so the tokens scored are a causal model's."""
    from moeguard.tasks.batches import collate, token_nll

    nll, n_tokens = 0.0, 0
    for begin in range(0, len(windows), batch_size):
        b = collate([Example(w, [IGNORE] + w[1:]) for w in windows[begin:begin + batch_size]], pad,
                    decoder_start=start).to(device)
        losses = token_nll(model(**b.inputs()).logits, b.labels)
        nll += losses.double().sum().item()
        n_tokens += b.n_targets
        ticker.advance()
    return nll, n_tokens


def lm_metrics(nll: float, n_tokens: int, reference: float | None) -> dict[str, Any]:
    """``loss``, ``perplexity`` and, given a reference perplexity, ``normalized_perplexity``."""
    ppl = M.perplexity(nll, n_tokens)
    out = {"loss": M.mean_nll(nll, n_tokens), "perplexity": ppl}
    if reference is not None:
        out["normalized_perplexity"] = M.normalized_perplexity(ppl, reference)
    return out


LANGUAGE_MODELING = register_kind(LanguageModeling())
