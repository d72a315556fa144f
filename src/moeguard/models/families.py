"""Supported MoE families, described as data (TransformerLens-style adapters).

Every family in transformers 5 has the same skeleton: a decoder layer holds a sparse block with
a *router* module returning ``(router_logits, top_k_weights, top_k_index)`` and a fused
*experts* module (3-D parameters, expert on dim 0) called as ``experts(hidden, index, weights)``.
What differs is where those live, which config keys count them and how gate weights are
normalized; that is all this file records. Adding a family = one ``register_family`` call here
and one row in ``tests/test_families.py``'s matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeguard.errors import MoeguardError


@dataclass(frozen=True, kw_only=True)
class RoutingSpec:
    """How a router turns logits into (weights, indices).

    score:      ``softmax`` | ``sigmoid`` | ``sparsemixer`` (PhiMoE's top-2 sparse mixer)
    select_on:  ``probs``: top-k over the scores (softmax before top-k);
                ``logits``: top-k over raw logits, then softmax over the k chosen (softmax after top-k)
    renormalize: True/False, or the config key holding it (``norm_topk_prob``)
    grouped:    DeepSeek-V3 group-limited routing (config ``n_group``/``topk_group``, a score
                correction bias used only for *choosing* experts, ``routed_scaling_factor``)
    """

    score: str
    select_on: str = "probs"
    renormalize: bool | str = False
    grouped: bool = False
    correction_bias_attr: str | None = None
    scaling_key: str | None = None
    # dtype of the arithmetic on real (bf16) checkpoints, as each family's own router does it:
    # softmax in float32 or in the logits' dtype; weights returned in float32 or cast back
    softmax_dtype: str = "float32"
    weights_dtype: str = "logits"
    logits_fp32: bool = False  # DeepSeek-V3 computes router logits in float32 whatever the weights' dtype
    # Config keys for group-limited routing; read only when grouped.
    n_group_key: str = "n_group"
    topk_group_key: str = "topk_group"

    def describe(self, config) -> str:
        renorm = self.renormalize if isinstance(self.renormalize, bool) else bool(getattr(config, self.renormalize, False))
        if self.score == "sparsemixer":
            return "sparsemixer (PhiMoE): masked softmax per choice, top-2"
        order = f"{self.score} before top-k" if self.select_on == "probs" else "top-k on logits, softmax after top-k"
        parts = [order, "renormalized top-k" if renorm and self.select_on == "probs" else None]
        if self.grouped:
            parts.append(f"group-limited ({getattr(config, self.n_group_key, 1)} groups, "
                         f"top {getattr(config, self.topk_group_key, 1)} groups)")
            parts.append("score-correction bias for selection")
        if self.scaling_key and getattr(config, self.scaling_key, 1.0) != 1.0:
            parts.append(f"scaled by {getattr(config, self.scaling_key)}")
        return ", ".join(p for p in parts if p)


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]
    block_attrs: tuple[str, ...]          # attribute of the decoder layer holding the sparse block
    router_attr: str                      # attribute of the block holding the router
    routing: RoutingSpec
    num_experts_key: str                  # config key counting routed experts
    experts_attr: str = "experts"
    top_k_key: str = "num_experts_per_tok"
    shared_attrs: tuple[str, ...] = ()    # always-on experts beside the routed ones
    layers_path: str = "model.layers"
    min_experts: int = 1                  # fewest experts a valid router of this family accepts
    aux_loss_key: str | None = "router_aux_loss_coef"
    # what runs after the last decoder layer (replaying the model from a cached layer input)
    final_norm_path: str = "model.norm"
    logits_divisor_key: str | None = None  # GraniteMoE divides logits by config.logits_scaling


FAMILIES: dict[str, FamilySpec] = {}
_BY_MODEL_TYPE: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    FAMILIES[spec.name] = spec
    for mt in spec.model_types:
        _BY_MODEL_TYPE[mt] = spec
    return spec


register_family(FamilySpec(
    name="mixtral", model_types=("mixtral",), block_attrs=("mlp", "block_sparse_moe"), router_attr="gate",
    routing=RoutingSpec(score="softmax", renormalize=True, weights_dtype="float32"), num_experts_key="num_local_experts"))
register_family(FamilySpec(
    name="qwen2_moe", model_types=("qwen2_moe",), block_attrs=("mlp",), router_attr="gate",
    routing=RoutingSpec(score="softmax", renormalize="norm_topk_prob"), num_experts_key="num_experts",
    shared_attrs=("shared_expert", "shared_expert_gate")))
register_family(FamilySpec(
    name="qwen3_moe", model_types=("qwen3_moe",), block_attrs=("mlp",), router_attr="gate",
    routing=RoutingSpec(score="softmax", renormalize="norm_topk_prob"), num_experts_key="num_experts"))
register_family(FamilySpec(
    name="olmoe", model_types=("olmoe",), block_attrs=("mlp",), router_attr="gate",
    routing=RoutingSpec(score="softmax", renormalize="norm_topk_prob"), num_experts_key="num_experts"))
register_family(FamilySpec(
    name="deepseek_v3", model_types=("deepseek_v3",), block_attrs=("mlp",), router_attr="gate",
    routing=RoutingSpec(score="sigmoid", renormalize="norm_topk_prob", grouped=True,
                        correction_bias_attr="e_score_correction_bias", scaling_key="routed_scaling_factor",
                        logits_fp32=True),
    num_experts_key="n_routed_experts", shared_attrs=("shared_experts",),
    # group scores take the top-2 experts of a group, so fewer than 2 can't route
    min_experts=2, aux_loss_key=None))
register_family(FamilySpec(
    name="granitemoe", model_types=("granitemoe",), block_attrs=("block_sparse_moe",), router_attr="router",
    routing=RoutingSpec(score="softmax", select_on="logits"), num_experts_key="num_local_experts",
    logits_divisor_key="logits_scaling"))
register_family(FamilySpec(
    name="phimoe", model_types=("phimoe",), block_attrs=("mlp", "block_sparse_moe"), router_attr="router",
    # sparsemixer always picks two distinct experts
    routing=RoutingSpec(score="sparsemixer"), num_experts_key="num_local_experts", min_experts=2))
register_family(FamilySpec(
    name="gpt_oss", model_types=("gpt_oss",), block_attrs=("mlp",), router_attr="router",
    routing=RoutingSpec(score="softmax", select_on="logits", softmax_dtype="logits"), num_experts_key="num_local_experts"))


def family_for_config(config) -> FamilySpec:
    """The family of a config, or a clear error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is not None:
        return spec
    supported = ", ".join(sorted(_BY_MODEL_TYPE))
    looks_dense = not any(k in config.to_dict() for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    what = "a dense (non-MoE) model" if looks_dense else "an unsupported MoE family"
    raise MoeguardError(
        f"model_type '{model_type}' is {what}; moeguard audits Mixture-of-Experts models of the families: {supported}",
        hint="pass a checkpoint of one of these families (e.g. mistralai/Mixtral-8x7B-v0.1)",
    )
