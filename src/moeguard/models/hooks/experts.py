"""Forwards that run a layer's experts through their own kernels, for the patches and for callers
that need each expert's output on its own (attribution, scan, merging)."""

from __future__ import annotations

import torch

from moeguard.models.adapter import MoEAdapter
from moeguard.models.attention_experts import AttentionContext
from moeguard.models.attention_experts import every_expert_output as every_attention_expert


def through_experts(layer):
    """A forward for a block that runs its per-expert linear maps itself (JetMoE, call "sorted"):
    router, then the layer's experts view (``adapter.ExpertsView``), then the block's bias. It
    computes what the block computes, in the same order, and lets a hook see or replace the
    experts' call, as for every other family."""
    block = layer.block

    def forward(layer_input):
        shape = layer_input.shape
        x = layer_input.reshape(-1, shape[-1])
        _, weights, index = layer.unpack(layer.router(x))
        return layer.experts(x, index, weights).view(shape) + block.bias
    return forward


def attention_reduce(block, *, record=None, on_output=None):
    """A replacement for the ``reduce`` of experts inside an attention (JetMoE's:
    ``reduce(per-slot attention outputs [B, T, k, H], topology)``) computing what it computes: each
    chosen expert's output projection on its slot, weighted by its gate, added per token, plus the
    block's bias. ``record(y, topology, tokens)`` sees each slot's unweighted output ``y``
    [B*T*k, d], sorted by expert; ``on_output`` may hook the weighted sum [B*T, d] (before the bias)."""
    def reduce(layer_input, topo_info):
        order, rows, gates, sizes = topo_info
        B, T, k, H = layer_input.shape
        y = block.output_linear(layer_input.reshape(-1, H)[order], sizes)
        if record is not None:
            record(y, topo_info, B * T)
        out = torch.zeros((B * T, y.shape[-1]), dtype=y.dtype, device=y.device).index_add(0, rows, y * gates[:, None])
        if on_output is not None:
            out = on_output(out)
        return out.view(B, T, -1) + block.bias
    return reduce


def chosen_rows(out: torch.Tensor, index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, k, d]: from input-scaled experts' output ``out`` [E*N, d] (every expert on every token,
    Llama-4), the rows of each token's chosen experts ``index`` [N, k]."""
    y = out.view(num_experts, -1, out.shape[-1]).transpose(0, 1)                # [N, E, d]
    return y.gather(1, index[..., None].expand(-1, -1, y.shape[-1]))


def expert_outputs(adapter: MoEAdapter, layer, hidden: torch.Tensor, experts: torch.Tensor,
                   weights: torch.Tensor, *, rows: torch.Tensor | None = None,
                   context: AttentionContext | None = None) -> torch.Tensor:
    """[n, d]: what expert ``experts[j]`` adds for token ``hidden[j]`` at gate ``weights[j]``,
    through the experts' own kernel (one call). Experts that scale their output are run at
    gate 1 and scaled; Llama-4's, which scale their input, run on the scaled input. Experts inside
    an attention (JetMoE's) need the token's batch row: ``rows`` (the tokens' positions in the
    recorded batch) and that batch's ``context``."""
    if not layer.standalone:
        if context is None or rows is None:
            raise ValueError("an attention expert runs on a recorded batch: pass its context and the tokens' rows")
        every = every_attention_expert(layer.outer, layer.block, context)                 # [B*L, E, d]
        return every[rows, experts] * weights[:, None].to(every.dtype)
    if adapter.family.call != "scaled_input":
        ones = torch.ones((len(experts), 1), dtype=weights.dtype, device=hidden.device)
        y = layer.experts(hidden, experts[:, None], ones).reshape(len(experts), -1)   # DBRX returns [n, 1, d]
        return y * weights[:, None].to(hidden.dtype)
    E, n = layer.num_experts, len(experts)
    routed_in = torch.zeros(E, n, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    rows = torch.arange(n, device=hidden.device)
    routed_in[experts, rows] = hidden * weights[:, None].to(hidden.dtype)
    return layer.experts(routed_in.reshape(E * n, -1)).view(E, n, -1)[experts, rows]


def every_expert_output(adapter: MoEAdapter, layer, hidden: torch.Tensor) -> torch.Tensor:
    """[E, N, d]: every expert of ``layer`` on every token of ``hidden`` [N, d] at gate 1, in one
    call of the experts' own kernel (E x N rows; Llama-4's input-scaled experts take the rows
    grouped by expert as they are, with nothing routed elsewhere)."""
    E, N = layer.num_experts, hidden.shape[0]
    rows = hidden.repeat(E, 1)                                                    # [E*N, d]
    if adapter.family.call == "scaled_input":
        return layer.experts(rows).view(E, N, -1)
    index = torch.arange(E, device=hidden.device).repeat_interleave(N)[:, None]
    ones = torch.ones((E * N, 1), dtype=hidden.dtype, device=hidden.device)
    return layer.experts(rows, index, ones).view(E, N, -1)
