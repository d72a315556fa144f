"""``coreset``: k-center greedy on the model's hidden states (Sener & Savarese 2018).

Each pick is the candidate farthest (Euclidean, mean-pooled last hidden state) from everything
labeled or picked so far, so the labeled set covers the pool's representation space. With
nothing labeled yet, the first center is a seeded random candidate.
"""

import torch

from moeguard.realign.strategies.base import Query, register_strategy


def k_center(points: torch.Tensor, candidates: list[int], centers: list[int], k: int, rng) -> list[int]:
    """Greedy k-center: each pick maximizes its distance to the nearest center so far."""
    x = points[torch.tensor(candidates)].double()
    picked: list[int] = []
    if centers:
        dist = torch.cdist(x, points[torch.tensor(centers)].double()).min(1).values
    else:
        picked.append(rng.randrange(len(candidates)))
        dist = torch.cdist(x, x[picked[0]:picked[0] + 1]).squeeze(1)
    while len(picked) < min(k, len(candidates)):
        dist[picked] = -1.0
        i = int(dist.argmax())
        picked.append(i)
        dist = torch.minimum(dist, torch.cdist(x, x[i:i + 1]).squeeze(1))
    return sorted(candidates[i] for i in picked)


@register_strategy("coreset", description="k-center greedy on mean-pooled hidden states (diversity)")
def select(q: Query) -> list[int]:
    return k_center(q.pool_embeddings, q.candidates, q.labeled, q.k, q.rng)
