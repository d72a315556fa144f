"""Each expert's weight statistics against its siblings in the same layer.

Norms and spectra catch a careless plant (Adam at a planting learning rate grows the expert's
norms by several sibling MADs); an attacker who rescales the changed weights to their old norms
evades them, which is why the suspicion score does not rest on them (docs/scan.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from moeguard.analysis import robust_z
from moeguard.errors import MoeguardError

_FLOATS = {"float32", "float16", "bfloat16", "float64"}
WEIGHT_STATS = ("gate_norm", "up_norm", "down_norm", "down_spectral", "down_stable_rank", "router_norm")


def _stable_rank(s: np.ndarray) -> float:
    """||W||_F^2 / ||W||_2^2 from W's singular values ``s`` (largest first): how many directions carry
    the matrix (a low-rank implant lowers it)."""
    return float((s ** 2).sum() / max(s[0] ** 2, 1e-30))


def weight_stats(model, adapter) -> dict[tuple[int, int], dict[str, Any]]:
    """Per (decoder layer, expert): the statistics in ``WEIGHT_STATS``, each with its robust z
    against the layer's experts, and ``weight_z``, the largest |z|."""
    from moeguard.models.hooks import weights_in_place
    from moeguard.trace.weights import expert_views, f64

    out: dict[tuple[int, int], dict[str, Any]] = {}
    for layer in adapter.layers:
        E = layer.num_experts
        # one expert at a time in float64 (a whole layer's copy is ~11 GB on Mixtral-8x7B, ~90 GB on
        # DeepSeek-V3), with offloaded weights put in place while they are read
        with weights_in_place(layer.experts), weights_in_place(layer.router):
            gate, up, down = expert_views(adapter.family, layer.experts)          # [E, I, d], [E, I, d], [E, d, I]
            stored = {str(t.dtype).removeprefix("torch.") for t in (gate, up, down)} - _FLOATS
            if stored:   # a quantized checkpoint kept quantized (FP8 on a GPU): raw values without their scales
                raise MoeguardError(f"layer {layer.index}'s experts are stored as {', '.join(sorted(stored))} "
                                    "(a quantized checkpoint): their norms and spectra would be of the raw values",
                                    hint="scan the float (bf16) release, or a copy dequantized and saved in bf16; "
                                         "on the CPU transformers dequantizes FP8 checkpoints as it loads them")
            router = layer.router_weight.detach().float().cpu().numpy()          # [E, d], float32 as before
            rows = [_expert_stats(layer.index, e, f64(gate[e]), f64(up[e]), f64(down[e]), router[e]) for e in range(E)]
        vals = {k: [r[k] for r in rows] for k in WEIGHT_STATS}
        zs = {k: robust_z(v) for k, v in vals.items()}
        for e in range(E):
            row = {k: round(vals[k][e], 5) for k in WEIGHT_STATS}
            row["z"] = {k: round(float(zs[k][e]), 3) for k in WEIGHT_STATS}
            row["weight_z"] = round(float(max(abs(zs[k][e]) for k in WEIGHT_STATS)), 3)
            out[(layer.index, e)] = row
    return out


def _expert_stats(index: int, e: int, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                  router: np.ndarray) -> dict[str, float]:
    # a NaN or inf (a corrupt shard, an fp16 overflow) failed the SVD with a traceback, or, in a router
    # row, made every suspicion NaN: nothing flagged, and a damaged model reported clean
    bad = [name for name, w in (("gate", gate), ("up", up), ("down", down), ("router row", router))
           if not np.isfinite(w).all()]
    if bad:
        raise MoeguardError(f"layer {index} expert {e} has non-finite weights ({', '.join(bad)}): the "
                            "checkpoint is damaged", hint="re-download or re-save it; a scan of NaN weights "
                            "would report nothing")
    s = np.linalg.svd(down, compute_uv=False)   # once: the spectral norm and the stable rank (two SVDs before)
    return {"gate_norm": float(np.linalg.norm(gate)), "up_norm": float(np.linalg.norm(up)),
            "down_norm": float(np.linalg.norm(down)), "down_spectral": float(s.max()),
            "down_stable_rank": _stable_rank(s), "router_norm": float(np.linalg.norm(router))}
