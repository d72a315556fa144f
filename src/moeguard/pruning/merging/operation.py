"""The weight arithmetic every merge method shares: each cluster of a layer's experts becomes one
expert whose every per-expert tensor (the experts' weights and biases, the router's row and bias,
a selection bias on the block) is the weighted average of its members' slices, written at the
cluster's centre; then the other members are cut as pruning cuts them (``prune_model``), so the
result has the same properties as a pruned model (a vanilla-loadable config for uniform K).

No neuron alignment (as HC-SMoE and M-SMoE without their permutation step): merging is
compression, not function-preserving. Experts with identical weights and router rows merge
exactly into either of them (a test checks it).
"""

from __future__ import annotations

import torch
from torch import nn

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.families import experts_first


def check_clusters(layer_index: int, num_experts: int, groups) -> None:
    flat = sorted(e for g in groups for e in g)
    if flat != list(range(num_experts)) or any(not g for g in groups):
        raise MoeguardError(f"layer {layer_index}: clusters {groups} do not split its {num_experts} experts",
                            hint="every expert goes to exactly one non-empty cluster")


def merge_experts(model: nn.Module, clusters: dict[int, list[list[int]]],
                  weights: dict[int, list[list[float]]] | None = None, *,
                  share_unchanged: bool = False) -> tuple[nn.Module, dict]:
    """Merge each named layer's clusters (centre first) into one expert each, weighted by
    ``weights`` (uniform where not given); ``model`` is left untouched. Returns the merged model
    and the record of what went where (``expert``: the merged expert's index in the new model).

    One pass over the expert weights: the model is cut to the centres (``prune_model``, the merged
    layers' expert tensors allocated, not copied), then each centre's slices are written with its
    cluster's average, read from the untouched original. ``share_unchanged``: see ``prune_model``
    (the merged model shares what merging does not change with ``model``)."""
    from moeguard.models.handle import check_merge_route
    from moeguard.models.prune import prune_model

    adapter = MoEAdapter(model)
    check_merge_route(adapter.family, True)   # one module per expert: no expert axis to average along
    keep: dict[int, list[int]] = {}
    plan: dict[int, list[tuple[int, list[int], torch.Tensor]]] = {}
    record: dict[str, list[dict]] = {}
    for layer in adapter.layers:
        groups = clusters.get(layer.index)
        if groups is None:
            continue
        check_clusters(layer.index, layer.num_experts, groups)
        for _, name, t, _ in layer.expert_tensors():
            if not t.is_floating_point() or t.element_size() == 1:
                raise MoeguardError(f"layer {layer.index}: {name} is {t.dtype} (quantized); merging averages "
                                    "expert weights, which quantized storage cannot do",
                                    hint="load or convert the model to bf16/fp16/fp32 first, then merge it")
        plan[layer.index] = cluster_weights(layer.index, groups, (weights or {}).get(layer.index))
        keep[layer.index] = sorted(g[0] for g in groups)
    merged, prune_record = prune_model(model, keep, share_unchanged=share_unchanged, unfilled=frozenset(plan))
    with torch.no_grad():
        for old, new in zip(adapter.layers, MoEAdapter(merged).layers):
            if old.index not in plan:
                continue
            order = keep[old.index]
            pairs = list(zip(old.expert_tensors(), new.expert_tensors()))
            for (_, name, t, axis), (_, new_name, nt, new_axis) in pairs:
                # merged to one expert, ERNIE's [1, E] selection bias is [1, 1], which reads as axis 0: the
                # source's axis holds when the merged tensor has the kept count there
                same = axis == new_axis or (nt.dim() == t.dim() and nt.shape[axis] == len(order))
                if name != new_name or not same:
                    raise RuntimeError(f"layer {old.index}: merged tensor {new_name} does not match {name}")
                view = experts_first(t, axis, old.num_experts)     # [E, ...]: view[e] is expert e's slice
                out = experts_first(nt, axis, len(order))
                for centre, g, w in plan[old.index]:
                    weighted_sum([view[e] for e in g], w, out=out[order.index(centre)])
            record[str(old.index)] = merges_record(plan[old.index], order)
    return merged, {"merges": record, "keep": {str(k): v for k, v in keep.items()}, "pruning": prune_record}


def cluster_weights(layer_index: int, groups, given) -> list[tuple[int, list[int], torch.Tensor]]:
    """(centre, members, normalized float64 weights) per cluster: the one rule for in-memory and
    streamed merges, so both compute bit-identical averages."""
    out = []
    for ci, g in enumerate(groups):
        w = torch.tensor(given[ci] if given is not None else [1.0] * len(g), dtype=torch.float64)
        if len(w) != len(g) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise MoeguardError(f"layer {layer_index}: cluster {g} has weights {w.tolist()}",
                                hint="give one non-negative weight per member, not all zero")
        out.append((g[0], list(g), w / w.sum()))
    return out


def weighted_sum(slices, w, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j w_j x_j in float64, members in cluster order (the same float operations wherever it runs).

    ((0 + w_1 x_1) + w_2 x_2) + ..., each product rounded before its sum (no fused multiply-add),
    a block of rows at a time: each block's float64 work stays in cache, so the members are read
    about once. (Three fresh full-size float64 tensors per member made the average four to six
    copies of the expert weights at Qwen3-30B-A3B's and Mixtral-8x7B's dimensions.)

    ``out``: a tensor of the slices' shape, any float dtype, that receives the sum rounded to its
    dtype block by block (what ``weighted_sum(...).to(out.dtype)`` gives, without the full-size
    float64 result); returned."""
    slices = list(slices)
    first = slices[0]
    if first.dim() == 0:
        acc = torch.zeros((), dtype=torch.float64, device=first.device)
        for wk, x in zip(w, slices):
            acc.add_(x.double() * float(wk))
        return acc if out is None else out.copy_(acc)
    if out is None:
        out = torch.empty(first.shape, dtype=torch.float64, device=first.device)
    rows = max(1, _BLOCK // max(1, first[0].numel()))
    n = min(rows, len(first))
    acc = torch.empty((n,) + tuple(first.shape[1:]), dtype=torch.float64, device=first.device)
    term = torch.empty_like(acc)
    for a in range(0, len(first), rows):
        s, t = acc[:min(rows, len(first) - a)], term[:min(rows, len(first) - a)]
        s.zero_()
        for wk, x in zip(w, slices):
            t.copy_(x[a:a + rows])    # exact: every float format widens to float64
            t.mul_(float(wk))
            s.add_(t)
        out[a:a + rows].copy_(s)      # rounded to out's dtype as .to() rounds
    return out


_BLOCK = 1 << 16   # float64 elements per block of rows (512 KB)


def merges_record(clusters: list[tuple[int, list[int], torch.Tensor]], order: list[int]) -> list[dict]:
    """What went where in one layer: ``expert`` is the merged expert's index in the new model."""
    return [{"into": c, "from": g, "weights": [round(float(x), 6) for x in w], "expert": order.index(c)}
            for c, g, w in clusters]
