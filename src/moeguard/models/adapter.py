"""A uniform view of a loaded Hugging Face MoE model: its sparse layers, routers and experts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from moeguard.errors import MoeguardError
from moeguard.models.families import FamilySpec, expert_axis, family_for_config, moe_config, unsupported_setting
from moeguard.models.routing import sort_pairs, unpack_router_output
from moeguard.models.upstream import known_repair, repair


@dataclass(frozen=True, kw_only=True)
class MoELayer:
    """One sparse block. ``index`` is the decoder-layer index (dense layers are skipped)."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: tuple[nn.Module, ...]
    num_experts: int
    top_k: int
    router_weight_attr: str = "weight"       # FamilySpec.router_weight_attr
    correction_bias_path: str | None = None  # RoutingSpec.correction_bias, under the block
    call: str = "standard"                   # FamilySpec.call: what the router returns
    route_method: str | None = None          # FamilySpec.route_method: the block's logits -> (weights, index)
    blocked: bool = False                    # FamilySpec.blocked: experts as [E*I, d] blocks of rows
    expert_module: str | None = None         # FamilySpec.expert_module when experts are modules ("modules" layout)
    decoder_index: int | None = None         # the decoder layer holding the block (None: ``index``)
    # modules besides the router whose ``top_k`` follows a masked router's clamped top-k (a block that
    # routes the logits itself, DBRX; JetMoE's attention, whose query heads per token are its top-k)
    top_k_holders: tuple[nn.Module, ...] = ()
    standalone: bool = True                  # the experts can be run on chosen tokens (not inside an attention)
    outer: nn.Module | None = None           # the module the block's experts work inside (JetMoE's attention)
    block_path: str = ""                     # the block's path in its decoder layer ("mlp", "self_attention.experts")

    @property
    def experts_input_module(self) -> nn.Module:
        """The module whose input is the tokens the experts take: the experts, or the block where the
        block runs its experts' linear maps itself (JetMoE) or scales their inputs (Llama-4)."""
        return self.block if self.call in ("scaled_input", "sorted") else self.experts

    @property
    def layer_index(self) -> int:
        """The decoder layer holding this sparse block (``index`` but for a second block per layer)."""
        return self.index if self.decoder_index is None else self.decoder_index

    def unpack(self, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, E], weights [T, k], index [T, k]) from what this layer's router returned.
        A router that returns its logits only (DBRX) is completed by the block's own routing
        method, so what is recorded is what the block computes."""
        if self.call == "logits":
            weights, index = getattr(self.block, self.route_method)(output)
            return output, weights, index
        return unpack_router_output(self.call, output, self.top_k)

    def expert(self, e: int) -> nn.Module:
        """Expert ``e``'s own module ("modules" layout only: fused experts have none)."""
        if self.expert_module is None:
            raise ValueError("this layer's experts are fused tensors, not modules")
        return self.experts[self.expert_module.format(e)]

    # Resolved on each access, never cached: moving or re-assigning a module replaces tensors.
    @property
    def router_weight(self) -> nn.Parameter:
        """The router's [E, d] weight."""
        return _get_path(self.router, self.router_weight_attr)

    @property
    def router_bias(self):
        """The bias of the router's linear map (GPT-OSS), or None."""
        return linear_bias(self.router, self.router_weight_attr)

    @property
    def correction_bias(self):
        """The per-expert selection bias (any shape ending in E), or None (also where the
        config turns it off: LFM2's ``use_expert_bias``)."""
        return _get_path(self.block, self.correction_bias_path, None) if self.correction_bias_path else None

    @property
    def correction_bias_owner(self) -> nn.Module | None:
        """The module holding :attr:`correction_bias` (ERNIE keeps it in its own ``moe_statics``)."""
        if not self.correction_bias_path:
            return None
        owner_path = self.correction_bias_path.rpartition(".")[0]
        return _get_path(self.block, owner_path) if owner_path else self.block

    def expert_tensors(self) -> list[tuple[nn.Module, str, torch.Tensor, int]]:
        """Every tensor with one slice per expert, as (owner module, name, tensor, expert axis):
        the router's and the experts' parameters and buffers (nested ones too), and a selection
        bias held on the block. The expert axis is 0 (E rows, or E blocks of rows in a blocked
        family: DBRX's [E*I, d], see ``families.experts_first``), or the last when every other dim
        is 1 (ERNIE's [1, E] bias). A tensor with no expert axis there is an unknown layout: an error."""
        out, seen = [], set()

        def add(owner: nn.Module, name: str, t) -> None:
            if t is None or not t.dim() or id(t) in seen:
                return
            axis = expert_axis(tuple(t.shape), self.num_experts, blocked=self.blocked)
            if axis is None:
                raise MoeguardError(f"layer {self.index}: {type(owner).__name__}.{name} has shape {list(t.shape)}, "
                                    f"with no axis of its {self.num_experts} experts",
                                    hint="this family's expert layout is not one moeguard knows; report it")
            seen.add(id(t))
            out.append((owner, name, t, axis))

        # one module per expert: only the router's tensors have an expert axis (pruning keeps and
        # renumbers the experts' modules instead)
        for module in (self.router,) if self.expert_module else (self.router, self.experts):
            for owner in module.modules():
                for store in (owner._parameters, owner._buffers):
                    for name, t in store.items():
                        add(owner, name, t)
        if self.correction_bias is not None:
            owner_path, _, name = self.correction_bias_path.rpartition(".")
            owner = _get_path(self.block, owner_path) if owner_path else self.block
            add(owner, name, getattr(owner, name))
        return out

    def expert_param_count(self) -> int:
        return sum(p.numel() for p in self.experts.parameters())

    def router_param_count(self) -> int:
        return sum(p.numel() for p in self.router.parameters())

    def shared_param_count(self) -> int:
        return sum(p.numel() for m in self.shared for p in m.parameters())


