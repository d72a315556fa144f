"""How a layer's experts are grouped, shared by the methods: around centres chosen by
attribution score, or by agglomerative clustering on the experts' outputs (HC-SMoE). Each
cluster is returned centre first: the expert whose index the merged expert keeps."""

from __future__ import annotations

import torch

from moeguard.pruning.merging.calibrate import LayerProfile


def by_score(scores: list[float]) -> list[int]:
    """Experts from highest score to lowest (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda e: (-scores[e], e))


def around_centres(profile: LayerProfile, scores: list[float], keep: int) -> list[list[int]]:
    """The ``keep`` best-scored experts are the centres; every other expert joins the centre whose
    outputs on the calibration tokens are most similar to its own (cosine)."""
    order = by_score(scores)
    centres = order[:keep]
    sim = profile.similarity
    groups = {c: [c] for c in centres}
    for e in order[keep:]:
        best = max(centres, key=lambda c: (float(sim[e, c]), -centres.index(c)))
        groups[best].append(e)
    return [[c, *sorted(groups[c][1:])] for c in sorted(centres)]


def hierarchical(profile: LayerProfile, scores: list[float], keep: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering (HC-SMoE) on the cosine distance between the
    experts' mean outputs over the calibration tokens, merged until ``keep`` clusters remain;
    the best-scored member of each is its centre. Exactly ``keep`` clusters, deterministic (ties:
    the first pair in row order). Cluster distances are updated by Lance-Williams (average
    linkage: size-weighted means), so E - K merges cost O(E^2) each."""
    mean = profile.mean_output.double()                                           # [E, H]
    mean = mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-12)
    E = profile.num_experts
    dist = (1.0 - mean @ mean.T).clamp_min(0.0)
    dist.fill_diagonal_(float("inf"))
    clusters: list[list[int] | None] = [[e] for e in range(E)]
    for _ in range(E - keep):
        flat = int(torch.argmin(dist))
        i, j = sorted(divmod(flat, E))
        ni, nj = len(clusters[i]), len(clusters[j])
        row = (ni * dist[i] + nj * dist[j]) / (ni + nj)
        dist[i], dist[:, i] = row, row
        dist[i, i] = float("inf")
        dist[j], dist[:, j] = float("inf"), float("inf")
        clusters[i] = sorted(clusters[i] + clusters[j])
        clusters[j] = None
    clusters = [c for c in clusters if c is not None]
    out = []
    for g in clusters:
        centre = min(g, key=lambda e: (-scores[e], e))
        out.append([centre, *[e for e in g if e != centre]])
    return sorted(out, key=lambda g: g[0])


def normalized(values: torch.Tensor, group: list[int]) -> list[float]:
    """Members' shares of ``values`` (uniform when the cluster has none of it)."""
    w = values[group].double().clamp_min(0)
    return (w / w.sum()).tolist() if float(w.sum()) > 0 else [1.0 / len(group)] * len(group)
