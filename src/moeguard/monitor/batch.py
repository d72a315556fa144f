"""What the online monitor (``online.py``) keeps of a request until its batch is scored, and how a
batch becomes the arrays the profile scores: routing counts, embeddings, ``surprise`` and replies.

Split from ``online.py`` so that the monitor's class holds the hooks, the queue and the per-client
state, and this file the arithmetic on a captured batch."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from moeguard.monitor.profile import Profile
from moeguard.monitor.replies import reply_routing


class Captured(NamedTuple):
    """One request's prefill, kept until its batch is scored."""
    out: Any              # its RequestResult
    routed: list          # per MoE layer, [rows * T, k] top-k ids
    ids: Any              # [rows, T] token ids, or None (called with embeddings)
    mask: Any             # [rows, T] attention mask; None or False: none given
    pooled: Any           # [rows, hidden] float32: the final norm's output summed over real tokens
    at: float             # time.monotonic() when it ended (the delay bound)
    reply: Any = None     # (per MoE layer the decode steps' top-k ids, their input ids): a profile of replies
    served: float = 0.0   # the monitor's clock (wall time) when it ended: its period of all traffic


class BatchReader:
    """A captured batch as the profile's inputs, with a handful of calls for the whole batch:
    straight after a forward, each numpy or torch call costs ~10x what it does in a loop, so
    per-request calls are what batching saves. Warns once per monitor about what it cannot score."""

    def __init__(self, profile: Profile, *, layers: int, experts: int):
        self.profile, self.E = profile, experts
        self.offsets = (np.arange(layers) * experts)[None, :, None]   # [1, L, 1]: layer l's experts at l * E
        self.warned_ids = self.warned_reply = False

    def prefills(self, batch: list[Captured]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch's routing counts [N, L, E], embeddings [N, dim] and ``surprise`` [N], padding excluded."""
        L, E, N = self.offsets.shape[1], self.E, len(batch)
        # tensors become numpy at once (torch's per-call dispatch on these tiny arrays is several times
        # numpy's; on a GPU server .cpu() copies them, on a CPU it is free); the routed ids are joined
        # per layer: L calls, not one per request
        toks, masks, hidden, rows_of, lengths = [], [], [], [], []   # per prompt row: its request, tokens kept
        has_ids = np.ones(N, dtype=bool)
        for r, (_, routed, tids, mask, pooled, *_) in enumerate(batch):
            n = len(routed[0])
            if tids is None or tids.numel() != n:
                if not self.warned_ids:
                    self.warned_ids = True
                    warnings.warn("the model was called without input ids: the monitor scores 'surprise' as 0 "
                                  "(no token ids to look up); the other statistics are unaffected")
                t, has_ids[r] = np.zeros((1, n), dtype=np.int64), False
            else:
                t = tids.cpu().numpy().reshape(-1, tids.shape[-1]) if n else np.zeros((1, 0), dtype=np.int64)
            toks.append(t.reshape(-1))
            if mask is not None and mask is not False and mask.numel() == n:
                m = mask.cpu().numpy().reshape(t.shape) != 0
                masks.append(m.reshape(-1))
                per_row = m.sum(1).tolist()
            else:
                masks.append(None)
                per_row = [t.shape[1]] * len(t)
            rows_of += [r] * len(per_row)
            lengths += per_row
            hidden.append(pooled.numpy())                 # [rows, hidden] float32, on the CPU (PooledHidden)
        # each layer's ids on the CPU before stacking: a model spread over GPUs routes each layer on its own
        cells = np.stack([torch.cat([c.routed[l] for c in batch]).cpu().numpy() for l in range(L)], 1)   # [M, L, k]
        tok = np.concatenate(toks)
        if any(m is not None for m in masks):   # padded positions are not the prompt's
            sel = np.concatenate([m if m is not None else np.ones(len(t), dtype=bool) for m, t in zip(masks, toks)])
            cells, tok = cells[sel], tok[sel]
        rows_of, lengths = np.array(rows_of, dtype=np.int64), np.array(lengths, dtype=np.int64)
        owner = np.repeat(rows_of, lengths)                          # [M]: the request of each kept token
        # one bincount over (request, layer, expert) cells
        cells = cells + self.offsets                                                # [M, L, k]: layer l's experts at l * E
        flat = cells + (owner * (L * E))[:, None, None]
        counts = np.bincount(flat.ravel(), minlength=N * L * E).reshape(N, L, E).astype(np.float64)
        ntok = np.bincount(owner, minlength=N).astype(np.float64)
        rows = np.concatenate(hidden).astype(np.float64)                            # [rows, hidden]
        if len(rows) != N:                      # a request of several rows: the sum of its rows
            rows = np.add.reduceat(rows, np.cumsum([0] + [len(h) for h in hidden[:-1]]), axis=0)
        x = self.profile.space(rows, ntok)                                          # [N, dim]
        # surprise: every token's score at once, the largest stretch per prompt row, per request the largest row
        table = self.profile.tokens
        per_row = table.stretches(tok, table.scores_flat(tok, cells), lengths)      # [rows]
        surprise = np.zeros(N)
        np.maximum.at(surprise, rows_of, np.where(has_ids[rows_of], per_row, 0.0))
        return counts, x, surprise

    def replies(self, batch: list[Captured]) -> tuple[np.ndarray, np.ndarray]:
        """The batch's reply histograms [N, L, E] (a row of zeros: no reply) and surprise [N]."""
        out, surprise = np.zeros((len(batch), self.offsets.shape[1], self.E)), np.zeros(len(batch))
        for i, c in enumerate(batch):
            n = c.out.reply_tokens
            if n is None and not self.warned_reply:
                self.warned_reply = True
                warnings.warn("a request ended without reply_tokens set: the monitor counts every decode step as its reply "
                              "(the one that made the end of text too; a 1-token generation counts as none); set "
                              "r.reply_tokens to the reply's length, as serve does, to score what `monitor score` scores")
            got = reply_routing(c.routed, c.ids, c.mask, *c.reply, self.E, None if n is None else int(n),
                                self.profile.tokens)
            if got is not None:
                out[i] = got[0] / np.maximum(got[0].sum(1, keepdims=True), 1)
                surprise[i] = got[1]
        return out, surprise
