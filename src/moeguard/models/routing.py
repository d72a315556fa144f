"""Routing of a router restricted to a subset of its experts.

Masking experts at run time and physically pruning them must give the same model. Both go
through :func:`pruned_router_params` (what the smaller router's config is) and masking goes
through :func:`route` (what that smaller router computes), so the equivalence holds by
construction and ``tests/test_families.py`` checks :func:`route` against transformers' own
routers with every expert kept. A block that routes the router's logits itself (DBRX) gets the
masked logits (dropped experts at -inf) and the pruned top-k, and routes them with its own rule,
which the same test checks against :func:`route`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from moeguard.models.families import FamilySpec, RoutingSpec


@dataclass(frozen=True, kw_only=True)
class RouterParams:
    top_k: int
    renormalize: bool
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0
    renorm_min: float = 0.0   # ERNIE divides by max(sum, moe_norm_min)
    renorm_p: float | None = None   # DBRX divides by the k weights' p-norm
    capacity: int | None = None     # tokens each expert takes per sequence (Switch), the rest dropped
    # NLLB-MoE's top-2 with batch capacity (RoutingSpec.top2_capacity): ``capacity`` is then the
    # configured expert_capacity (None: 2 x ceil(tokens / experts)) until :func:`top2_capacity` fixes
    # the one a call uses
    top2_capacity: bool = False
    eval_capacity_fraction: float = 0.0
    prioritized: bool = False         # batch_prioritized_routing: tokens take capacity by confidence
    normalize_before_drop: bool = False
    route_padding: bool = False       # router_ignore_padding_tokens: padding routed like any token


def pruned_router_params(family: FamilySpec, config, kept: list[int], num_experts: int) -> RouterParams:
    """Router settings of the model that keeps ``kept`` (sorted original indices) of ``num_experts``.

    top_k is clamped to what is left. Group-limited routing keeps its groups only when every
    original group keeps the same number (>= 2) of experts; otherwise the groups no longer mean
    anything and routing falls back to one group (recorded in the pruning record).
    """
    spec = family.routing
    n = len(kept)
    top_k = min(family.top_k(config), n)
    scaling = float(getattr(config, spec.scaling_key, 1.0)) if spec.scaling_key else 1.0
    n_group, topk_group = 1, 1
    if spec.groups_on(config):
        n_group = int(getattr(config, spec.n_group_key, 1) or 1)
        topk_group = int(getattr(config, spec.topk_group_key, 1) or 1)
        size = num_experts // n_group
        per_group = [sum(1 for e in kept if e // size == g) for g in range(n_group)]
        if n_group > 1 and len(set(per_group)) == 1 and per_group[0] >= 2:
            topk_group = min(topk_group, n_group)
            top_k = min(top_k, topk_group * per_group[0])
        else:
            n_group, topk_group = 1, 1
    renorm_min = float(getattr(config, spec.renorm_min_key)) if spec.renorm_min_key else 0.0
    renorm_p = getattr(config, spec.renorm_p_key, None) if spec.renorm_p_key else None
    capacity = int(getattr(config, spec.capacity_key)) if spec.capacity_key else None
    top2 = {}
    if spec.top2_capacity:
        fixed = getattr(config, "expert_capacity", None)
        capacity = None if fixed is None else int(fixed)
        top2 = dict(top2_capacity=True,
                    eval_capacity_fraction=float(getattr(config, "moe_eval_capacity_token_fraction", 0.0) or 0.0),
                    prioritized=bool(getattr(config, "batch_prioritized_routing", False)),
                    normalize_before_drop=bool(getattr(config, "normalize_router_prob_before_dropping", False)),
                    route_padding=bool(getattr(config, "router_ignore_padding_tokens", False)))
    return RouterParams(top_k=top_k, renormalize=spec.renormalizes(config), n_group=n_group,
                        topk_group=topk_group, scaling=scaling, renorm_min=renorm_min,
                        renorm_p=None if renorm_p is None else float(renorm_p), capacity=capacity, **top2)


def _group_mask(scores: torch.Tensor, params: RouterParams, how: str) -> torch.Tensor:
    """[tokens, experts] True inside the ``topk_group`` best groups; a group scores the sum of its
    top 2 (``top2_sum``, DeepSeek-V3) or its best expert (``max``, DeepSeek-V2)."""
    n, g = scores.shape[-1], params.n_group
    grouped = scores.view(-1, g, n // g)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1) if how == "top2_sum" else grouped.max(dim=-1).values
    group_idx = torch.topk(group_scores, k=params.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, g, n // g).reshape(-1, n).bool()


def _scores(logits: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    x = logits if spec.score_dtype == "logits" else logits.float()
    return x.sigmoid() if spec.score == "sigmoid" else F.softmax(x, dim=-1)


def _renorm(w: torch.Tensor, spec: RoutingSpec, params: RouterParams) -> torch.Tensor:
    if params.renorm_p is not None:   # DBRX: torch.norm, as its block computes it (p = 1 too)
        return w / torch.norm(w, p=params.renorm_p, dim=-1, keepdim=True)
    total = w.sum(dim=-1, keepdim=True)
    if params.renorm_min:
        return w / total.clamp(min=params.renorm_min)
    return w / (total + spec.renorm_eps) if spec.renorm_eps else w / total


def _capacity_route(logits: torch.Tensor, params: RouterParams, out_dtype: torch.dtype,
                    sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch Transformers' top-1 with capacity: float32 softmax cast to the router input's dtype,
    the first best expert of each token (argmax, as its router takes it), and each expert's tokens
    counted in sequence order within each of ``sequences`` equal runs of rows: past ``capacity``
    a token is dropped (weight 0)."""
    probs = F.softmax(logits.float(), dim=-1).to(out_dtype)          # [T, E]
    idx = probs.argmax(dim=-1, keepdim=True)                         # [T, 1]
    top = probs.gather(1, idx)
    onehot = torch.zeros_like(logits, dtype=torch.long).scatter_(1, idx, 1)
    rank = onehot.view(sequences, -1, onehot.shape[-1]).cumsum(dim=1).view_as(onehot).gather(1, idx)
    return top * (rank <= params.capacity).to(top.dtype), idx


