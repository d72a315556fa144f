"""``ablation``: the exact increase of the task loss when one expert is pruned (the ground truth).

For each (layer, expert): the mean target NLL with that expert masked (its tokens re-routed
among the rest, as the pruned model would) minus the unmodified model's. Cost is kept to what
exactness needs: one plain forward records every decoder layer's input, each mask re-runs only
layers l..end, and ``masks_per_pass`` masks share one batched pass. Total work is
sum over MoE layers l of E x (layers after l + head), below L x E full forwards.
"""

import torch

from moeguard.attribution.base import MethodOutput, register_method
from moeguard.attribution.replay import replay_hidden, target_nll
from moeguard.models.hooks import capture_inputs, check_head, drop_one_per_chunk, last_hidden


@register_method("ablation", "exact increase of the mean target NLL when the expert is masked (its tokens re-routed)",
                 comparable_across_layers=True, removes_one=True,
                 causal_only="replays the decoder layers after each masked one from their cached inputs, which an "
                             "encoder-decoder's cross-attention does not allow")
def ablation(ctx) -> MethodOutput:
    return MethodOutput(scores=exact_deltas(ctx) / max(1, ctx.n_targets), tokens=ctx.n_targets)


def exact_deltas(ctx, experts: dict[int, list[int]] | None = None, *, label: str = "ablation") -> torch.Tensor:
    """[L, E] summed NLL increase over the calibration targets of masking each expert, for
    ``experts[row]`` of each MoE layer row (every expert when None); the rest stay 0."""
    adapter, model = ctx.adapter, ctx.model
    E = adapter.num_experts
    todo = {row: list(range(E)) if experts is None else list(experts[row]) for row in range(len(adapter.layers))}
    modules = dict(enumerate(adapter.decoder_layers))

    def term(batch) -> torch.Tensor:   # this batch's summed NLL increases, [L, E]
        b = batch.to(ctx.device)
        check_head(model, adapter, b.input_ids)   # the NLL below is scored through adapter.head
        out = torch.zeros(len(adapter.layers), E, dtype=torch.float64)
        # stopped before the head: no [B, T, V] logits (0.6 GB at Qwen3's vocabulary, batch 4 x 256)
        with capture_inputs(modules) as inputs:
            last = last_hidden(model, adapter, input_ids=b.input_ids, attention_mask=b.attention_mask,
                               use_cache=False)
        base = float(target_nll(adapter, last, b.labels).double().sum())
        tokens = b.input_ids.numel()
        per_pass = int(ctx.options.get("masks_per_pass") or
                       max(1, min(E, int(ctx.options.get("tokens_per_pass", 2048)) // tokens)))
        for row, layer in enumerate(adapter.layers):
            for first in range(0, len(todo[row]), per_pass):
                drops = todo[row][first:first + per_pass]
                with drop_one_per_chunk(adapter, layer.index, drops, rows=tokens):
                    hidden = replay_hidden(adapter, inputs, layer.layer_index, copies=len(drops))
                nll = target_nll(adapter, hidden, b.labels.repeat(len(drops), 1)).double()
                out[row, drops] = nll.view(len(drops), -1).sum(1).cpu() - base
        return out

    with torch.no_grad():
        # kept per batch where the caller keeps a scratch folder: the costliest method resumes mid-run
        return ctx.batch_sum(label, term, shape=(len(adapter.layers), E), key=todo)
