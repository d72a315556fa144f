"""``cluster-uncertainty``: diverse *and* uncertain batches (Zhdanov 2019's diverse mini-batch AL).

The candidates' hidden states are clustered into k groups by k-means (k-means++ seeding,
weighted by uncertainty so clusters form where the model is unsure), and the most uncertain
sample of each cluster is labeled. Uncertainty is the kind's default (label entropy, or mean
token NLL). Pure uncertainty sampling tends to pick near-duplicates in one batch; clustering
spreads the batch over the pool.
"""

import torch

from moeguard.realign.strategies.base import Query, register_strategy


def kmeans(x: torch.Tensor, k: int, weights: torch.Tensor, rng, iters: int = 20) -> torch.Tensor:
    """Cluster assignment [n] of weighted k-means with k-means++ seeding (seeded by ``rng``)."""
    n = x.shape[0]
    w = weights.clamp_min(1e-12)
    centers = [rng.choices(range(n), weights=w.tolist())[0]]
    d2 = ((x - x[centers[0]]) ** 2).sum(1)
    for _ in range(1, k):
        probs = (d2 * w).clamp_min(0)
        if float(probs.sum()) <= 0:
            break
        centers.append(rng.choices(range(n), weights=probs.tolist())[0])
        d2 = torch.minimum(d2, ((x - x[centers[-1]]) ** 2).sum(1))
    c = x[centers].clone()
    assign = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        for j in range(c.shape[0]):
            members = assign == j
            if members.any():
                c[j] = (x[members] * w[members, None]).sum(0) / w[members].sum()
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


@register_strategy("cluster-uncertainty", description="k-means on hidden states, the most uncertain sample per cluster")
def select(q: Query) -> list[int]:
    k = min(q.k, len(q.candidates))
    u = q.uncertainty().double()
    x = q.pool_embeddings[torch.tensor(q.candidates)].double()
    assign = kmeans(x, k, u - u.min() + 1e-6, q.rng)
    picked: list[int] = []
    for j in sorted(set(assign.tolist())):
        members = (assign == j).nonzero().squeeze(1)
        picked.append(int(members[u[members].argmax()]))
    if len(picked) < k:  # fewer distinct clusters than k: fill with the most uncertain rest
        rest = [i for i in u.argsort(descending=True).tolist() if i not in set(picked)]
        picked += rest[:k - len(picked)]
    return sorted(q.candidates[i] for i in picked)
