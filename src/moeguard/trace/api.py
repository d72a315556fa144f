"""``trace``: test a suspect checkpoint against the owner's fingerprint, and name what it kept.

The verdict is the combined p-value of ``stats.py`` (``derived`` when p <= ALPHA). The expert
mapping, the merges and the transformations are descriptions built on top of it and carry no
extra test: thresholds named below only decide how each suspect expert is *labelled*.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.trace.align import align
from moeguard.trace.features import cosine, features
from moeguard.trace.fingerprint import Fingerprint
from moeguard.trace.stats import layer_test, product_tail

SCHEMA = "moeguard.trace/1"
ALPHA = 0.01
KEPT_SIMILARITY = 0.5     # label "kept": both views at least this similar to one owner expert ...
KEPT_MARGIN = 0.2         # ... and that far ahead of the next owner expert
MERGE_SHARE = 0.02        # an owner expert is in a merge when its NNLS weight is >= this share of the total
MERGE_GAIN = 0.05         # ... and the merge explains the gate sums this much better than one expert


def _r2(y: np.ndarray, fit: np.ndarray) -> float:
    return 1.0 - float(np.sum((y - fit) ** 2)) / max(float(np.sum(y ** 2)), 1e-30)


def merge_sources(v_own: np.ndarray, v: np.ndarray) -> dict[str, Any]:
    """Nonnegative least squares of a suspect expert's gate sum on the owner's: which owner
    experts it is made of (a merge is a weighted average, exactly linear in gate sums)."""
    from scipy.optimize import nnls

    beta, _ = nnls(v_own.T, v)
    # the best fit by one owner expert alone (nonnegative scale), against which a merge must win
    scale = np.maximum(v_own @ v, 0.0) / np.maximum(np.einsum("ed,ed->e", v_own, v_own), 1e-30)
    r2_one = max(_r2(v, c * row) for c, row in zip(scale, v_own))
    r2_all = _r2(v, beta @ v_own)
    total = float(beta.sum())
    support = [int(i) for i in np.flatnonzero(beta >= MERGE_SHARE * total)] if total > 0 else []
    return {"weights": {str(i): round(float(beta[i] / total), 4) for i in support} if total > 0 else {},
            "r2": round(r2_all, 4), "r2_single": round(r2_one, 4), "sum": round(total, 4),
            "merged": len(support) >= 2 and r2_all - r2_one >= MERGE_GAIN}


def _neurons_in_order(own_rows: np.ndarray, sus_rows: np.ndarray) -> float:
    """Mean cosine of the owner expert's first gate rows with the suspect's rows of the same index
    (both on H, in the owner's frame)."""
    a = own_rows
    b = sus_rows[: a.shape[0]]
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30
    return float(np.mean(num / den))


def quantization(w) -> dict[str, Any]:
    """Whether the suspect's expert weights sit on a quantization grid: per block of 32 values,
    the distinct values are equally spaced with few levels (any scale and zero point)."""
    stored = w.source.get("quantization")
    g = w.quant_sample()
    blocks = g.reshape(-1, 32)[:256] if g.size % 32 == 0 else g.reshape(1, -1)
    levels = []
    for x in blocks:
        u = np.unique(x)
        if len(u) < 2:
            continue
        step = np.min(np.diff(u))
        span = (u[-1] - u[0]) / step
        on_grid = np.allclose((u - u[0]) / step, np.round((u - u[0]) / step), atol=1e-2)
        levels.append(round(span) if on_grid and span < 256 else math.inf)  # 15.000007 is 16 levels
    grid = bool(levels) and np.mean(np.isfinite(levels)) > 0.9
    if not grid:
        return {"detected": stored is not None, "bits": None, "stored": stored}
    bits = int(math.ceil(math.log2(np.percentile([l for l in levels if np.isfinite(l)], 99) + 1)))
    return {"detected": True, "bits": bits, "stored": stored}


def check_shape(meta: dict, *, hidden: int, layers: int, intermediate: int | None = None) -> None:
    """A one-line error unless the suspect has the original's hidden size, MoE layers and expert size:
    what trace matches. Not a finding: a copy narrowed or with layers dropped (width or depth pruning)
    may still be cut from the original, and the error says that nothing was concluded."""
    none = "trace has not compared them, so this is no evidence either way"
    if hidden != meta["hidden"]:
        raise MoeguardError(f"the suspect's hidden size is {hidden}, the original's {meta['hidden']}: {none}",
                            hint="trace compares models of the same width (a width-pruned copy is not traced yet)")
    if layers != len(meta["layers"]):
        raise MoeguardError(f"the suspect has {layers} MoE layers, the original {len(meta['layers'])}: {none}",
                            hint="trace compares models of the same depth (a copy with layers dropped is not traced yet)")
    if intermediate is not None and intermediate != meta["intermediate"]:
        raise MoeguardError(f"the suspect's experts have {intermediate} neurons, the original's "
                            f"{meta['intermediate']}: {none}",
                            hint="trace compares experts of the same size (a copy with neurons pruned is not traced yet)")


FLIP_EVIDENCE = 0.15   # share of a layer's negative agreement that says its norm gains' signs were flipped


def _signs(x: np.ndarray) -> np.ndarray:
    t = np.sign(x)
    t[t == 0] = 1.0
    return t


def _unflip(sk, f: dict[str, np.ndarray], own: dict[str, np.ndarray]):
    """Undo sign flips of the gain of the norm in front of the block: a gain's sign per dimension
    is free (its readers' columns flip with it), and a flipped input dimension flips view A's rows
    and columns and view B's columns. Each of the suspect's input dimensions on H takes the sign
    under which its column of the layer's mean view B agrees with the owner's common direction.
    The signs come from the mean over experts, the same under every relabeling, so the relabeling
    test stays exact. Returns the sketch and features (unchanged when no sign is flipped) and the
    number of dimensions flipped."""
    from dataclasses import replace

    m = sk.ka.shape[1]
    agree = (own["mu_b"].reshape(m, m) * f["b"].mean(axis=0).reshape(m, m)).sum(axis=0)   # [m] per input dim
    # a layer is taken as flipped only on clear evidence: the share of the agreement's mass that is
    # negative is at most 0.014 on the embedded model's copies (pruned to 2 of 8, with 30-60% weight
    # noise) and 0.32-0.70 with half the gains' signs flipped; flipping on a few weak columns of a
    # pruned, fine-tuned copy lost 2 of its 8 kept experts
    if np.abs(agree[agree < 0]).sum() <= FLIP_EVIDENCE * np.abs(agree).sum():
        return sk, f, 0
    t = _signs(agree)
    sk = replace(sk, ka=sk.ka * t[None, :, None] * t[None, None, :], kb=sk.kb * t[None, None, :],
                 rows=sk.rows * t[None, None, :])
    return sk, features(sk), int((t < 0).sum())


def trace(fp: Fingerprint, suspect, *, seed: int = 0, progress=None, keep: Path | None = None) -> dict[str, Any]:
    """Test ``suspect`` (a trace source, ``weights.py``) against ``fp``. ``progress``: a rich
    Progress to advance once per MoE layer; ``keep``: where each layer's sketch of the suspect is
    kept for a resumed run (``resume.keyed``), None to keep nothing."""
    from moeguard.trace.resume import kept_sketch

    rng = np.random.default_rng(seed)
    meta, H = fp.meta, fp.H
    check_shape(meta, hidden=suspect.hidden, layers=suspect.num_layers, intermediate=suspect.intermediate)
    own_layers = [l["index"] for l in meta["layers"]]
    frame = align(fp.tensors["anchors"].astype(np.float64), meta["anchor_tokens"], suspect)
    task = progress.add_task("tracing MoE layers", total=len(own_layers)) if progress is not None else None
    layers, ps, grids = [], [], []
    for position, own_index in enumerate(own_layers):
        own = fp.layer(own_index)
        sk = kept_sketch(keep, f"suspect-{position}", H, frame, lambda: suspect.sketch(position, H, frame))
        if not all(np.isfinite(x).all() for x in (sk.ka, sk.kb, sk.v)):
            # a NaN similarity is never >= the observed one: the test's count would be 0, a p-value of 0
            raise MoeguardError(f"the suspect's MoE layer {sk.index} holds NaN or infinite weights",
                                hint="the checkpoint is damaged (or was saved from a diverged run); trace a sound copy")
        f = features(sk)
        sk, f, flipped = _unflip(sk, f, own)
        s_a, s_b = cosine(own["a"], f["a"], own["mu_a"]), cosine(own["b"], f["b"], own["mu_b"])
        test = layer_test(s_a, s_b, rng=rng)
        if flipped:   # the gate sums over every hidden dimension, signed by the matched experts' agreement
            f = {**f, "v": f["v"] * _signs(sum(own["v"][i] * f["v"][j] for j, i in enumerate(test["sigma"])))}
        ps.append(test["p"])
        grids.append(test["N"])
        S = (s_a + s_b) / 2
        experts = []
        for j, i in enumerate(test["sigma"]):
            others = np.delete(S[:, j], i)
            merge = merge_sources(own["v"], f["v"][j])
            sim = float(min(s_a[i, j], s_b[i, j]))
            margin = float(S[i, j] - others.max()) if len(others) else float(S[i, j])
            if merge["merged"]:
                label = "merged"
            elif sim >= KEPT_SIMILARITY and margin >= KEPT_MARGIN:
                label = "kept"
            else:
                label = "unmatched"
            experts.append({"expert": j, "original": int(i), "label": label,
                            "similarity": {"gate": round(float(s_a[i, j]), 4), "up_down": round(float(s_b[i, j]), 4)},
                            "margin": round(margin, 4), "drift": round(1.0 - float(S[i, j]), 4),
                            "neurons_in_order": round(_neurons_in_order(own["rows"][i], sk.rows[j]), 4),
                            "merge": merge})
        if task is not None:
            progress.advance(task)
        kept = [e["original"] for e in experts if e["label"] == "kept"]
        layers.append({"layer": own_index, "suspect_layer": sk.index, "experts_original": int(own["a"].shape[0]),
                       "experts_suspect": sk.num_experts, "p": test["p"], "null_size": test["N"],
                       "exact": test["exact"], "statistic": round(test["statistic"], 4),
                       "null_mean": round(test["null_mean"], 4), "null_sd": round(test["null_sd"], 4),
                       "norm_signs_flipped": flipped,
                       "kept": sorted(kept), "experts": experts})
    p, method = product_tail(ps, grids)
    from moeguard.trace.stats import log10_product_tail

    # p can underflow to 0.0 with many layers at their grid's floor; its log10 stays exact
    log10_p = log10_product_tail(ps, grids) if p < 1e-300 else (math.log10(p) if p > 0 else None)
    return {"schema": SCHEMA, "original": meta["model"], "suspect": suspect.name,
            "verdict": "derived" if p <= ALPHA else "independent", "p_value": p,
            "log10_p_value": None if log10_p is None else round(log10_p, 4), "alpha": ALPHA,
            "combination": method, "p_any_dependence": min(1.0, len(ps) * min(ps)),
            # what combined the layers: the exact count, or Fisher's bound where the count ran past its budget
            "test": "expert relabeling (view A chooses, view B scores), layers combined by "
            + ("the exact product-of-uniforms tail" if method == "exact" else "Fisher's method (a larger, valid bound: the "
               "exact count ran past its budget)"), "frame": frame.to_dict(),
            "transformations": _transformations(layers, frame, suspect), "layers": layers}


def _transformations(layers: list[dict], frame, suspect) -> dict[str, Any]:
    per_layer = [[e for e in l["experts"] if e["label"] == "kept"] for l in layers]
    kept = [e for es in per_layer for e in es]
    order = [[e["original"] for e in es] for es in per_layer]
    reordered = any(o != sorted(o) for o in order)
    in_order = [e["neurons_in_order"] for e in kept]
    return {"experts_reordered": reordered,
            "experts_dropped": any(l["experts_suspect"] < l["experts_original"] for l in layers),
            "hidden_permuted": frame.permuted, "hidden_sign_flips": frame.flipped,
            "neurons_permuted": bool(in_order) and float(np.median(in_order)) < 0.5,
            "merged_experts": sum(e["label"] == "merged" for l in layers for e in l["experts"]),
            "drift_median": round(float(np.median([e["drift"] for e in kept])), 4) if kept else None,
            "quantization": quantization(suspect)}


_FINGERPRINTS: dict[str, Fingerprint] = {}


def fingerprint_in_memory(model, tokenizer, *, key: str, seed: int = 0) -> Fingerprint:
    """The fingerprint of a loaded model (its budget: 1% of its parameters' bytes), built once per
    process and ``key`` (the last two are kept)."""
    from moeguard.trace.fingerprint import build
    from moeguard.trace.weights import from_model

    cached = (key, seed)   # another seed samples other dimensions
    if cached not in _FINGERPRINTS:
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        while len(_FINGERPRINTS) >= 2:  # a defense comparison alternates two models: keep both
            _FINGERPRINTS.pop(next(iter(_FINGERPRINTS)))
        _FINGERPRINTS[cached] = build(from_model(model, tokenizer, name=key), checkpoint_bytes=size, seed=seed)
    return _FINGERPRINTS[cached]


def tracer(model, tokenizer, keep: dict[int, list[int]], *, key: str, seed: int = 0, merge: dict | None = None):
    """``after(stolen) -> {"trace": ...}`` for a study's re-aligned models: :func:`detectability`
    against ``model``'s fingerprint. A model too small to fingerprint (its 1% budget holds no
    fingerprint: a 2-layer cut of a real model, a toy) is a study without traces, not a failed
    study: ``{"trace": None, "trace_skipped": why}``. ``seed``: the study's (the fingerprint's
    sampled dimensions and the trace's null); ``merge``: a merged model's plan (``clusters`` and
    ``weights`` by layer: the merge route)."""
    from moeguard.trace.fingerprint import FingerprintTooLarge

    try:   # only the budget: any other failure (a layout trace cannot read) stays an error
        fp = fingerprint_in_memory(model, tokenizer, key=key, seed=seed)
    except FingerprintTooLarge as e:
        return lambda stolen, why=str(e): {"trace": None, "trace_skipped": why}
    clusters = None if merge is None else {int(l): g for l, g in merge["clusters"].items()}
    weights = None if merge is None else {int(l): w for l, w in (merge.get("weights") or {}).items()}
    return lambda stolen: {"trace": detectability(fp, stolen, tokenizer, keep, seed=seed, clusters=clusters,
                                                  weights=weights)}


def detectability(fp: Fingerprint, stolen, tokenizer, keep: dict[int, list[int]], *, seed: int = 0,
                  clusters: dict[int, list[list[int]]] | None = None,
                  weights: dict[int, list[list[float]]] | None = None) -> dict[str, Any]:
    """Trace a stolen model whose kept experts are known (``keep``: layer -> original experts, in
    the stolen model's order): the p-value, and how many of its experts the trace names correctly.
    With ``clusters`` (a merged model: layer -> groups, each its centre first) an expert merged from
    a group is named correctly when the trace labels it merged from exactly that group's members of
    at least MERGE_SHARE of its ``weights`` (layer -> per group, as the merge plan gives them; None:
    equal) (merged experts are never labelled kept: they were counted missed); one left alone, when kept."""
    import torch

    from moeguard.trace.weights import from_model

    with torch.no_grad():
        doc = trace(fp, from_model(stolen, tokenizer, name="stolen"), seed=seed)
    # each group by its centre: the members a trace can see, those of at least MERGE_SHARE of the merge's
    # weight (router-weighted gives a barely-routed member about 0: the average is then the others')
    groups = {}
    for l, gs in (clusters or {}).items():
        given = (weights or {}).get(l) or [None] * len(gs)
        groups[int(l)] = {}
        for g, w in zip(gs, given):
            share = [1.0 / len(g)] * len(g) if w is None else [float(x) / max(float(sum(w)), 1e-30) for x in w]
            groups[int(l)][g[0]] = sorted(m for m, x in zip(g, share) if x >= MERGE_SHARE) or [g[0]]

    def named(layer: int, e: dict) -> bool:
        centre = sorted(keep[layer])[e["expert"]]
        group = groups.get(layer, {}).get(centre, [centre])
        if len(group) == 1:   # kept, or a merge one member dominates: it reads as that member kept
            return e["label"] == "kept" and e["original"] == group[0]
        return e["label"] == "merged" and sorted(int(i) for i in e["merge"]["weights"]) == group

    right = sum(1 for l in doc["layers"] for e in l["experts"] if named(l["layer"], e))
    merged = sum(1 for gs in groups.values() for g in gs.values() if len(g) > 1)
    return {"p_value": doc["p_value"], "verdict": doc["verdict"], "kept_identified": right,
            "kept_total": sum(len(v) for v in keep.values()), "merged_total": merged, "combination": doc["combination"]}
