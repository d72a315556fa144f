"""Experts that work inside an attention (JetMoE's mixture of attention heads), run alone.

An attention expert e is a query projection ``W_q[e]`` [H, d] and an output projection ``W_o[e]``
[d, H]; a token routed to it gets ``W_o[e] attn(rope(W_q[e] x_t), K, V)``, with the keys and values
of the layer (one dense ``kv_proj``, shared by every expert). So what expert e would add for a token
it was not routed to is well defined given the token's batch row: the layer's own keys, values,
rotary tables and mask. :func:`every_expert_output` computes it for every expert and every token
of a batch, through the model's own rotary function and attention kernel, the experts as extra
query heads over the same keys: E / k times the attention's own query and score work.

What a hook must record for it (the attention's input, mask and rotary tables) is an
:class:`AttentionContext`; ``hooks.trace_experts`` records one per attention block.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class AttentionContext:
    """One attention call's inputs, as the decoder layer passed them."""

    hidden: torch.Tensor                 # [B, L, d] the attention's input (normed)
    mask: Any                            # the mask the attention kernel took (None: causal)
    position_embeddings: tuple           # (cos, sin) [B, L, head_dim]

    @classmethod
    def from_call(cls, args: tuple, kwargs: dict) -> "AttentionContext":
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return cls(hidden=hidden.detach(), mask=kwargs.get("attention_mask"),
                   position_embeddings=tuple(t.detach() for t in kwargs["position_embeddings"]))


def every_expert_output(attention, block, context: AttentionContext) -> torch.Tensor:
    """[B*L, E, d]: every expert of ``block`` (JetMoE's ``self_attention.experts``) on every token
    of the recorded batch, at gate 1 and without the block's bias: what each would add per unit of
    gate. Tokens routed to an expert get what the model computed for them, up to the kernels'
    rounding on other shapes (tested)."""
    from moeguard.models.hooks import weights_in_place   # (hooks imports this module)

    # read outside their modules' forwards: under accelerate's offload, in place only here
    with weights_in_place(attention), weights_in_place(block):
        return _every_expert_output(attention, block, context)


def _every_expert_output(attention, block, context: AttentionContext) -> torch.Tensor:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model_module = sys.modules[type(attention).__module__]   # the family's own rotary and eager kernel
    x = context.hidden
    B, L, _ = x.shape
    W_q, W_o = block.input_linear.weight, block.output_linear.weight           # [E, H, d], [E, d, H]
    E, H = W_q.shape[0], W_q.shape[1]
    hd = attention.head_dim
    q = F.linear(x, W_q.reshape(E * H, -1)).view(B, L, E * H // hd, hd).transpose(1, 2)   # [B, E*nkv, L, hd]
    k, v = attention.kv_proj(x).chunk(2, dim=-1)
    k, v = (t.reshape(B, L, -1, hd).transpose(1, 2) for t in (k, v))                      # [B, nkv, L, hd]
    cos, sin = context.position_embeddings
    q, k = model_module.apply_rotary_pos_emb(q, k, cos, sin)
    # the experts side by side as query heads, each over the layer's keys (as the attention repeats them per slot)
    k, v = k.repeat(1, E, 1, 1), v.repeat(1, E, 1, 1)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation,
                                                      model_module.eager_attention_forward)
    out, _ = interface(attention, q, k, v, context.mask, dropout=0.0, scaling=attention.scaling)   # [B, L, E*nkv, hd]
    a = out.reshape(B * L, E, H)
    return torch.einsum("neh,edh->ned", a, W_o)
