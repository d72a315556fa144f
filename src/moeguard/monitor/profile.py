"""The reference routing profile of benign traffic, and the statistics a request or a client's
window of requests is scored by (``moeguard monitor profile`` / ``score``; docs/routing-security.md).

A request's **routing histogram** is, per MoE layer, the share of its routing assignments each
expert received ([L, E], rows sum to 1; padding excluded). From benign requests (the given tasks'
inputs), split in two halves by a seeded shuffle:

- the **fit half** gives per (layer, expert) the mean and spread of a request's share, each
  task's mean histogram (the benign *topics*), and each topic's reference embeddings
  (``embed.py``: the model's final hidden state, pooled and projected);
- the **calibration half** gives the null distribution of every statistic below, so a score is
  turned into an empirical p-value, ``(1 + #{benign >= s}) / (n + 1)``: calibrated on held-out
  benign traffic, never on a tuned threshold.

Statistics (larger = more anomalous), each with where it points:

- ``load``: the largest standardized share, max over (layer, expert) of (share - mean) / sd:
  one expert forced to take a request (routing hijack, expert saturation);
- ``atypical``: the Jensen-Shannon divergence from the nearest benign topic, averaged over
  layers: routing unlike any benign use (random-token probing, crafted inputs);
- ``unfamiliar``: -log of the request's embedding density under its nearest benign topic: a
  prompt unlike any benign one, even where it routes like one (``embed.py``);
- ``surprise``: the largest mean, over 16 consecutive tokens, of how unlikely each token's experts
  are *for that token* under benign routing: the tokens a crafted prefix moves (``tokens.py``);
- windows of a client's ``window`` requests get ``load`` and ``atypical`` on their mean histogram,
  ``evidence``, the mean of -log p of their requests, and ``drift``, the MMD between their
  embeddings and benign references of the same topic mix (``embed.py``); all calibrated on benign windows drawn
  from the calibration half: one from a single topic per window (a benign single-topic user,
  the hard negative) or mixed, alternately. (Each calibration request's own p-value, which
  ``evidence`` averages, leaves that request out of its null, as a fresh request is scored: in-sample
  p-values are larger, and fresh benign windows of 16 exceeded that null at 0.05 on 13%.)

A p-value is the smallest of its statistics' p-values times their number (Bonferroni).
"""

from __future__ import annotations

import bisect
import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.io import kept_arrays
from moeguard.monitor.embed import Embedding, KernelReference
from moeguard.monitor.replies import REPLY_STATISTICS, ReplyReference
from moeguard.monitor.tokens import SEGMENT, RoutedIds, TokenRouting, TokenRoutingCounts

SCHEMA = "moeguard.routing-profile/2"      # /2: with the embedding and token statistics
STATISTICS = ("load", "atypical", "unfamiliar", "surprise")         # of a request
WINDOW_STATISTICS = ("load", "atypical", "evidence", "drift")       # of a client's window


def empirical_p(null: np.ndarray, values) -> np.ndarray:
    """``(1 + #{benign >= s}) / (n + 1)`` for each value ``s`` against a sorted ``null``: the calibrated
    p-value every statistic (request, window, slice) is given."""
    return (1 + len(null) - np.searchsorted(null, values, side="left")) / (len(null) + 1)


def histograms(model, tokenizer, prompts: list[str], **kw) -> np.ndarray:
    """[N, L, E] routing histograms of ``prompts`` (``observe``'s first part)."""
    return observe(model, tokenizer, prompts, **kw)[0]


