"""Hooks that record what a forward computed, for attribution, replay and realignment: a module's
inputs, the tokens entering the experts, the last hidden state, and per-layer expert traces with
their gradients."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from moeguard.models.adapter import MoEAdapter, _get_path
from moeguard.models.attention_experts import AttentionContext
from moeguard.models.hooks.experts import attention_reduce, chosen_rows, through_experts
from moeguard.models.hooks.registry import Hooks, on_grad


@contextlib.contextmanager
def capture_inputs(modules: Mapping[int, nn.Module]) -> Iterator[dict[int, tuple]]:
    """Record ``(args, kwargs)`` (detached) of each module's latest call inside the block.

    On decoder layers this is what replaying the model from a layer needs: the hidden states
    plus the exact masks and rotary tables transformers computed for that layer (sliding-window
    layers get their own mask); on MoE blocks it is the layer-local input.
    """
    store: dict[int, tuple] = {}

    def hook_for(key):
        def hook(module, args, kwargs):
            store[key] = (tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()})
        return hook

    with Hooks() as hooks:
        for key, module in modules.items():
            hooks.on_input(module, hook_for(key), with_kwargs=True)
        yield store


@contextlib.contextmanager
def expert_inputs(adapter: MoEAdapter) -> Iterator[dict[int, torch.Tensor]]:
    """Per MoE layer slot, the [N, H] tokens (N = B*T, flattened) that entered its experts in the
    latest forward: the experts' own input, or the block's input where the experts take a
    score-scaled input (Llama-4) or the block runs them itself (JetMoE). What running an expert on
    the layer's real tokens needs. Experts inside an attention are left out: they run on a batch
    (``attention_experts.every_expert_output``)."""
    store: dict[int, torch.Tensor] = {}

    def hook_for(slot):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            store[slot] = h.reshape(-1, h.shape[-1]).detach()
        return hook

    with Hooks() as hooks:
        for slot, layer in enumerate(adapter.layers):
            if not layer.standalone:   # experts inside an attention take no tokens alone (attention_experts)
                continue
            hooks.on_input(layer.experts_input_module, hook_for(slot), with_kwargs=True)
        yield store


class _StopAtHead(Exception):
    """Raised in the final norm's pre-hook by :func:`last_hidden`: the rest of the forward (the
    full-vocabulary head) is not computed."""


def last_hidden(model: nn.Module, adapter: MoEAdapter, **inputs) -> torch.Tensor:
    """The last decoder layer's output [B, T, H] (the final norm's input), with its autograd graph,
    from a forward stopped before the head: the loss can then run the head where there are targets
    only (``replay.target_nll``), not on [B, T, V] logits (V = 151,936 for Qwen3)."""
    store: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        store["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _StopAtHead

    with Hooks() as hooks:
        hooks.on_input(_get_path(model, adapter.family.final_norm_path), hook, with_kwargs=True)
        try:
            model(**inputs)
        except _StopAtHead:
            pass
    if "hidden" not in store:
        raise RuntimeError(f"the forward never reached {adapter.family.final_norm_path}")
    return store["hidden"]


def check_head(model: nn.Module, adapter: MoEAdapter, input_ids: torch.Tensor) -> None:
    """Refuse, once per adapter, a model whose logits are not ``adapter.head`` of its last hidden
    state: a forward that scales them further (Cohere2-MoE's logit_scale, a final soft-cap) would
    have methods that score through the head (ablation, gradient) measure the loss of another
    function. One short forward on ``input_ids`` [B, T] (its first row's first 8 tokens)."""
    if getattr(adapter, "_head_checked", False):
        return
    from moeguard.errors import MoeguardError

    ids = input_ids[:1, :8]
    store: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        store["hidden"] = args[0] if args else kwargs["hidden_states"]

    was_training = model.training
    try:
        model.eval()   # no dropout between the two
        with torch.no_grad(), Hooks() as hooks:
            hooks.on_input(_get_path(model, adapter.family.final_norm_path), hook, with_kwargs=True)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            mine = adapter.head(store["hidden"]).float().to(logits.device)
    finally:
        model.train(was_training)
    scale = float(logits.abs().max()) or 1.0
    if not torch.allclose(mine, logits, rtol=1e-2, atol=1e-2 * scale):
        cfg = adapter.moe_config
        keys = [k for k in ("logit_scale", "final_logit_softcapping", "logits_scaling", "output_multiplier_scale")
                if getattr(cfg, k, None) not in (None, 1, 1.0)]
        raise MoeguardError(f"the model's logits are not its final norm and LM head of the last hidden state "
                            f"(largest difference {float((mine - logits).abs().max()):.3g} at logits up to {scale:.3g}"
                            + (f"; its config sets {', '.join(keys)}" if keys else "")
                            + "): methods that score through the head would measure another function",
                            hint="use a method that reads routing or weights only (frequency, gate, reap, "
                                 "reconstruction), or describe the family's logit scaling as a built-in family")
    adapter._head_checked = True


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


@dataclass
class ExpertTrace:
    """What one MoE layer's experts saw and produced in a forward with gradients."""

    hidden: torch.Tensor = None   # [N, H] tokens entering the experts (detached)
    index: torch.Tensor = None    # [N, k] chosen experts
    weights: torch.Tensor = None  # [N, k] their gate weights
    logits: torch.Tensor = None   # [N, E] router logits
    slot_out: torch.Tensor = None  # [N, k, H] each chosen expert's unweighted output (detached)
    grad: torch.Tensor = None     # [N, H] d loss / d (weighted experts output), after backward
    context: AttentionContext | None = None   # experts inside an attention (JetMoE): its inputs, to run them alone


@contextlib.contextmanager
def trace_experts(model: nn.Module, *, adapter: MoEAdapter | None = None) -> Iterator[dict[int, ExpertTrace]]:
    """Per MoE layer, record router logits, expert inputs, per-slot outputs and (after the caller's
    ``backward``) the gradient of the loss at the experts' output. The experts run through their
    own implementation, one expert at a time, so the forward computes the same function."""
    adapter = adapter or MoEAdapter(model)
    traces = {l.index: ExpertTrace() for l in adapter.layers}

    call = adapter.family.call

    def router_hook(trace, layer):
        def hook(module, args, output):
            logits, weights, index = layer.unpack(output)
            trace.logits = logits.detach()
            if call == "scaled_input" or not layer.standalone:   # the patches below see neither
                trace.index, trace.weights = index.detach(), weights.detach()
        return hook

    def context_hook(trace):
        """JetMoE's attention experts: the attention's inputs (to run its experts alone later)."""
        def hook(module, args, kwargs):
            trace.context = AttentionContext.from_call(args, kwargs)
            trace.hidden = trace.context.hidden.reshape(-1, trace.context.hidden.shape[-1])
        return hook

    def attention_slots(trace):
        """JetMoE's attention experts: each slot's unweighted output, in (token, rank) order."""
        def record(y, topo_info, tokens):
            order = topo_info[0]
            trace.slot_out = y.detach().new_empty(y.shape).index_copy_(0, order, y.detach()).view(tokens, -1, y.shape[-1])
        return record

    def output_grad(trace):
        """Keep d loss / d out in ``trace.grad`` after the caller's backward."""
        def on_output(out):
            if torch.is_grad_enabled():
                if not out.requires_grad:
                    # frozen weights and no grad upstream: this output starts the graph, so the
                    # backward stops here instead of running down to the embeddings for nothing
                    out.requires_grad_(True)
                on_grad(out, lambda g: setattr(trace, "grad", g.detach()))
            return out
        return on_output

    def block_hook(trace):
        def hook(module, args):
            trace.hidden = args[0].reshape(-1, args[0].shape[-1]).detach()
        return hook

    def scaled_experts_forward(trace, original, E):
        """Llama-4: every expert on every token's score-scaled input ([E*N, d] rows). A slot's
        output is its contribution per unit of gate, exact at the gate it has (w * y_j is what
        the expert adds)."""
        def forward(routed_in):
            out = original(routed_in)
            N = out.shape[0] // E
            slots = chosen_rows(out, trace.index, E)                                 # [N, k, d]
            w = trace.weights[..., None].to(slots.dtype)
            trace.slot_out = torch.where(w > 0, slots / w.clamp_min(torch.finfo(w.dtype).tiny), 0).detach()
            if torch.is_grad_enabled():
                if not out.requires_grad:
                    out.requires_grad_(True)
                # the block sums the experts' rows: each row's gradient is the summed output's
                on_grad(out, lambda g: setattr(trace, "grad", g.view(E, N, -1)[0].detach()))
            return out
        return forward

    def experts_forward(trace, original):
        def forward(hidden_states, top_k_index, top_k_weights):
            shape = hidden_states.shape   # [N, d], or DBRX's [B, T, d] (its experts flatten it)
            hidden_states = hidden_states.reshape(-1, shape[-1])
            N, k = top_k_index.shape
            # every (token, slot) as its own row with weight 1: one call of the experts'
            # own kernel gives each chosen expert's unweighted output, at the usual FLOPs
            flat = hidden_states[:, None, :].expand(N, k, hidden_states.shape[-1]).reshape(N * k, -1)
            ones = torch.ones((N * k, 1), dtype=top_k_weights.dtype, device=top_k_weights.device)
            slots = original(flat, top_k_index.reshape(N * k, 1), ones).view(N, k, -1)
            out = (slots * top_k_weights[..., None].to(slots.dtype)).sum(1)
            trace.hidden, trace.index = hidden_states.detach(), top_k_index.detach()
            trace.weights, trace.slot_out = top_k_weights.detach(), slots.detach()
            return output_grad(trace)(out).view(shape)
        return forward

    with Hooks() as hooks:
        for layer in adapter.layers:
            t = traces[layer.index]
            hooks.on_output(layer.router, router_hook(t, layer))
            if not layer.standalone:
                hooks.on_input(layer.outer, context_hook(t), with_kwargs=True)
                hooks.replace_method(layer.block, "reduce",
                                     attention_reduce(layer.block, record=attention_slots(t), on_output=output_grad(t)))
                continue
            if call == "sorted":   # the block calls its linear maps itself: route it through the view
                hooks.replace_forward(layer.block, through_experts(layer), replaces=True)
            original = layer.experts.forward
            if call == "scaled_input":
                hooks.on_input(layer.block, block_hook(t))
                forward = scaled_experts_forward(t, original, layer.num_experts)
            else:
                forward = experts_forward(t, original)
            hooks.replace_forward(layer.experts, forward)
        yield traces
