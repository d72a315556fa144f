"""``reconstruction``: how far a layer's output moves when experts are dropped (NAEE's objective).

Lu et al. (2024, "Not All Experts are Equal") choose, per layer, the kept subset whose MoE
output best reconstructs the full layer's output on calibration tokens, searching subsets
exhaustively. Here the score of an expert is the mean squared reconstruction error when it
alone is dropped and its tokens re-routed among the rest; and for every keep count the best
subset is searched exhaustively when there are at most ``max_subsets`` candidates per layer,
greedily (drop the expert whose removal hurts least, repeat) otherwise. The subsets go in the
scores file and the planner uses them for uniform keeps.
"""

from itertools import combinations
from math import comb

import torch

from moeguard.attribution.base import MethodOutput, register_method
from moeguard.models.hooks import capture_inputs, mask_experts


def _block_out(block, x):
    out = block(x)
    return (out[0] if isinstance(out, tuple) else out).float()


@register_method("reconstruction", "mean squared error of the layer output when the expert is dropped; "
                 "best kept subsets searched exhaustively (greedily when too many)")
def reconstruction(ctx) -> MethodOutput:
    adapter, model = ctx.adapter, ctx.model
    max_subsets = int(ctx.options.get("max_subsets", 256))
    max_tokens = int(ctx.options.get("reconstruction_tokens", 8192))
    E, min_keep = adapter.num_experts, max(1, adapter.family.min_experts)
    blocks = {l.index: l.block for l in adapter.layers}
    xs: dict[int, list[torch.Tensor]] = {i: [] for i in blocks}
    with torch.no_grad():
        for batch in ctx.batches:
            b = batch.to(ctx.device)
            with capture_inputs(blocks) as inputs:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            valid = b.attention_mask.reshape(-1).bool()
            for i, (args, kwargs) in inputs.items():
                h = kwargs.get("hidden_states", args[0] if args else None)
                xs[i].append(h.reshape(-1, h.shape[-1])[valid])
    gen = torch.Generator().manual_seed(ctx.seed)
    scores = torch.zeros(len(adapter.layers), E, dtype=torch.float64)
    subsets: dict[int, dict[int, list[int]]] = {}
    with torch.no_grad():
        for row, layer in enumerate(ctx.track(adapter.layers, "reconstruction")):
            x = torch.cat(xs[layer.index])
            if x.shape[0] > max_tokens:
                x = x[torch.randperm(x.shape[0], generator=gen)[:max_tokens].sort().values.to(x.device)]
            x = x[None]
            full = _block_out(layer.block, x)

            def error(kept):
                with mask_experts(model, {layer.index: list(kept)}, adapter=adapter):
                    return float((_block_out(layer.block, x) - full).pow(2).sum(-1).mean())

            for e in range(E):
                scores[row, e] = error([x_ for x_ in range(E) if x_ != e]) if E - 1 >= min_keep else 0.0
            greedy = list(range(E))
            for k in range(E - 1, min_keep - 1, -1):
                if comb(E, k) <= max_subsets:
                    best = min(combinations(range(E), k), key=error)
                else:
                    drop = min(greedy, key=lambda d: error([x_ for x_ in greedy if x_ != d]))
                    best = [x_ for x_ in greedy if x_ != drop]
                greedy = sorted(best)
                subsets.setdefault(k, {})[layer.index] = sorted(best)
    tokens = sum(int(b.attention_mask.sum()) for b in ctx.batches)
    return MethodOutput(scores=scores, tokens=tokens, subsets=subsets)
