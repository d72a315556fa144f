"""What a request *says*, beside where it is routed: the model's own representation of the prompt,
and two statistics on it (docs/routing-security.md).

Routing alone cannot tell a task-extraction stream from a benign single-topic user when both send
the task's inputs, nor a crafted prefix that routes where benign traffic already goes. The MMD
query-stream detector for extraction (the issue's anchor) compares a client's queries with benign
ones in an embedding space; here the space is the monitored model's own:

- **embedding**: the final norm's output (the last hidden state the LM head reads), mean-pooled
  over the prompt's tokens, projected to ``dim`` dimensions by a seeded Gaussian matrix stored
  in the profile (Johnson-Lindenstrauss: distances kept, profiles small for a 4096-wide model), centred on the
  benign mean and scaled to unit length. It comes from the same forward as the routing: no extra
  pass;
- a Gaussian kernel ``k(a, b) = exp(-|a - b|^2 / bandwidth)``, bandwidth the median squared
  distance between benign references (the usual median heuristic);
- per benign topic, a reference sample ``R_t`` (the profile's fit half);
- **``unfamiliar``** (a request): ``-log`` of its kernel density under its nearest topic,
  ``max_t mean_j k(x, R_tj)``: a prompt unlike any benign one (crafted prefixes, random tokens);
- **``drift``** (a window of a client's requests): the squared MMD between the window and the
  benign references *of the same topics in the same proportions* (each request is assigned to
  its nearest topic; composition ``c``):
  ``mean_{i != j} k(x_i, x_j) + c'Kc - 2 mean_i sum_t c_t mean_j k(x_i, R_tj)``, with
  ``K[t, u] = mean k(R_t, R_u)`` (self-pairs excluded). Benign windows of any topic mix have
  ``drift`` near 0; a stream drawn unlike benign users of its topics (selected by active
  learning, spread for coverage, synthetic) does not. A stream drawn *like* them (a random sample
  of the task's inputs) is, by construction, a benign single-topic user, and nothing here can
  tell it apart.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

DIM = 64            # projected dimensions (at most the model's hidden size)
REFERENCES = 128    # reference requests kept per topic


def projection(hidden: int, dim: int, seed: int) -> np.ndarray:
    """[hidden, dim] seeded Gaussian projection, rounded to float32 (the profile stores it: a
    random stream is not promised to be the same across library versions)."""
    g = np.random.default_rng(int(seed))
    return (g.standard_normal((hidden, dim)) / math.sqrt(dim)).astype(np.float32).astype(np.float64)


def pack(a: np.ndarray, dtype: str = "<f4") -> str:
    """An array as base64 little-endian float32 (profiles are JSON; ``"<f8"`` where exact numbers matter)."""
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode()


def unpack(text: str, shape: tuple[int, ...], dtype: str = "<f4") -> np.ndarray:
    a = np.frombuffer(base64.b64decode(text, validate=True), dtype=dtype).astype(np.float64)
    if a.size != int(np.prod(shape)):
        raise ValueError(f"{a.size} stored values for shape {shape}")
    return a.reshape(shape)


class PooledHidden:
    """Per row of the next forwards: the sum over its real tokens of the final norm's output
    ([rows, hidden]) and its token count. Hook on the final norm (not the LM head, which a
    generating model feeds its last position only); the caller enters and exits it."""

    def __init__(self, adapter):
        from moeguard.models.adapter import _get_path
        from moeguard.models.hooks import Hooks

        self.module = _get_path(adapter.model, adapter.family.final_norm_path)
        self.mask = None               # [B, T] attention mask of the next forward, set by the caller
        self.sums: list = []           # [B, hidden] float32 tensors, one per call
        self._hooks = Hooks()
        self.enabled = True
        self.limit: int | None = None   # calls kept (the online monitor keeps the prefill only)

    def _hook(self, module, args, output):
        if not self.enabled or (self.limit is not None and len(self.sums) >= self.limit):
            return
        h = output[0] if isinstance(output, tuple) else output        # [B, T, D]
        if self.mask is not None and self.mask.shape == h.shape[:2]:   # padding: zero, even if inf/NaN there
            # the mask is where the embeddings are; the final norm, on a model spread over GPUs, on the last one
            h = h.masked_fill(~self.mask.to(h.device).bool()[..., None], 0)
        self.sums.append(h.detach().float().sum(1).cpu())       # [B, D] tensor; numpy at the end

    def __enter__(self) -> "PooledHidden":
        self._hooks.ensure_empty(self)
        self._hooks.on_output(self.module, self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.close()


def _pooled(sums: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """[N, hidden] mean hidden state per request from its sum and token count."""
    return sums / np.maximum(tokens, 1)[:, None]


def embed(sums: np.ndarray, tokens: np.ndarray, proj: np.ndarray, centre: np.ndarray | None) -> np.ndarray:
    """[N, dim] unit embeddings from per-request hidden sums [N, hidden] and token counts [N]."""
    x = _pooled(sums, tokens) @ proj
    if centre is not None:
        x = x - centre
    # np.linalg.norm's own formula for real rows, without its dispatch (the online hook calls this per request)
    return x / np.maximum(np.sqrt(np.add.reduce(x * x, axis=1, keepdims=True)), 1e-12)


class KernelReference:
    """The benign references per topic and the two statistics (module docstring)."""

    def __init__(self, *, refs: dict[str, np.ndarray], bandwidth: float):
        self.names = list(refs)
        self.refs = [np.asarray(r, dtype=np.float64) for r in refs.values()]
        self.bandwidth = float(bandwidth)
        T = len(self.refs)
        self._all = np.concatenate(self.refs)                              # [sum n_t, dim]
        self._sizes = np.array([len(r) for r in self.refs], dtype=np.float64)
        self._starts = np.concatenate([[0], np.cumsum(self._sizes)[:-1]]).astype(np.int64)
        self._all_sq = (self._all * self._all).sum(1)                      # [sum n_t]: |r|^2, once
        self.K = np.zeros((T, T))
        for a in range(T):
            for b in range(T):
                k = self._k(self.refs[a], self.refs[b])
                if a == b:
                    n = len(k)
                    self.K[a, b] = (k.sum() - np.trace(k)) / max(1, n * (n - 1))
                else:
                    self.K[a, b] = k.mean()

    @classmethod
    def fit(cls, refs: dict[str, np.ndarray], *, seed: int = 0) -> "KernelReference":
        """References capped at ``REFERENCES`` per topic; the median-heuristic bandwidth."""
        rng = np.random.default_rng(seed)
        kept = {t: r[rng.permutation(len(r))[:REFERENCES]] for t, r in refs.items()}
        allr = np.concatenate(list(kept.values()))
        d = _sq(allr, allr)[np.triu_indices(len(allr), 1)]
        return cls(refs=kept, bandwidth=max(float(np.median(d)), 1e-6))

    def _k(self, a: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None = None) -> np.ndarray:
        return np.exp(-_sq(a, b, b_sq) / self.bandwidth)

    def means(self, x: np.ndarray) -> np.ndarray:
        """[N, topics]: mean kernel of each embedding to each topic's references (one kernel
        block over every reference: the online hook calls this per request)."""
        return np.add.reduceat(self._k(x, self._all, self._all_sq), self._starts, axis=1) / self._sizes

    def unfamiliar(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(-log density under the nearest topic [N], nearest topic [N])."""
        mu = self.means(x)
        return -np.log(mu.max(1) + 1e-300), mu.argmax(1)

    def drift(self, x: np.ndarray) -> float:
        """Squared MMD of one window [n, dim] against the references of its own topic mix."""
        mu = self.means(x)
        n = len(x)
        c = np.bincount(mu.argmax(1), minlength=len(self.refs)) / n
        kx = self._k(x, x)
        within = (kx.sum() - np.trace(kx)) / max(1, n * (n - 1))
        return float(within + c @ self.K @ c - 2 * (mu @ c).mean())

    def to_dict(self) -> dict[str, Any]:
        return {"bandwidth": self.bandwidth, "refs": {t: r.round(6).tolist() for t, r in zip(self.names, self.refs)}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KernelReference":
        refs = {str(t): np.asarray(r, dtype=np.float64) for t, r in d["refs"].items()}
        bw = float(d["bandwidth"])
        if not refs or not (np.isfinite(bw) and bw > 0) \
                or any(r.ndim != 2 or len(r) < 2 or not np.isfinite(r).all() for r in refs.values()) \
                or len({r.shape[1] for r in refs.values()}) != 1:
            raise ValueError("kernel references or bandwidth are damaged")
        return cls(refs=refs, bandwidth=bw)


def _sq(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None = None) -> np.ndarray:
    """[len(a), len(b)] squared Euclidean distances (``b_sq``: ``b``'s squared norms, if known)."""
    b_sq = (b * b).sum(1) if b_sq is None else b_sq
    return np.maximum((a * a).sum(1)[:, None] + b_sq[None, :] - 2 * a @ b.T, 0.0)


class Embedding:
    """The projection and centring that turn hidden sums into unit embeddings (``embed``)."""

    def __init__(self, *, proj: np.ndarray, seed: int, centre: np.ndarray | None = None):
        self.proj = np.asarray(proj, dtype=np.float64)                # [hidden, dim]
        self.hidden, self.dim = self.proj.shape
        self.seed = int(seed)
        self.centre = None if centre is None else np.asarray(centre, dtype=np.float64)

    @classmethod
    def fit(cls, sums: np.ndarray, tokens: np.ndarray, *, seed: int) -> "Embedding":
        e = cls(proj=projection(sums.shape[1], min(DIM, sums.shape[1]), seed), seed=seed)
        e.centre = (_pooled(sums, tokens) @ e.proj).mean(0)
        return e

    def __call__(self, sums: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return embed(sums, tokens, self.proj, self.centre)

    def to_dict(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "dim": self.dim, "seed": self.seed, "centre": self.centre.round(8).tolist(),
                "projection_f32_b64": pack(self.proj)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Embedding":
        hidden, dim = int(d["hidden"]), int(d["dim"])
        if not 1 <= dim <= hidden <= 1 << 20:
            raise ValueError(f"embedding of {dim} dimensions from hidden size {hidden}")
        e = cls(proj=unpack(d["projection_f32_b64"], (hidden, dim)), seed=int(d["seed"]),
                centre=np.asarray(d["centre"], dtype=np.float64))
        if e.centre.shape != (dim,) or not (np.isfinite(e.proj).all() and np.isfinite(e.centre).all()):
            raise ValueError("embedding projection or centre is damaged")
        return e
