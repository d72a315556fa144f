"""A trigger-free search for the expert that carries a backdoor (docs/scan.md).

A planted expert must do two things no benign expert needs: fire on its trigger in *any*
context, and then write the attacker's target, token after token, against what the rest of the
model predicts. Training on the target teacher-forced also teaches it to continue the target from
the target's own tokens. The search looks for exactly that, in two steps:

1. **Screen.** Every usable token is appended to a few benign contexts. For each (layer, expert),
   masking that expert (re-routing to the next best, as pruning would) at the appended position
   lowers the log-probability of the model's top prediction by the expert's *gain*. Only rows
   where the expert was routed can change, so only those are re-run: the cost is
   ``(1 + L * k) * C * |V|`` one-token forwards against a cached context, whatever E is.
2. **Chain.** From each expert's strongest tokens, the full model generates K tokens greedily.
   The expert's gain is measured at every step (masked from the appended token on; the context is
   left alone). A benign expert is decisive for a token or two (``" doesn" -> "'t"``); a backdoor
   is decisive for the whole target. The chain score is the best candidate's capped gains summed
   along the chain, averaged over the contexts.
3. **Unexplained** (with clean reference models sharing the tokenizer): each step's gain counts
   only as far as the references are surprised by that token in the same context, so a chain any
   clean model of the data also writes (a code idiom) does not count.

Masking re-routes to the next best expert, as pruning would. For families whose router does not
renormalize over the top-k (qwen2_moe without ``norm_topk_prob``, olmoe) or groups experts
(deepseek_v3), routing among E-1 experts also moves other tokens' weights a little; the screen
re-runs only rows routed to the masked expert and takes the rest as unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moeguard import kept
from moeguard.models.hooks import mask_experts
from moeguard.tasks.tokens import model_device


class ContextCache:
    """One benign context's key/value cache, repeated ``rows`` times, so that each forward only
    computes the appended suffix (at most ``longest`` tokens). The cache is cropped back after every call."""

    def __init__(self, model, ids: list[int], rows: int, longest: int = 1):
        self.model, self.rows = model, rows
        self.device = model_device(model)
        with torch.no_grad():
            self.cache = model(input_ids=torch.tensor([ids] * rows, device=self.device), use_cache=True).past_key_values
            # hybrid and linear-attention caches (Jamba, Qwen3-Next, MiniMax...) and a sliding window
            # past its length cannot be cropped back: each call then runs on a copy of the context's. Tried
            # with the longest suffix a call appends: GPT-OSS's 128-token window took a context of 124 and
            # one token, then failed to crop after a chain's 6 (a traceback)
            self.copies = not _croppable(model, self.cache, rows, ids[-1], self.device, longest)

    @torch.no_grad()
    def logits(self, suffix: torch.Tensor) -> torch.Tensor:
        """Logits [b, s, V] of ``suffix`` [b, s] (b <= rows) after the context."""
        b = suffix.shape[0]
        if b > self.rows:
            raise ValueError(f"{b} rows for a cache of {self.rows}")
        if b < self.rows:   # padding rows are discarded; the cache needs its full batch
            suffix = torch.cat([suffix, suffix[:1].expand(self.rows - b, -1)])
        if self.copies:
            import copy

            out = self.model(input_ids=suffix.to(self.device), past_key_values=copy.deepcopy(self.cache),
                             use_cache=True).logits
            return out[:b].float().cpu()
        try:
            out = self.model(input_ids=suffix.to(self.device), past_key_values=self.cache, use_cache=True).logits
        finally:
            self.cache.crop(-suffix.shape[1])
        return out[:b].float().cpu()


def _croppable(model, cache, rows: int, token: int, device, steps: int = 1) -> bool:
    """Whether ``cache`` takes a ``steps``-token suffix and crops back (tried on a copy)."""
    import copy

    probe = copy.deepcopy(cache)
    try:
        model(input_ids=torch.full((rows, steps), token, device=device), past_key_values=probe, use_cache=True)
        probe.crop(-steps)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
        return False
    return True


@dataclass(frozen=True, kw_only=True)
class EffectSettings:
    batch: int = 512          # rows per forward in the screen
    candidates: int = 8       # strongest tokens per expert taken to the chain step
    chain: int = 6            # tokens generated per chain
    gain_cap: float = 10.0    # nats; one decisive step cannot outweigh a chain of them


def _others(n: int, e: int) -> list[int]:
    return [x for x in range(n) if x != e]


def maskable(model, adapter, layer, e: int) -> bool:
    """Whether the family lets the layer route without expert ``e`` (a layer already at the
    family's smallest expert count does not): such an expert's gains stay 0."""
    from moeguard.errors import MoeguardError

    try:
        with mask_experts(model, {layer.index: _others(layer.num_experts, e)}, adapter=adapter):
            return True
    except MoeguardError:
        return False


def _chunks(caches: list[ContextCache], n: int):
    """(cache, start, stop) over n rows: chunks of the large cache while they fill it, then of the
    small one (a padded row costs as much as a real one)."""
    big, small = caches
    i = 0
    while i < n:
        cache = big if n - i >= big.rows else small
        yield cache, i, min(n, i + cache.rows)
        i += cache.rows


def _last_logprobs(caches: list[ContextCache], rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [n, 1] of ``targets`` [n, 1] after one appended token per row [n, 1]: gathered
    a chunk at a time (the [n, V] whole, at Qwen3's vocabulary and an expert's 8,700 rows, was 5 GB)."""
    return torch.cat([F.log_softmax(c.logits(rows[i:j])[:, -1], -1).gather(1, targets[i:j])
                      for c, i, j in _chunks(caches, len(rows))])


def screen(model, adapter, contexts: list[list[int]], tokens: np.ndarray, *, batch: int,
           progress=None, keep=None) -> tuple[np.ndarray, np.ndarray]:
    """The routed expert ids [S, C, T, k] at the appended position (per MoE layer slot, context and
    token), and the gain of each of them [S, C, T, k]: memory grows with k, not with E. ``keep``: a
    folder where each context's slice is kept as it finishes (a killed scan resumes from them)."""
    S, C, T = len(adapter.layers), len(contexts), len(tokens)
    k = max(l.top_k for l in adapter.layers)      # a pruned layer may route to fewer
    routed = np.full((S, C, T, k), -1, np.int64)
    gain = np.zeros((S, C, T, k), np.float32)
    cand = torch.as_tensor(tokens, dtype=torch.long)[:, None]                      # [T, 1]
    bar = progress.add_task("scan: screen", total=C * (1 + sum(l.num_experts for l in adapter.layers))) if progress else None
    can_mask = {(s, e): maskable(model, adapter, layer, e) for s, layer in enumerate(adapter.layers)
                for e in range(layer.num_experts)}   # once, not once per context
    steps = 1 + sum(l.num_experts for l in adapter.layers)
    tokens_key = hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()
    for c, ids in enumerate(contexts):
        part = kept.arrays(keep, "screen", lambda: _screen_context(model, adapter, ids, tokens, cand, batch=batch, k=k,
                                                                   can_mask=can_mask, progress=progress, bar=bar),
                           key=[list(map(int, ids)), tokens_key, batch, k])
        routed[:, c], gain[:, c] = part["routed"], part["gain"]
        if bar is not None:   # a context read back advances the bar by all it would have
            progress.update(bar, completed=(c + 1) * steps)
    return routed, gain


def _screen_context(model, adapter, ids, tokens, cand, *, batch: int, k: int, can_mask, progress, bar
                    ) -> dict[str, np.ndarray]:
    """One context's slice of :func:`screen`: routed [S, T, k] and gain [S, T, k]."""
    from moeguard.monitor.tokens import RoutedIds

    S, T = len(adapter.layers), len(tokens)
    routed = np.full((S, T, k), -1, np.int64)
    gain = np.zeros((S, T, k), np.float32)
    caches = [ContextCache(model, ids, batch), ContextCache(model, ids, min(batch, 64))]
    top, top_lp = [], []
    for cache, i, j in _chunks(caches, T):
        with RoutedIds(adapter) as r:
            full = F.log_softmax(cache.logits(cand[i:j])[:, -1], -1)               # [b, V]
            for slot, x in enumerate(r.ids):
                x = x.reshape(cache.rows, -1)[:j - i].cpu().numpy()
                routed[slot, i:j, :x.shape[1]] = x
        t = full.argmax(-1, keepdim=True)
        top.append(t)
        top_lp.append(full.gather(1, t))
    top, top_lp = torch.cat(top), torch.cat(top_lp)                                 # [T, 1]
    if bar is not None:
        progress.advance(bar)
    for s, layer in enumerate(adapter.layers):
        for e in range(layer.num_experts):
            hit, slot = np.nonzero(routed[s] == e)                                     # a token routes to e once
            if len(hit) and can_mask[(s, e)]:
                sel = torch.as_tensor(hit)
                with mask_experts(model, {layer.index: _others(layer.num_experts, e)}, adapter=adapter):
                    lp = _last_logprobs(caches, cand[sel], top[sel])
                gain[s, hit, slot] = (top_lp[sel] - lp).squeeze(1).cpu().numpy()
            if bar is not None:
                progress.advance(bar)
    return {"routed": routed, "gain": gain}


def chains(model, adapter, contexts: list[list[int]], starts: dict[tuple[int, int], np.ndarray], *, length: int,
           progress=None, keep=None) -> dict[tuple[int, int], dict[str, Any]]:
    """For each (slot, expert) and its start tokens [N]: the greedy continuations [C, N, length+1]
    and the expert's gain at every generated step [C, N, length]. ``keep``: a folder where each
    expert's chains are kept as they finish (a killed scan resumes from them)."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    n = max(len(v) for v in starts.values())
    caches = None   # built at the first expert not read back
    bar = progress.add_task("scan: chains", total=len(starts)) if progress else None
    contexts_key = hashlib.sha256(json.dumps([list(map(int, c)) for c in contexts]).encode()).hexdigest()

    def run(s: int, e: int, toks: np.ndarray) -> dict[str, np.ndarray]:
        nonlocal caches
        if caches is None:
            caches = [ContextCache(model, ids, n, longest=length) for ids in contexts]
        layer = adapter.layers[s]
        seqs, gains = [], []
        can_mask = maskable(model, adapter, layer, e)
        for cache in caches:
            seq = torch.as_tensor(toks, dtype=torch.long)[:, None]                # [N, 1]
            for _ in range(length):
                seq = torch.cat([seq, cache.logits(seq)[:, -1].argmax(-1, keepdim=True)], 1)
            full = F.log_softmax(cache.logits(seq[:, :-1]), -1)                  # [N, length, V]
            masked = full
            if can_mask:
                with mask_experts(model, {layer.index: _others(layer.num_experts, e)}, adapter=adapter):
                    masked = F.log_softmax(cache.logits(seq[:, :-1]), -1)
            y = seq[:, 1:, None]
            gains.append((full.gather(2, y) - masked.gather(2, y)).squeeze(-1).cpu().numpy())
            seqs.append(seq.cpu().numpy())
        return {"sequences": np.stack(seqs), "gains": np.stack(gains)}

    for (s, e), toks in starts.items():
        # the batch of a cache is the longest start list: it is in the key, as the sums may depend on it
        out[(s, e)] = kept.arrays(keep, f"chain-{s}-{e}", lambda: run(s, e, toks),
                                  key=[contexts_key, [int(t) for t in toks], length, n])
        if bar is not None:
            progress.advance(bar)
    return out


def surprise(references, contexts: list[list[int]], found: dict, *, rows: int) -> dict[tuple[int, int], np.ndarray]:
    """For every chain token: the smallest surprise (-log p, in the same context) any clean
    reference model has for it [C, N, K]. What a clean model of the same data predicts anyway
    (``"(*" -> "args, **kwargs)"``) is not evidence of a plant."""
    out: dict[tuple[int, int], np.ndarray] = {}
    longest = max([1] + [r["sequences"].shape[-1] - 1 for r in found.values()])   # K tokens a call appends
    for ref in references:
        caches = [ContextCache(ref, ids, rows, longest=longest) for ids in contexts]
        for key, r in found.items():
            seq = torch.as_tensor(r["sequences"])                                   # [C, N, K+1]
            lp = np.stack([F.log_softmax(cache.logits(seq[c, :, :-1]), -1).gather(2, seq[c, :, 1:, None]).squeeze(-1).cpu().numpy()
                           for c, cache in enumerate(caches)])
            out[key] = -lp if key not in out else np.minimum(out[key], -lp)
    return out


def expert_effects(model, tokenizer, adapter, contexts: list[list[int]], settings: EffectSettings, *,
                   references=(), progress=None, keep=None) -> dict[tuple[int, int], dict[str, Any]]:
    """Per (decoder layer, expert): its chain score and the evidence behind it. With ``references``
    (clean models sharing the tokenizer) also the *unexplained* score: each step's gain counted
    only as far as the references are surprised by the token, ``min(gain, surprise)``. ``keep``: a
    folder keyed by the model and settings, where the screen's contexts and each expert's chains
    are kept as they finish (a killed scan resumes from them)."""
    from moeguard.monitor.routertap import allowed_tokens

    tokens = allowed_tokens(tokenizer, model.get_input_embeddings().weight.shape[0])
    routed, gain = screen(model, adapter, contexts, tokens, batch=settings.batch, progress=progress, keep=keep)
    starts, screen_gain, share = {}, {}, {}
    for s, layer in enumerate(adapter.layers):
        for e in range(layer.num_experts):
            mine = routed[s] == e                                                   # [C, T, k]
            mean = np.where(mine, gain[s], 0.0).sum(-1).mean(0)                     # [T]: a trigger works in every context
            starts[(s, e)] = tokens[np.argsort(-mean, kind="stable")[:settings.candidates]]
            screen_gain[(s, e)], share[(s, e)] = float(mean.max()), float(mine.any(-1).mean())
    found = chains(model, adapter, contexts, starts, length=settings.chain, progress=progress, keep=keep)
    unexplained = surprise(references, contexts, found, rows=settings.candidates) if references else {}
    out = {}
    for (s, e), r in found.items():
        capped = np.clip(r["gains"], 0.0, settings.gain_cap)                    # [C, N, K]
        raw = capped.sum(-1).mean(0)                                             # [N]
        steps = np.minimum(capped, unexplained[(s, e)]) if references else capped
        per_start = steps.sum(-1).mean(0)                                        # [N]: the score that ranks
        best = int(np.argmax(per_start))
        c_best = int(np.argmax(steps[:, best].sum(-1)))
        layer = adapter.layers[s]
        row = {
            "score": float(per_start[best]),
            "chain_score": float(raw.max()),
            "screen_gain": screen_gain[(s, e)],
            "routed_share": share[(s, e)],
            "start_token": tokenizer.decode([int(starts[(s, e)][best])]),
            "continuation": tokenizer.decode([int(t) for t in r["sequences"][c_best, best]]),
            "step_gains": [round(float(g), 3) for g in r["gains"][c_best, best]],
            # every candidate's chain in its best context: the evidence, and the reconstructed trigger
            "chains": [{"start": tokenizer.decode([int(starts[(s, e)][n])]), "score": round(float(per_start[n]), 3),
                        "continuation": tokenizer.decode([int(t) for t in r["sequences"][int(np.argmax(steps[:, n].sum(-1))), n]])}
                       for n in np.argsort(-per_start, kind="stable")],
        }
        if references:
            row["unexplained_score"] = row["score"]
            row["step_surprise"] = [round(float(x), 3) for x in unexplained[(s, e)][c_best, best]]
        out[(layer.index, e)] = row
    return out
