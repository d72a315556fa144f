"""``gate``: router-weighted mass, the mean gate weight an expert gets per token (0 when not chosen)."""

import torch

from moeguard.attribution.base import MethodOutput, register_method


@register_method("gate", "mean top-k gate weight the expert receives per token (the family's own normalization)")
def gate(ctx) -> MethodOutput:
    stats = ctx.routing_stats()
    scores = torch.stack([l.gate_mass / max(1, l.tokens) for l in stats.layers])
    return MethodOutput(scores=scores.double(), tokens=stats.layers[0].tokens)
