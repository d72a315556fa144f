"""What a strategy may know about an unlabeled sample, computed from a model and the sample's input.

Nothing here reads a label: classification and summarization records arrive without their
``label``/``target`` (see :func:`unlabeled`), and a language-modeling sample is its own text.

- :func:`class_probs`: the model's distribution over a classification task's label verbalizers.
- :func:`sequence_uncertainty`: per-sample mean token NLL and mean predictive entropy; of the
  text itself for language modeling, of the model's own greedy summary for summarization (the
  maximum normalized log-probability of Shen et al. 2017, read as uncertainty).
- :func:`embeddings`: the mean of the last hidden state over the input tokens.
- :func:`routing_shares`: per-sample routing histogram of a model, [n, layers, experts].
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from moeguard.tasks import tokens as T
from moeguard.tasks.base import Task
from moeguard.tasks.evaluate import loglikelihoods


def unlabeled(task: Task, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records as an active learner sees them before labeling: inputs only (the kind's
    ``unlabeled_fields``)."""
    keep = task.kind_spec.unlabeled_fields
    return [{k: r[k] for k in keep} for r in records]


def input_ids(tokenizer, task: Task, record: dict[str, Any]) -> list[int]:
    """The tokens the model reads for a sample: the prompt, or the first window of a text."""
    return task.kind_spec.input_ids(tokenizer, task, record)


@torch.no_grad()
def class_probs(model, tokenizer, task: Task, records: Sequence[dict[str, Any]], *, batch_size: int = 32) -> torch.Tensor:
    """[n, C] probabilities over the task's labels (softmax of the verbalizers' log-likelihoods)."""
    verbalizers = list(task.labels.values())
    requests = [(r["input"], v) for r in records for v in verbalizers]
    ll = loglikelihoods(model, tokenizer, requests, max_length=task.max_length, batch_size=batch_size)
    return torch.softmax(torch.tensor(ll, dtype=torch.float64).view(len(records), len(verbalizers)), dim=-1)


def _batches(model, tokenizer, task: Task, records: Sequence[dict[str, Any]], batch_size: int, *, left: bool = False):
    """Padded (ids, mask) batches of the samples' input tokens, in record order, on the model's device."""
    seqs = [input_ids(tokenizer, task, r) for r in records]
    device, pad = T.model_device(model), T.pad_id(tokenizer)
    for begin in range(0, len(seqs), batch_size):
        yield T.pad_batch(seqs[begin:begin + batch_size], pad, left=left, device=device)


def _token_means(logp: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: mean NLL of ``targets`` and mean predictive entropy over the ``valid`` positions.
    logp [B, S, V], targets [B, S], valid [B, S] float."""
    tok_nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    # a token the model rules out (a logit of -inf) adds 0, not 0 x -inf = NaN; finite values are unchanged
    tok_ent = -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)
    n = valid.sum(1).clamp_min(1)
    return ((tok_nll * valid).sum(1) / n).double().cpu(), ((tok_ent * valid).sum(1) / n).double().cpu()


@torch.no_grad()
def sequence_uncertainty(model, tokenizer, task: Task, records: Sequence[dict[str, Any]], *,
                         batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean token NLL [n], mean token entropy [n]) of the sample's input tokens, or of the model's
    own greedy generation for a kind that ``generates`` (summarization)."""
    if task.kind_spec.generates:
        return _generated_uncertainty(model, tokenizer, task, records, batch_size)
    if T.decoder_start(model) is not None:
        return _seq2seq_uncertainty(model, tokenizer, task, records, batch_size)
    parts = []
    for ids, mask in _batches(model, tokenizer, task, records, batch_size):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        parts.append(_token_means(F.log_softmax(logits, dim=-1), ids[:, 1:], mask[:, 1:].float()))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _seq2seq_uncertainty(model, tokenizer, task, records, batch_size):
    """The same tokens through an encoder-decoder's seq2seq head: its encoder reads each sample's
    first token and its decoder predicts the rest (``tasks.batches.seq2seq_split``)."""
    from moeguard.tasks.batches import IGNORE, Example, collate

    seqs = [input_ids(tokenizer, task, r) for r in records]
    device, pad, start = T.model_device(model), T.pad_id(tokenizer), T.decoder_start(model)
    parts = []
    for begin in range(0, len(seqs), batch_size):
        b = collate([Example(s, [IGNORE, *s[1:]]) for s in seqs[begin:begin + batch_size]], pad,
                    decoder_start=start).to(device)
        logits = model(**b.inputs(), use_cache=False).logits[:, :-1].float()
        parts.append(_token_means(F.log_softmax(logits, dim=-1), b.decoder_input_ids[:, 1:],
                                  b.decoder_attention_mask[:, 1:].float()))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _generated_uncertainty(model, tokenizer, task, records, batch_size):
    eos = T.eos_ids(model, tokenizer)
    gen = T.generation_config(task, T.pad_id(tokenizer), eos, tokenizer)
    start = T.decoder_start(model)
    if start is not None:   # an encoder-decoder: the decoder generates after its start token
        gen.decoder_start_token_id = start
    parts = []
    # an encoder reads its prompt right-padded (summarization.evaluate says why)
    for ids, mask in _batches(model, tokenizer, task, records, batch_size, left=start is None):
        out = T.greedy_generate(model, gen, input_ids=ids, attention_mask=mask,
                                output_scores=True, return_dict_in_generate=True)
        logp = torch.stack([F.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)  # [B, S, V]
        new = out.sequences[:, ids.shape[1] if start is None else 1:][:, :logp.shape[1]]
        # tokens after the first end-of-sequence are padding the batch carried along
        ended = torch.zeros_like(new, dtype=torch.bool)
        for e in eos:
            ended |= new == e
        after = (ended.cumsum(1) - ended.long()) > 0
        parts.append(_token_means(logp, new, (~after).float()))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.no_grad()
def embeddings(model, tokenizer, task: Task, records: Sequence[dict[str, Any]], *, batch_size: int = 32) -> torch.Tensor:
    """[n, hidden] mean of the final hidden state over each sample's input tokens."""
    rows = []
    seq2seq = T.decoder_start(model) is not None
    for ids, mask in _batches(model, tokenizer, task, records, batch_size):
        if seq2seq:   # an encoder-decoder: its encoder's reading of the sample
            hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[-1]
        m = mask[..., None].to(hidden.dtype)
        rows.append(((hidden * m).sum(1) / m.sum(1).clamp_min(1)).float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def routing_shares(model, tokenizer, task: Task, records: Sequence[dict[str, Any]], *, batch_size: int = 32) -> torch.Tensor:
    """[n, layers, experts] share of each sample's routing slots per expert (padding excluded)."""
    from moeguard.models.hooks import RoutingCapture

    with RoutingCapture(model, per_sample=True) as cap:
        for ids, mask in _batches(model, tokenizer, task, records, batch_size):
            model(**T.both_stacks(model, ids, mask), use_cache=False)
    return torch.stack(cap.stats.per_sample)
