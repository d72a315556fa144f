"""``gradient``: an estimate of ``ablation`` from one forward and one backward pass.

Pruning expert e changes layer l's routed output at token t by d_t = sum_j' w'_j' y_j' -
sum_j w_j y_j (the routing the pruned router computes minus the old top-k). With G_t =
d loss / d output_t, the first-order change is sum_t G_t . d_t. Removing a busy expert is not a
small change, and the signed first-order sum alone cancels across tokens (Spearman with the exact
ablation on the embedded model: 0.41 / 0.16 / 0.43 on arith-compare / stdlib-code /
docstring-topic). So a second-order term from the empirical Fisher is added, token-diagonal as in
Optimal Brain Damage: the loss is a mean over N target tokens, so the Fisher of the mean is
N sum_t G_t G_t^T and 1/2 d^T F d ~ N/2 sum_t (G_t . d_t)^2 (same runs: 0.60 / 0.96 / 0.60).
The old per-slot outputs y_j come from the forward; the one expert each affected token newly
reaches is run once more (about one extra MoE forward in all). Only activation gradients are
computed, never weight gradients.
"""

import torch

from moeguard.attribution.base import MethodOutput, register_method
from moeguard.attribution.replay import target_nll
from moeguard.models.hooks import check_head, expert_outputs, last_hidden, trace_experts
from moeguard.models.routing import pruned_router_params, route_module


def _drop_one_plans(adapter, E: int, device) -> list:
    """(kept experts, pruned router settings) for each single-expert mask; made once per run."""
    plans = []
    for e in range(E):
        kept = [x for x in range(E) if x != e]
        plans.append((torch.tensor(kept, device=device), pruned_router_params(adapter.family, adapter.moe_config, kept, E)))
    return plans


def _pruned_weights(adapter, layer, trace, params, kept_t):
    """The pruned router's (weights, kept slots) from the traced logits, in the dtype the model's own
    weights came in. Granite's router returns float32 logits (what the trace holds) and its weights in
    the input's dtype, which a spec replaying its bf16 logits (built or inferred) cannot tell from the
    logits' dtype: they came back in float32 beside the model's bf16 ones, a rounding offset on every
    token of every plan. A pruned router returns its weights in the unpruned one's dtype."""
    w_new, sub = route_module(layer, trace.logits, adapter.family.routing, params, kept=kept_t,
                              input_dtype=trace.hidden.dtype)
    return w_new.to(trace.weights.dtype), sub


def _layer_delta(adapter, layer, trace, n_targets: int, plans: list) -> torch.Tensor:
    E = layer.num_experts
    out = torch.zeros(E, dtype=torch.float64)
    if trace.grad is None:
        return out
    G = trace.grad.float()
    N = G.shape[0]
    s = (trace.slot_out.float() * G[:, None, :]).sum(-1)           # [N, k] G . y_j
    old = (trace.weights.float() * s).sum(1)                        # [N]
    device = trace.logits.device
    # G . y for (token, expert) pairs; the pruned routers reach few pairs beyond the old top-k
    table = torch.full((N, E), float("nan"), device=device).scatter_(1, trace.index, s)
    routed = []
    for kept_t, params in plans:
        kept_t = kept_t.to(device)   # the layer's device: under a multi-GPU device map not the first parameter's
        # the router input's dtype, as the masked replays pass it (ERNIE returns its weights in it: a bf16
        # model's pruned weights came back in float32 beside old ones in bf16, a rounding offset on every token)
        w_new, sub = _pruned_weights(adapter, layer, trace, params, kept_t)
        routed.append((w_new.float(), kept_t[sub]))
    need = torch.zeros(N, E, dtype=torch.bool, device=device)
    for _, idx in routed:
        need.scatter_(1, idx, True)
    tok, ex = torch.where(need & table.isnan())
    if tok.numel():  # one call of the experts' kernel for every newly reached pair, per unit of gate
        if adapter.family.call == "scaled_input":
            # Llama-4: a pair's gate is its own sigmoid whatever else is dropped, and the expert
            # sees it in its input: run it at that gate (exact there)
            gates = torch.zeros(N, E, device=device)
            for w_new, idx in routed:
                gates.scatter_(1, idx, w_new)
            w = gates[tok, ex].clamp_min(torch.finfo(torch.float32).tiny)
        else:   # the gate scales the output: gate 1 (x * 1 and x / 1 are exact)
            w = torch.ones(tok.numel(), dtype=trace.weights.dtype, device=device)
        y = expert_outputs(adapter, layer, trace.hidden[tok], ex.to(trace.index.dtype), w, rows=tok,
                           context=trace.context).float() / w[:, None]
        table[tok, ex] = (y * G[tok]).sum(-1)
    for e, (w_new, idx) in enumerate(routed):
        d = ((w_new * table.gather(1, idx)).sum(1) - old).double()  # [N] first-order change per token
        out[e] = float(d.sum() + 0.5 * n_targets * d.pow(2).sum())
    return out


@register_method("gradient", "gradient x change of layer output plus an empirical-Fisher second-order term: estimate of the ablation loss increase",
                 comparable_across_layers=True, removes_one=True,
                 causal_only="traces each routed slot's output through fused expert tensors, which one module per expert lacks")
def gradient(ctx) -> MethodOutput:
    adapter, model = ctx.adapter, ctx.model
    n_targets = max(1, ctx.n_targets)
    plans = _drop_one_plans(adapter, adapter.num_experts, ctx.device)

    def term(batch) -> torch.Tensor:   # this batch's estimates, [L, E]
        b = batch.to(ctx.device)
        check_head(model, adapter, b.input_ids)   # the NLL below is scored through adapter.head
        with torch.enable_grad(), trace_experts(model, adapter=adapter) as traces:
            # the head only at target positions: full logits were most of the peak at E = 128
            hidden = last_hidden(model, adapter, input_ids=b.input_ids, attention_mask=b.attention_mask,
                                 use_cache=False)
            (target_nll(adapter, hidden, b.labels).sum() / n_targets).backward()
        out = torch.zeros(len(adapter.layers), adapter.num_experts, dtype=torch.float64)
        with torch.no_grad():
            for row, layer in enumerate(adapter.layers):
                out[row] = _layer_delta(adapter, layer, traces[layer.index], n_targets, plans)
        return out

    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        # kept per batch where the caller keeps a scratch folder (ablation-screened's screen reads the same terms)
        deltas = ctx.batch_sum("gradient", term, shape=(len(adapter.layers), adapter.num_experts))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return MethodOutput(scores=deltas, tokens=ctx.n_targets)
