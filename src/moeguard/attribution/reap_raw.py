"""``reap-raw``: REAP's score with the router's raw score as the gate.

Score = mean, over the tokens routed to the expert, of the router's score before top-k
renormalization (softmax over all experts, or sigmoid) x ||expert output||. This is what REAP's
default pipeline computes for Mixtral (its ``main.py``): Mixtral's config has no
``norm_topk_prob``, so the observer falls back to the raw softmax gate, while the model itself
renormalizes over the top-k. ``reap`` uses the weights the block applies; the two rank experts
differently (docs/merging.md). Where a family does not renormalize, both are the same.
"""

import torch

from moeguard.attribution.base import MethodOutput, register_method


@register_method("reap-raw", "REAP with the raw router score (before top-k renormalization) as the gate, as REAP's Mixtral pipeline")
def reap_raw(ctx) -> MethodOutput:
    stats = ctx.routing_stats(norms=True)
    scores = torch.stack([l.raw_weighted_norm_sum / l.counts.clamp_min(1) for l in stats.layers])
    return MethodOutput(scores=scores.double(), tokens=stats.layers[0].tokens)
