"""Expert merging, the second compression route: each layer's experts are clustered and each
cluster averaged into one expert (router rows combined the same way), instead of dropping experts.

One operation, used by the provenance benchmark's merged derivatives and by trace's tests; the
merging attack (clustering methods, router-weighted merges, checkpoints with a merge record) builds
on it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter


def merge_experts(model: nn.Module, clusters: dict[int, list[list[int]]],
                  weights: dict[int, list[list[float]]] | None = None) -> tuple[nn.Module, dict]:
    """Merge each layer's clusters of experts into one expert each (weighted average of gate, up
    and down, and of the router rows), as HC-SMoE / M-SMoE do without neuron alignment; the
    model keeps one expert per cluster. Returns the model and the record of what went where.
    Not function-preserving: this is compression."""
    from moeguard.models.prune import prune_model

    work = copy.deepcopy(model)
    keep: dict[int, list[int]] = {}
    record: dict[str, list[dict]] = {}
    with torch.no_grad():
        for layer in MoEAdapter(work).layers:
            groups = clusters.get(layer.index)
            if groups is None:
                continue
            flat = sorted(e for g in groups for e in g)
            if flat != list(range(layer.num_experts)):
                raise MoeguardError(f"layer {layer.index}: clusters {groups} do not split its {layer.num_experts} "
                                    "experts", hint="every expert goes to exactly one cluster")
            centres = []
            for ci, g in enumerate(groups):
                w = torch.tensor((weights or {}).get(layer.index, [[1.0] * len(x) for x in groups])[ci],
                                 dtype=torch.float64)
                w = w / w.sum()
                centre = g[0]
                for p in [*layer.experts.parameters(recurse=False), layer.router_weight]:
                    avg = sum(float(wk) * p[e].double() for wk, e in zip(w, g))
                    p[centre] = avg.to(p.dtype)
                centres.append(centre)
                record.setdefault(str(layer.index), []).append(
                    {"into": centre, "from": list(g), "weights": [round(float(x), 6) for x in w]})
            keep[layer.index] = sorted(centres)
    merged, prune_record = prune_model(work, keep)
    # the merged expert of a cluster sits at the rank of its centre among the kept ones
    for li, groups in record.items():
        order = keep[int(li)]
        for g in groups:
            g["expert"] = order.index(g["into"])
    return merged, {"merges": record, "keep": {str(k): v for k, v in keep.items()}, "pruning": prune_record}
