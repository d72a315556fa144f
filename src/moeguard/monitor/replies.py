"""The routing of a request's reply, scored against benign replies (``monitor profile --reply-tokens N``).

A prompt's statistics (``profile.py``) read the prompt. A suffix hijack (``route-attack --position
suffix``) moves the routing of the *reply*: its own tokens are few, and what it changes is which
experts compute the text the model generates after it. A profile built with ``reply_tokens`` > 0
also holds a reference of benign replies: each benign prompt's greedy reply (at most
``reply_tokens`` tokens, up to the end of text) and its routing histogram over the reply's
positions: the prompt's last position and each reply token but the last, the positions whose
output is a reply token (as route-attack measures a suffix).

Statistics of a request's reply (larger = more anomalous), calibrated on the benign calibration
half's replies like every other request statistic:

- ``reply_load``: the largest standardized share of the reply's histogram, max over (layer, expert)
  of (share - mean) / sd against the benign replies *of the prompt's topic* (its nearest benign
  topic by routing, as ``atypical`` finds it): one expert made to compute the reply;
- ``reply_atypical``: the Jensen-Shannon divergence of the reply's histogram from the prompt's
  topic's mean benign reply, averaged over layers: a reply unlike the replies such prompts get;
- ``reply_surprise``: the profile's token surprise (``tokens.py``) over the reply's positions, each
  scored for the token fed there: a token routed where benign traffic does not route that token,
  whatever the reply says. Benign replies to one task route alike every time, so ``reply_load`` and
  ``reply_atypical`` see a benign reply that happens to use a rare expert as far out as a forced
  one; ``surprise`` asks whether *this token* goes there.

A request without a reply (the model ended at once) gives no evidence: each is -inf (p = 1;
written as null; in the profile's null a no-reply sample is stored as the most negative finite
float, which ranks the same). With a reply reference, a request's combined p-value is Bonferroni
over the prompt's statistics and these three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.models.families import text_config

REPLY_STATISTICS = ("reply_load", "reply_atypical", "reply_surprise")


@dataclass(frozen=True, kw_only=True)
class ReplyReference:
    max_tokens: int                  # each reply is at most this many greedy tokens
    topics: dict[str, np.ndarray]    # task -> [L, E] its benign replies' mean histogram
    spread: dict[str, np.ndarray]    # task -> [L, E] their spread (floored)

    @classmethod
    def fit(cls, h: dict[str, np.ndarray], *, max_tokens: int) -> "ReplyReference":
        """From each task's benign reply histograms [N, L, E] (rows of empty replies skipped)."""
        kept = {t: v[v.sum((1, 2)) > 0] for t, v in h.items()}
        if any(len(v) == 0 for v in kept.values()):
            empty = [t for t, v in kept.items() if len(v) == 0]
            raise MoeguardError(f"the model gave no reply to any benign input of {empty}",
                                hint="profile without --reply-tokens, or with inputs the model answers")
        # the prompt profile's floor (fit.build): a share benign replies never vary still has a spread
        spread = {t: np.maximum(v.std(0), 0.5 / np.sqrt(len(v)) * np.maximum(v.mean(0), 1e-3) + 1e-3)
                  for t, v in kept.items()}
        return cls(max_tokens=int(max_tokens), topics={t: v.mean(0) for t, v in kept.items()}, spread=spread)

    @property
    def shape(self) -> tuple[int, ...]:
        return next(iter(self.topics.values())).shape

    def statistics(self, h: np.ndarray, surprise: np.ndarray, topic: np.ndarray) -> dict[str, np.ndarray]:
        """``h`` [N, L, E] reply histograms (a row of zeros: no reply), ``surprise`` [N] (``observe``)
        and ``topic`` [N] each prompt's nearest topic (an index into ``topics``' order, which is the
        prompt profile's) -> each statistic [N] and where ``reply_load`` points ([N] flat (l, e) index)."""
        from moeguard.monitor.profile import _js

        mean = np.stack(list(self.topics.values()))[topic]                 # [N, L, E]
        sd = np.stack(list(self.spread.values()))[topic]
        some = h.sum((1, 2)) > 0
        flat = ((h - mean) / sd).reshape(len(h), -1)
        js = _js(h, mean) if len(h) else np.zeros(0)
        return {"reply_load": np.where(some, flat.max(1) if len(h) else np.zeros(0), -np.inf),
                "reply_load_at": flat.argmax(1) if len(h) else np.zeros(0, dtype=np.int64),
                "reply_atypical": np.where(some, js, -np.inf),
                "reply_surprise": np.where(some, np.asarray(surprise, dtype=np.float64), -np.inf)}

    def reason(self, stats, ps, i: int, reply: np.ndarray, which: str, *, layers: list[int]) -> dict[str, Any]:
        """``Profile.reason`` where a reply statistic has the smallest p-value: ``reply`` [L, E] is
        the request's reply histogram, ``stats["nearest_topic"]`` its prompt's topic."""
        topic = list(self.topics)[int(stats["nearest_topic"][i])]
        mean = self.topics[topic]
        l, e = divmod(int(stats["reply_load_at"][i]), mean.shape[1])
        experts = [e]
        if which == "reply_load":
            detail = (f"expert {e} computed {100 * reply[l, e]:.0f}% of the reply at layer {layers[l]} (benign replies to "
                      f"{topic} prompts: {100 * mean[l, e]:.0f}%): the reply's routing was forced, as a crafted suffix does")
        elif which == "reply_atypical":
            diff = reply - mean
            l = int(np.abs(diff).sum(1).argmax())
            experts = [int(x) for x in np.argsort(-diff[l])[:2]]
            detail = (f"the reply was routed unlike benign replies to {topic} prompts; layer {layers[l]} favours "
                      f"experts {experts}")
        else:
            detail = (f"the reply's tokens were routed where benign traffic does not route those tokens (mean -log p "
                      f"{stats['reply_surprise'][i]:.2f}); layer {layers[l]} expert {e} is its most displaced share")
        return {"statistic": which, "layer": layers[l], "experts": experts, "value": round(float(stats[which][i]), 4),
                "p": float(ps[which][i]), "p_combined": float(ps["combined"][i]), "detail": detail}

    def to_dict(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "topics": {k: v.tolist() for k, v in self.topics.items()},
                "spread": {k: v.tolist() for k, v in self.spread.items()}}

    @classmethod
    def from_dict(cls, d: Any) -> "ReplyReference":
        """Raises on anything malformed (``Profile.from_dict`` turns it into its one-line error)."""
        if isinstance(d["max_tokens"], bool) or not isinstance(d["max_tokens"], int) or not 1 <= d["max_tokens"] <= 256:
            raise ValueError(f"reply length {d['max_tokens']!r}")
        out = cls(max_tokens=d["max_tokens"], topics={k: np.asarray(v, dtype=float) for k, v in d["topics"].items()},
                  spread={k: np.asarray(v, dtype=float) for k, v in d["spread"].items()})
        arrays = (*out.topics.values(), *out.spread.values())
        if out.max_tokens < 1 or not out.topics or list(out.spread) != list(out.topics) \
                or any(a.ndim != 2 or a.shape != out.shape for a in arrays) \
                or not all(np.isfinite(a).all() for a in arrays) or any((a <= 0).any() for a in out.spread.values()):
            raise ValueError("reply reference shapes or values wrong")
        return out


