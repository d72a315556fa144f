"""Put a suspect's hidden dimensions into the owner's frame.

An attacker may permute the hidden dimension (and flip signs of dimensions) consistently through
the whole model: a function-preserving change that scrambles every weight. The owner's
fingerprint keeps the embedding rows of ``anchors``, tokens named by their *strings*; the
suspect's rows of the same strings give each hidden dimension a profile over the anchors, and a
linear assignment on 1 - |cosine| of those profiles (as AWM does) recovers the permutation and
the signs. Only the test's power depends on this step: its null (``stats.py``) relabels experts,
which the alignment never looks at.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeguard.errors import MoeguardError

MIN_ANCHORS = 16


@dataclass(frozen=True)
class Frame:
    """Suspect dim ``cols[k]`` times ``signs[k]`` is owner dim ``k``."""

    cols: np.ndarray      # [d] int
    signs: np.ndarray     # [d] +-1
    cosine: np.ndarray    # [d] |cos| of each matched pair
    anchors: int          # anchors found in the suspect's vocabulary

    @property
    def permuted(self) -> bool:
        return bool((self.cols != np.arange(len(self.cols))).any())

    @property
    def flipped(self) -> int:
        return int((self.signs < 0).sum())

    def inputs(self, x: np.ndarray) -> np.ndarray:
        """A matrix reading the hidden state (hidden on the last axis) in the owner's frame."""
        return x[..., self.cols] * self.signs

    def outputs(self, y: np.ndarray, axis: int) -> np.ndarray:
        """A matrix writing the hidden state (hidden on ``axis``) in the owner's frame."""
        y = np.take(y, self.cols, axis=axis)
        shape = [1] * y.ndim
        shape[axis] = -1
        return y * self.signs.reshape(shape)

    def to_dict(self) -> dict:
        return {"anchors": self.anchors, "permuted": self.permuted, "sign_flips": self.flipped,
                "median_abs_cosine": round(float(np.median(self.cosine)), 4),
                "identity": not self.permuted and self.flipped == 0}


def columns_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    a = a / np.maximum(np.linalg.norm(a, axis=0), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=0), 1e-12)
    return a.T @ b


def identity(d: int) -> Frame:
    """The owner's own frame (for its fingerprint)."""
    return Frame(cols=np.arange(d), signs=np.ones(d), cosine=np.ones(d), anchors=0)


def align(anchor_rows: np.ndarray, anchor_tokens: list[str], suspect) -> Frame:
    """The frame mapping a suspect (a trace source: ``tokens``, ``hidden``, ``embed_rows``) onto
    the owner's anchors. Only the anchors' embedding rows are read."""
    from scipy.optimize import linear_sum_assignment

    where = {t: i for i, t in enumerate(suspect.tokens) if t}
    pairs = [(k, where[t]) for k, t in enumerate(anchor_tokens) if t in where]
    d, d_s = anchor_rows.shape[1], suspect.hidden
    if d != d_s:
        raise MoeguardError(f"the suspect's hidden size is {d_s}, the original's {d}: trace has not compared them, so "
                            "this is no evidence either way",
                            hint="trace compares models of the same width (a width-pruned copy is not traced yet)")
    if len(pairs) < MIN_ANCHORS:
        raise MoeguardError(f"only {len(pairs)} of the original's {len(anchor_tokens)} anchor tokens are in the "
                            "suspect's vocabulary", hint="trace needs a shared vocabulary to align hidden dimensions "
                            f"(at least {MIN_ANCHORS} anchors)")
    own = anchor_rows[[k for k, _ in pairs]]
    sus = suspect.embed_rows([i for _, i in pairs])
    if not np.isfinite(sus).all():   # the assignment below fails on them with a traceback
        raise MoeguardError("the suspect's token embeddings hold NaN or infinite values",
                            hint="the checkpoint is damaged (or was saved from a diverged run); trace a sound copy")
    c = columns_cosine(own, sus)                                  # [d owner, d suspect]
    rows, cols = linear_sum_assignment(-np.abs(c))
    order = np.argsort(rows)
    cols = cols[order]
    matched = c[np.arange(d), cols]
    return Frame(cols=cols, signs=np.where(matched < 0, -1.0, 1.0), cosine=np.abs(matched), anchors=len(pairs))
