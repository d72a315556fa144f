"""What a request's content predicts its routing to be (``periods.py``'s residuals): the mean routing
histogram of its ``NEIGHBOURS`` nearest benign requests in the profile's embedding space, among up to
``REFERENCES`` of the profile's fit half (fewer where their histograms would pass ``VALUES``), kept in
the profile. Finer than a mix of topics: a log profile's topics are a few clusters, and a day heavy
in one task moved a topic-mix residual nearly as far as a campaign did
(``benchmarks/routing_monitor_day_load.py``'s control).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeguard.monitor.embed import pack, unpack

NEIGHBOURS = 16       # benign requests whose mean routing predicts a request's
REFERENCES = 4096     # benign requests kept for that (the profile's fit half, subsampled)
VALUES = 1 << 22      # at most this many stored histogram values (16 MiB as float32): a model of 58 MoE
                      # layers x 256 experts keeps 282 references, not a 240 MB profile


class Neighbours:
    """Benign requests' embeddings [R, dim] and routing histograms [R, L, E]: what a request's
    content predicts its routing to be."""

    def __init__(self, *, x: np.ndarray, h: np.ndarray):
        self.x = np.asarray(x, dtype=np.float64)
        self.h = np.asarray(h, dtype=np.float64)
        self.k = min(NEIGHBOURS, len(self.x))

    @classmethod
    def fit(cls, x: np.ndarray, h: np.ndarray, *, seed: int) -> "Neighbours":
        """At most ``REFERENCES`` of the benign requests (fewer where their histograms would pass
        ``VALUES``), drawn with their own generator (the profile's other draws are unchanged by it)."""
        cap = min(REFERENCES, max(2 * NEIGHBOURS, VALUES // max(1, int(np.prod(np.shape(h)[1:])))))
        keep = np.sort(np.random.default_rng([seed, 0x6E]).permutation(len(x))[:cap])
        return cls(x=np.asarray(x)[keep], h=np.asarray(h)[keep])

    def residual(self, x: np.ndarray, h: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """[N, L, E]: each request's histogram less the mean of its nearest references' (cosine:
        the embeddings are unit length). In blocks of rows: a log of 100k requests never builds
        [N, R] at once. ``out``: a float64 array of ``h``'s shape to write into (``h`` itself: a block
        is read before it is written, so a caller done with the histograms needs no second array)."""
        if out is None:
            out = np.empty(np.shape(h), dtype=np.float64)
        elif out.shape != np.shape(h) or out.dtype != np.float64:
            raise ValueError(f"out is {out.dtype} {out.shape}, not float64 {np.shape(h)}")
        step = max(1, min(2048, VALUES // max(1, self.k * int(np.prod(self.h.shape[1:])))))   # [step, k, L, E] at most VALUES
        for a in range(0, len(x), step):
            sim = np.asarray(x[a:a + step]) @ self.x.T                           # [n, R]
            nn = np.argpartition(-sim, self.k - 1, axis=1)[:, :self.k]
            out[a:a + step] = np.asarray(h[a:a + step]) - self.h[nn].mean(1)
        return out

    @property
    def digest(self) -> str:
        """What a period's residuals depend on, so that a history made with other references is refused."""
        import hashlib

        return hashlib.sha256(pack(self.x).encode() + pack(self.h).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"count": len(self.x), "embeddings_f32_b64": pack(self.x), "histograms_f32_b64": pack(self.h)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, dim: int, shape: tuple[int, int]) -> "Neighbours":
        n = int(d["count"])
        out = cls(x=unpack(d["embeddings_f32_b64"], (n, dim)), h=unpack(d["histograms_f32_b64"], (n, *shape)))
        if n < 2 or not (np.isfinite(out.x).all() and np.isfinite(out.h).all()):
            raise ValueError("neighbour references are damaged")
        return out
