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

import copy

import torch
from torch import nn

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter


def check_clusters(layer_index: int, num_experts: int, groups) -> None:
    flat = sorted(e for g in groups for e in g)
    if flat != list(range(num_experts)) or any(not g for g in groups):
        raise MoeguardError(f"layer {layer_index}: clusters {groups} do not split its {num_experts} experts",
                            hint="every expert goes to exactly one non-empty cluster")


def merge_experts(model: nn.Module, clusters: dict[int, list[list[int]]],
                  weights: dict[int, list[list[float]]] | None = None) -> tuple[nn.Module, dict]:
    """Merge each named layer's clusters (centre first) into one expert each, weighted by
    ``weights`` (uniform where not given); ``model`` is left untouched. Returns the merged model
    and the record of what went where (``expert``: the merged expert's index in the new model)."""
    from moeguard.models.prune import prune_model

    work = copy.deepcopy(model)
    keep: dict[int, list[int]] = {}
    record: dict[str, list[dict]] = {}
    with torch.no_grad():
        for layer in MoEAdapter(work).layers:
            groups = clusters.get(layer.index)
            if groups is None:
                continue
            check_clusters(layer.index, layer.num_experts, groups)
            given = (weights or {}).get(layer.index)
            tensors = layer.expert_tensors()
            for ci, g in enumerate(groups):
                w = torch.tensor(given[ci] if given is not None else [1.0] * len(g), dtype=torch.float64)
                if len(w) != len(g) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                    raise MoeguardError(f"layer {layer.index}: cluster {g} has weights {w.tolist()}",
                                        hint="give one non-negative weight per member, not all zero")
                w = w / w.sum()
                centre = g[0]
                for _, _, t, axis in tensors:
                    view = t if axis == 0 else t.movedim(-1, 0)
                    avg = sum(float(wk) * view[e].double() for wk, e in zip(w, g))
                    view[centre] = avg.to(t.dtype)
                record.setdefault(str(layer.index), []).append(
                    {"into": centre, "from": list(g), "weights": [round(float(x), 6) for x in w]})
            keep[layer.index] = sorted(g[0] for g in groups)
    merged, prune_record = prune_model(work, keep)
    del work
    for li, groups in record.items():   # the merged expert sits at its centre's rank among the kept
        order = keep[int(li)]
        for g in groups:
            g["expert"] = order.index(g["into"])
    return merged, {"merges": record, "keep": {str(k): v for k, v in keep.items()}, "pruning": prune_record}
