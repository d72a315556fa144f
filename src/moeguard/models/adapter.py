"""A uniform view of a loaded Hugging Face MoE model: its sparse layers, routers and experts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from torch import nn

from moeguard.errors import MoeguardError
from moeguard.models.families import FamilySpec, family_for_config


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

    def expert_param_count(self) -> int:
        return sum(p.numel() for p in self.experts.parameters())

    def router_param_count(self) -> int:
        return sum(p.numel() for p in self.router.parameters())

    def shared_param_count(self) -> int:
        return sum(p.numel() for m in self.shared for p in m.parameters())


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


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
        self.config = model.config
        self.family = family or family_for_config(model.config)

    @cached_property
    def layers(self) -> list[MoELayer]:
        out = []
        for i, layer in enumerate(_get_path(self.model, self.family.layers_path)):
            block = next((getattr(layer, a) for a in self.family.block_attrs if hasattr(layer, a)), None)
            router = getattr(block, self.family.router_attr, None) if block is not None else None
            experts = getattr(block, self.family.experts_attr, None) if block is not None else None
            if router is None or experts is None:
                continue  # a dense layer (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers)
            shared = tuple(m for m in (_shared(block, layer, a) for a in self.family.shared_attrs) if m is not None)
            out.append(MoELayer(index=i, block=block, router=router, experts=experts, shared=shared,
                                num_experts=int(router.weight.shape[0]), top_k=int(getattr(self.config, self.family.top_k_key))))
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
        """Every decoder layer, dense ones included, in order."""
        return list(_get_path(self.model, self.family.layers_path))

    def head(self, hidden):
        """Logits from the last decoder layer's output: final norm, LM head, family scaling."""
        logits = self.model.get_output_embeddings()(_get_path(self.model, self.family.final_norm_path)(hidden))
        if self.family.logits_divisor_key:
            logits = logits / getattr(self.config, self.family.logits_divisor_key)
        return logits

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters and those active for one token (top-k of the routed experts)."""
        seen: set[int] = set()
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
        return {
            "family": self.family.name,
            "model_type": self.config.model_type,
            "num_layers": int(self.config.num_hidden_layers),
            "moe_layers": [l.index for l in self.layers],
            "experts_per_layer": {str(l.index): l.num_experts for l in self.layers},
            "top_k": self.top_k,
            "shared_experts": shared,
            "gate_normalization": self.family.routing.describe(self.config),
            "parameters": counts,
        }
