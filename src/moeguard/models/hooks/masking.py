"""Routing among a subset of experts without touching weights: the masked model computes what the
physically pruned one computes (the same clamped top-k and group handling)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.hooks.registry import Hooks
from moeguard.models.routing import pack_router_output, pruned_router_params, route_module, router_logits


def normalize_keep(adapter: MoEAdapter, keep: Mapping) -> dict[int, list[int]]:
    """Validate a keep map {layer index: expert indices}; layers not named keep every expert."""
    out: dict[int, list[int]] = {}
    by_index = {l.index: l for l in adapter.layers}
    for key, experts in keep.items():
        try:
            li = int(key)
        except (TypeError, ValueError):
            raise MoeguardError(f"keep map has layer key {key!r}", hint="use decoder-layer indices") from None
        if li not in by_index:
            raise MoeguardError(f"keep map names layer {li}, which is not an MoE layer",
                                hint=f"MoE layers are {sorted(by_index)}")
        layer = by_index[li]
        kept = sorted({int(e) for e in experts})
        if len(kept) != len(list(experts)):
            raise MoeguardError(f"layer {li}: keep list {list(experts)} repeats an expert", hint="list each expert once")
        bad = [e for e in kept if not 0 <= e < layer.num_experts]
        if bad:
            raise MoeguardError(f"layer {li}: experts {bad} do not exist",
                                hint=f"expert indices run from 0 to {layer.num_experts - 1}")
        if len(kept) < adapter.family.min_experts:
            raise MoeguardError(
                f"layer {li}: keeping {len(kept)} expert(s) leaves no valid {adapter.family.name} router",
                hint=f"keep at least {adapter.family.min_experts} experts per layer for this family")
        out[li] = kept
    for layer in adapter.layers:
        out.setdefault(layer.index, list(range(layer.num_experts)))
    return out


@contextlib.contextmanager
def mask_experts(model: nn.Module, keep: Mapping, *, adapter: MoEAdapter | None = None) -> Iterator[MoEAdapter]:
    """Route only among ``keep[layer]`` experts inside the block; weights are not touched.

    The router computes exactly what the physically pruned model's router computes (same
    clamped top-k, same group handling), then maps indices back to original expert ids.
    """
    adapter = adapter or MoEAdapter(model)
    keep = normalize_keep(adapter, keep)
    spec, call = adapter.family.routing, adapter.family.call
    with Hooks() as hooks:
        for layer in adapter.layers:
            kept = keep[layer.index]
            params = pruned_router_params(adapter.family, adapter.moe_config, kept, layer.num_experts)
            router = layer.router
            # a capacity the router keeps between calls (NLLB-MoE): every router of the masked model, a
            # full one too, starts from the config's, as a freshly pruned model's do, and the unmasked
            # routers get their own back after
            if params.top2_capacity:
                hooks.set_attribute(router, "expert_capacity", params.capacity)
            if len(kept) == layer.num_experts:
                continue
            # on the logits' device at the call: an offloaded router's weight is on "meta" until then
            kept_t = torch.tensor(kept)

            # *args: a router may take the block's selection bias too (MiniMax-M2, LFM2); the layer
            # reads that same tensor itself
            # (NLLB-MoE's router takes its layer's attention mask: the padding it leaves out)
            def forward(hidden_states, *args, _layer=layer, _kept=kept_t, _params=params):
                lead = hidden_states.shape[:-1]   # [T], or Switch's [B, S] (capacity counts per sequence)
                logits = router_logits(_layer, hidden_states, spec)
                _kept = _kept.to(logits.device)
                weights, sub_idx = route_module(_layer, logits, spec, _params, kept=_kept,
                                                input_dtype=hidden_states.dtype,
                                                sequences=lead[0] if len(lead) == 2 else 1,
                                                padding_mask=args[0] if spec.top2_capacity and args else None)
                masked = torch.full_like(logits, float("-inf"))
                masked[:, _kept] = logits[:, _kept]
                return pack_router_output(call, masked, weights, _kept[sub_idx], shape=lead)

            hooks.replace_forward(router, forward, replaces=True)
            _clamp_block_top_k(hooks, layer, params.top_k)
        yield adapter


def _clamp_block_top_k(hooks: Hooks, layer, top_k: int) -> None:
    """A block that routes the router's logits itself (DBRX) picks its own top-k of them: with
    fewer experts kept than that, it would add dropped experts at weight 0; JetMoE's attention
    sizes its query heads by its top-k. So these modules' top-k is clamped as the pruned model's,
    until ``hooks`` close."""
    for module in layer.top_k_holders:
        if module.top_k != top_k:
            hooks.set_attribute(module, "top_k", top_k)


@contextlib.contextmanager
def drop_one_per_chunk(adapter: MoEAdapter, layer_index: int, drops: Sequence[int], *, rows: int) -> Iterator[None]:
    """Batched single-expert masks for one layer: the input batch is ``len(drops)`` copies of a
    ``rows``-token batch, and copy ``c`` routes as if expert ``drops[c]`` were pruned (exactly
    what :func:`mask_experts` does with every other expert kept)."""
    layer = adapter.layer(layer_index)
    router, spec = layer.router, adapter.family.routing
    E = layer.num_experts
    plans = []
    for e in drops:
        kept = [x for x in range(E) if x != e]
        plans.append((torch.tensor(kept), pruned_router_params(adapter.family, adapter.moe_config, kept, E)))

    def forward(hidden_states, *args):
        logits = router_logits(layer, hidden_states, spec)
        if logits.shape[0] != rows * len(plans):
            raise RuntimeError(f"expected {rows} x {len(plans)} tokens, got {logits.shape[0]}")
        masked, weights, index = [], [], []
        for c, (kept, params) in enumerate(plans):
            kept = kept.to(logits.device)
            part = logits[c * rows:(c + 1) * rows]
            w, sub = route_module(layer, part, spec, params, kept=kept, input_dtype=hidden_states.dtype)
            m = torch.full_like(part, float("-inf"))
            m[:, kept] = part[:, kept]
            masked.append(m), weights.append(w), index.append(kept[sub])
        return pack_router_output(adapter.family.call, torch.cat(masked), torch.cat(weights), torch.cat(index))

    with Hooks() as hooks:
        hooks.replace_forward(router, forward, replaces=True)
        _clamp_block_top_k(hooks, layer, min(p.top_k for _, p in plans))
        yield