def top2_capacity(params: RouterParams, tokens: int, experts: int, *, training: bool,
                  stored: int | None) -> int:
    """The capacity one call of NLLB-MoE's router uses, as it sets it: in eval with an eval fraction,
    ceil(fraction x tokens); else the capacity the router holds (``stored``: its ``expert_capacity``,
    which an eval call overwrites), or 2 x ceil(tokens / experts) when it holds none."""
    if not training and params.eval_capacity_fraction > 0:
        return math.ceil(params.eval_capacity_fraction * tokens)
    return 2 * math.ceil(tokens / experts) if stored is None else int(stored)


def non_padding(padding_mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """[tokens] True for the tokens NLLB-MoE's router routes, from the mask its layer passes it (the
    attention mask: additive, 0 where attended), read as the router reads it: a 4-D mask by its last
    query row, flattened, its last ``tokens`` entries. None: no mask, every token routed."""
    if padding_mask is None:
        return None
    if padding_mask.dim() == 4:
        padding_mask = padding_mask[:, :, -1, :].reshape(-1)[-tokens:]
    return ~padding_mask.bool()


def _top2_choice(logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NLLB-MoE's two choices as its router takes them: (probabilities [T, E], a float32 softmax cast to
    ``dtype``; the first expert [T], by them; the second [T], by the logits with the first masked)."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(dtype)
    first = probs.argmax(dim=-1)
    second = logits.masked_fill(F.one_hot(first, num_classes=logits.shape[-1]).bool(), float("-inf")).argmax(dim=-1)
    return probs, first, second


def _top2_capacity_route(logits: torch.Tensor, params: RouterParams, out_dtype: torch.dtype,
                         routed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """NLLB-MoE's top-2 with batch capacity, op for op as its router computes it (so weights are
    equal bit for bit): float32 softmax cast to the input's dtype; the first expert by it, the second
    by the logits with the first masked; tokens not ``routed`` (padding) take none; capacity slots
    counted over the batch, second choices after every first choice (or both by confidence,
    ``prioritized``); the two weights divided by their sum. ``params.capacity``: this call's."""
    E = logits.shape[-1]
    probs, first, second = _top2_choice(logits, out_dtype)                       # [T, E], [T], [T]
    mask1, mask2 = F.one_hot(first, num_classes=E), F.one_hot(second, num_classes=E)

    def normalized(m1, m2):
        p1, p2 = (probs * m1).sum(dim=1), (probs * m2).sum(dim=1)
        total = torch.clamp(p1 + p2, min=torch.finfo(probs.dtype).eps)
        return p1 / total, p2 / total

    if params.normalize_before_drop:
        p1, p2 = normalized(mask1, mask2)
    if routed is not None and not params.route_padding:
        mask1 = mask1 * routed.unsqueeze(-1).to(mask1.dtype)
        mask2 = mask2 * routed.unsqueeze(-1).to(mask1.dtype)
    if params.prioritized:   # the most confident tokens take their slots first
        order = (-probs.max(dim=1)[0]).argsort(dim=0)
        back = order.argsort(dim=0)
        loc1 = ((torch.cumsum(mask1[order], dim=0) - 1) * mask1[order])[back]
        loc2 = ((torch.cumsum(mask2[order], dim=0) - 1) * mask2[order])[back]
    else:
        loc1, loc2 = torch.cumsum(mask1, dim=0) - 1, torch.cumsum(mask2, dim=0) - 1
    loc2 = loc2 + mask1.sum(dim=0, keepdim=True)
    mask1 = mask1 * torch.lt(loc1, params.capacity)
    mask2 = mask2 * torch.lt(loc2, params.capacity)
    if not params.normalize_before_drop:
        p1, p2 = normalized(mask1, mask2)
    idx = torch.stack([first, second], dim=-1)                                   # [T, 2]
    # the router's combine weights at the two chosen columns (the other choice adds 0 there)
    weights = torch.stack([(p1[:, None] * mask1).gather(1, first[:, None])[:, 0],
                           (p2[:, None] * mask2).gather(1, second[:, None])[:, 0]], dim=-1)
    return weights, idx


def route(logits: torch.Tensor, spec: RoutingSpec, params: RouterParams, *,
          correction_bias: torch.Tensor | None = None, training: bool = False,
          jitter_eps: float = 0.0, input_dtype: torch.dtype | None = None,
          sequences: int = 1, routed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k weights and indices for ``logits`` [tokens, experts] (indices into these experts).

    ``correction_bias`` (any shape ending in the experts) moves the choice, never the weights;
    ``input_dtype`` is the router input's dtype (ERNIE returns its weights in it); ``sequences``:
    how many equal runs of rows (batch rows) the tokens are, for capacity-limited routing;
    ``routed``: [tokens] False for padding the router leaves out (NLLB-MoE)."""
    k = params.top_k
    if spec.score == "sparsemixer":
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        return sparsemixer(logits, jitter_eps=jitter_eps, training=training, top_k=k)
    out_dtype = {"float32": torch.float32, "logits": logits.dtype,
                 "input": input_dtype or logits.dtype}[spec.weights_dtype]
    if params.top2_capacity:
        return _top2_capacity_route(logits, params, out_dtype, routed)
    if params.capacity is not None:
        return _capacity_route(logits, params, out_dtype, sequences)
    if spec.select_on == "logits":
        if correction_bias is None:
            top, idx = torch.topk(logits, k, dim=-1)
        else:
            idx = torch.topk(logits + correction_bias, k, dim=-1, sorted=spec.sorted_choice)[1]
            top = logits.gather(1, idx)
        top = top if spec.score_dtype == "logits" else top.float()
        if spec.score == "sigmoid":   # in the scores' dtype, returned in the logits' (Llama-4)
            top = top.sigmoid()
            return ((_renorm(top, spec, params) if params.renormalize else top) * params.scaling).to(out_dtype), idx
        return F.softmax(top, dim=-1).to(out_dtype), idx
    scores = _scores(logits, spec)                                   # [T, E]
    if correction_bias is None and params.n_group == 1 and not spec.grouped:
        top, idx = torch.topk(scores, k, dim=-1)   # sorted, as such routers take it (the sum order follows)
    else:
        choice = scores if correction_bias is None else scores + correction_bias
        if params.n_group > 1:
            inside = _group_mask(choice, params, spec.group_score)
            if spec.score == "sigmoid":   # DeepSeek-V3: groups limit the choice only
                choice = choice.masked_fill(~inside, float("-inf"))
            else:                         # DeepSeek-V2: scores outside the groups are 0, weights too
                scores = scores.masked_fill(~inside, 0.0)
                choice = choice.masked_fill(~inside, 0.0)
        # a group-limited router runs this path with one group too (Mistral-4's default): its unsorted
        # choice sets the order the renormalizing sum adds the k weights in
        idx = torch.topk(choice, k=k, dim=-1, sorted=spec.sorted_choice)[1]
        top = scores.gather(1, idx)
    if params.renormalize:
        top = _renorm(top, spec, params)
    if spec.score == "sigmoid":   # sigmoid routers return their scores' dtype, or cast to the input's (Laguna)
        top = top * params.scaling
        return (top.to(out_dtype) if spec.weights_dtype == "input" else top), idx
    return (top * params.scaling).to(out_dtype), idx   # x * 1.0 is exact: unscaled families are unchanged


def route_module(layer, logits: torch.Tensor, spec: RoutingSpec, params: RouterParams,
                 kept: torch.Tensor | None = None, *, input_dtype: torch.dtype | None = None,
                 sequences: int = 1, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`route` with an MoE layer's own extras (correction bias, jitter, train mode, NLLB-MoE's
    padding and its capacity, which the router keeps as state and this updates as it does), on the
    experts ``kept`` (a tensor of indices into ``logits``' columns) or on all of them.
    ``padding_mask``: what the layer passed its router (NLLB-MoE's attention mask)."""
    bias = layer.correction_bias
    if bias is not None and bias.device.type == "meta":   # offloaded: in place only while its module runs
        from moeguard.models.hooks import weights_in_place

        with weights_in_place(layer.correction_bias_owner, recurse=False):
            bias = layer.correction_bias.clone()
    if kept is not None:
        logits = logits[:, kept]
        bias = None if bias is None else bias[..., kept]
    router = layer.router
    routed = None
    if params.top2_capacity:
        T, n = logits.shape
        params = replace(params, capacity=top2_capacity(params, T, n, training=router.training,
                                                        stored=getattr(router, "expert_capacity", params.capacity)))
        router.expert_capacity = params.capacity
        routed = non_padding(padding_mask, T)
    return route(logits, spec, params, correction_bias=bias, training=router.training,
                 jitter_eps=getattr(router, "router_jitter_noise", 0.0), input_dtype=input_dtype,
                 sequences=sequences, routed=routed)


def router_logits(layer, hidden: torch.Tensor, spec: RoutingSpec | None = None) -> torch.Tensor:
    """The raw logits every family's router computes from an MoE layer's input: a linear map
    (GPT-OSS adds a bias)."""
    weight = layer.router_weight
    if weight.device.type == "meta":   # silently computing on an empty tensor gives garbage scores
        raise RuntimeError("the router's weight is offloaded (meta): read it inside its forward or "
                           "under hooks.weights_in_place")
    hidden = hidden.reshape(-1, weight.shape[-1])
    if spec is not None and spec.logits_fp32:   # a bias (Switch's router_bias) in float32 too
        bias = layer.router_bias
        return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    if weight.dtype == torch.float32 and hidden.dtype != torch.float32:
        hidden = hidden.float()  # DeepSeek-V3 and HunYuan keep routers in fp32 and cast the input up
    return F.linear(hidden, weight, layer.router_bias)


def sort_pairs(index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """JetMoE's grouping of the (token, rank) pairs of ``index`` [T, k] by expert, as its gating
    does it: (the pairs' flat positions t*k + r in expert order, their tokens, tokens per expert)."""
    sizes = torch.bincount(index.reshape(-1), minlength=num_experts).tolist()
    _, order = index.reshape(-1).sort(0)
    return order, order.div(index.shape[-1], rounding_mode="trunc"), sizes


def pair_experts(sizes, device=None) -> torch.Tensor:
    """The expert of each pair in expert order (expert e repeated ``sizes[e]`` times)."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.as_tensor(sizes, device=device))


def unpack_router_output(call: str, output, top_k: int):
    """(logits [T, E], weights [T, k], index [T, k]) from what a family's router returns: the
    standard triple, or Llama-4's (scores [T, E], logits) with the chosen experts the top-k logits
    (masked routers give -inf to dropped experts, so k is clamped to the experts left)."""
    if call == "logits":   # the triple needs the block's own routing: MoELayer.unpack has it
        raise ValueError("a router that returns logits only is unpacked by MoELayer.unpack, with its block")
    if call == "dispatch":   # Switch: (dispatch [B, S, E], probs [B, S, 1], logits [B, S, E])
        dispatch, probs, logits = output
        E = logits.shape[-1]
        logits, dispatch = logits.reshape(-1, E), dispatch.reshape(-1, E)
        # the chosen expert as the router chose it (argmax of its probabilities, in their dtype), also
        # for a token dropped past capacity, whose slot has weight 0
        idx = F.softmax(logits.float(), dim=-1).to(probs.dtype).argmax(dim=-1, keepdim=True)
        return logits, probs.reshape(-1, 1) * dispatch.sum(-1, keepdim=True).to(probs.dtype), idx
    if call == "combine":   # NLLB-MoE: (top-1 mask [T, E], combine weights [T, E], logits [T, E])
        _, combine, logits = output
        # the two experts as the router chose them (the first by its probabilities in their dtype, the
        # second by the logits), also where capacity or padding dropped them (weight 0). A masked
        # router's logits are -inf at dropped experts: the softmax is taken over the kept columns only,
        # as the pruned router takes it (a longer sum may round the other way and flip a near-tie)
        # (only whole -inf columns are dropped experts: a NaN or +inf of one token drops nothing)
        kept = (~torch.isneginf(logits).all(dim=0)).nonzero().flatten() if logits.shape[0] else None
        sub = logits if kept is None or kept.numel() == logits.shape[-1] else logits[:, kept]
        _, first, second = _top2_choice(sub, combine.dtype)
        idx = torch.stack([first, second], dim=-1)
        if sub is not logits:
            idx = kept[idx]
        return logits, combine.gather(1, idx), idx
    if call == "sorted":   # JetMoE: (sorted pair order, their tokens, their gates, per-expert counts, logits)
        order, _, gates, sizes, logits = output
        T = logits.shape[0]
        k = order.numel() // T if T else top_k
        # pair j of the sorted order is flat slot order[j] (token t, rank r: t*k + r), and belongs to
        # the expert whose run of sizes it falls in
        index = torch.empty_like(order).scatter_(0, order, pair_experts(sizes, order.device))
        weights = torch.empty_like(gates).scatter_(0, order, gates)
        return logits, weights.view(T, k), index.view(T, k)
    if call != "scaled_input":
        return output[0], output[1], output[2]
    scores, logits = output[0], output[1]
    k = min(top_k, int(torch.isfinite(logits).sum(-1).min()) if logits.numel() else top_k)
    idx = torch.topk(logits, k, dim=-1).indices
    return logits, scores.gather(1, idx), idx


def pack_router_output(call: str, logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                       shape: tuple[int, ...] | None = None):
    """What the family's router returns, from (logits, weights, index): the inverse of
    :func:`unpack_router_output` (Llama-4's scores are 0 for experts not chosen). ``shape``: the
    router input's leading dims ([B, S]), which Switch's outputs keep."""
    if call == "logits":   # DBRX: the router returns logits; its block routes them
        return logits
    if call == "dispatch":   # a dropped token's probability is not used: its dispatch row is zero
        dispatch = torch.zeros_like(logits, dtype=torch.long).scatter_(1, index, (weights != 0).long())
        lead = tuple(shape) if shape is not None else (logits.shape[0],)
        return dispatch.view(*lead, -1), weights.view(*lead, 1), logits.view(*lead, -1)
    if call == "combine":   # each token's kept weights in their columns; the top-1 mask without dropped tokens
        combine = torch.zeros_like(logits, dtype=weights.dtype).scatter(1, index, weights)
        top1 = torch.zeros_like(logits, dtype=torch.long).scatter(1, index[:, :1], (weights[:, :1] != 0).long())
        return top1, combine, logits
    if call == "sorted":   # as JetMoE's gating sorts the (token, rank) pairs by expert
        order, rows, sizes = sort_pairs(index, logits.shape[-1])
        return order, rows, weights.reshape(-1)[order], sizes, logits.float()
    if call != "scaled_input":
        return logits, weights, index
    return torch.zeros_like(logits).scatter_(1, index, weights.to(logits.dtype)), logits
