"""``ablation-screened``: exact ``ablation`` where it decides the plan, for layers with many experts.

Exact ablation costs one masked pass per expert: L x E, which at Qwen3-30B-A3B's E = 128 is
about 200 forward-pass equivalents for two layers (docs/scale.md). Here ``gradient``, an estimate
of the same quantity at about 2 forward-pass equivalents, screens: the ``screen`` experts of each
layer it ranks highest (default E/4, at least top-k) are ablated exactly, and ranked by that. Every
other expert keeps gradient's estimate times a per-layer factor fitted on the screened ones (least
squares through zero, in ablation's loss units), shifted where needed to stay below the lowest
screened expert: a plan keeping up to ``screen`` experts per layer is exact ablation's choice among
gradient's candidates. Cost: gradient plus screen/E of ablation.

Its error against exact ablation, and where the screen misses, is measured in
docs/attribution-and-pruning.md.
"""

import torch

from moeguard.attribution.ablation import exact_deltas
from moeguard.attribution.base import MethodOutput, register_method
from moeguard.attribution.gradient import gradient


@register_method("ablation-screened", "exact ablation of the experts gradient ranks highest (screen per layer, "
                 "default E/4), gradient's estimate scaled to ablation's units for the rest",
                 comparable_across_layers=True, removes_one=True,
                 causal_only="screens with gradient and replays layers as ablation does")
def ablation_screened(ctx) -> MethodOutput:
    adapter = ctx.adapter
    E = adapter.num_experts
    screen = int(ctx.options.get("screen") or max(adapter.top_k, -(-E // 4)))
    screen = max(1, min(E, screen))
    estimate = gradient(ctx).scores.double()                               # [L, E]
    # in expert order: masks share batched passes as in exact ablation (screen = E gives its numbers)
    picks = {row: sorted(torch.topk(estimate[row], screen).indices.tolist()) for row in range(estimate.shape[0])}
    exact = exact_deltas(ctx, picks, label="ablation (screened)") / max(1, ctx.n_targets)
    scores = estimate.clone()
    for row, idx in picks.items():
        g, a = estimate[row, idx], exact[row, idx]
        denom = float((g * g).sum())
        # gradient's scale in ablation's units; never below 0, which would invert its order
        scale = max(float((g * a).sum()) / denom, 1e-12) if denom > 0 else 1.0
        screened = set(idx)
        rest = [e for e in range(E) if e not in screened]
        if rest:
            # the screen is a candidate filter: every unscreened expert stays below the screened
            # ones (shifted, so gradient's order and differences among them are kept)
            est = estimate[row, rest] * scale
            floor = float(a.min())
            over = float(est.max()) - floor
            scores[row, rest] = est - (over + 1e-9 * (abs(floor) + 1.0) if over >= 0 else 0.0)
        scores[row, idx] = a
    return MethodOutput(scores=scores, tokens=ctx.n_targets)
