"""``reap``: Router-weighted Expert Activation Pruning (Lasby et al., Cerebras 2025).

Score = mean, over the tokens routed to the expert, of gate weight x ||expert output||. Gate
weights are the router's real ones (renormalized top-k where the family renormalizes), taken
from transformers' own router in the forward; an expert no token reaches scores 0.
"""

import torch

from moeguard.attribution.base import MethodOutput, register_method


@register_method("reap", "mean over routed tokens of gate weight x L2 norm of the expert's output (REAP)")
def reap(ctx) -> MethodOutput:
    stats = ctx.routing_stats(norms=True)
    scores = torch.stack([l.weighted_norm_sum / l.counts.clamp_min(1) for l in stats.layers])
    return MethodOutput(scores=scores.double(), tokens=stats.layers[0].tokens)
