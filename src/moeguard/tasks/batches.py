"""Token sequences with a loss mask for any task: what attribution and fine-tuning score.

The *task loss* is the mean negative log-likelihood of the tokens a task is about, read the
way evaluation reads them: every token of a language-modeling window, the gold verbalizer of a
classification prompt, the reference summary after a summarization prompt. One definition is
shared by every attribution method (so ``ablation`` and ``gradient`` estimate the same thing)
and by re-alignment.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from moeguard.errors import MoeguardError
from moeguard.tasks import tokens as T
from moeguard.tasks.base import Task
from moeguard.tasks.kinds.base import IGNORE, Example
from moeguard.tasks.loaders import sample_records
from moeguard.tasks.registry import get_task

__all__ = ["IGNORE", "Batch", "Example", "calibration_batches", "collate", "next_token_targets", "task_sequences",
           "token_nll"]


def task_sequences(tokenizer, task: Task | str, records: Sequence[dict[str, Any]]) -> list[Example]:
    """One or more supervised sequences per record, in record order (the task's kind turns a
    record into examples; LM texts longer than max_length give several)."""
    task = get_task(task)
    spec = task.kind_spec
    out: list[Example] = []
    for rec in records:
        out += spec.examples(tokenizer, task, rec)
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor          # [B, T], IGNORE outside targets; already aligned to input_ids
    # an encoder-decoder's decoder side ([B, T'], :func:`collate` with ``decoder_start``): the
    # labels are then aligned to decoder_input_ids, the way a causal batch's are to input_ids
    decoder_input_ids: torch.Tensor | None = None
    decoder_attention_mask: torch.Tensor | None = None

    @property
    def n_targets(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    @property
    def target_mask(self) -> torch.Tensor:
        """[B, T'] the attention mask of the tokens the labels are aligned to."""
        return self.attention_mask if self.decoder_attention_mask is None else self.decoder_attention_mask

    def inputs(self) -> dict[str, torch.Tensor]:
        """The model's keyword inputs (an encoder-decoder's decoder inputs too)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.decoder_input_ids is not None:
            out.update(decoder_input_ids=self.decoder_input_ids, decoder_attention_mask=self.decoder_attention_mask)
        return out

    def to(self, device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device))
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     move(self.decoder_input_ids), move(self.decoder_attention_mask))


def collate(seqs: Sequence[Example], pad_id: int, *, decoder_start: int | None = None) -> Batch:
    """Right-padded rows. ``decoder_start`` (an encoder-decoder's decoder start token): each example
    is split where its targets begin (:func:`seq2seq_split`)."""
    if decoder_start is not None:
        return _collate_seq2seq(seqs, pad_id, decoder_start)
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s.ids)] = torch.tensor(s.ids)
        mask[row, :len(s.ids)] = 1
        labels[row, :len(s.labels)] = torch.tensor(s.labels)
    return Batch(ids, mask, labels)


def seq2seq_split(example: Example) -> int:
    """Where an encoder-decoder splits an example: its encoder reads the tokens before the first
    target (at least one) and its decoder predicts the rest. A classification prompt goes to the
    encoder and its verbalizer to the decoder; a summarization prompt and its summary likewise; a
    language-modeling window gives its first token to the encoder and every later one to the decoder,
    so the same tokens are predicted as by a causal model."""
    first = next((i for i, label in enumerate(example.labels) if label != IGNORE), len(example.labels))
    return max(1, first)


def _collate_seq2seq(seqs: Sequence[Example], pad_id: int, start: int) -> Batch:
    # decoder input [start] + targets and labels [IGNORE] + targets: logits at position t predict
    # labels[t + 1], as token_nll reads a causal batch, so every loss and score reads both alike
    enc, dec = [], []
    for s in seqs:
        p = seq2seq_split(s)
        enc.append(Example(list(s.ids[:p]), [IGNORE] * p))
        dec.append(Example([start, *s.ids[p:]], [IGNORE, *s.labels[p:]]))
    e, d = collate(enc, pad_id), collate(dec, pad_id)
    return Batch(e.input_ids, e.attention_mask, d.labels, d.input_ids, d.attention_mask)


def calibration_batches(tokenizer, task: Task | str, *, samples: int, batch_size: int = 16, seed: int = 0,
                        role: str | None = None, decoder_start: int | None = None) -> list[Batch]:
    """``samples`` records of the task (the train split when there is one: the attacker's data,
    kept apart from the eval split that scores the pruned model), shuffled with ``seed``,
    turned into padded batches sorted by length (less padding). ``decoder_start``: batches for an
    encoder-decoder (:func:`moeguard.tasks.tokens.decoder_start`)."""
    task = get_task(task)
    if samples < 1:
        raise MoeguardError(f"samples is {samples}", hint="pass --samples of at least 1")
    # a task without a train split is attributed on its eval records: the caller is warned and
    # the split is recorded, because the same records may then score the pruned model
    role = role or ("train" if "train" in task.splits else "eval")
    if role == "eval":
        import warnings

        warnings.warn(f"task '{task.name}' has no train split; attribution samples come from its eval split",
                      stacklevel=2)
    pool = sample_records(task, role, samples, seed=seed)   # a sample of the whole split, not of its first records
    random.Random(seed).shuffle(pool)
    seqs = task_sequences(tokenizer, task, pool)
    seqs.sort(key=lambda s: -len(s.ids))
    pad = T.pad_id(tokenizer)
    return [collate(seqs[i:i + batch_size], pad, decoder_start=decoder_start) for i in range(0, len(seqs), batch_size)]


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] the token each position predicts (IGNORE at the last position).

    The labels are shifted, not the logits: slicing logits would copy the largest tensor of the pass."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] negative log-likelihood of each next token (0 where ignored)."""
    B, T, V = logits.shape
    target = next_token_targets(labels)
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(B * T, V), target.reshape(-1),
                                            ignore_index=IGNORE, reduction="none").view(B, T)
    return nll[:, :-1]
