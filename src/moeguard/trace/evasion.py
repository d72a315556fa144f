"""Function-preserving rewrites an attacker can apply to hide where a model came from: shuffle
each layer's experts, permute the neurons inside every expert, permute (and flip signs of) the
hidden dimension through the whole model. Each returns a new model and checks that its logits
equal the input's, so the evasion itself is verified before anything is traced against it.

Merging (``merge_experts``, from :mod:`moeguard.pruning.merging.operation`) is not function-preserving: it
is compression, re-exported here for the benchmark's merged derivatives.

Verified on the Mixtral layout (the embedded model and its family): fused ``gate_up_proj``/
``down_proj`` experts and attention projections named ``q_proj``/``k_proj``/``v_proj``/``o_proj``.
Elsewhere a rewrite that does not keep the logits is refused with a one-line error (DeepSeek-V3's
low-rank attention projections are not permuted; PhiMoE's LayerNorm subtracts the mean, so sign
flips change it).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.families import text_config

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
            for _, _, t, axis in layer.expert_tensors():   # router rows, biases, experts
                t.copy_(t.index_select(axis, perm))
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


def rescale_norms(model: nn.Module, *, seed: int, signs: bool = True, spread: float = 1.0) -> nn.Module:
    """Multiply the gain of the norm in front of each MoE block by s per dimension and divide the
    block's readers' columns (router, experts' gate and up, any other linear of the block) by s:
    the same function. ``s`` = exp(N(0, spread)), with a random half of the signs flipped when
    ``signs`` (a gain's sign is free: the norm's output is only ever read through those columns)."""
    new = copy.deepcopy(model)
    d = text_config(new.config).hidden_size   # a multimodal wrapper's is its language model's
    gen = torch.Generator().manual_seed(seed)
    adapter = _experts(new)
    moe_layers = {l.layer_index for l in adapter.layers}
    with torch.no_grad():
        for i, layer in enumerate(new.model.layers):
            norm, block = getattr(layer, "post_attention_layernorm", None), getattr(layer, "mlp", None)
            if i not in moe_layers:
                continue
            if norm is None or block is None or tuple(norm.weight.shape) != (d,):
                raise MoeguardError(f"rescaling norms needs a post_attention_layernorm in front of each MoE block; "
                                    f"{adapter.family.name}'s layer {i} has none", hint="use a Mixtral-like family")
            s = torch.exp(torch.randn(d, generator=gen, dtype=torch.float64) * spread)
            if signs:
                s = s * torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).double()
            norm.weight.copy_((norm.weight.double() * s).to(norm.weight.dtype))
            for name, p in block.named_parameters():
                # what reads the normed input: its last axis is the hidden size (down projections write it)
                if p.dim() >= 2 and p.shape[-1] == d and "down" not in name:
                    p.copy_((p.double() / s).to(p.dtype))
    _check_same_function(model, new, "rescaling norms")
    return new


def permute_hidden(model: nn.Module, *, seed: int, flip_signs: bool = False) -> nn.Module:
    """Permute the hidden (residual-stream) dimension consistently through the whole model, and
    optionally flip the sign of a random half of the dimensions (RMS norms are sign-blind)."""
    new = copy.deepcopy(model)
    d = text_config(new.config).hidden_size   # a multimodal wrapper's is its language model's
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
            elif (leaf.endswith("layernorm") or leaf == "norm") and getattr(module, "weight", None) is not None \
                    and tuple(module.weight.shape) == (d,):
                module.weight.copy_(module.weight[perm])  # a gain per dimension: permuted, never flipped
    _check_same_function(model, new, "permuting the hidden dimension")
    return new


from moeguard.pruning.merging.operation import merge_experts  # noqa: E402  (the benchmark's merges; one copy, in pruning/)

__all__ = ["shuffle_experts", "permute_neurons", "permute_hidden", "rescale_norms", "merge_experts"]
