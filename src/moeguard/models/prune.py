"""Physical expert pruning in memory: a smaller model of the same family.

The new model is built from a pruned *config* (so every module derives its sizes from the
config, as transformers expects) and receives the kept experts' slices of the old weights.
``save_pretrained`` then writes the family's public on-disk layout, which vanilla
``AutoModelForCausalLM.from_pretrained`` reads back with no moeguard import.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.hooks import normalize_keep
from moeguard.models.routing import pruned_router_params


def pruned_config(adapter: MoEAdapter, keep: dict[int, list[int]]):
    """The config of the pruned model, plus a record of every routing change made."""
    counts = {len(v) for v in keep.values()}
    if len(counts) != 1:
        raise MoeguardError(
            f"keep counts differ across layers ({ {k: len(v) for k, v in keep.items()} }); a "
            f"{adapter.family.name} config has one expert count for all layers",
            hint="keep the same number of experts in every layer for a physical checkpoint "
                 "(per-layer budgets can still be evaluated with masking)")
    n = counts.pop()
    family, cfg = adapter.family, copy.deepcopy(adapter.config)
    params = {li: pruned_router_params(family, adapter.config, kept, adapter.layer(li).num_experts)
              for li, kept in keep.items()}
    first = next(iter(params.values()))
    if any(p != first for p in params.values()):
        raise MoeguardError("the kept experts give different router settings per layer (group-limited routing)",
                            hint="keep the same number of experts in each routing group of every layer")
    setattr(cfg, family.num_experts_key, n)
    setattr(cfg, family.top_k_key, first.top_k)
    changes = {family.num_experts_key: n, family.top_k_key: first.top_k}
    if family.routing.grouped:
        setattr(cfg, family.routing.n_group_key, first.n_group)
        setattr(cfg, family.routing.topk_group_key, first.topk_group)
        changes.update({family.routing.n_group_key: first.n_group, family.routing.topk_group_key: first.topk_group})
    return cfg, changes


def _sliced_state(adapter: MoEAdapter, keep: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """State dict with every router/expert tensor of an MoE layer cut to the kept experts on dim 0."""
    model = adapter.model
    owners: dict[int, list[int]] = {}
    for layer in adapter.layers:
        for module in (layer.router, layer.experts):
            for t in list(module.parameters()) + list(module.buffers()):
                owners[id(t)] = keep[layer.index]
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        kept = owners.get(id(t))
        t = t.detach()
        if kept is not None:
            if t.shape[0] < max(kept) + 1:
                raise MoeguardError(f"tensor {name} has {t.shape[0]} rows, fewer than the experts to keep",
                                    hint="this checkpoint's expert layout is not the family's")
            t = t.index_select(0, torch.tensor(kept, device=t.device))
        out[name] = t.clone()
    return out


def prune_model(model: nn.Module, keep: Mapping) -> tuple[nn.Module, dict]:
    """Return ``(pruned_model, record)``; ``model`` itself is left untouched.

    ``keep`` maps decoder-layer index -> original expert indices to keep (layers not named keep
    all). The record lists the kept original experts per layer and the config changes.
    """
    adapter = MoEAdapter(model)
    keep = normalize_keep(adapter, keep)
    cfg, changes = pruned_config(adapter, keep)
    state = _sliced_state(adapter, keep)
    with torch.device("meta"):
        new = type(model)(cfg)
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"pruned model did not take tensors {unexpected[:5]}")
    # non-persistent buffers (rotary tables) are not in the state dict: take them from the source
    old_buffers = dict(model.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:
            mod_name, _, attr = name.rpartition(".")
            owner = new.get_submodule(mod_name) if mod_name else new
            owner._buffers[attr] = old_buffers[name].clone()
    if hasattr(new, "tie_weights"):
        new.tie_weights()
    still_meta = [n for n, p in new.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"pruned model has parameters without weights: {still_meta[:5]}")
    new.generation_config = copy.deepcopy(getattr(model, "generation_config", None))
    new.eval() if not model.training else new.train()
    record = {
        "family": adapter.family.name,
        "original_num_experts": adapter.num_experts,
        "num_experts": len(next(iter(keep.values()))),
        "keep": {str(k): v for k, v in sorted(keep.items())},
        "config_changes": changes,
    }
    return new, record
