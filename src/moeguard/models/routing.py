"""Routing of a router restricted to a subset of its experts.

Masking experts at run time and physically pruning them must give the same model. Both go
through :func:`pruned_router_params` (what the smaller router's config is) and masking goes
through :func:`route` (what that smaller router computes), so the equivalence holds by
construction and ``tests/test_families.py`` checks :func:`route` against transformers' own
routers with every expert kept.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _renorm_flag(spec: RoutingSpec, config) -> bool:
    if isinstance(spec.renormalize, bool):
        return spec.renormalize
    return bool(getattr(config, spec.renormalize, False))


def pruned_router_params(family: FamilySpec, config, kept: list[int], num_experts: int) -> RouterParams:
    """Router settings of the model that keeps ``kept`` (sorted original indices) of ``num_experts``.

    top_k is clamped to what is left. Group-limited routing keeps its groups only when every
    original group keeps the same number (>= 2) of experts; otherwise the groups no longer mean
    anything and routing falls back to one group (recorded in the pruning record).
    """
    spec = family.routing
    n = len(kept)
    top_k = min(int(getattr(config, family.top_k_key)), n)
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
    return RouterParams(top_k=top_k, renormalize=_renorm_flag(spec, config), n_group=n_group,
                        topk_group=topk_group, scaling=scaling)


def _group_mask(scores: torch.Tensor, params: RouterParams, how: str) -> torch.Tensor:
    """[tokens, experts] True inside the ``topk_group`` best groups; a group scores the sum of its
    top 2 (``top2_sum``, DeepSeek-V3) or its best expert (``max``, DeepSeek-V2)."""
    n, g = scores.shape[-1], params.n_group
    grouped = scores.view(-1, g, n // g)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1) if how == "top2_sum" else grouped.max(dim=-1).values
    group_idx = torch.topk(group_scores, k=params.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, g, n // g).reshape(-1, n).bool()


def route(logits: torch.Tensor, spec: RoutingSpec, params: RouterParams, *,
          correction_bias: torch.Tensor | None = None, training: bool = False,
          jitter_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k weights and indices for ``logits`` [tokens, experts] (indices into these experts)."""
    k = params.top_k
    if spec.score == "sparsemixer":
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        return sparsemixer(logits, jitter_eps=jitter_eps, training=training, top_k=k)
    if spec.score == "sigmoid":
        scores = logits.float().sigmoid()
        choice = scores if correction_bias is None else scores + correction_bias
        if params.n_group > 1:
            choice = choice.masked_fill(~_group_mask(choice, params, spec.group_score), float("-inf"))
        idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if params.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * params.scaling, idx
    if params.n_group > 1:   # DeepSeek-V2: softmax scores, masked to 0 outside the chosen groups
        probs = F.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs.masked_fill(~_group_mask(probs, params, spec.group_score), 0.0), k=k, dim=-1,
                              sorted=False)
        return top * params.scaling, idx
    out_dtype = torch.float32 if spec.weights_dtype == "float32" else logits.dtype
    if spec.select_on == "logits":
        top, idx = torch.topk(logits, k, dim=-1)
        top = top if spec.softmax_dtype == "logits" else top.float()
        return F.softmax(top, dim=-1).to(out_dtype), idx
    probs = F.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    if params.renormalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return (top * params.scaling).to(out_dtype), idx   # x * 1.0 is exact: unscaled families are unchanged


def route_module(router: torch.nn.Module, logits: torch.Tensor, spec: RoutingSpec, params: RouterParams,
                 kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`route` with the router module's own extras (correction bias, jitter, train mode),
    on the experts ``kept`` (a tensor of indices into ``logits``' columns) or on all of them."""
    bias = getattr(router, spec.correction_bias_attr, None) if spec.correction_bias_attr else None
    if kept is not None:
        logits = logits[:, kept]
        bias = None if bias is None else bias[kept]
    return route(logits, spec, params, correction_bias=bias, training=router.training,
                 jitter_eps=getattr(router, "router_jitter_noise", 0.0))


def router_logits(router: torch.nn.Module, hidden: torch.Tensor, spec: RoutingSpec | None = None) -> torch.Tensor:
    """The raw logits every family's router computes: a linear map (GPT-OSS adds a bias)."""
    hidden = hidden.reshape(-1, router.weight.shape[-1])
    weight = router.weight
    if spec is not None and spec.logits_fp32:
        return F.linear(hidden.float(), weight.float())
    if weight.dtype == torch.float32 and hidden.dtype != torch.float32:
        hidden = hidden.float()  # DeepSeek-V3 keeps its router in fp32 and casts the input up
    return F.linear(hidden, weight, getattr(router, "bias", None))