def observe(model, tokenizer, prompts: list[str], *, batch_size: int = 16, max_length: int | None = None,
            adapter=None, tokens: TokenRoutingCounts | TokenRouting | None = None,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Per prompt, from one forward: its routing histogram [N, L, E] (padding excluded), the sum of
    its final hidden states [N, hidden], its token count [N] (``embed.py``), and with a token
    table its ``surprise`` [N] (``tokens.py``; with counts instead, the prompts' routing is added
    to them and ``None`` returned). A prompt longer than ``max_length`` tokens (default: the
    model's positions) is routed as consecutive chunks of that length and their
    assignments summed (surprise: the largest of its chunks'): a payload placed after a long
    benign opening is still seen."""
    import torch

    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.hooks import RoutingCapture
    from moeguard.monitor.embed import PooledHidden
    from moeguard.tasks.tokens import bos_ids, encode, model_device, pad_batch, pad_id

    adapter = adapter or MoEAdapter(model)
    device = model_device(model)
    if max_length is None:
        # the model's own limit (not lower): the online hook sees a served prompt in one forward,
        # and offline replay must route it the same way
        max_length = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
    head = bos_ids(tokenizer)
    rows, owner = [], []                      # token chunks, and the prompt each belongs to
    for n, p in enumerate(prompts):
        ids = head + encode(tokenizer, p)
        for a in range(0, max(len(ids), 1), max_length):
            rows.append(ids[a:a + max_length])
            owner.append(n)
    counts = np.zeros((len(prompts), len(adapter.layers), adapter.num_experts))
    sums: np.ndarray | None = None
    ntok = np.zeros(len(prompts))
    surprise = np.zeros(len(prompts)) if isinstance(tokens, TokenRouting) else None
    with torch.no_grad(), PooledHidden(adapter) as pooled, RoutedIds(adapter) as routed:
        for i in range(0, len(rows), batch_size):
            seqs = rows[i:i + batch_size]
            ids, mask = pad_batch(seqs, pad_id(tokenizer), left=False, device=device)
            pooled.mask, pooled.sums = mask, []
            with RoutingCapture(model, per_sample=True, adapter=adapter) as cap:
                model(input_ids=ids, attention_mask=mask)
            hidden = pooled.sums[0].double().numpy()      # [B, hidden]
            per_token = routed.rows(len(seqs)) if tokens is not None else None   # [L, B, T, k]
            if sums is None:
                sums = np.zeros((len(prompts), hidden.shape[1]))
            for j, h in enumerate(cap.stats.per_sample):  # each row's shares, weighted by its tokens
                o, n = owner[i + j], len(seqs[j])
                counts[o] += h.numpy() * n
                sums[o] += hidden[j]
                ntok[o] += n
                if per_token is not None:
                    r = per_token[:, j, :n]
                    if surprise is None:
                        tokens.add(np.asarray(seqs[j]), r)
                    else:
                        surprise[o] = max(surprise[o], tokens.surprise(np.asarray(seqs[j]), r))
    if sums is None:
        sums = np.zeros((0, 1))
    return counts / np.maximum(counts.sum(-1, keepdims=True), 1e-12), sums, ntok, surprise


def _js(h: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (nats) of histograms h [..., L, E] from ref [..., L, E] (broadcast),
    mean over layers."""
    m = (h + ref) / 2

    def kl(a, b):   # 0 log 0 = 0; b >= a / 2 > 0 wherever a > 0, so nothing divides by zero
        return (a * np.log(np.where(a > 0, a, 1.0) / np.maximum(b, 1e-12))).sum(-1)
    return ((kl(h, m) + kl(ref, m)) / 2).mean(-1)


@dataclass(frozen=True, kw_only=True)
class Profile:
    meta: dict[str, Any]             # model, tasks, sizes, window, seed
    mean: np.ndarray                 # [L, E] mean share per request
    sd: np.ndarray                   # [L, E] its spread (floored)
    topics: dict[str, np.ndarray]    # task -> [L, E] mean histogram
    null: dict[str, np.ndarray]      # "request.load", "window.atypical", ... -> sorted benign values
    space: Embedding                 # hidden sums -> unit embeddings (embed.py)
    kernel: KernelReference          # benign embeddings per topic; unfamiliar and drift
    tokens: TokenRouting             # benign routing per token; surprise
    replies: ReplyReference | None = None   # benign replies' routing (replies.py); None: prompts only

    @property
    def request_statistics(self) -> tuple[str, ...]:
        """The statistics of a request: the prompt's, and its reply's where the profile has replies."""
        return STATISTICS + (REPLY_STATISTICS if self.replies is not None else ())

    @cached_property
    def _topic_stack(self) -> np.ndarray:
        """[topics, L, E]: the topics' histograms, stacked once (the online hook scores per request)."""
        return np.stack(list(self.topics.values()))

    # --- statistics --------------------------------------------------------------------------
    def statistics(self, h: np.ndarray, x: np.ndarray | None, surprise: np.ndarray | None = None,
                   reply: np.ndarray | None = None, reply_surprise: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``h`` [N, L, E] histograms, ``x`` [N, dim] embeddings (``None``: windows, which use
        ``drift`` instead) and (requests) ``surprise`` [N] from ``observe`` -> each statistic [N],
        with where ``load`` points ([N] flat (l, e) index) and the nearest topics; ``reply`` [N, L, E]
        and ``reply_surprise`` [N]: the replies' (``replies.observe``), scored where the profile has
        replies. Computed in
        blocks of rows: a log of 100k requests never builds [N, topics, L, E] at once."""
        if len(h) > 1024:
            cut = lambda v, a: None if v is None else v[a:a + 1024]   # noqa: E731
            parts = [self.statistics(h[a:a + 1024], cut(x, a), cut(surprise, a), cut(reply, a), cut(reply_surprise, a))
                     for a in range(0, len(h), 1024)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        z = (h - self.mean) / self.sd
        flat = z.reshape(len(h), -1)
        js = _js(h[:, None], self._topic_stack)                                # [N, topics]
        out = {"load": flat.max(1), "load_at": flat.argmax(1), "atypical": js.min(1), "nearest_topic": js.argmin(1)}
        if x is not None:
            out["unfamiliar"], out["nearest_embedded"] = self.kernel.unfamiliar(x)
        if surprise is not None:
            out["surprise"] = np.asarray(surprise, dtype=np.float64)
        if self.replies is not None and x is not None:
            if reply is None or reply_surprise is None:   # a silent skip would score against a null calibrated with replies
                raise MoeguardError("the profile scores replies, and no reply histograms were given",
                                    hint="pass the requests' replies (replies.histograms), or use a profile without them")
            out.update(self.replies.statistics(reply, reply_surprise, out["nearest_topic"]))
        return out

    def check_hidden(self, hidden: int | None) -> None:
        """A one-line error unless the model's hidden size (``None``: unknown) is the profile's."""
        if hidden is not None and hidden != self.space.hidden:
            raise MoeguardError(f"the profile was made for hidden size {self.space.hidden}, the model has {hidden}",
                                hint="use the profile made for this model")

    def check_routing(self, adapter) -> None:
        """A one-line error unless the model (its ``MoEAdapter``) has the profile's MoE layers x experts:
        a checkpoint pruned or re-made at the same path keeps its name."""
        check_uniform(adapter)
        L, E = len(adapter.layers), adapter.num_experts
        if (L, E) != self.mean.shape:
            raise MoeguardError(f"the profile has {self.mean.shape[0]} MoE layers x {self.mean.shape[1]} experts, "
                                f"the model {L} x {E}", hint="use the profile made for this model, or profile it")
        k = self.meta.get("top_k", adapter.top_k)
        if k != adapter.top_k:   # every histogram and token-routing cell counts top-k choices
            raise MoeguardError(f"the profile was made with top-{k} routing, the model routes top-{adapter.top_k}",
                                hint="use the profile made for this model, or profile it")

    def check_model(self, name: str, weights: dict | None = None) -> None:
        """A one-line error unless the profile was made for this model: a same-shaped fine-tuned or
        pruned model routes differently, and every p-value with it. ``weights``: the model's
        ``weights_digest``; where the profile has one too (and either says something: a local
        checkpoint's files, a cached hub commit) the weights are compared, so the same checkpoint
        named another way (./ckpt, ckpt/) matches and one re-saved at the same path does not.
        Otherwise the names are (a profile made before the digest was kept)."""
        mine = self.meta.get("weights")
        if mine and weights and (mine.get("files") or mine.get("revision")):
            if mine != weights:
                raise MoeguardError(f"the profile was made for other weights ({self.meta.get('model')}) than {name}'s",
                                    hint="use the profiled model (--model), or profile this one")
            return
        if name != self.meta.get("model"):
            raise MoeguardError(f"the profile was made for {self.meta.get('model')}, not {name}",
                                hint="use the profiled model (--model), or profile this one")

    def p_floor(self, level: str) -> float:
        """The smallest combined p-value ``level`` ("request" or "window") can give: with fewer
        benign calibration samples than (statistics / alpha), nothing there can alert at alpha."""
        names = self.request_statistics if level == "request" else WINDOW_STATISTICS
        return min(1.0, len(names) / (len(self.null[f"{level}.load"]) + 1))

    @cached_property
    def _null_lists(self) -> dict[str, list[float]]:
        return {k: v.tolist() for k, v in self.null.items()}

    def p_values(self, stats: dict[str, np.ndarray], level: str, *, own: bool = False) -> dict[str, np.ndarray]:
        """Each statistic's empirical p-value and their Bonferroni ``combined``. ``own``: the rows are
        the null's own samples, each left out of its own null (what it would get as a fresh request)."""
        out = {}
        names = self.request_statistics if level == "request" else WINDOW_STATISTICS
        values = [stats[s] for s in names]
        if not own and all(len(v) == 1 and v[0] == v[0] for v in values):
            # one row, no NaN (the online hook, per request): bisect on lists, the same numbers as
            # searchsorted below at a tenth of the calls
            for s, v in zip(names, values):
                null = self._null_lists[f"{level}.{s}"]
                out[s] = np.array([(1 + len(null) - bisect.bisect_left(null, float(v[0]))) / (len(null) + 1)])
            out["combined"] = np.array([min(1.0, len(names) * min(float(out[s][0]) for s in names))])
            return out
        for s in names:
            null = self.null[f"{level}.{s}"]
            # own: 1 + (#{benign >= s} - itself) of the n - 1 others
            out[s] = (len(null) - np.searchsorted(null, stats[s], side="left")) / len(null) if own \
                else empirical_p(null, stats[s])
        out["combined"] = np.minimum(1.0, len(names) * np.min(np.stack([out[s] for s in names]), axis=0))
        return out

    def window_statistics(self, h: np.ndarray, request_p: list[np.ndarray], xs: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Windows' statistics: ``h`` [W, L, E] their mean histograms, ``request_p`` each window's
        requests' combined p-values, ``xs`` each window's embeddings [n, dim]. ``evidence`` is the
        mean of -log p over the window: requests each only somewhat unusual add up (Fisher's idea,
        calibrated on benign windows); ``drift`` the window's MMD from benign use of its topics."""
        out = self.statistics(h, None)
        out["evidence"] = np.array([float(np.mean(-np.log(p))) for p in request_p])
        out["drift"] = np.array([self.kernel.drift(x) for x in xs])
        return out

    def reason(self, stats: dict[str, np.ndarray], ps: dict[str, np.ndarray], i: int, h: np.ndarray,
               reply: np.ndarray | None = None) -> dict[str, Any]:
        """Row ``i``'s alert reason: the statistic with the smallest p-value, and the layer and
        experts it points at (``h`` [L, E] its histogram, ``reply`` [L, E] its reply's). Offline
        scoring and the online hook share it."""
        layers, E = self.meta["layers"], self.mean.shape[1]
        which = min([k for k in ("load", "atypical", "unfamiliar", "surprise", *REPLY_STATISTICS, "evidence", "drift")
                     if k in ps], key=lambda s: ps[s][i])
        if which in REPLY_STATISTICS and reply is not None:
            return self.replies.reason(stats, ps, i, reply, which, layers=layers)
        l, e = divmod(int(stats["load_at"][i]), E)
        experts = [e]
        displaced = f"most displaced: expert {e} at layer {layers[l]}, {100 * h[l, e]:.0f}% (benign {100 * self.mean[l, e]:.0f}%)"
        if which == "evidence":  # point at the window's most displaced (layer, expert), as load does
            detail = f"its requests were jointly unlikely (mean -log p {stats['evidence'][i]:.2f}); {displaced}"
        elif which == "drift":
            detail = (f"its prompts are distributed unlike benign use of the same topics (MMD^2 {stats['drift'][i]:.3f} in "
                      f"the model's representation; a selected, spread or synthetic query stream); {displaced}")
        elif which == "surprise":
            detail = (f"a stretch of its tokens was routed where benign traffic does not route those tokens (mean "
                      f"-log p {stats['surprise'][i]:.2f} over {SEGMENT} tokens: a routing hijack's signature); {displaced}")
        elif which == "unfamiliar":
            topic = self.kernel.names[int(stats["nearest_embedded"][i])]
            detail = (f"its prompt is unlike every benign one in the model's representation (nearest: {topic}, "
                      f"-log density {stats['unfamiliar'][i]:.2f}); {displaced}")
        elif which == "load":
            detail = f"expert {e} took {100 * h[l, e]:.0f}% of the routing at layer {layers[l]} (benign {100 * self.mean[l, e]:.0f}%)"
        else:
            topic = list(self.topics)[int(stats["nearest_topic"][i])]
            diff = h - self.topics[topic]
            l = int(np.abs(diff).sum(1).argmax())
            experts = [int(x) for x in np.argsort(-diff[l])[:2]]
            detail = f"routing unlike any benign topic (nearest: {topic}); layer {layers[l]} favours experts {experts}"
        return {"statistic": which, "layer": layers[l], "experts": experts, "value": round(float(stats[which][i]), 4),
                "p": float(ps[which][i]), "p_combined": float(ps["combined"][i]), "detail": detail}

    # --- storage -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **self.meta, "mean": self.mean.tolist(), "sd": self.sd.tolist(),
                "topics": {k: v.tolist() for k, v in self.topics.items()},
                "null": {k: v.tolist() for k, v in self.null.items()},
                "embedding": self.space.to_dict(), "kernel": self.kernel.to_dict(), "token_routing": self.tokens.to_dict(),
                **({"replies": self.replies.to_dict()} if self.replies is not None else {})}

    @classmethod
    def from_dict(cls, d: Any, *, where: str) -> "Profile":
        from moeguard.monitor import ladder, slices

        fix = "make it with `moeguard monitor profile --out P`"
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise MoeguardError(f"{where} is not a routing profile of this version (schema {got!r}, expected {SCHEMA})",
                                hint=fix)
        try:
            mean, sd = np.asarray(d["mean"], dtype=float), np.asarray(d["sd"], dtype=float)
            topics = {k: np.asarray(v, dtype=float) for k, v in d["topics"].items()}
            null = {k: np.sort(np.asarray(v, dtype=float)) for k, v in d["null"].items()}
            space, kernel = Embedding.from_dict(d["embedding"]), KernelReference.from_dict(d["kernel"])
            tokens = TokenRouting.from_dict(d["token_routing"])
            replies = ReplyReference.from_dict(d["replies"]) if d.get("replies") is not None else None
            meta = {k: v for k, v in d.items()
                    if k not in ("schema", "mean", "sd", "topics", "null", "embedding", "kernel", "token_routing", "replies")}
        except Exception as e:  # noqa: BLE001 -- any malformed content (overflow, huge sizes, bad base64) is one line
            raise MoeguardError(f"{where} is a damaged routing profile ({type(e).__name__}: {e})", hint=fix) from None
        finite = all(np.isfinite(a).all() for a in (mean, sd, *topics.values(), *null.values()))
        if mean.ndim != 2 or sd.shape != mean.shape or not topics or any(t.shape != mean.shape for t in topics.values()) \
                or not finite or (sd <= 0).any() or any(v.ndim != 1 or len(v) == 0 for v in null.values()) \
                or any(f"request.{s}" not in null for s in STATISTICS) \
                or any(f"window.{s}" not in null for s in WINDOW_STATISTICS) \
                or space.centre is None or space.centre.shape != (space.dim,) \
                or any(r.ndim != 2 or r.shape[1] != space.dim or len(r) < 2 for r in kernel.refs) \
                or tokens.counts.shape[1:] != mean.shape or tokens.marginal.shape != mean.shape \
                or (replies is not None and (replies.shape != mean.shape or list(replies.topics) != list(topics)
                                             or replies.max_tokens != d.get("reply_tokens")
                                             or any(len(null.get(f"request.{s}", ())) != len(null["request.load"])
                                                    for s in REPLY_STATISTICS))):
            raise MoeguardError(f"{where} is a damaged routing profile (shapes, values or null samples wrong or missing)",
                                hint=fix)
        if not isinstance(meta.get("window"), int) or meta["window"] < 1 or not isinstance(meta.get("layers"), list) \
                or len(meta["layers"]) != mean.shape[0] or not ladder.check_profile(meta, null) \
                or not slices.check_profile(meta, null):
            raise MoeguardError(f"{where} is a damaged routing profile (window, early looks, slices or layers missing)",
                                hint=fix)
        return cls(meta=meta, mean=mean, sd=sd, topics=topics, null=null, space=space, kernel=kernel, tokens=tokens,
                   replies=replies)


def check_uniform(adapter) -> None:
    """A one-line error unless every MoE layer has the same number of experts: a request's
    histogram is one [layers, experts] array (a budget-pruned checkpoint keeps counts per layer)."""
    counts = {l.index: l.num_experts for l in adapter.layers}
    if len(set(counts.values())) > 1:
        raise MoeguardError(f"the routing monitor needs the same number of experts in every MoE layer; this model "
                            f"has {counts} (a budget-pruned checkpoint)",
                            hint="monitor the model as served before budget pruning, or prune it with --keep")


def build(model, tokenizer, prompts: dict[str, list[str]], *, window: int = 16, windows: int | None = None,
          seed: int = 0, name: str = "", cache: Path | None = None, progress=None, reply_tokens: int = 0,
          early: tuple[int, ...] | None = None, slice_len: int = 0) -> Profile:
    """The profile of benign ``prompts`` (task -> inputs); see the module docstring. ``reply_tokens``
    > 0: each benign input's greedy reply of at most that many tokens is routed too, and the profile
    scores requests' replies (``replies.py``). With ``cache``
    (``io.resumable_scratch``), each task's observed arrays are kept there as they finish and read
    back on a resumed run: the same numbers as one uninterrupted build. ``early``: lengths at which
    a client's window is also scored as it grows (``ladder.py``); ``windows``: benign windows per
    calibration set (default 400, or ``ladder.BENIGN_BLOCKS`` with early lengths); ``slice_len``: requests
    per slice of all traffic (``slices.py``; 0: none), as many benign slices calibrated."""
    from moeguard.models.adapter import MoEAdapter
    from moeguard.monitor import ladder, replies, slices

    if window < 1:
        raise MoeguardError(f"window is {window}", hint="pass a window of at least 1 request")
    early = ladder.check_early(early, window)
    slice_len = slices.check_slice(slice_len)
    windows = windows if windows is not None else (ladder.BENIGN_BLOCKS if early else 400)
    reply_tokens = replies.check_length(reply_tokens)
    for t, ps in prompts.items():             # before any forward
        if len(ps) < 4:
            raise MoeguardError(f"task '{t}' gives {len(ps)} benign inputs", hint="a profile needs at least 4 per task")
    rng = np.random.default_rng(seed)
    held_out = sum(len(ps) - len(ps) // 2 for ps in prompts.values())
    if held_out < window:   # every benign window would repeat requests, inflating drift's null and every spread
        raise MoeguardError(f"a window of {window} requests is larger than the {held_out} benign calibration requests "
                            "(half of each task's inputs)", hint=f"pass --window of at most {held_out}, or profile more inputs")
    adapter = MoEAdapter(model)
    check_uniform(adapter)
    fit, cal, cal_topic = [], [], []
    fit_hidden, cal_hidden = [], []           # (hidden sums, token counts) of each half
    topics, held = {}, {}
    vocab = int(model.get_input_embeddings().weight.shape[0])
    counts = TokenRoutingCounts(vocab=vocab, layers=len(adapter.layers), experts=adapter.num_experts)
    bar = progress.add_task("profiling benign requests", total=sum(map(len, prompts.values()))) if progress else None

    def fit_part(ps: list[str]) -> dict[str, np.ndarray]:
        # each task's token counts apart, merged in task order (TokenRoutingCounts.merge): a
        # resumed build reads a finished task's counts instead of observing it again
        own = TokenRoutingCounts(vocab=vocab, layers=len(adapter.layers), experts=adapter.num_experts)
        h, sums, ntok, _ = observe(model, tokenizer, ps, adapter=adapter, tokens=own)
        return {"h": h, "sums": sums, "ntok": ntok, **own.arrays()}

    def reply_part(ps: list[str]) -> dict[str, np.ndarray]:
        from moeguard.monitor import replies

        h, surprise = replies.observe(model, tokenizer, ps, replies.generate(model, tokenizer, ps, reply_tokens),
                                      adapter=adapter, table=table, max_tokens=reply_tokens)
        return {"h": h, "surprise": surprise}

    fit_replies, cal_replies = {}, []
    for i, (t, ps) in enumerate(prompts.items()):   # the fit half: statistics' parameters, and the token table
        order = rng.permutation(len(ps))
        half = len(ps) // 2
        z = kept_arrays(cache, f"fit-{i}", lambda: fit_part([ps[j] for j in order[:half]]))
        if reply_tokens:   # their routing only: the token table is the prompts' (the fit half's, complete below)
            fit_replies[t] = [ps[j] for j in order[:half]]
        counts.merge(z["count_tokens"], z["counts"])
        fit.append(z["h"])
        fit_hidden.append((z["sums"], z["ntok"]))
        topics[t] = z["h"].mean(0)
        held[t] = [ps[j] for j in order[half:]]
        if bar is not None:
            progress.advance(bar, half)
    table = counts.table(adapter.top_k, getattr(tokenizer, "bos_token_id", None))
    for i, t in enumerate(fit_replies):
        ps = fit_replies[t]
        fit_replies[t] = kept_arrays(cache, f"reply-fit-{i}", lambda: reply_part(ps))["h"]
    cal_surprise = []
    for i, (t, ps) in enumerate(held.items()):   # the calibration half: every statistic's null
        z = kept_arrays(cache, f"calibration-{i}", lambda: dict(zip(
            ("h", "sums", "ntok", "surprise"), observe(model, tokenizer, ps, adapter=adapter, tokens=table))))
        cal.append(z["h"])
        cal_hidden.append((z["sums"], z["ntok"]))
        cal_surprise.append(z["surprise"])
        if reply_tokens:
            cal_replies.append(kept_arrays(cache, f"reply-calibration-{i}", lambda: reply_part(ps)))
        cal_topic += [t] * len(ps)
        if bar is not None:
            progress.advance(bar, len(ps))
    return assemble(adapter=adapter, name=name, seed=seed, rng=rng, window=window, windows=windows, early=early,
                    slice_len=slice_len, reply_tokens=reply_tokens, table=table, fit_replies=fit_replies,
                    fit={t: (h, a, b) for t, h, (a, b) in zip(topics, fit, fit_hidden)},
                    cal=(np.concatenate(cal), np.concatenate([a for a, _ in cal_hidden]),
                         np.concatenate([b for _, b in cal_hidden]), np.concatenate(cal_surprise)),
                    cal_topic=cal_topic, cal_replies=cal_replies)


def assemble(*, adapter, name: str, seed: int, rng: np.random.Generator, window: int, windows: int,
             early: tuple[int, ...], slice_len: int, reply_tokens: int, table: TokenRouting,
             fit: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], cal: tuple[np.ndarray, ...], cal_topic: list[str],
             fit_replies: dict[str, np.ndarray], cal_replies: list[dict[str, np.ndarray]], space: Embedding | None = None,
             blocks=None, slice_null=None, sidak: bool = False, source: dict[str, Any] | None = None) -> Profile:
    """The profile from observed benign requests, whichever way they were drawn (``build``: tasks;
    ``fromlog.build``: a deployment's own log). ``fit``: topic -> (histograms [n, L, E], hidden sums
    [n, hidden], token counts [n]) of the fit half; ``cal``: the calibration half's (histograms, hidden
    sums, token counts, surprise), each request's topic in ``cal_topic`` (read only by the default
    ``blocks`` and ``slice_null``; a log with its own blocks and slices passes none). ``blocks(i)``: benign block
    ``i`` of ``window`` calibration requests (indices, in order; default: drawn from one topic or
    mixed, alternately); ``slice_null(kernel, XC)``: the sorted benign slice drifts (default: Dirichlet
    topic mixes, ``slices.calibrate``); ``space``: an embedding already fitted on the fit half;
    ``sidak``: early looks adjusted by Sidak's formula instead of benign blocks' min-p (``ladder.calibrate``)."""
    from moeguard.monitor import ladder, slices

    topics = {t: h.mean(0) for t, (h, _, _) in fit.items()}
    F = np.concatenate([h for h, _, _ in fit.values()])
    C, cal_sums, cal_ntok, cal_surprise = cal
    mean = F.mean(0)
    sd = np.maximum(F.std(0), 0.5 / math.sqrt(max(1, len(F))) * np.maximum(mean, 1e-3) + 1e-3)
    if space is None:
        space = Embedding.fit(np.concatenate([a for _, a, _ in fit.values()]), np.concatenate([b for _, _, b in fit.values()]),
                              seed=seed)
    kernel = KernelReference.fit({t: space(a, b) for t, (_, a, b) in fit.items()}, seed=seed)
    XC = space(cal_sums, cal_ntok)
    null: dict[str, np.ndarray] = {}
    reply_ref = ReplyReference.fit(fit_replies, max_tokens=reply_tokens) if reply_tokens else None
    prof = Profile(meta={}, mean=mean, sd=sd, topics=topics, null=null, space=space, kernel=kernel,
                   tokens=table, replies=reply_ref)                       # null: filled below
    s = prof.statistics(C, XC, cal_surprise,
                        np.concatenate([z["h"] for z in cal_replies]) if reply_tokens else None,
                        np.concatenate([z["surprise"] for z in cal_replies]) if reply_tokens else None)
    for k in prof.request_statistics:
        # a calibration request without a reply (-inf: no evidence) is kept as the most negative
        # finite float, which ranks the same and survives strict JSON (which writes -inf as null)
        null[f"request.{k}"] = np.sort(np.maximum(s[k], -np.finfo(np.float64).max))
    req_p = prof.p_values(s, "request", own=True)["combined"]   # the calibration requests', each left out of its null
    if blocks is None:
        # benign windows: alternately one topic (a single-topic user) and a mix of topics
        # a single-topic window repeats no request: topics with fewer calibration requests than a
        # window give none (repeats would inflate drift's null and every statistic's spread)
        by_topic = {t: ix for t in topics if len(ix := np.flatnonzero(np.asarray(cal_topic) == t)) >= window}
        if not by_topic:
            warnings.warn(f"no topic has {window} calibration inputs (half of its benign inputs): benign windows are all "
                          f"mixed; profile more inputs per topic (--limit, or a longer --log) for single-topic windows")

        def blocks(i: int) -> np.ndarray:
            pool = by_topic[list(by_topic)[i // 2 % len(by_topic)]] if i % 2 == 0 and by_topic else np.arange(len(C))
            return rng.choice(pool, size=window, replace=len(pool) < window)

    picks = [blocks(i) for i in range(windows)]
    ws = prof.window_statistics(*ladder.first(picks, window, C, XC, req_p))
    for k in WINDOW_STATISTICS:
        null[f"window.{k}"] = np.sort(ws[k])
    if early:   # drawn after the windows above, which are then the same as without early looks
        ladder.calibrate(prof, window=window, early=early, fit_blocks=picks,
                         ladder_blocks=None if sidak else [blocks(windows + i) for i in range(windows)], C=C, XC=XC,
                         request_p=req_p)
    if slice_len:   # drawn last: every null above is what it is without slices
        null["slice.drift"] = slice_null(kernel, XC) if slice_null is not None else slices.calibrate(
            kernel, n=slice_len, XC=XC, cal_topic=cal_topic, topics=list(topics), count=windows, rng=rng)
    meta = {"model": name, "tasks": list(topics), "requests": {"fit": int(len(F)), "calibration": int(len(C))},
            "window": window, "benign_windows": windows, "seed": seed,
            "layers": [l.index for l in adapter.layers], "num_experts": adapter.num_experts, "top_k": adapter.top_k,
            "reply_tokens": reply_tokens, **({"early": list(early)} if early else {}),
            **({"slice": slice_len} if slice_len else {}), **({"source": source} if source else {})}
    return Profile(meta=meta, mean=mean, sd=sd, topics=topics, null=null, space=space, kernel=kernel, tokens=table,
                   replies=reply_ref)
