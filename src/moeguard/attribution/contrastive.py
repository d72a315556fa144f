"""``contrastive``: how much more the task relies on an expert than a reference corpus does.

Per layer, with p = the task's share of gate mass over experts and q = the reference's, the
score of expert e is p_e * log(p_e / q_e): its term in KL(p || q). It is high for an expert
that is both used by the task and used *more* than by general text, negative for one the
reference needs more; an expert that everything uses equally scores near 0 however busy it is.
The reference is the ``--reference`` tasks (default: the other tasks of the embedded suite).
"""

import torch

from moeguard.attribution.base import MethodOutput, register_method

_EPS = 1e-6


@register_method("contrastive", "p log(p/q) of the task's gate-mass share p against a reference corpus' share q",
                 needs_reference=True)
def contrastive(ctx) -> MethodOutput:
    task = ctx.routing_stats()
    ref = ctx.routing_stats(reference=True)
    rows = []
    for t, r in zip(task.layers, ref.layers):
        p = t.gate_mass / t.gate_mass.sum().clamp_min(_EPS)
        q = r.gate_mass / r.gate_mass.sum().clamp_min(_EPS)
        rows.append(p * torch.log((p + _EPS) / (q + _EPS)))
    return MethodOutput(scores=torch.stack(rows).double(), tokens=task.layers[0].tokens)
