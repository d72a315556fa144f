"""Token-conditional routing surprise: where benign traffic routes *this token*, against where this
request routed it (docs/routing-security.md).

A routing hijack does not need to move a request's overall expert shares far: it moves the
routing of the tokens after the crafted text. Benign traffic routes a given token at a given layer
to a few experts, consistently; a hijacked input token goes to the target expert instead. So per
token ``t`` and MoE layer ``l``, the profile keeps how often benign traffic routed ``t`` to each
expert, and a request's token is scored by

    s(token) = sum over layers l, over its top-k experts e of  -log p(e | t, l),
    p(e | t, l) = (count(t, l, e) + k * prior(l, e)) / (count(t, l) + k)

(add-k smoothing toward the layer's marginal, ``prior``, which keeps 1e-3 of uniform mass so an
expert benign traffic never used scores high, not infinite: a token benign traffic never showed
is scored against the layer's overall routing). The request's statistic **``surprise``** is the largest mean of ``s``
over ``SEGMENT`` consecutive tokens: a crafted prefix and the tokens it moves form a contiguous
stretch, which a mean over the whole prompt would dilute.

The table is bounded: it keeps the most frequent benign tokens, at most ``MAX_CELLS`` counts in
all (tokens x layers x experts); other tokens fall back to the marginal.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeguard.monitor.embed import pack, unpack

SEGMENT = 16            # tokens per stretch the statistic averages over
MAX_CELLS = 4_194_304   # table counts kept, most frequent tokens first (16 MB stored, ~64 MB in memory)


class TokenRoutingCounts:
    """Accumulates benign (token, layer, expert) counts while the profile's fit half is observed:
    one float32 [L, E] row per distinct token seen, not per vocabulary entry. That is L x E x 4
    bytes per token (24 KB at 48 x 128: 30k distinct tokens take 0.7 GB while profiling)."""

    def __init__(self, *, vocab: int, layers: int, experts: int):
        self.vocab = vocab
        self.rows: dict[int, int] = {}
        self.counts = np.zeros((256, layers, experts), dtype=np.float32)

    def _rows(self, ids: np.ndarray, *, first_seen: bool = False) -> np.ndarray:
        """Each id's row, new ids taking the next rows (in sorted order, or with ``first_seen``
        in the order given)."""
        for t in (ids.tolist() if first_seen else np.unique(ids).tolist()):
            if t not in self.rows:
                self.rows[t] = len(self.rows)
        if len(self.rows) > len(self.counts):       # grow by doubling
            grown = np.zeros((2 * len(self.rows),) + self.counts.shape[1:], dtype=np.float32)
            grown[:len(self.counts)] = self.counts
            self.counts = grown
        return np.array([self.rows[t] for t in ids.tolist()], dtype=np.int64)

    def arrays(self) -> dict[str, np.ndarray]:
        """The counts as arrays (token ids in row order, counts [N, L, E]): for a resumable profile."""
        return {"count_tokens": np.fromiter(self.rows, dtype=np.int64, count=len(self.rows)),
                "counts": self.counts[:len(self.rows)].copy()}   # a copy: a view held the doubled buffer

    def merge(self, tokens: np.ndarray, counts: np.ndarray) -> None:
        """Add another table's ``arrays()``. Tokens new here take rows in the other's order, so
        counting tasks apart and merging them in turn gives the rows and counts of one pass over
        all (the counts are whole numbers, which float32 adds exactly below 2**24)."""
        rows = self._rows(np.asarray(tokens, dtype=np.int64), first_seen=True)
        self.counts[rows] += counts

    def add(self, ids: np.ndarray, routed: np.ndarray) -> None:
        """ids [T] token ids; routed [L, T, k] the experts each token went to."""
        L, T, k = routed.shape
        rows = np.repeat(self._rows(ids), k)
        for l in range(L):
            np.add.at(self.counts, (rows, l, routed[l].reshape(-1)), 1.0)

    def table(self, top_k: int, bos: int | None) -> "TokenRouting":
        n = len(self.rows)
        counts = self.counts[:n]
        tokens = np.array(list(self.rows), dtype=np.int64)          # row order
        cells = counts.shape[1] * counts.shape[2]
        keep = np.argsort(-counts.sum((1, 2), dtype=np.float64), kind="stable")[:max(1, MAX_CELLS // cells)]
        keep = keep[np.argsort(tokens[keep])]
        marginal = counts.sum(0, dtype=np.float64)                  # over every token seen, kept or not
        marginal = marginal / np.maximum(marginal.sum(-1, keepdims=True), 1e-12)
        return TokenRouting(tokens=tokens[keep], counts=counts[keep].astype(np.float64), marginal=marginal, top_k=top_k,
                            vocab=self.vocab, bos=bos)


class TokenRouting:
    """The benign table and the statistic (module docstring)."""

    def __init__(self, *, tokens: np.ndarray, counts: np.ndarray, marginal: np.ndarray, top_k: int, vocab: int,
                 bos: int | None):
        self.tokens = np.asarray(tokens, dtype=np.int64)             # [N] token ids kept
        self.counts = np.asarray(counts, dtype=np.float64)           # [N, L, E]
        self.marginal = np.asarray(marginal, dtype=np.float64)       # [L, E]
        self.top_k, self.vocab = int(top_k), int(vocab)
        self.bos = None if bos is None else int(bos)                 # a leading BOS is not the user's text
        k = self.top_k
        # -log p per (kept token, layer, expert), and last the fallback row (count 0: p = the
        # marginal): looked up with one gather per request, never recomputed
        # an expert benign traffic never used at a layer still gets a little mass (1e-3 of uniform):
        # its tokens score high, not infinite (a sum of infinities has no largest stretch)
        E = self.marginal.shape[1]
        prior = (self.marginal + 1e-3 / E) / (1 + 1e-3)
        nll = -np.log((self.counts + k * prior) / (self.counts.sum(-1, keepdims=True) + k))
        # flat [(N + 1) * L * E]: one 1-D take per request (numpy's three-array fancy indexing
        # cost the online hook ~0.15 ms per request at batch 1)
        L = self.marginal.shape[0]
        self._nll = np.concatenate([nll, -np.log(prior)[None]]).reshape(-1)                 # [(N + 1) * L * E]
        self._row = np.full(self.vocab + 1, len(self.tokens), dtype=np.int64)                # unknown -> fallback
        self._row[self.tokens] = np.arange(len(self.tokens))
        self._row *= L * E                                                                   # row offsets
        self._layers = (np.arange(L) * E)[None, :, None]                                     # [1, L, 1] layer offsets

    def token_scores(self, ids: np.ndarray, routed: np.ndarray) -> np.ndarray:
        """[T] s(token) for ids [T] and routed [L, T, k]."""
        return self.scores_flat(ids, routed.transpose(1, 0, 2) + self._layers)

    def scores_flat(self, ids: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """[T] s(token) for ids [T] and ``cells`` [T, L, k]: the routed experts with layer l's at
        l * E (the online monitor scores a batch's tokens in one call)."""
        rows = self._row[np.minimum(np.maximum(ids, 0), self.vocab)]     # (np.clip's dispatch costs more)
        return self._nll.take(rows[:, None, None] + cells).sum((1, 2))

    def stretch(self, ids: np.ndarray, s: np.ndarray) -> float:
        """The largest mean of token scores ``s`` [T] over ``SEGMENT`` consecutive tokens (a
        leading BOS excluded)."""
        if len(ids) and self.bos is not None and int(ids[0]) == self.bos:
            s = s[1:]
        if len(s) == 0:
            return 0.0
        if len(s) <= SEGMENT:
            return float(s.mean())
        c = np.concatenate([[0.0], np.cumsum(s)])
        return float(((c[SEGMENT:] - c[:-SEGMENT]) / SEGMENT).max())

    def stretches(self, ids: np.ndarray, s: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """``stretch`` of each of several rows laid end to end: ids and scores [M], ``lengths``
        [rows] summing to M. One pass over a batch's rows (the online monitor's); equal to
        ``stretch`` per row up to rounding (the running sum spans the rows)."""
        starts = np.cumsum(lengths) - lengths
        if self.bos is not None and len(ids):                   # a row's leading BOS is not the user's text
            lead = (lengths > 0) & (ids[np.minimum(starts, len(ids) - 1)] == self.bos)
            starts, lengths = starts + lead, lengths - lead
        c = np.concatenate([[0.0], np.cumsum(s)])
        out = np.zeros(len(lengths))
        short = (lengths > 0) & (lengths <= SEGMENT)
        out[short] = (c[starts + lengths] - c[starts])[short] / lengths[short]
        long = lengths > SEGMENT
        if long.any():
            n = lengths[long] - SEGMENT + 1                     # windows per long row
            first = np.cumsum(n) - n                            # each row's first window in the flat list
            j = np.arange(n.sum()) + np.repeat(starts[long] - first, n)   # every window's first token
            out[long] = np.maximum.reduceat((c[j + SEGMENT] - c[j]) / SEGMENT, first)
        return out

    def surprise(self, ids: np.ndarray, routed: np.ndarray) -> float:
        """``stretch`` of the token scores of ids [T] routed [L, T, k]."""
        return self.stretch(ids, self.token_scores(ids, routed))

    def to_dict(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "vocab": self.vocab, "bos": self.bos, "shape": list(self.counts.shape),
                "tokens": self.tokens.tolist(), "marginal": self.marginal.tolist(), "counts_f32_b64": pack(self.counts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenRouting":
        shape = tuple(int(x) for x in d["shape"])
        vocab, top_k = int(d["vocab"]), int(d["top_k"])
        tokens, marginal = np.asarray(d["tokens"], dtype=np.int64), np.asarray(d["marginal"], dtype=np.float64)
        if len(shape) != 3 or not 0 <= shape[0] <= vocab <= 1 << 24 or not 1 <= top_k <= shape[2] \
                or tokens.shape != (shape[0],) or (len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab)) \
                or marginal.shape != shape[1:] or not np.isfinite(marginal).all() or (marginal < 0).any() \
                or not (d["bos"] is None or isinstance(d["bos"], int)):
            raise ValueError("token table shape, ids or marginal are damaged")
        counts = unpack(d["counts_f32_b64"], shape)
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise ValueError("token table counts are damaged")
        return cls(tokens=tokens, counts=counts, marginal=marginal, top_k=top_k, vocab=vocab, bos=d["bos"])


class RoutedIds:
    """Each MoE layer's top-k expert ids ([rows * T, k]) of the next forward, from hooks on the
    routers; removed on exit whatever happens. ``first_only`` keeps the first call per layer
    (a generating model's prefill) and copies it, since it is read after later calls."""

    def __init__(self, adapter, *, first_only: bool = False):
        self.adapter = adapter
        self.first_only = first_only
        self.enabled = True
        self.ids: list = [None] * len(adapter.layers)
        from moeguard.models.hooks import Hooks   # torch: not for the profile's readers

        self._hooks = Hooks()

    def reset(self) -> None:
        self.ids = [None] * len(self.ids)

    def __enter__(self) -> "RoutedIds":
        attach_routers(self._hooks, self, self._hook)
        return self

    def _hook(self, slot: int, layer):
        def hook(module, args, output):
            if not self.enabled:
                return
            index = layer.unpack(output)[2]
            if not self.first_only:
                self.ids[slot] = index
            elif self.ids[slot] is None:
                self.ids[slot] = index.detach().clone()   # not a buffer a later call may reuse
        return hook

    def __exit__(self, *exc) -> None:
        self._hooks.close()

    def rows(self, B: int) -> np.ndarray:
        """[L, B, T, k] as numpy."""
        return np.stack([x.detach().cpu().numpy().reshape(B, -1, x.shape[-1]) for x in self.ids])


def attach_routers(hooks, owner, make, *, extra=None) -> None:
    """Attach ``make(slot, layer)`` to every MoE layer's router of ``owner.adapter`` (and ``extra``,
    a callable given ``hooks``, first), all or none: an error while attaching removes those
    already attached."""
    hooks.ensure_empty(owner)
    try:
        if extra is not None:
            extra(hooks)
        for slot, layer in enumerate(owner.adapter.layers):
            hooks.on_output(layer.router, make(slot, layer))
    except BaseException:
        hooks.close()
        raise