def _get_path(obj, path: str, *default):
    """``obj.a.b.c`` for ``path`` "a.b.c"; ``default`` (when given) where a part is missing or None."""
    for part in path.split("."):   # a numeric part indexes a ModuleList (Switch's ``layer.1.mlp``)
        obj = getattr(obj, part, None) if default else getattr(obj, part)
        if obj is None and default:
            return default[0]
    return obj


def linear_bias(router: nn.Module, weight_attr: str):
    """The bias beside a router's [E, d] weight at ``weight_attr`` (GPT-OSS has one), or None."""
    owner = weight_attr.rpartition(".")[0]
    return getattr(_get_path(router, owner) if owner else router, "bias", None)


class ExpertsView(nn.Module):
    """A block's two per-expert linear maps (JetMoE's ``input_linear`` and ``output_linear``,
    ParallelExperts with [E, out, in] weights) as one experts module with the standard call
    ``experts(hidden [N, d], index [N, k], weights [N, k]) -> [N, d]``: the gated MLP computed as
    JetMoE's block computes it (pairs sorted by expert, outputs added in that order), without the
    block's bias. The view holds the model's own modules (nothing is copied), and is not part of
    the model: saving and loading never see it."""

    def __init__(self, block: nn.Module, names: tuple[str, str], *, gated: bool = True):
        super().__init__()
        self.input_linear = getattr(block, names[0])
        self.output_linear = getattr(block, names[1])
        self.act = getattr(block, "activation", None)
        self.gated = gated

    # the fused layout's names (FamilySpec.expert_layout "gate_up"), read by trace and the scan
    @property
    def gate_up_proj(self) -> nn.Parameter:
        return self.input_linear.weight      # [E, 2I, d]: gate rows, then up rows

    @property
    def down_proj(self) -> nn.Parameter:
        return self.output_linear.weight     # [E, d, I]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if not self.gated:
            raise RuntimeError("these experts work inside an attention (queries in, outputs back): "
                               "nothing runs them alone")
        order, rows, sizes = sort_pairs(top_k_index, self.input_linear.weight.shape[0])
        h = self.input_linear(hidden_states[rows], sizes)                   # [N*k, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = self.output_linear(self.act(gate) * up, sizes) * top_k_weights.reshape(-1)[order][:, None]
        return torch.zeros_like(hidden_states, dtype=y.dtype).index_add(0, rows, y)


