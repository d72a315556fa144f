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

This module is what a profile is and how it scores; ``fit.py`` makes one (observing requests,
``build``, ``assemble``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.monitor.embed import Embedding, KernelReference
from moeguard.monitor.neighbours import Neighbours
from moeguard.monitor.replies import REPLY_STATISTICS, ReplyReference
from moeguard.monitor.tokens import SEGMENT, TokenRouting

SCHEMA = "moeguard.routing-profile/2"      # /2: with the embedding and token statistics
STATISTICS = ("load", "atypical", "unfamiliar", "surprise")         # of a request
WINDOW_STATISTICS = ("load", "atypical", "evidence", "drift")       # of a client's window


def empirical_p(null: np.ndarray, values) -> np.ndarray:
    """``(1 + #{benign >= s}) / (n + 1)`` for each value ``s`` against a sorted ``null``: the calibrated
    p-value every statistic (request, window, slice) is given."""
    return (1 + len(null) - np.searchsorted(null, values, side="left")) / (len(null) + 1)


def unmeasured(stats: dict[str, np.ndarray], names) -> np.ndarray:
    """[N] rows with a statistic that is NaN: the model's hidden states or log-probabilities on the
    request were (a float16 overflow, a damaged tensor). ``empirical_p`` would put NaN past every
    benign value, the smallest p-value the profile gives: one broken forward alerted as the most
    anomalous request, with a value of null. (-inf, a request without a reply, is a measurement.)"""
    return np.any(np.stack([np.isnan(np.asarray(stats[s], dtype=np.float64)) for s in names]), axis=0)


NOT_MEASURED = ("the model's hidden states or token log-probabilities on it are NaN (a float16 overflow, or a "
                "damaged weight its input reaches)")
NOT_MEASURED_FIX = "load the model in bfloat16 or float32, or check its weights (moeguard scan)"


BLOCK_VALUES = 1 << 22   # values in one [rows, topics, L, E] temporary of ``Profile.statistics`` (32 MiB as float64)


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
    neighbours: Neighbours | None = None     # benign requests' embeddings and routing (periods.py); None: made before it

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
        # the divergences from every topic in smaller blocks still: their [rows, topics, L, E] temporaries
        # at most BLOCK_VALUES values each (1,024 rows of 8 topics on DeepSeek-V3's 58 x 256 cells were
        # 973 MB apiece, and _js makes about five). Each row's is reduced over its own cells, so any block
        # size gives the same bits (the embedding's kernel, a matrix product, keeps the 1,024-row blocks)
        step = max(1, BLOCK_VALUES // max(1, self._topic_stack.size))
        js = _js(h[:, None], self._topic_stack) if len(h) <= step else np.concatenate(
            [_js(h[a:a + step, None], self._topic_stack) for a in range(0, len(h), step)])   # [N, topics]
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
            # a profile made before the tokenizer (routers, generation config) were in the digest compares the rest
            later = [k for k in ("tokenizer", "routers", "generation") if k not in mine]
            now = {k: v for k, v in weights.items() if k not in later}
            if mine != now:
                differ = {k for k in set(mine) | set(now) if mine.get(k) != now.get(k)}
                if differ == {"routers"}:   # only the routers' tensors: tuned, or a digest from before a bias joined it
                    raise MoeguardError(f"the profile's routers differ from {name}'s (the rest of the weights match): "
                                        "its routers were re-trained, or the profile predates 2026-12-07, when a "
                                        "block-held selection bias (LFM2's expert_bias) joined the routers' digest",
                                        hint="profile this model again")
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
                **({"replies": self.replies.to_dict()} if self.replies is not None else {}),
                **({"neighbours": self.neighbours.to_dict()} if self.neighbours is not None else {})}

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
            neighbours = Neighbours.from_dict(d["neighbours"], dim=space.dim, shape=mean.shape) \
                if d.get("neighbours") is not None else None
            meta = {k: v for k, v in d.items() if k not in ("schema", "mean", "sd", "topics", "null", "embedding", "kernel",
                                                            "token_routing", "replies", "neighbours")}
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
                or not slices.check_profile(meta, null) or not isinstance(meta.get("weights") or {}, dict):
            # weights: the model's digest, compared by check_model (a string there was an AttributeError)
            raise MoeguardError(f"{where} is a damaged routing profile (window, early looks, slices, layers or weights "
                                "missing or wrong)",
                                hint=fix)
        return cls(meta=meta, mean=mean, sd=sd, topics=topics, null=null, space=space, kernel=kernel, tokens=tokens,
                   replies=replies, neighbours=neighbours)


def check_uniform(adapter) -> None:
    """A one-line error unless every MoE layer has the same number of experts: a request's
    histogram is one [layers, experts] array (a budget-pruned checkpoint keeps counts per layer)."""
    counts = {l.index: l.num_experts for l in adapter.layers}
    if len(set(counts.values())) > 1:
        raise MoeguardError(f"the routing monitor needs the same number of experts in every MoE layer; this model "
                            f"has {counts} (a budget-pruned checkpoint)",
                            hint="monitor the model as served before budget pruning, or prune it with --keep")