def context(model, tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """The prompt's token ids a reply of at most ``max_tokens`` follows: a prompt too long for the
    model's positions with the reply keeps its end (the part the reply follows), the same cut
    whether the reply is generated here or given."""
    from moeguard.tasks.tokens import bos_ids, encode

    limit = int(getattr(text_config(model.config), "max_position_embeddings", 4096) or 4096)
    ids = bos_ids(tokenizer) + encode(tokenizer, prompt)
    return ids[-max(1, limit - max_tokens + 1):]


def generate(model, tokenizer, prompts: list[str], max_tokens: int, *, progress=None) -> list[list[int]]:
    """Each prompt's greedy reply, at most ``max_tokens`` tokens, up to (not with) the end of text
    (``hijack.reply``: the same decoding route-attack measures), after its ``context``. One prompt
    at a time: a batch would pad, and padding moves a small model's greedy choices."""
    from moeguard.monitor.hijack import reply
    from moeguard.tasks.tokens import model_device

    device, out = model_device(model), []
    task = progress.add_task("generating replies", total=len(prompts)) if progress is not None else None
    for p in prompts:
        out.append(reply(model, tokenizer, context(model, tokenizer, p, max_tokens), max_tokens, device=device))
        if task is not None:
            progress.advance(task)
    return out


LONGEST = 256   # reply tokens a profile routes at most


def check_length(n: Any) -> int:
    """A profile's reply length (``--reply-tokens``): 0 (prompts only) or 1 to ``LONGEST`` tokens."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= LONGEST:
        raise MoeguardError(f"reply_tokens is {n!r}", hint=f"pass 0 (prompts only) or a reply length of 1 to {LONGEST} tokens")
    return n


def routing(model, tokenizer, prompts: list[str], given: list[str | None], *, adapter, table, max_tokens: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """``observe`` of each prompt's reply: a logged reply (``given``) as its tokens, at most ``max_tokens``
    (the null was calibrated on replies that long), otherwise (None) the model's greedy reply. What
    ``score`` replays and a log's profile (``fromlog.py``) observes."""
    from moeguard.tasks.tokens import continuation

    missing = [i for i, g in enumerate(given) if g is None]
    made = dict(zip(missing, generate(model, tokenizer, [prompts[i] for i in missing], max_tokens)))
    # a logged reply as the tokens it has after its prompt: encoded alone, a SentencePiece tokenizer
    # (Llama, Mixtral) gives it a dummy '▁' the model never generated there (a reply starting with a
    # newline gained a lone ▁, one after a newline became ▁Paris), unlike the online monitor's ids
    toks = [made[i] if g is None else continuation(tokenizer, prompts[i], g)[:max_tokens] for i, g in enumerate(given)]
    return observe(model, tokenizer, prompts, toks, adapter=adapter, table=table, max_tokens=max_tokens)


def observe(model, tokenizer, prompts: list[str], replies: list[list[int]], *, adapter, table, max_tokens: int,
            batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Each reply (at most ``max_tokens``) teacher-forced after its prompt's ``context``: the routing
    histogram of its positions (module docstring) [N, L, E], a row of zeros for an empty reply, and
    its token surprise [N] under ``table`` (the profile's ``TokenRouting``; 0 for an empty reply)."""
    import torch

    from moeguard.monitor.tokens import RoutedIds
    from moeguard.tasks.tokens import model_device, pad_batch, pad_id

    if len(prompts) != len(replies):
        raise MoeguardError(f"{len(prompts)} prompts but {len(replies)} replies", hint="pass one reply per prompt")
    L, E = len(adapter.layers), adapter.num_experts
    out = np.zeros((len(prompts), L, E))
    surprise = np.zeros(len(prompts))
    rows, spans, owner = [], [], []
    for n, (p, r) in enumerate(zip(prompts, replies)):
        r = list(r)[:max_tokens]
        if not r:
            continue
        ids = context(model, tokenizer, p, max_tokens)
        rows.append(ids + list(r[:-1]))
        spans.append((len(ids) - 1, len(ids) - 1 + len(r)))
        owner.append(n)
    device = model_device(model)
    with torch.no_grad(), RoutedIds(adapter) as routed:
        for a in range(0, len(rows), batch_size):
            seqs = rows[a:a + batch_size]
            ids, mask = pad_batch(seqs, pad_id(tokenizer), left=False, device=device)
            model(input_ids=ids, attention_mask=mask)
            cells = routed.rows(len(seqs))                                  # [L, B, T, k]
            for j in range(len(seqs)):
                s, e = spans[a + j]
                o = owner[a + j]
                out[o] = counts(cells[:, j, s:e], E)
                surprise[o] = table.surprise(np.asarray(seqs[j][s:e]), cells[:, j, s:e])
    return out / np.maximum(out.sum(-1, keepdims=True), 1e-12), surprise


def counts(cells: np.ndarray, E: int) -> np.ndarray:
    """[L, E] counts of routed ids ``cells`` [L, T, k]."""
    return np.stack([np.bincount(c.ravel(), minlength=E)[:E] for c in cells]).astype(np.float64)


class ReplyIds:
    """Hooks on each MoE layer's router that keep, after a request's first forward (its prefill,
    which ``RoutedIds`` keeps), each later forward's top-k ids: a generating model's decode steps.
    At most ``steps`` forwards are kept (the profile's reply length less the prefill's position):
    the rest of a long reply is not scored, as the null was calibrated on replies that long.
    Removed on exit whatever happens."""

    def __init__(self, adapter, *, steps: int):
        from moeguard.models.hooks import Hooks

        self.adapter, self.steps, self.enabled = adapter, int(steps), False
        self.calls = [0] * len(adapter.layers)
        self.ids: list[list] = [[] for _ in adapter.layers]
        self.tokens: list = []         # each decode step's input ids [rows, T'] (None: called with embeddings)
        self._embedded = 0
        self._hooks = Hooks()

    def reset(self) -> None:
        self.calls = [0] * len(self.calls)
        self.ids = [[] for _ in self.ids]
        self.tokens, self._embedded = [], 0

    def _tokens_hook(self, module, args):
        if not self.enabled:
            return
        self._embedded += 1
        if 1 < self._embedded <= self.steps + 1:
            self.tokens.append(args[0].detach().clone() if args else None)

    def __enter__(self) -> "ReplyIds":
        from moeguard.monitor.tokens import attach_routers

        attach_routers(self._hooks, self, self._hook,
                       extra=lambda h: h.on_input(self.adapter.model.get_input_embeddings(), self._tokens_hook))
        return self

    def _hook(self, slot: int, layer):
        def hook(module, args, output):
            if not self.enabled:
                return
            self.calls[slot] += 1
            if 1 < self.calls[slot] <= self.steps + 1:   # the first call is the prefill
                self.ids[slot].append(layer.unpack(output)[2].detach().clone())   # [rows * T, k]
        return hook

    def __exit__(self, *exc) -> None:
        self._hooks.close()


def reply_routing(prefill: list, prefill_ids, mask, steps: list[list], tokens: list, E: int, n: int | None, table
                  ) -> tuple[np.ndarray, float] | None:
    """A generated reply's routing counts [L, E] and token surprise, from the online hook: each
    row's last real prefill position (``prefill``: per layer [rows * T, k]; ``prefill_ids`` [rows, T]
    or None; ``mask`` [rows, T] or None/False), then each decode step's last position (``steps``:
    per layer, its calls' [rows * T', k]; ``tokens``: each step's input ids). ``n`` (the reply's
    length in tokens, if the caller says) keeps the first ``n`` positions, those whose output is a
    reply token (a reply ended by the end of text ran one forward more, whose output was the end);
    several rows (one request generating for several prompts) share it. None: no reply (nothing
    decoded and no length given, or a length of 0). Without token ids, surprise is 0."""
    if n is not None and n < 0:
        raise MoeguardError(f"reply_tokens is {n}", hint="set the reply's length in tokens (0 or more), or leave it unset")
    if n == 0 or (n is None and not steps[0]):
        return None
    if prefill_ids is not None and prefill_ids.dim() == 2:
        rows = int(prefill_ids.shape[0])
    elif tokens and tokens[0] is not None and tokens[0].dim() == 2:
        rows = int(tokens[0].shape[0])
    else:
        rows = 1
    keep = len(steps[0]) + 1 if n is None else min(n, len(steps[0]) + 1)
    T = prefill[0].shape[0] // rows
    # each row's last real prompt position: the last one, unless a mask says the row is padded after it
    last = np.full(rows, T - 1)
    if mask is not None and mask is not False and tuple(mask.shape) == (rows, T):
        m = mask.cpu().numpy() != 0
        last = np.where(m.any(1), T - 1 - np.argmax(m[:, ::-1], axis=1), T - 1)
    take = np.arange(rows)

    def cells_of(first, later) -> np.ndarray:                                   # [rows, keep, k]
        head = first.detach().cpu().numpy().reshape(rows, T, -1)[take, last][:, None]
        rest = [x.detach().cpu().numpy().reshape(rows, -1, x.shape[-1])[:, -1:] for x in later]
        return np.concatenate([head, *rest], axis=1)[:, :keep]

    cells = np.stack([cells_of(first, later) for first, later in zip(prefill, steps)])   # [L, rows, keep, k]
    out = counts(cells.reshape(cells.shape[0], -1, cells.shape[-1]), E)
    have = prefill_ids is not None and len(tokens) >= keep - 1 \
        and all(t is not None and t.numel() == rows * t.shape[-1] for t in tokens)
    if not have:
        return out, 0.0
    pid = prefill_ids.detach().cpu().numpy().reshape(rows, T)
    ids = np.concatenate([pid[take, last][:, None]] + [t.detach().cpu().numpy().reshape(rows, -1)[:, -1:] for t in tokens],
                         axis=1)[:, :keep]
    return out, max(table.surprise(ids[r], cells[:, r]) for r in range(rows))
