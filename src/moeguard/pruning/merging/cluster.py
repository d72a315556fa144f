"""How a layer's experts are grouped, shared by the methods: around centres chosen by
attribution score, or by agglomerative clustering on the experts' outputs (HC-SMoE). Each
cluster is returned centre first: the expert whose index the merged expert keeps."""

from __future__ import annotations

import torch

from moeguard.pruning.merging.calibrate import LayerProfile


def _by_score(scores: list[float]) -> list[int]:
    """Experts from highest score to lowest (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda e: (-scores[e], e))


def around_centres(profile: LayerProfile, scores: list[float], keep: int) -> list[list[int]]:
    """The ``keep`` best-scored experts are the centres; every other expert joins the centre whose
    outputs on the calibration tokens are most similar to its own (cosine)."""
    order = _by_score(scores)
    centres = order[:keep]
    sim = profile.similarity()
    groups = {c: [c] for c in centres}
    for e in order[keep:]:
        best = max(centres, key=lambda c: (float(sim[e, c]), -centres.index(c)))
        groups[best].append(e)
    return [[c, *sorted(groups[c][1:])] for c in sorted(centres)]


def hierarchical(profile: LayerProfile, scores: list[float], keep: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering (HC-SMoE) on the cosine distance between the
    experts' mean outputs over the calibration tokens, merged until ``keep`` clusters remain;
    the best-scored member of each is its centre. Exactly ``keep`` clusters, deterministic."""
    mean = profile.outputs.double().mean(dim=1)                                   # [E, H]
    mean = mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dist = (1.0 - mean @ mean.T).clamp_min(0.0)
    clusters = [[e] for e in range(profile.num_experts)]
    while len(clusters) > keep:
        best = None
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                d = float(dist[clusters[i]][:, clusters[j]].mean())
                if best is None or d < best[0]:
                    best = (d, i, j)
        _, i, j = best
        clusters[i] = sorted(clusters[i] + clusters[j])
        del clusters[j]
    out = []
    for g in clusters:
        centre = min(g, key=lambda e: (-scores[e], e))
        out.append([centre, *[e for e in g if e != centre]])
    return sorted(out, key=lambda g: g[0])


def normalized(values: torch.Tensor, group: list[int]) -> list[float]:
    """Members' shares of ``values`` (uniform when the cluster has none of it)."""
    w = values[group].double().clamp_min(0)
    return (w / w.sum()).tolist() if float(w.sum()) > 0 else [1.0 / len(group)] * len(group)