def _shared(block, layer, attr: str):
    """An always-on expert module: in the sparse block, or on the decoder layer beside it
    (granitemoehybrid's shared MLP). A module's truth value is not its presence (a ModuleList
    of length 0 is falsy), so presence is tested against None."""
    m = getattr(block, attr, None)
    return m if m is not None else getattr(layer, attr, None)


class MoEAdapter:
    """Family-independent access to a model's MoE layers.

    Parameters are described by data in :mod:`moeguard.models.families`; this class only walks
    the module tree with it.
    """

    def __init__(self, model: nn.Module, *, family: FamilySpec | None = None):
        self.model = model
        self.config = model.config                    # the model's own (saved with a checkpoint)
        self.moe_config = moe_config(model.config)    # where the family's keys live (a wrapper's text config)
        self.family = family or family_for_config(model.config)
        unsupported = unsupported_setting(self.family, self.moe_config)   # a model built, not loaded
        if unsupported:
            raise MoeguardError(f"model of type '{self.config.model_type}': {unsupported[0]}",
                                hint=f"{unsupported[1]} in its config")
        # every model moeguard works on computes its reference model (NLLB-MoE's experts, models/upstream.py)
        repair(model)

    @cached_property
    def layers(self) -> list[MoELayer]:
        out, f = [], self.family
        n = len(self.decoder_layers)
        # the main sparse block of every layer, then each further kind of block (JetMoE's attention)
        kinds = [(0, f.block_attrs, True), *((j + 1, (a,), False) for j, a in enumerate(f.more_block_attrs))]
        for offset, attrs, main in kinds:
            for i, layer in enumerate(self.decoder_layers):
                found = next(((a, b) for a, b in ((a, _get_path(layer, a, None)) for a in attrs) if b is not None), None)
                if found is None:
                    continue  # a dense layer (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers)
                path, block = found
                router = getattr(block, f.router_attr, None)
                experts = (ExpertsView(block, f.expert_linears, gated=main) if f.expert_linears and router is not None
                           else getattr(block, f.experts_attr, None))
                if router is None or experts is None:
                    continue
                shared = tuple(m for m in (_shared(block, layer, a) for a in f.shared_attrs) if m is not None) if main else ()
                weight = _get_path(router, f.router_weight_attr)
                # every module on the path to the block (the block too) that holds the top-k it routes
                on_path = [_get_path(layer, ".".join(path.split(".")[:d + 1])) for d in range(path.count(".") + 1)]
                holders = tuple(m for m in on_path if isinstance(getattr(m, "top_k", None), int)) \
                    if f.call in ("logits", "sorted") else ()
                out.append(MoELayer(index=offset * n + i, block=block, router=router, experts=experts, shared=shared,
                                    num_experts=int(weight.shape[0]),
                                    # a budget checkpoint's layer may keep fewer experts than the config's top-k
                                    top_k=min(f.top_k(self.moe_config), int(weight.shape[0])),
                                    router_weight_attr=f.router_weight_attr,
                                    correction_bias_path=f.routing.correction_bias,
                                    call=f.call, route_method=f.route_method, blocked=f.blocked,
                                    expert_module=f.expert_module if f.expert_layout == "modules" else None,
                                    decoder_index=None if offset == 0 else i, top_k_holders=holders,
                                    standalone=main, outer=None if main or len(on_path) < 2 else on_path[-2],
                                    block_path=path))
        if not out:
            raise MoeguardError(f"model of type '{self.config.model_type}' has no sparse MoE layer",
                                hint="check the config's expert settings (e.g. decoder_sparse_step, mlp_only_layers)")
        return out

    def layer(self, index: int) -> MoELayer:
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise MoeguardError(f"layer {index} is not a sparse MoE layer",
                            hint=f"MoE layers are {[l.index for l in self.layers]}")

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts

    @property
    def top_k(self) -> int:
        return self.layers[0].top_k

    @cached_property
    def decoder_layers(self) -> list[nn.Module]:
        """Every layer, dense ones included, in index order (an encoder-decoder's encoder layers, then
        its decoder's)."""
        return [layer for path in self.family.stacks for layer in _get_path(self.model, path)]

    @cached_property
    def stack_starts(self) -> dict[str, int]:
        """Each stack's path -> the index of its first layer (indices run on across stacks)."""
        starts, first = {}, 0
        for path in self.family.stacks:
            starts[path] = first
            first += len(_get_path(self.model, path))
        return starts

    def stack_of(self, index: int) -> tuple[str, int]:
        """(the stack's path, the layer's index within it) of layer ``index``."""
        if not 0 <= index < len(self.decoder_layers):
            raise IndexError(index)
        for path, first in reversed(self.stack_starts.items()):   # the last stack starting at or before it
            if index >= first:
                return path, index - first
        raise IndexError(index)

    @cached_property
    def vocab_size(self) -> int:
        """Logits per position (the LM head's rows)."""
        head = self.model.get_output_embeddings()
        return int(getattr(head, "out_features", None) or head.weight.shape[0])

    def head(self, hidden):
        """Logits from the last decoder layer's output: final norm, LM head, family scaling."""
        logits = self.model.get_output_embeddings()(_get_path(self.model, self.family.final_norm_path)(hidden))
        if self.family.logits_divisor_key:
            logits = logits / getattr(self.moe_config, self.family.logits_divisor_key)
        return logits

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters and those active for one token (top-k of the routed experts)."""
        seen: set[int] = set()
        # accelerate's offload unties tied embeddings (two meta tensors): the output one is not counted
        inp, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        tied = getattr(self.model.config.get_text_config(), "tie_word_embeddings", False)
        if tied and inp is not None and out is not None and getattr(out, "weight", None) is not None \
                and out.weight is not inp.weight and out.weight.shape == inp.weight.shape:
            seen.add(id(out.weight))
        total = 0
        for p in self.model.parameters():  # tied embeddings count once
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        routed = sum(l.expert_param_count() for l in self.layers)
        inactive = sum(l.expert_param_count() * (l.num_experts - l.top_k) // l.num_experts for l in self.layers)
        return {"total": total, "active": total - inactive, "routed_experts": routed,
                "per_expert": routed // sum(l.num_experts for l in self.layers)}

    def describe(self) -> dict:
        counts = self.parameter_counts()
        shared = [{"layer": l.index, "modules": list(self.family.shared_attrs), "params": l.shared_param_count()}
                  for l in self.layers if l.shared]
        stacks = {}
        if self.family.encoder_decoder:   # which stack each index is in (indices run on across stacks)
            for l in self.layers:
                path, local = self.stack_of(l.index)
                stacks.setdefault(path, []).append(local)
        blocks, sizes = {}, {}
        if self.family.more_block_attrs:   # JetMoE: which decoder layer and block each MoE layer index is
            for l in self.layers:
                blocks.setdefault(l.block_path, {})[str(l.index)] = l.layer_index
                sizes.setdefault(l.block_path, l.expert_param_count() // l.num_experts)   # its experts' size, not the mean
            counts["per_expert_by_block"] = sizes
        return {
            "family": self.family.name,
            "model_type": self.config.model_type,
            **({"moe_layers_per_stack": stacks} if stacks else {}),
            **({"moe_layers_per_block": blocks} if blocks else {}),
            "num_layers": len(self.decoder_layers),
            "moe_layers": [l.index for l in self.layers],
            "experts_per_layer": {str(l.index): l.num_experts for l in self.layers},
            "top_k": self.top_k,
            "shared_experts": shared,
            "gate_normalization": self.family.routing.describe(self.moe_config),
            "parameters": counts,
            # what transformers gets wrong in this model, and that moeguard computes the model itself
            **({"upstream_repair": repaired} if (repaired := known_repair(self.config.model_type)) else {}),
        }
