"""Supported MoE families, described as data (TransformerLens-style adapters).

Every family in transformers 5 has the same skeleton: a decoder layer holds a sparse block with
a *router* module returning ``(router_logits, top_k_weights, top_k_index)`` and a fused
*experts* module (3-D parameters, expert on dim 0) called as ``experts(hidden, index, weights)``.
What differs is where those live (in memory and in saved checkpoints), which config keys count
them and how gate weights are normalized; that is all this file records. Adding a family = one
``register_family`` call here and one row in ``tests/test_families.py``'s matrix.

Past 400 lines on purpose: about a third is the table of built-in families, which reads against
the spec's field comments above it; a family's row and the fields it sets belong on one page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from moeguard.errors import MoeguardError
from moeguard.registry import Registry


@dataclass(frozen=True, kw_only=True)
class RoutingSpec:
    """How a router turns logits into (weights, indices).

    score:      ``softmax`` | ``sigmoid`` | ``sparsemixer`` (PhiMoE's top-2 sparse mixer)
    select_on:  ``probs``: top-k over the scores (softmax before top-k);
                ``logits``: top-k over raw logits (plus a selection bias, Kolibri), then the score of
                the k chosen (softmax over them, or each one's sigmoid)
    sorted_choice: a biased or group-limited choice takes the top-k sorted by score (AFMoE, Beam);
                DeepSeek-V3 and MiniMax-M2 take them unsorted. Only the order of the k weights
                differs, so only a renormalized sum's last bit does
    renormalize: True/False, or the config key holding it (``norm_topk_prob``)
    grouped:    group-limited routing (config ``n_group``/``topk_group``): DeepSeek-V3 scores a
                group by the sum of its top 2 (``group_score="top2_sum"``); DeepSeek-V2 scores it by
                its best expert (``"max"``), and only when ``group_method_key`` names ``group_method``
    correction_bias: path, under the sparse block, of a per-expert bias added to the scores for
                *choosing* experts only (DeepSeek-V3 ``gate.e_score_correction_bias``, ERNIE-4.5
                ``gate.moe_statics.e_score_correction_bias`` [1, E], MiniMax-M2 and LFM2 hold it on
                the block and pass it to the router). Its expert axis is its last.
    """

    score: str
    select_on: str = "probs"
    renormalize: bool | str = False
    grouped: bool = False
    correction_bias: str | None = None
    scaling_key: str | None = None
    # renormalized weights: w / (sum + renorm_eps), or w / max(sum, config[renorm_min_key]) (ERNIE)
    renorm_eps: float = 0.0
    renorm_min_key: str | None = None
    # renormalized by the p-norm of the k weights, p read from this config key (DBRX's
    # moe_normalize_expert_weights: 1.0 is a sum, 2.0 the Euclidean norm; None: not renormalized)
    renorm_p_key: str | None = None
    # dtype of the arithmetic on real (bf16) checkpoints, as each family's own router does it:
    # scores (softmax or sigmoid) in float32 or in the logits' dtype; weights returned in float32,
    # in the logits' dtype or in the router input's dtype
    score_dtype: str = "float32"
    weights_dtype: str = "logits"
    logits_fp32: bool = False  # DeepSeek-V3 computes router logits in float32 whatever the weights' dtype
    # Config keys for group-limited routing; read only when grouped.
    n_group_key: str = "n_group"
    topk_group_key: str = "topk_group"
    group_score: str = "top2_sum"
    group_method_key: str | None = None   # DeepSeek-V2: groups apply only when config.topk_method says so
    group_method: str = ""
    sorted_choice: bool = False
    # Capacity-limited routing (Switch Transformers): each expert takes at most config[capacity_key]
    # tokens of a sequence, in token order; a token past its expert's capacity is dropped (no expert
    # output, the residual passes it on), which route() reports as weight 0 in its slot
    capacity_key: str | None = None
    # NLLB-MoE's top-2 with batch capacity (fairseq's Top2Gate): the best expert by the softmax, the
    # second by the logits; padding tokens take no expert; each expert takes at most a capacity of the
    # batch's tokens, every first choice counted before any second one; the two weights renormalized
    # to sum to 1 (before or after dropping, per config). Read from the config: expert_capacity,
    # moe_eval_capacity_token_fraction, batch_prioritized_routing,
    # normalize_router_prob_before_dropping, router_ignore_padding_tokens.
    top2_capacity: bool = False
    # Config settings the rule above needs, with the values it supports ((key, allowed values), ...):
    # NLLB-MoE's "sampling" and "random" second-expert policies draw noise on every call (in eval too),
    # so no pruned and masked model could be compared; load refuses them, saying so.
    requires: tuple[tuple[str, tuple], ...] = ()

    def group_rule_on(self, config) -> bool:
        """Whether this config's router runs the group-limited code (DeepSeek-V2's greedy mode does
        not), whatever its number of groups: what ``check_config`` validates."""
        return self.grouped and (self.group_method_key is None
                                 or getattr(config, self.group_method_key, None) == self.group_method)

    def groups_on(self, config) -> bool:
        """Whether this config routes group-limited: the rule on, with more than one group (one
        group, GLM-4.5's and dots1's default, limits nothing)."""
        n = getattr(config, self.n_group_key, 1)
        return self.group_rule_on(config) and type(n) is int and n > 1

    def renormalizes(self, config) -> bool:
        """Whether the k chosen weights are renormalized under this config."""
        if self.renorm_p_key:
            return getattr(config, self.renorm_p_key, None) is not None
        return self.renormalize if isinstance(self.renormalize, bool) else bool(getattr(config, self.renormalize, False))

    def describe(self, config) -> str:
        renorm = self.renormalizes(config)
        if self.score == "sparsemixer":
            return "sparsemixer (PhiMoE): masked softmax per choice, top-2"
        order = f"{self.score} before top-k" if self.select_on == "probs" else f"top-k on logits, {self.score} after top-k"
        if self.top2_capacity:   # its own choice of the two, said below
            order = self.score
        p = getattr(config, self.renorm_p_key, None) if self.renorm_p_key else None
        parts = [order, (f"top-k renormalized by their {p:g}-norm" if p not in (None, 1.0) else "renormalized top-k")
                 if renorm and self.select_on == "probs" else None]
        if self.groups_on(config):
            parts.append(f"group-limited ({getattr(config, self.n_group_key, 1)} groups, "
                         f"top {getattr(config, self.topk_group_key, 1)} groups)")
        if self.correction_bias:
            parts.append("score-correction bias for selection")
        if self.top2_capacity:
            frac = getattr(config, "moe_eval_capacity_token_fraction", 0.0) or 0.0
            fixed = getattr(config, "expert_capacity", None)
            train = f"{fixed} tokens" if fixed is not None else "2 x ceil(tokens / experts) of its first call"
            evals = f"ceil({frac:g} x the batch's tokens)" if frac > 0 else train
            parts.append(f"top-2 (second choice by logits), renormalized over the two "
                         f"{'before' if getattr(config, 'normalize_router_prob_before_dropping', False) else 'after'} "
                         f"dropping; capacity per expert and batch {evals} in eval, {train} in training "
                         "(the router keeps its last call's, an eval call's too; first choices before second "
                         "ones), the rest dropped"
                         + ("" if getattr(config, "router_ignore_padding_tokens", False) else "; padding takes no expert"))
        if self.capacity_key:
            parts.append(f"capacity {getattr(config, self.capacity_key, None)} tokens per expert and sequence, "
                         "the rest dropped")
        if self.scaling_key and getattr(config, self.scaling_key, 1.0) != 1.0:
            parts.append(f"scaled by {getattr(config, self.scaling_key)}")
        return ", ".join(p for p in parts if p)


@dataclass(frozen=True)
class DiskLayout:
    """Where routed experts live in a saved checkpoint, by module name under a sparse block.

    The on-disk layout is not the in-memory one (transformers converts fused experts to each
    family's public layout on save, and back on load), so a family's layout holds both its
    in-memory names and its public on-disk names (:meth:`FamilySpec.disk_layout`).
    """

    block_names: tuple[str, ...]
    router_modules: tuple[str, ...]
    expert_modules: tuple[str, ...]
    # always-on experts: copied even though they sit in the same block, whatever their shapes
    shared_modules: tuple[str, ...] = ()
    # ``experts.{e}.<rest>``: one tensor per expert, the expert number in the key
    per_expert: re.Pattern = re.compile(r"^experts\.(\d+)\.(.+)$")
    # fused tensors may hold E blocks of rows on dim 0 ([E*I, d], DBRX), not E rows
    blocked: bool = False
    # the module name of expert e (what ``per_expert`` matches): renumbered kept experts are written so
    per_expert_name: str = "experts.{}"

    @classmethod
    def union(cls, layouts: Iterable["DiskLayout"]) -> "DiskLayout":
        """Every name of every layout (for a checkpoint whose family is not known)."""
        layouts = list(layouts)
        patterns = {l.per_expert.pattern for l in layouts}
        if len(patterns) != 1:
            raise ValueError(f"layouts disagree on the per-expert key pattern: {sorted(patterns)}")
        return cls(**{f: _unique(n for l in layouts for n in getattr(l, f))
                      for f in ("block_names", "router_modules", "expert_modules", "shared_modules")},
                   per_expert=layouts[0].per_expert, per_expert_name=layouts[0].per_expert_name)


def expert_axis(shape: tuple[int, ...], num_experts: int, *, blocked: bool = False) -> int | None:
    """The axis of a per-expert tensor of ``shape`` that indexes experts: 0, or the last when
    every other dim is 1 (ERNIE's [1, E] bias); None when neither holds. In memory and on disk.

    ``blocked`` (DBRX): dim 0 may also hold E equal blocks of rows ([E*I, d], expert e's rows
    e*I..(e+1)*I-1), which is [E, I, d] in the same bytes: :func:`experts_first` views it so."""
    if shape and (shape[0] == num_experts or (blocked and shape[0] and shape[0] % num_experts == 0)):
        return 0
    if shape and shape[-1] == num_experts and all(s == 1 for s in shape[:-1]):
        return len(shape) - 1
    return None


def experts_first(t, axis: int, num_experts: int):
    """A view of a per-expert tensor with its E experts on dim 0 (``view[e]`` is expert e's slice):
    the tensor itself, its last axis moved first (ERNIE's [1, E]), or E blocks of rows ([E*I, d]
    viewed [E, I, d], DBRX)."""
    if axis != 0:
        return t.movedim(-1, 0)
    return t if t.shape[0] == num_experts else t.view(num_experts, -1, *t.shape[1:])


def cut_shape(shape, axis: int, num_experts: int, n: int) -> list[int]:
    """``shape`` of a per-expert tensor of ``num_experts`` experts, cut to ``n`` of them."""
    out = list(shape)
    out[axis] = out[axis] // num_experts * n
    return out


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]
    block_attrs: tuple[str, ...]          # attribute of the decoder layer holding the sparse block
    router_attr: str                      # attribute of the block holding the router
    routing: RoutingSpec
    num_experts_key: str                  # config key counting routed experts
    experts_attr: str = "experts"
    # config key of the experts each token takes; None: the router's fixed rule takes ``fixed_top_k``
    # (Switch Transformers routes top-1 and has no key)
    top_k_key: str | None = "num_experts_per_tok"
    fixed_top_k: int = 1
    # Further stacks of layers after ``layers_path`` (an encoder-decoder's decoder: "decoder.block").
    # Layer indices run on across stacks (encoder 0..n-1, decoder n..), in keep maps and reports alike.
    more_layers_paths: tuple[str, ...] = ()
    shared_attrs: tuple[str, ...] = ()    # always-on experts beside the routed ones (in the block, or on the layer)
    layers_path: str = "model.layers"
    min_experts: int = 1                  # fewest experts a valid router of this family accepts
    aux_loss_key: str | None = "router_aux_loss_coef"
    # "module:function" computing one stack's load-balancing term from its router logits, for a model
    # whose forward computes it only when given labels (NLLB-MoE's, which also fails when layerdrop
    # skipped every sparse layer of a stack): fine-tuning calls it on each stack's recorded logits
    aux_loss_from_logits: str | None = None
    # the router's [E, d] weight under the router module (HunYuan nests it in a Linear: ``wg.weight``);
    # a bias beside it (GPT-OSS) is read from the same module
    router_weight_attr: str = "weight"
    # what runs after the last decoder layer (replaying the model from a cached layer input)
    final_norm_path: str = "model.norm"
    logits_divisor_key: str | None = None  # GraniteMoE divides logits by config.logits_scaling
    # Public on-disk names (what save_pretrained writes and hub checkpoints hold) beside the
    # in-memory ones above: the sparse block, its router and its expert tensors.
    disk_block_attrs: tuple[str, ...] = ()
    disk_router_attrs: tuple[str, ...] = ()
    disk_expert_attrs: tuple[str, ...] = ()
    disk_per_expert: str = r"^experts\.(\d+)\.(.+)$"  # one tensor per expert, number in the key
    # In memory, fused experts: "gate_up" = gate_up_proj [E, 2I, d] (gate rows, then up rows) and
    # down_proj [E, d, I]; "gate_up_interleaved_t" = gpt-oss's [E, d, 2I] (gate even, up odd) and [E, I, d];
    # "up" = ungated experts (Nemotron-H): up_proj [E, I, d] and down_proj [E, d, I];
    # "gate_up_t" = Llama-4's [E, d, 2I] (gate columns, then up) and [E, I, d];
    # "blocked" = DBRX's three [E*I, d] tensors under ``experts.mlp``: w1 (gate), v1 (up) and w2
    # (down, transposed), expert e in rows e*I..(e+1)*I-1 (:func:`experts_first` views them [E, I, d]).
    # "modules" = one module per expert in a ModuleDict, named ``expert_module.format(e)`` (Switch
    # Transformers' ``expert_{e}`` with wi [I, d] and wo [d, I]), in memory and on disk: pruning keeps
    # and renumbers modules instead of cutting tensors.
    expert_layout: str = "gate_up"
    expert_module: str = "expert_{}"
    # How the block calls its router and experts. "standard": the router returns (logits, weights,
    # index) and the experts are called as experts(hidden, index, weights), scaling their outputs.
    # "scaled_input" (Llama-4): the router returns (scores [T, E], logits), zero for experts not
    # chosen, and every expert runs on every token's input scaled by its score (experts([E*T, d])).
    # "logits" (DBRX): the router returns its logits [T, E] only; the block's own ``route_method``
    # turns them into (weights, index), and the experts are called as in "standard".
    # "dispatch" (Switch Transformers): the router takes [B, S, d] and returns (dispatch [B, S, E],
    # one-hot with capacity-dropped tokens all zero; probabilities [B, S, 1] of the chosen expert;
    # logits [B, S, E]); the experts are called as experts(hidden [T, d], dispatch [T, 1, E], probs [T, 1]).
    # "combine" (NLLB-MoE): the router takes [T, d] and the layer's attention mask (its padding) and
    # returns (top-1 mask [T, E], combine weights [T, E]: each token's two kept weights, 0 elsewhere and
    # where dropped; logits [T, E]); the experts are called as experts(hidden [T, d], top-1 mask, combine)
    # and run expert e on the tokens with a nonzero weight in column e.
    # "sorted" (JetMoE): the router returns (sorted pair order, the pairs' tokens, their gates, tokens per
    # expert, logits [T, E]), the (token, rank) pairs sorted by expert; the block runs its two
    # ``expert_linears`` on the sorted rows itself (no experts module to call).
    call: str = "standard"
    route_method: str | None = None
    # Experts held as two per-expert linear maps on the block, not an experts module: JetMoE's
    # ``input_linear`` [E, 2I, d] (gate rows, then up rows; in the attention, queries [E, H, d]) and
    # ``output_linear`` [E, d, I]. moeguard views the pair as one experts module (adapter.ExpertsView).
    expert_linears: tuple[str, str] | None = None
    # Further sparse blocks in each decoder layer, by path from the layer (JetMoE's mixture of attention
    # heads, ``self_attention.experts``): the j-th such block of layer i is MoE layer (j + 1) * n + i
    # (n decoder layers), after every main block. Its experts work inside the attention (queries in,
    # outputs back): what one adds for a token is computed on the token's recorded batch
    # (models/attention_experts.py), and trace reads the main blocks' experts only.
    more_block_attrs: tuple[str, ...] = ()
    # The sub-config holding the MoE keys (expert count, top-k, routing switches) when they are not
    # on the model's (text) config: DBRX's ``ffn_config``. :func:`moe_config` resolves it.
    config_attr: str | None = None
    # Where checkpoints keep the decoder layers when not where memory does (Nemotron-H saves its
    # base model as ``backbone``): the prefix of layers_path is swapped for on-disk names.
    disk_layers_path: str | None = None
    # On disk (what trace streams): each routed expert's gate, up and down tensors. Three names
    # under ``experts.{e}.`` (gate [I, d], up [I, d], down [d, I]), or two fused names under the
    # sparse block (every expert's gate-up and down, in ``expert_layout``). And the router's
    # weight, under its module.
    disk_expert_tensors: tuple[str, ...] = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    disk_router_weight: str = "weight"

    def top_k(self, config) -> int:
        """The experts each token takes under ``config`` (the MoE config, :func:`moe_config`). A key that
        lists one value per layer (HunYuan's ``moe_topk``, as Hunyuan-A13B's config gives it) reads as its
        value where every layer has the same (``loading.check_config`` refuses other lists first)."""
        if not self.top_k_key:
            return self.fixed_top_k
        value = getattr(config, self.top_k_key)
        if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
            value = value[0]
        return int(value)

    @property
    def stacks(self) -> tuple[str, ...]:
        """Every stack of layers, in index order (one for a decoder-only model)."""
        return (self.layers_path, *self.more_layers_paths)

    @property
    def encoder_decoder(self) -> bool:
        return bool(self.more_layers_paths)

    def config_key(self, key: str) -> str:
        """``key`` as config.json nests it (DBRX: ``ffn_config.moe_top_k``), for messages and listings."""
        return f"{self.config_attr}.{key}" if self.config_attr else key

    @property
    def blocked(self) -> bool:
        """Whether the experts' tensors hold E blocks of rows on dim 0 (:func:`expert_axis`)."""
        return self.expert_layout == "blocked"

    @property
    def disk_layers(self) -> str:
        """Where checkpoints keep the decoder layers."""
        return self.disk_layers_path or self.layers_path

    @property
    def disk_stacks(self) -> tuple[str, ...]:
        """Where checkpoints keep each stack of layers, in index order."""
        return (self.disk_layers, *self.more_layers_paths)

    def disk_name(self, name: str) -> str:
        """The on-disk name of an in-memory parameter name (they differ only in the base-model prefix)."""
        if not self.disk_layers_path:
            return name
        mem, disk = self.layers_path.rpartition(".")[0] + ".", self.disk_layers_path.rpartition(".")[0] + "."
        return disk + name[len(mem):] if name.startswith(mem) else name

    def disk_layout(self) -> DiskLayout:
        """The module names under which this family's checkpoints hold routers and experts."""
        bias = self.routing.correction_bias
        block_held = (bias,) if bias and "." not in bias else ()   # a bias on the block, not in its router
        return DiskLayout(block_names=_unique(self.block_attrs + self.disk_block_attrs + self.more_block_attrs),
                          router_modules=_unique((self.router_attr, *self.disk_router_attrs, *block_held)),
                          expert_modules=_unique((self.experts_attr, *self.disk_expert_attrs)),
                          shared_modules=self.shared_attrs, per_expert=re.compile(self.disk_per_expert),
                          blocked=self.blocked,
                          per_expert_name=f"{self.experts_attr}.{self.expert_module}" if self.expert_layout == "modules"
                          else "experts.{}")


def unsupported_setting(family: FamilySpec, config) -> tuple[str, str] | None:
    """(a message, the setting to use) for a config setting the family's routing is not modelled
    for (``RoutingSpec.requires``: NLLB-MoE's random second-expert policies), or None."""
    for key, allowed in family.routing.requires:
        value = getattr(config, key, None)
        if value not in allowed:
            why = "; moeguard compares pruned and masked models, which random routing forbids" \
                if key == "second_expert_policy" else ""
            return (f"config {family.config_key(key)} is {value!r}; {family.name}'s routing is modelled for "
                    f"{' or '.join(map(repr, allowed))} only{why}", f"set {family.config_key(key)} to {allowed[0]!r}")
    return None


FAMILIES: Registry[FamilySpec] = Registry("model family")
_BY_MODEL_TYPE: Registry[FamilySpec] = Registry("model_type")


def register_family(spec: FamilySpec, *, overwrite: bool = False) -> FamilySpec:
    if spec.call == "logits" and not spec.route_method:
        raise ValueError(f"family {spec.name}: call 'logits' needs route_method, the block's logits -> "
                         "(weights, index) method")
    FAMILIES.add(spec.name, spec, overwrite=overwrite)
    for mt in spec.model_types:
        _BY_MODEL_TYPE.add(mt, spec, overwrite=overwrite)
    return spec


def get_family(name: str) -> FamilySpec:
    return FAMILIES.get(name)


# Mixtral's router and on-disk names (block_sparse_moe.gate, block_sparse_moe.experts.{e}.w1), also
# MiniMax-Text-01's, beside its lightning-attention layers
for _name in ("mixtral", "minimax"):
    register_family(FamilySpec(
        name=_name, model_types=(_name,), block_attrs=("mlp", "block_sparse_moe"), router_attr="gate",
        routing=RoutingSpec(score="softmax", renormalize=True, weights_dtype="float32"),
        num_experts_key="num_local_experts", disk_block_attrs=("block_sparse_moe",),
        disk_expert_tensors=("w1.weight", "w3.weight", "w2.weight")))
# Qwen2-MoE's router (softmax, top-k, renormalized when norm_topk_prob) as the mlp block's gate,
# in Qwen2/3-MoE, OLMoE, Qwen3-Next (hybrid linear attention) and FlexOlmo
QWEN2_ROUTING = RoutingSpec(score="softmax", renormalize="norm_topk_prob")
for _name, _shared in (("qwen2_moe", ("shared_expert", "shared_expert_gate")), ("qwen3_moe", ()), ("olmoe", ()),
                       ("qwen3_next", ("shared_expert", "shared_expert_gate")), ("flex_olmo", ())):
    register_family(FamilySpec(name=_name, model_types=(_name,), block_attrs=("mlp",), router_attr="gate",
                               routing=QWEN2_ROUTING, num_experts_key="num_experts", shared_attrs=_shared))
# DeepSeek-V3's router, reused as is by GLM-4.5 (glm4_moe, glm4_moe_lite) and dots1: sigmoid
# scores, a correction bias for choosing only, group-limited choice (a group scores the sum of its
# top 2), optional renormalization and a routing scale; logits in float32.
DEEPSEEK_V3_ROUTING = RoutingSpec(score="sigmoid", renormalize="norm_topk_prob", grouped=True,
                                  correction_bias="gate.e_score_correction_bias", scaling_key="routed_scaling_factor",
                                  renorm_eps=1e-20, logits_fp32=True)
# Also EXAONE-MoE (its checkpoints hold the bias on the block: mlp.e_score_correction_bias), Solar
# Open and MiMo-V2-Flash (no shared experts).
for _name, _count, _shared, _disk_router in (
        ("deepseek_v3", "n_routed_experts", ("shared_experts",), ()), ("glm4_moe", "n_routed_experts", ("shared_experts",), ()),
        ("glm4_moe_lite", "n_routed_experts", ("shared_experts",), ()), ("dots1", "n_routed_experts", ("shared_experts",), ()),
        ("exaone_moe", "num_experts", ("shared_experts",), ("e_score_correction_bias",)),
        ("solar_open", "n_routed_experts", ("shared_experts",), ()), ("mimo_v2_flash", "n_routed_experts", (), ())):
    register_family(FamilySpec(
        name=_name, model_types=(_name,), block_attrs=("mlp",), router_attr="gate", routing=DEEPSEEK_V3_ROUTING,
        num_experts_key=_count, shared_attrs=_shared, disk_router_attrs=_disk_router,
        # group scores take the top-2 experts of a group, so fewer than 2 can't route
        min_experts=2, aux_loss_key=None))
# DeepSeek-V2: softmax scores, group-limited greedy choice when topk_method says so (a group scores
# its best expert), never renormalized (the router drops norm_topk_prob), scaled; logits in float32
register_family(FamilySpec(
    name="deepseek_v2", model_types=("deepseek_v2",), block_attrs=("mlp",), router_attr="gate",
    routing=RoutingSpec(score="softmax", grouped=True, group_score="max", group_method_key="topk_method",
                        group_method="group_limited_greedy", scaling_key="routed_scaling_factor", logits_fp32=True,
                        # transformers' router runs these two only: another ("noaux_tc", a typo) left its weights
                        # unset, an UnboundLocalError at the first forward
                        requires=(("topk_method", ("greedy", "group_limited_greedy")),)),
    num_experts_key="n_routed_experts", shared_attrs=("shared_experts",), aux_loss_key=None))
# GraniteMoE, and Granite 4.0 hybrid (Mamba2 and attention layers) and GraniteMoE-Shared, with an
# always-on MLP on the decoder layer beside the sparse block (the adapter finds it there). On
# disk: block_sparse_moe.router.layer, fused block_sparse_moe.input_linear / output_linear;
# GraniteMoE-SWA (sliding-window layers) saves its in-memory names.
GRANITE_ROUTING = RoutingSpec(score="softmax", select_on="logits")
for _name, _shared in (("granitemoe", ()), ("granitemoehybrid", ("shared_mlp",)), ("granitemoeshared", ("shared_mlp",))):
    register_family(FamilySpec(
        name=_name, model_types=(_name,), block_attrs=("block_sparse_moe",), router_attr="router",
        routing=GRANITE_ROUTING, num_experts_key="num_local_experts",
        shared_attrs=_shared, logits_divisor_key="logits_scaling", disk_expert_attrs=("input_linear", "output_linear"),
        disk_expert_tensors=("input_linear.weight", "output_linear.weight"), disk_router_weight="layer.weight"))
register_family(FamilySpec(
    name="granitemoe_swa", model_types=("granitemoe_swa",), block_attrs=("block_sparse_moe",), router_attr="router",
    routing=GRANITE_ROUTING, num_experts_key="num_local_experts", shared_attrs=("shared_mlp",),
    logits_divisor_key="logits_scaling", disk_expert_tensors=("experts.gate_up_proj", "experts.down_proj")))
register_family(FamilySpec(
    name="phimoe", model_types=("phimoe",), block_attrs=("mlp", "block_sparse_moe"), router_attr="router",
    # sparsemixer always picks two distinct experts
    routing=RoutingSpec(score="sparsemixer"), num_experts_key="num_local_experts", min_experts=2,
    disk_block_attrs=("block_sparse_moe",), disk_router_attrs=("gate",),  # block_sparse_moe.gate, experts.{e}.w1
    disk_expert_tensors=("w1.weight", "w3.weight", "w2.weight")))
register_family(FamilySpec(
    name="gpt_oss", model_types=("gpt_oss",), block_attrs=("mlp",), router_attr="router",
    routing=RoutingSpec(score="softmax", select_on="logits", score_dtype="logits"), num_experts_key="num_local_experts",
    expert_layout="gate_up_interleaved_t", disk_expert_tensors=("experts.gate_up_proj", "experts.down_proj")))

# Nemotron-H: Mamba2, attention and MoE layers (the MoE layer's block is its ``mixer``);
# DeepSeek-V3's router; ungated relu² experts; checkpoints call the base model ``backbone``
register_family(FamilySpec(
    name="nemotron_h", model_types=("nemotron_h",), block_attrs=("mixer",), router_attr="gate",
    routing=DEEPSEEK_V3_ROUTING, num_experts_key="n_routed_experts", shared_attrs=("shared_experts",),
    min_experts=2, aux_loss_key=None, final_norm_path="model.norm_f", expert_layout="up",
    disk_layers_path="backbone.layers",
    # per expert: up and down on disk; the up projection stands in for the gate where a reader wants one
    disk_expert_tensors=("up_proj.weight", "up_proj.weight", "down_proj.weight")))

# Llama-4 (text model; the multimodal wrapper resolves to it): top-k on logits, each chosen expert's
# sigmoid, never renormalized; the score scales the expert's *input*; transposed fused experts
register_family(FamilySpec(
    name="llama4", model_types=("llama4_text",), block_attrs=("feed_forward",), router_attr="router",
    routing=RoutingSpec(score="sigmoid", select_on="logits"), num_experts_key="num_local_experts",
    shared_attrs=("shared_expert",), expert_layout="gate_up_t", call="scaled_input",
    disk_expert_tensors=("experts.gate_up_proj", "experts.down_proj")))

# Jamba: Mamba and attention layers, an MoE feed-forward every expert_layer_period; softmax, top-k,
# never renormalized
register_family(FamilySpec(
    name="jamba", model_types=("jamba",), block_attrs=("feed_forward",), router_attr="router",
    routing=RoutingSpec(score="softmax"), num_experts_key="num_experts", final_norm_path="model.final_layernorm"))


# ERNIE-4.5-MoE: float32 softmax; experts chosen on the probabilities plus a [1, E] bias
# (gate.moe_statics; on disk mlp.moe_statics); weights renormalized by max(sum, moe_norm_min),
# returned in the input's dtype
register_family(FamilySpec(
    name="ernie4_5_moe", model_types=("ernie4_5_moe",), block_attrs=("mlp",), router_attr="gate",
    routing=RoutingSpec(score="softmax", renormalize=True, renorm_min_key="moe_norm_min", logits_fp32=True,
                        correction_bias="gate.moe_statics.e_score_correction_bias", weights_dtype="input",
                        sorted_choice=True),
    num_experts_key="moe_num_experts", top_k_key="moe_k", shared_attrs=("shared_experts",),
    disk_router_attrs=("moe_statics",)))
# MiniMax-M2: sigmoid scores, a selection bias held by the block and passed to the router,
# renormalized; Mixtral's names on disk
register_family(FamilySpec(
    name="minimax_m2", model_types=("minimax_m2",), block_attrs=("mlp",), router_attr="gate",
    routing=RoutingSpec(score="sigmoid", renormalize=True, correction_bias="e_score_correction_bias"),
    num_experts_key="num_local_experts", disk_block_attrs=("block_sparse_moe",),
    disk_expert_tensors=("w1.weight", "w3.weight", "w2.weight")))
# LFM2-MoE (short convolutions and attention): sigmoid in the logits' dtype, an optional selection
# bias on the block (use_expert_bias), renormalized with eps 1e-6, scaled; w1/w3/w2 on disk
register_family(FamilySpec(
    name="lfm2_moe", model_types=("lfm2_moe",), block_attrs=("feed_forward",), router_attr="gate",
    routing=RoutingSpec(score="sigmoid", score_dtype="logits", renormalize="norm_topk_prob", renorm_eps=1e-6,
                        correction_bias="expert_bias", scaling_key="routed_scaling_factor", sorted_choice=True),
    num_experts_key="num_experts", final_norm_path="model.embedding_norm", aux_loss_key=None,
    disk_expert_tensors=("w1.weight", "w3.weight", "w2.weight")))
# HunYuan-MoE: Qwen's softmax router with its weight nested in a Linear (gate.wg), always
# renormalized; an always-on MLP in the block
register_family(FamilySpec(
    name="hunyuan_v1_moe", model_types=("hunyuan_v1_moe",), block_attrs=("mlp",), router_attr="gate",
    routing=RoutingSpec(score="softmax", renormalize=True), num_experts_key="num_experts", top_k_key="moe_topk",
    shared_attrs=("shared_mlp",), router_weight_attr="wg.weight", disk_router_weight="wg.weight", aux_loss_key=None))
# Qwen3.5-MoE's language model (hybrid Gated DeltaNet and attention) and Mellum: Qwen's router;
# Qwen3.5 always renormalizes
register_family(FamilySpec(
    name="qwen3_5_moe", model_types=("qwen3_5_moe_text",), block_attrs=("mlp",), router_attr="gate",
    routing=RoutingSpec(score="softmax", renormalize=True), num_experts_key="num_experts",
    shared_attrs=("shared_expert", "shared_expert_gate")))
register_family(FamilySpec(name="mellum", model_types=("mellum",), block_attrs=("mlp",), router_attr="gate",
                           routing=QWEN2_ROUTING, num_experts_key="num_local_experts"))

# DBRX: the router returns its logits only and the block routes (softmax in the logits' dtype,
# top-k, divided by the k weights' p-norm, p = moe_normalize_expert_weights); the MoE keys live in
# the config's ffn_config; the experts hold w1 (gate), v1 (up) and w2 (down, transposed) as
# [E*I, d] blocks of rows, in memory and on disk
register_family(FamilySpec(
    name="dbrx", model_types=("dbrx",), block_attrs=("ffn",), router_attr="router",
    routing=RoutingSpec(score="softmax", score_dtype="logits", renormalize=True,
                        renorm_p_key="moe_normalize_expert_weights"),
    num_experts_key="moe_num_experts", top_k_key="moe_top_k", config_attr="ffn_config",
    layers_path="transformer.blocks", final_norm_path="transformer.norm_f", aux_loss_key="moe_loss_weight",
    router_weight_attr="layer.weight", disk_router_weight="layer.weight", call="logits",
    route_method="route_tokens_to_experts", expert_layout="blocked",
    disk_expert_tensors=("experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2")))

# Switch Transformers (encoder-decoder, T5-style): a sparse feed-forward in every
# encoder_sparse_step-th encoder block (``layer.1.mlp``) and decoder block (``layer.2.mlp``, after
# the cross-attention); top-1 softmax routing in float32 with a per-sequence expert capacity; one
# module per expert (``experts.expert_{e}``: wi, wo), the same names on disk
register_family(FamilySpec(
    name="switch_transformers", model_types=("switch_transformers",), block_attrs=("layer.2.mlp", "layer.1.mlp"),
    router_attr="router", routing=RoutingSpec(score="softmax", weights_dtype="input", logits_fp32=True,
                                              capacity_key="expert_capacity",
                                              # its router computes in router_dtype; moeguard's in float32
                                              # (near-ties would pick another expert): refused, as NLLB's
                                              requires=(("router_dtype", ("float32",)),)),
    num_experts_key="num_experts", top_k_key=None, layers_path="encoder.block", more_layers_paths=("decoder.block",),
    router_weight_attr="classifier.weight", disk_router_weight="classifier.weight",
    final_norm_path="decoder.final_layer_norm", call="dispatch", expert_layout="modules",
    disk_per_expert=r"^experts\.expert_(\d+)\.(.+)$", disk_expert_tensors=("wi.weight", "wi.weight", "wo.weight")))

# NLLB-MoE (encoder-decoder, fairseq's): a sparse feed-forward (``ffn``) in every
# encoder_sparse_step-th encoder layer and decoder_sparse_step-th decoder layer; top-2 with a batch
# capacity (RoutingSpec.top2_capacity), float32 router, weights in the input's dtype; one module per
# expert (``experts.expert_{e}``: fc1, fc2, with biases), the same names on disk. transformers 5.24
# runs these experts wrongly (models/upstream.py repairs every model moeguard builds or loads).
register_family(FamilySpec(
    name="nllb_moe", model_types=("nllb-moe",), block_attrs=("ffn",), router_attr="router",
    routing=RoutingSpec(score="softmax", weights_dtype="input", logits_fp32=True, top2_capacity=True,
                        requires=(("second_expert_policy", ("all",)), ("router_dtype", ("float32",)))),
    num_experts_key="num_experts", top_k_key=None, fixed_top_k=2, min_experts=2,
    aux_loss_from_logits="transformers.models.nllb_moe.modeling_nllb_moe:load_balancing_loss_func",
    layers_path="model.encoder.layers", more_layers_paths=("model.decoder.layers",),
    router_weight_attr="classifier.weight", disk_router_weight="classifier.weight",
    final_norm_path="model.decoder.layer_norm", call="combine", expert_layout="modules",
    disk_per_expert=r"^experts\.expert_(\d+)\.(.+)$", disk_expert_tensors=("fc1.weight", "fc1.weight", "fc2.weight")))

# JetMoE: a mixture of attention heads (each expert a query and an output projection, top-k per
# token; ``self_attention.experts``) and a mixture of MLP experts in every layer, both with the same
# router (top-k on float32 logits, softmax over the k, in the input's dtype) and both counted by
# num_local_experts and num_experts_per_tok: pruning one prunes the other to the same count. The
# router hands the block its (token, rank) pairs sorted by expert; the experts are two per-expert
# linear maps with a bias on the block; the same names on disk.
register_family(FamilySpec(
    name="jetmoe", model_types=("jetmoe",), block_attrs=("mlp",), more_block_attrs=("self_attention.experts",),
    router_attr="router", routing=RoutingSpec(score="softmax", select_on="logits", weights_dtype="input"),
    num_experts_key="num_local_experts", aux_loss_key="aux_loss_coef", router_weight_attr="layer.weight",
    disk_router_weight="layer.weight", call="sorted", expert_linears=("input_linear", "output_linear"),
    disk_expert_attrs=("input_linear", "output_linear"),
    disk_expert_tensors=("input_linear.weight", "output_linear.weight")))

# Whether commands use an inferred spec that moeguard could not verify (the CLI's
# --trust-inferred-family sets it for one invocation; library users call trust_inferred_families).
_POLICY = {"trust_inferred": False}


def trusts_inferred_families() -> bool:
    """Whether inferred specs that failed verification are accepted now (see below)."""
    return _POLICY["trust_inferred"]


def trust_inferred_families(trust: bool) -> bool:
    """Accept (or stop accepting) inferred family specs that failed verification; returns the
    setting it replaces."""
    previous, _POLICY["trust_inferred"] = _POLICY["trust_inferred"], bool(trust)
    return previous


def text_config(config):
    """A multimodal wrapper's language-model config, else the config itself: where the text model's
    positions and hidden size are (Qwen3-VL-MoE's and GLM-4.5V's top level has neither, and a
    ``getattr`` with a default read the default)."""
    if hasattr(config, "get_text_config"):
        try:
            return config.get_text_config()
        except ValueError:   # several text configs (an encoder-decoder): the top level holds them
            pass
    return config


def moe_config(config):
    """The config that holds the MoE keys (expert count, top-k, routing switches): a family's own
    sub-config (DBRX's ``ffn_config``), a multimodal wrapper's language-model config, else the
    config itself. moeguard reads and writes its family keys there, and its own per-layer counts too."""
    config = text_config(config)
    model_type = getattr(config, "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type) if model_type in _BY_MODEL_TYPE else None
    if family is not None and family.config_attr:
        return getattr(config, family.config_attr)
    return config


def family_for_config(config) -> FamilySpec:
    """The family of a config: built in, else inferred from the module tree (:mod:`moeguard.models.infer`)
    and used when it reproduces the model's own router, or when the user trusts it; else a clear
    error naming what is supported and why this one is not."""
    model_type = getattr(config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE.get(model_type)
    from moeguard.models.infer import infer_family

    found = infer_family(config)
    if found.spec is not None and (found.status in ("built-in", "verified") or _POLICY["trust_inferred"]):
        return found.spec
    supported = ", ".join(_BY_MODEL_TYPE.names())
    why = "; ".join(found.reasons)
    if found.status == "unverified" and found.spec is None:
        raise MoeguardError(f"model_type '{model_type}' has no built-in spec, and moeguard could not infer one: {why}; "
                            f"the built-in model types are: {supported}",
                            hint="add a spec for it (docs/families.md says how)")
    if found.status == "unverified":
        raise MoeguardError(
            f"model_type '{model_type}' has no built-in spec, and the spec moeguard inferred for it is not verified: "
            f"{why}; the built-in model types are: {supported}", hint="pass --trust-inferred-family before the command to use it anyway (`moeguard "
                           "--trust-inferred-family info --model M` shows it), or add a spec (docs/families.md)")
    count_keys = sorted({f.num_experts_key for f in FAMILIES.items()})
    text = moe_config(config)
    looks_dense = found.status == "dense" or not any(k in c.to_dict() for c in (config, text) for k in count_keys)
    what = "a dense (non-MoE) model" if looks_dense else f"an unsupported MoE family ({why})"
    raise MoeguardError(
        f"model_type '{model_type}' is {what}; moeguard audits Mixture-of-Experts models of the families: {supported}",
        hint="pass a checkpoint of one of these families (e.g. mistralai/Mixtral-8x7B-v0.1), or one of the model "
             "types `moeguard families` lists as verified",
    )
