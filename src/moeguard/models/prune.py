"""Physical expert pruning in memory: a smaller model of the same family.

The new model is built from a pruned *config* (so every module derives its sizes from the
config, as transformers expects) and receives the kept experts' slices of the old weights.
``save_pretrained`` then writes the family's public on-disk layout, which vanilla
``AutoModelForCausalLM.from_pretrained`` reads back with no moeguard import.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.families import cut_shape, experts_first, moe_config
from moeguard.models.hooks import normalize_keep
from moeguard.models.routing import pruned_router_params
from moeguard.models.upstream import repair


# Config key of a checkpoint whose layers keep different numbers of experts (a --budget plan).
# transformers configs hold one expert count, so such a checkpoint is built at the largest count
# and each smaller layer is resized after construction: moeguard's loader does this; vanilla
# from_pretrained refuses it with a size mismatch.
PER_LAYER_KEY = "moeguard_experts_per_layer"
_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")


def original_counts(adapter: MoEAdapter) -> dict[str, Any]:
    """The source's expert counts for a pruning record: ``original_num_experts``, the most any layer
    has (layer 0's was taken, wrong for a budget-pruned source), and, where the layers differ,
    ``original_experts_per_layer``."""
    counts = {str(l.index): l.num_experts for l in adapter.layers}
    return {"original_num_experts": max(counts.values()),
            **({"original_experts_per_layer": counts} if len(set(counts.values())) > 1 else {})}


def pruned_config(adapter: MoEAdapter, keep: dict[int, list[int]]):
    """The config of the pruned model, plus a record of every routing change made."""
    family, whole = adapter.family, copy.deepcopy(adapter.config)
    cfg = moe_config(whole)   # the keys are written where they are read: a wrapper's text config
    params = {li: pruned_router_params(family, adapter.moe_config, kept, adapter.layer(li).num_experts)
              for li, kept in keep.items()}
    counts = {li: len(v) for li, v in keep.items()}
    n = max(counts.values())
    if len(set(counts.values())) > 1:
        if family.expert_layout == "modules":
            raise MoeguardError(
                f"keep counts differ across layers ({counts}); {family.name} keeps one module per expert, and "
                f"transformers builds (and initializes) {family.config_key(family.num_experts_key)} of them in every "
                "layer", hint="keep the same number of experts in every layer for this family (--keep, not --budget)")
        if family.routing.groups_on(adapter.moe_config):
            raise MoeguardError(
                f"keep counts differ across layers ({counts}); {family.name}'s group-limited routing needs the "
                "same groups in every layer", hint="keep the same number of experts in every layer for this family")
        top_k = max(p.top_k for p in params.values())
        setattr(cfg, family.num_experts_key, n)
        _set_top_k(cfg, family, top_k)
        setattr(cfg, PER_LAYER_KEY, {str(li): c for li, c in sorted(counts.items())})
        return whole, {family.num_experts_key: n, **_top_k_change(family, top_k), PER_LAYER_KEY: getattr(cfg, PER_LAYER_KEY)}
    cfg.__dict__.pop(PER_LAYER_KEY, None)  # re-pruning a budget checkpoint to a uniform plan
    first = next(iter(params.values()))
    if any(p != first for p in params.values()):
        raise MoeguardError("the kept experts give different router settings per layer (group-limited routing)",
                            hint="keep the same number of experts in each routing group of every layer")
    setattr(cfg, family.num_experts_key, n)
    _set_top_k(cfg, family, first.top_k)
    changes = {family.num_experts_key: n, **_top_k_change(family, first.top_k)}
    if family.routing.groups_on(adapter.moe_config):
        setattr(cfg, family.routing.n_group_key, first.n_group)
        setattr(cfg, family.routing.topk_group_key, first.topk_group)
        changes.update({family.routing.n_group_key: first.n_group, family.routing.topk_group_key: first.topk_group})
    return whole, changes


def _set_top_k(cfg, family, top_k: int) -> None:
    if family.top_k_key:   # a fixed rule (Switch's top-1) has no key to write
        now = getattr(cfg, family.top_k_key, None)
        # a key of one value per layer (HunYuan's moe_topk) stays a list, as transformers reads it per layer
        setattr(cfg, family.top_k_key, [top_k] * len(now) if isinstance(now, (list, tuple)) else top_k)


def _top_k_change(family, top_k: int) -> dict:
    return {family.top_k_key: top_k} if family.top_k_key else {}


def resize_layers(model: nn.Module) -> None:
    """Shrink the MoE layers a per-layer-count config names to their own expert count.

    Works on a freshly built model (meta or real): every per-expert tensor
    (:meth:`MoELayer.expert_tensors`) is replaced by an empty one with the layer's count on its
    expert axis, and the modules' count and top-k attributes follow (top-k clamped as the pruned
    router clamps it)."""
    per_layer = getattr(moe_config(model.config), PER_LAYER_KEY, None)
    if not per_layer:
        return
    adapter = MoEAdapter(model)
    top_k = adapter.family.top_k(adapter.moe_config)
    for layer in adapter.layers:
        n = int(per_layer.get(str(layer.index), layer.num_experts))
        if n == layer.num_experts:
            continue
        E = layer.num_experts
        for owner, name, t, axis in layer.expert_tensors():
            shape = cut_shape(t.shape, axis, E, n)
            new = torch.empty(shape, dtype=t.dtype, device=t.device)
            store = owner._parameters if name in owner._parameters else owner._buffers
            store[name] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        # (JetMoE's per-expert linear maps, children of its experts view, count their experts too)
        for module in (layer.block, layer.router, layer.experts, *layer.experts.children(), *layer.top_k_holders):
            for attr in _COUNT_ATTRS:
                if getattr(module, attr, None) == E:
                    setattr(module, attr, n)
            if isinstance(getattr(module, "top_k", None), int):
                module.top_k = min(top_k, n)


def _sliced_state(adapter: MoEAdapter, keep: dict[int, list[int]], *, share_unchanged: bool = False,
                  unfilled: frozenset[int] = frozenset()) -> dict[str, torch.Tensor]:
    """State dict with every per-expert tensor of an MoE layer cut to the kept experts on its
    expert axis (:meth:`MoELayer.expert_tensors`). ``share_unchanged``: the other tensors are the
    source's own (no copy); ``unfilled``: layers whose per-expert tensors are allocated, not
    copied (the caller writes every slice)."""
    model = adapter.model
    owners: dict[int, tuple[list[int], int, int, bool]] = {}
    # "modules" layout: a kept expert's tensors move to its new number, a dropped one's go
    renamed: dict[str, str | None] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for layer in adapter.layers:
        for _, _, t, axis in layer.expert_tensors():
            owners[id(t)] = (keep[layer.index], axis, layer.num_experts, layer.index in unfilled)
        if layer.expert_module:
            new_number = {e: i for i, e in enumerate(keep[layer.index])}
            for e in range(layer.num_experts):
                at = f"{names[id(layer.experts)]}.{layer.expert_module.format(e)}."
                to = f"{names[id(layer.experts)]}.{layer.expert_module.format(new_number[e])}." if e in new_number else None
                renamed[at] = to
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if renamed:
            at = next((p for p in renamed if name.startswith(p)), None)
            if at is not None:
                if renamed[at] is not None:
                    kept_t = t.detach()
                    out[renamed[at] + name[len(at):]] = kept_t if share_unchanged else kept_t.clone()
                continue
        cut = owners.get(id(t))
        t = t.detach()
        if cut is not None:   # index_select makes a new tensor: cloning it again copied the kept experts twice
            kept, axis, E, empty = cut
            if empty:
                out[name] = torch.empty(cut_shape(t.shape, axis, E, len(kept)), dtype=t.dtype, device=t.device)
            elif axis == 0 and t.shape[0] != E:   # E blocks of rows (DBRX): the kept blocks, in order
                cut_t = experts_first(t, axis, E).index_select(0, torch.tensor(kept, device=t.device))
                out[name] = cut_t.reshape(cut_shape(t.shape, axis, E, len(kept)))
            else:
                out[name] = t.index_select(axis, torch.tensor(kept, device=t.device))
        else:
            out[name] = t if share_unchanged else t.clone()
    return out


def spread(model: nn.Module) -> bool:
    """Whether ``model`` was dispatched over several devices (accelerate's hooks): dropping it then needs
    ``loading.release_memory``, since the hooks hold it in reference cycles that ``del`` leaves."""
    placed = getattr(model, "hf_device_map", None)
    return isinstance(placed, dict) and len(set(placed.values())) > 1


def placed_like(new: nn.Module, model: nn.Module) -> nn.Module:
    """``new`` (a model of ``model``'s module names: a pruned copy, a fresh one of its shape) placed as
    ``model`` is. Over several accelerators (``--device-map auto`` on a multi-GPU server) accelerate's
    hooks move the hidden states between the layers' GPUs: built on meta and filled, a pruned copy had
    none, and its first layer on the second GPU got the first GPU's hidden states. On one device, moved
    there (the from-scratch baseline was built, and trained, on the CPU). An offloaded map is not
    placed in memory (the capped paths stream instead)."""
    placed = getattr(model, "hf_device_map", None)
    devices = set(placed.values()) if isinstance(placed, dict) else set()
    if len(devices) > 1 and not devices & {"cpu", "disk", "meta"}:
        from accelerate import dispatch_model

        return dispatch_model(new, device_map=dict(placed))
    if len(devices) > 1:
        return new
    from moeguard.tasks.tokens import model_device

    device = model_device(model)
    return new if model_device(new) == device else new.to(device)


def prune_model(model: nn.Module, keep: Mapping, *, share_unchanged: bool = False,
                unfilled: frozenset[int] = frozenset()) -> tuple[nn.Module, dict]:
    """Return ``(pruned_model, record)``; ``model`` itself is left untouched.

    ``keep`` maps decoder-layer index -> original expert indices to keep (layers not named keep
    all). The record lists the kept original experts per layer and the config changes.

    ``share_unchanged``: the tensors pruning does not change (attention, embeddings, norms, shared
    experts) are the source's own, not copies: for a caller that only reads the result (evaluates
    or saves it) or drops the source. Training either model then changes both.
    ``unfilled``: layers whose kept per-expert tensors are allocated but not copied, for a caller
    that overwrites every slice (merging).
    """
    adapter = MoEAdapter(model)
    keep = normalize_keep(adapter, keep)
    cfg, changes = pruned_config(adapter, keep)
    record = _record(adapter, keep, changes)
    state = _sliced_state(adapter, keep, share_unchanged=share_unchanged, unfilled=frozenset(unfilled))
    with torch.device("meta"):
        new = type(model)(cfg)
    repair(new)   # a fresh model has transformers' classes again (models/upstream.py)
    resize_layers(new)
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
    new = placed_like(new, model)
    return new, record


def pruning_record(model: nn.Module, keep: Mapping) -> dict:
    """The record :func:`prune_model` gives for ``keep``, without building the pruned copy (a caller that
    wants what was kept and the config's changes, not the weights)."""
    adapter = MoEAdapter(model)
    keep = normalize_keep(adapter, keep)
    return _record(adapter, keep, pruned_config(adapter, keep)[1])


def _record(adapter: MoEAdapter, keep: dict[int, list[int]], changes: dict) -> dict:
    return {
        "family": adapter.family.name,
        **original_counts(adapter),
        "num_experts": max(len(v) for v in keep.values()),
        "experts_per_layer": {str(k): len(v) for k, v in sorted(keep.items())},
        "keep": {str(k): v for k, v in sorted(keep.items())},
        "config_changes": changes,
    }


@contextlib.contextmanager
def resized_construction(config) -> Iterator[None]:
    """Inside the block, building the config's model class shrinks per-layer-count layers right
    after ``__init__``, so ``from_pretrained`` (with its checkpoint-layout conversions) loads a
    budget-pruned checkpoint. The class is restored in ``finally``; a uniform config is a no-op."""
    if not getattr(moe_config(config), PER_LAYER_KEY, None):
        yield
        return
    from moeguard.models.loading import model_class

    cls = model_class(config, concrete=True)
    original = cls.__init__

    def init(self, cfg, *args, **kwargs):
        original(self, cfg, *args, **kwargs)
        resize_layers(self)

    cls.__init__ = init
    try:
        yield
    finally:
        cls.__init__ = original
