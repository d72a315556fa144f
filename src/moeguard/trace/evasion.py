"""Function-preserving rewrites an attacker can apply to hide where a model came from: shuffle
each layer's experts, permute the neurons inside every expert, permute (and flip signs of) the
hidden dimension through the whole model. Each returns a new model and checks that its logits
equal the input's, so the evasion itself is verified before anything is traced against it.

Supported: the families whose experts are fused ``gate_up_proj``/``down_proj`` with gate rows
then up rows (all but gpt-oss), with attention projections named ``q_proj``/``k_proj``/
``v_proj``/``o_proj``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter

TOLERANCE = 1e-4


def _check_same_function(a: nn.Module, b: nn.Module, what: str, *, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, a.config.vocab_size, (2, 24), generator=gen)
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    diff = float((la - lb).abs().max() / la.abs().max().clamp_min(1e-12))
    if diff > TOLERANCE:
        raise MoeguardError(f"{what} changed the model's function (relative logit change {diff:.2e})",
                            hint="this family's layout is not one the evasion supports")
    return diff


def _experts(model):
    adapter = MoEAdapter(model)
    if getattr(adapter.family, "expert_layout", "gate_up") != "gate_up":
        raise MoeguardError(f"evasion does not support the expert layout of {adapter.family.name}",
                            hint="use a family with fused gate_up_proj experts")
    return adapter


def shuffle_experts(model: nn.Module, *, seed: int) -> tuple[nn.Module, dict[int, list[int]]]:
    """Re-order each layer's experts (router rows with them); returns the new order per layer."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    orders = {}
    with torch.no_grad():
        for layer in _experts(new).layers:
            perm = torch.randperm(layer.num_experts, generator=gen)
            layer.router.weight.copy_(layer.router.weight[perm])
            if getattr(layer.router, "bias", None) is not None:
                layer.router.bias.copy_(layer.router.bias[perm])
            for p in layer.experts.parameters(recurse=False):
                p.copy_(p[perm])
            for name, buf in layer.router.named_buffers(recurse=False):  # DeepSeek's correction bias
                if buf.shape[:1] == perm.shape:
                    buf.copy_(buf[perm])
            orders[layer.index] = perm.tolist()
    _check_same_function(model, new, "shuffling experts")
    return new, orders


def permute_neurons(model: nn.Module, *, seed: int) -> nn.Module:
    """Permute the neurons inside every expert (gate and up rows, down columns together)."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _experts(new).layers:
            gu, dn = layer.experts.gate_up_proj, layer.experts.down_proj
            I = dn.shape[-1]
            for e in range(layer.num_experts):
                perm = torch.randperm(I, generator=gen)
                gu[e, :I] = gu[e, :I][perm].clone()
                gu[e, I:] = gu[e, I:][perm].clone()
                dn[e] = dn[e][:, perm].clone()
    _check_same_function(model, new, "permuting neurons")
    return new


def permute_hidden(model: nn.Module, *, seed: int, flip_signs: bool = False) -> nn.Module:
    """Permute the hidden (residual-stream) dimension consistently through the whole model, and
    optionally flip the sign of a random half of the dimensions (RMS norms are sign-blind)."""
    new = copy.deepcopy(model)
    d = new.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(d, generator=gen)
    sign = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0) if flip_signs else torch.ones(d)
    adapter = _experts(new)
    experts = {id(l.experts) for l in adapter.layers}
    routers = {id(l.router) for l in adapter.layers}
    tied = new.get_output_embeddings() is not None and \
        new.get_output_embeddings().weight is new.get_input_embeddings().weight

    def cols(w):  # reads the hidden state: columns
        w.copy_(w[..., perm] * sign.to(w.dtype))

    def rows(w, axis):  # writes it: rows on ``axis``
        shape = [1] * w.dim()
        shape[axis] = d
        w.copy_(torch.index_select(w, axis, perm) * sign.to(w.dtype).reshape(shape))

    with torch.no_grad():
        cols(new.get_input_embeddings().weight)
        if not tied and new.get_output_embeddings() is not None:
            cols(new.get_output_embeddings().weight)
        for name, module in new.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if id(module) in experts:
                cols(module.gate_up_proj)
                rows(module.down_proj, 1)
            elif id(module) in routers or leaf in ("q_proj", "k_proj", "v_proj") or \
                    (isinstance(module, nn.Linear) and leaf in ("gate_proj", "up_proj", "shared_expert_gate")):
                cols(module.weight)
            elif leaf in ("o_proj", "down_proj") and isinstance(module, nn.Linear):
                rows(module.weight, 0)
                if module.bias is not None:
                    module.bias.copy_(module.bias[perm] * sign)
            elif (leaf.endswith("layernorm") or leaf == "norm") and getattr(module, "weight", None) is not None:
                module.weight.copy_(module.weight[perm])  # a gain per dimension: permuted, never flipped
    _check_same_function(model, new, "permuting the hidden dimension")
    return new


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
                for p in [*layer.experts.parameters(recurse=False), layer.router.weight]:
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
