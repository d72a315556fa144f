"""Per-expert features that survive the function-preserving changes an attacker can make for free.

For one expert with gate G [I, d], up U [I, d] and down D [d, I], on a subset H of m hidden
dimensions (owner frame, see ``align.py``):

- **view A, gate Gram** ``K_A = G[:, H]^T G[:, H]`` (m x m): a sum over neurons, so the order of
  the neurons does not matter; the up/down rescaling below does not touch the gate.
- **view B, up-down operator** ``K_B = D[H, :] U[:, H]`` (m x m) = sum_n D[:, n] U[n, :]:
  invariant to permuting neurons *and* to rescaling a neuron's up row by c and its down column
  by 1/c (sign included), which leaves a gated MLP's function unchanged.
- **gate sum** ``v = G^T 1`` (d): linear in the weights and blind to neuron order, so an expert
  made by averaging others (a merge) has the weighted sum of their ``v``s (``merge.py``).

Each view is normalized per layer by the layer's median scale per hidden dimension, so a
per-dimension rescaling of a norm's gain (as activation-aware quantizers do) cancels, and the
owner layer's common direction (what every expert of the layer shares) is projected out on both
sides: the similarity then measures what makes *this* expert itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROWS = 4               # gate rows kept per expert for the neuron-order check


@dataclass(frozen=True, kw_only=True)
class Sketch:
    """All a trace reads of one MoE layer, in the owner's frame: a few MB whatever the expert
    size, so a checkpoint is streamed into sketches and never held whole (``stream.py``)."""

    index: int                 # decoder-layer index
    ka: np.ndarray             # [E, m, m] gate Grams on H (view A, raw)
    kb: np.ndarray             # [E, m, m] up-down operators on H (view B, raw)
    v: np.ndarray              # [E, d] gate sums
    rows: np.ndarray           # [E, ROWS, m] each expert's first gate rows on H
    intermediate: int          # I, neurons per expert

    @property
    def num_experts(self) -> int:
        return int(self.ka.shape[0])


def sketch_layer(layer, H: np.ndarray, frame) -> Sketch:
    """The sketch of an in-memory layer (``weights.LayerWeights``), read in ``frame`` (``align.Frame``).

    Only what the sketch reads is widened to float64, an expert at a time: the m columns of gate
    and up, the m rows of down, and the gate's column sums (the layer whole in float64 is 8 bytes
    a parameter: 13 GB for a 128-expert OLMoE-width layer pair). The Grams then run on the same
    values, in the memory order numpy's fancy indexing of the whole layer gave them (m outermost:
    einsum's sums follow it), so the numbers are bit-identical to the whole-layer computation."""
    from moeguard.trace.weights import f64

    C, s = frame.cols[H], frame.signs[H]
    E, I, m = int(layer.gate.shape[0]), int(layer.gate.shape[1]), len(C)
    g, u = np.empty((m, E, I)).transpose(1, 2, 0), np.empty((m, E, I)).transpose(1, 2, 0)   # [E, I, m]
    dn = np.empty((m, E, I)).transpose(1, 0, 2)                                           # [E, m, I]
    v = np.empty((E, len(frame.cols)))
    for e in range(E):
        gate = f64(layer.gate[e])   # widened once: its m columns and its column sums
        g[e], u[e], dn[e] = gate[:, C], f64(layer.up[e][:, C]), f64(layer.down[e][C, :])
        v[e] = gate.sum(axis=0)[frame.cols]
    g, u, dn, v = g * s, u * s, dn * s[None, :, None], v * frame.signs
    return Sketch(index=layer.index, ka=np.einsum("eim,ein->emn", g, g), kb=np.einsum("emi,ein->emn", dn, u),
                  v=v, rows=g[:, :ROWS, :], intermediate=int(layer.gate.shape[1]))


def _scales(ka: np.ndarray, kb: np.ndarray) -> dict[str, np.ndarray]:
    """A layer's per-dimension scales: medians over its experts (each side uses its own, so a
    rescaled norm gain, which every expert of the layer reads, cancels)."""
    diag = np.einsum("emm->em", ka)
    return {"a": np.sqrt(np.maximum(np.median(diag, axis=0), 1e-30)),
            "b_rows": np.maximum(np.median(np.linalg.norm(kb, axis=2), axis=0), 1e-30),
            "b_cols": np.maximum(np.median(np.linalg.norm(kb, axis=1), axis=0), 1e-30)}


def _center(k: np.ndarray) -> np.ndarray:
    """Unbiased HSIC centering of each Gram in [E, m, m] (diagonal zeroed), as in unbiased CKA."""
    m = k.shape[-1]
    k = k.copy()
    idx = np.arange(m)
    k[:, idx, idx] = 0.0
    mu = k.sum(axis=2) / (m - 2)                               # [E, m]
    mu = mu - (mu.sum(axis=1, keepdims=True) / (2 * (m - 1)))
    k = k - mu[:, :, None] - mu[:, None, :]
    k[:, idx, idx] = 0.0
    return k


def features(sk: Sketch) -> dict[str, np.ndarray]:
    """(view A [E, m*m], view B [E, m*m], gate sums [E, d]) of every expert, not yet projected."""
    sc = _scales(sk.ka, sk.kb)
    ka = sk.ka / sc["a"][None, :, None] / sc["a"][None, None, :]
    kb = sk.kb / sc["b_rows"][None, :, None] / sc["b_cols"][None, None, :]
    E = ka.shape[0]
    return {"a": _center(ka).reshape(E, -1), "b": kb.reshape(E, -1), "v": sk.v}


def common(x: np.ndarray) -> np.ndarray:
    """The owner layer's common direction (unit mean of its experts' feature rows)."""
    mu = x.mean(axis=0)
    return mu / max(float(np.linalg.norm(mu)), 1e-30)


def cosine(own: np.ndarray, sus: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """[E_owner, E_suspect] cosine similarities. The owner layer's common direction ``mu`` is
    projected out of both sides, and the suspect layer's own common direction out of its side
    (when it has two experts or more): what a layer's experts share would otherwise give every
    owner expert a similarity offset to the whole suspect layer, the same in both views, which
    the relabeling test would mistake for a match (a row effect)."""
    own = own - np.outer(own @ mu, mu)
    sus = sus - np.outer(sus @ mu, mu)
    if len(sus) >= 2:
        mu_s = common(sus)
        sus = sus - np.outer(sus @ mu_s, mu_s)
    own = own / np.maximum(np.linalg.norm(own, axis=1, keepdims=True), 1e-30)
    sus = sus / np.maximum(np.linalg.norm(sus, axis=1, keepdims=True), 1e-30)
    return own @ sus.T
