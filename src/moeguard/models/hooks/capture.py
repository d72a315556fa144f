"""Routing statistics recorded while the model runs (REAP-style: hooks on the routers, statistics
reduced as they stream, so memory does not grow with tokens)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from moeguard.models.adapter import MoEAdapter
from moeguard.models.hooks.experts import attention_reduce, chosen_rows, through_experts
from moeguard.models.hooks.registry import Hooks
from moeguard.models.routing import pair_experts


@dataclass
class LayerStats:
    """Per-expert sums over the valid (non-padding) tokens one MoE layer saw."""

    layer: int
    tokens: int = 0
    counts: torch.Tensor = None           # [E] routing slots received
    gate_mass: torch.Tensor = None        # [E] sum of the (normalized) top-k gate weights
    raw_gate_mass: torch.Tensor | None = None  # [E] sum of the raw score (before top-k renormalization) where chosen (raw=True)
    prob_mass: torch.Tensor = None        # [E] sum of the router's full score distribution
    norm_sum: torch.Tensor | None = None  # [E] sum of ||expert output|| over routed tokens
    weighted_norm_sum: torch.Tensor | None = None  # [E] sum of gate x ||expert output||
    raw_weighted_norm_sum: torch.Tensor | None = None  # [E] the same with the raw score as the gate

    def to_dict(self) -> dict:
        out = {"layer": self.layer, "tokens": self.tokens}
        for name in ("counts", "gate_mass", "prob_mass", "norm_sum", "weighted_norm_sum"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.tolist()
        return out


@dataclass
class RoutingStats:
    layers: list[LayerStats]
    num_experts: int
    top_k: int
    # one [num_moe_layers, E] routing histogram (share of the sample's slots) per sample, on request
    per_sample: list[torch.Tensor] = field(default_factory=list)

    def frequency(self) -> torch.Tensor:
        """[L, E] share of routing slots each expert received (rows sum to 1)."""
        counts = torch.stack([l.counts for l in self.layers])
        return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)

    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "top_k": self.top_k,
                "layers": [l.to_dict() for l in self.layers]}


class RoutingCapture(contextlib.AbstractContextManager):
    """Record routing of every MoE layer while the model runs inside the ``with`` block.

    ``norms=True`` also runs each expert on its own tokens to record its output norm (the
    experts' forward is replaced by an equivalent per-expert dispatch through transformers'
    own implementation, so nothing is computed twice). ``per_sample=True`` keeps one routing
    histogram per batch row, in the order samples were seen. Padding (attention_mask == 0) is
    excluded throughout.
    """

    def __init__(self, model: nn.Module, *, norms: bool = False, per_sample: bool = False, raw: bool = False,
                 adapter: MoEAdapter | None = None):
        self.adapter = adapter or MoEAdapter(model)
        self.model = model
        self.norms = norms
        self.raw = raw   # also sum the raw score of the chosen experts (merging's gate mass): off the default path
        self.per_sample = per_sample
        self._hooks = Hooks()
        self._valid: torch.Tensor | None = None   # [B*T] bool for the current forward
        self._valid_decoder: torch.Tensor | None = None   # an encoder-decoder's decoder tokens
        self._decoder_shape: tuple[int, int] | None = None
        # slot -> whether the layer is in an encoder-decoder's decoder (its tokens are the decoder's)
        self._in_decoder = [self.adapter.stack_of(l.layer_index)[0] != self.adapter.family.layers_path
                            for l in self.adapter.layers]
        self._batch_shape: tuple[int, int] | None = None
        self._sample_counts: torch.Tensor | None = None
        self._routed: dict[int, tuple] = {}
        self._raw: dict[int, torch.Tensor] = {}    # slot -> [N, k] raw scores of the chosen experts (norms)
        # every layer's statistics are as long as the widest layer's: a budget-pruned checkpoint keeps
        # different counts per layer, and a layer's entries past its own experts stay 0
        E = max(l.num_experts for l in self.adapter.layers)
        self.stats = RoutingStats(
            layers=[LayerStats(layer=l.index, counts=torch.zeros(E, dtype=torch.float64),
                               gate_mass=torch.zeros(E, dtype=torch.float64),
                               raw_gate_mass=torch.zeros(E, dtype=torch.float64) if raw else None,
                               prob_mass=torch.zeros(E, dtype=torch.float64),
                               norm_sum=torch.zeros(E, dtype=torch.float64) if norms else None,
                               weighted_norm_sum=torch.zeros(E, dtype=torch.float64) if norms else None,
                               raw_weighted_norm_sum=torch.zeros(E, dtype=torch.float64) if norms else None)
                    for l in self.adapter.layers],
            num_experts=E, top_k=self.adapter.top_k)

    # -- model-level hook: learn which flattened tokens are padding -------------------------
    def _model_pre_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        self._valid_decoder = None
        dec = kwargs.get("decoder_input_ids")
        self._decoder_shape = tuple(dec.shape[:2]) if dec is not None else None
        if dec is not None:   # an encoder-decoder: the decoder's padding is its own mask's
            dmask = kwargs.get("decoder_attention_mask")
            self._valid_decoder = (dmask[:, -dec.shape[1]:].bool() if dmask is not None and dmask.dim() == 2
                                   else torch.ones(dec.shape, dtype=torch.bool, device=dec.device)).reshape(-1)
        if ref is None:
            self._valid = None
            return
        B, T = ref.shape[0], ref.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            valid = torch.ones(B, T, dtype=torch.bool, device=ref.device)
        else:
            valid = mask[:, -T:].bool()  # with a KV cache the mask covers past tokens too
        self._batch_shape = (B, T)
        self._valid = valid.reshape(-1)
        if self.per_sample:
            self._sample_counts = torch.zeros(B, len(self.stats.layers), self.stats.num_experts, dtype=torch.float64)

    def _model_post_hook(self, module, args, kwargs, output):
        if self.per_sample and self._sample_counts is not None:
            c = self._sample_counts
            self.stats.per_sample.extend(list(c / c.sum(dim=-1, keepdim=True).clamp_min(1)))
            self._sample_counts = None

    def _valid_for(self, n: int, device, slot: int | None = None) -> torch.Tensor:
        if slot is not None and self._in_decoder[slot]:
            valid = self._valid_decoder
            return valid.to(device) if valid is not None and valid.numel() == n else \
                torch.ones(n, dtype=torch.bool, device=device)
        if self._valid is None or self._valid.numel() != n:
            return torch.ones(n, dtype=torch.bool, device=device)
        return self._valid.to(device)

    # -- router hook -------------------------------------------------------------------------
    def _router_hook(self, slot: int):
        stats, layer = self.stats.layers[slot], self.adapter.layers[slot]
        spec, call = self.adapter.family.routing, self.adapter.family.call

        def hook(module, args, output):
            logits, weights, idx = layer.unpack(output)
            if call == "scaled_input" and self.norms:   # for the input-scaled experts patch (Llama-4)
                self._routed[slot] = (idx.detach(), weights.detach())
            if call == "combine" and self.norms:        # which slot each expert is in (NLLB-MoE's patch)
                self._routed[slot] = idx.detach()
            with torch.no_grad():
                valid = self._valid_for(idx.shape[0], idx.device, slot)
                sel, w = idx[valid], weights[valid].float()
                E = stats.counts.numel()
                stats.tokens += int(valid.sum())
                # capacity-limited routing (Switch): a token dropped past capacity (weight 0) reaches no expert
                # (NLLB-MoE: nor does padding, or a second choice past capacity)
                routed = (w != 0).reshape(-1).double() if spec.capacity_key or spec.top2_capacity else None
                stats.counts += torch.bincount(sel.reshape(-1), weights=routed, minlength=E).double().cpu()
                # sums on the CPU (as before there, in one order): CUDA's index_add_ adds with atomics in a varying order
                stats.gate_mass += torch.zeros(E).index_add_(0, sel.reshape(-1).cpu(), w.reshape(-1).cpu()).double()
                score = (lambda x: x.sigmoid()) if spec.score == "sigmoid" else (lambda x: torch.softmax(x, dim=-1))
                if self.norms:   # every row's raw scores at its chosen experts, for reap-raw's norms
                    every = score(logits.float())
                    probs = every[valid]
                    self._raw[slot] = every.gather(1, idx)
                else:
                    probs = score(logits[valid].float())
                stats.prob_mass[:probs.shape[-1]] += probs.sum(0).double().cpu()
                if self.raw:
                    raw = probs.gather(1, sel).reshape(-1)
                    stats.raw_gate_mass += torch.zeros(E).index_add_(
                        0, sel.reshape(-1).cpu(), (raw if routed is None else raw * routed.to(raw)).cpu()).double()
                shape = self._decoder_shape if self._in_decoder[slot] else self._batch_shape
                if self.per_sample and self._sample_counts is not None and shape is not None:
                    B, T = shape
                    if idx.shape[0] == B * T:
                        onehot = torch.zeros(idx.shape[0], E, device=idx.device).scatter_add_(
                            1, idx, torch.ones_like(idx, dtype=torch.float) if routed is None
                            else (weights != 0).float())
                        onehot = onehot * valid[:, None]
                        self._sample_counts[:, slot] += onehot.view(B, T, E).sum(1).double().cpu()
        return hook

    # -- experts patch (norms) ----------------------------------------------------------------
    def _scaled_experts_forward(self, slot: int, original):
        """Llama-4: every expert runs on every token's score-scaled input ([E*T, d] rows). An
        expert's gate is inside it, so both norm sums record the norm of what it adds."""
        stats = self.stats.layers[slot]

        def forward(routed_in):
            out = original(routed_in)
            idx, _ = self._routed[slot]
            E = self.adapter.layers[slot].num_experts     # the rows out holds (stats may be wider)
            with torch.no_grad():
                slots = chosen_rows(out, idx, E)                                 # [T, k, d]
                picked = slots.float().norm(dim=-1) * self._valid_for(idx.shape[0], idx.device, slot)[:, None]
                add = torch.zeros(E, dtype=torch.float64).index_add_(0, idx.reshape(-1).cpu(),
                                                                     picked.reshape(-1).double().cpu())
                # this layer's E leading columns: a budget-pruned model's narrower layers (a size mismatch)
                stats.norm_sum[:E] += add
                stats.weighted_norm_sum[:E] += add   # the score is inside: raw (sigmoid, not renormalized)
                stats.raw_weighted_norm_sum[:E] += add
            return out
        return forward

    def _dispatch_experts_forward(self, slot: int):
        """Switch: experts(hidden [T, d], dispatch [T, 1, E], probs [T, 1]), one module per expert,
        run here expert by expert as its block does (output times probability, added per token)."""
        stats, layer = self.stats.layers[slot], self.adapter.layers[slot]

        def forward(hidden_states, dispatch, probs):
            out = torch.zeros_like(hidden_states)
            valid = self._valid_for(hidden_states.shape[0], hidden_states.device, slot)
            for e in (dispatch.sum(dim=(0, 1)) > 0).nonzero().flatten().tolist():
                tok = torch.where(dispatch[:, 0, e])[0]
                y = layer.expert(e)(hidden_states[tok])                      # expert e's unweighted output
                w = probs[tok, 0]
                with torch.no_grad():
                    norm = y.float().norm(dim=-1) * valid[tok]
                    stats.norm_sum[e] += float(norm.sum())
                    stats.weighted_norm_sum[e] += float((norm * w.float()).sum())
                    stats.raw_weighted_norm_sum[e] += float((norm * self._raw[slot][tok, 0]).sum())
                out.index_add_(0, tok, (y * w[:, None]).to(out.dtype))
            return out
        return forward

    def _combine_experts_forward(self, slot: int, original):
        """NLLB-MoE: experts(hidden [T, d], top-1 mask, combine [T, E]). Each expert runs through the
        experts' own (repaired, models/upstream.py) forward on the tokens with a nonzero weight in its
        column, at weight 1: its output with the eval token-dropout scaling, what it adds to a token
        before its weight, so what both norm sums record; then weighted as that forward weights it."""
        stats = self.stats.layers[slot]

        def forward(hidden_states, router_mask, router_probs):
            out = torch.zeros_like(hidden_states)
            valid = self._valid_for(hidden_states.shape[0], hidden_states.device, slot)
            idx = self._routed[slot]
            for e in (router_probs != 0).any(dim=0).nonzero().flatten().tolist():
                tok = torch.where(router_probs[:, e] != 0)[0]
                alone = torch.zeros((tok.numel(), router_probs.shape[1]), dtype=router_probs.dtype,
                                    device=router_probs.device)
                alone[:, e] = 1
                y = original(hidden_states[tok], None, alone)                # expert e's unweighted output
                w = router_probs[tok, e]
                with torch.no_grad():
                    norm = y.float().norm(dim=-1) * valid[tok]
                    raw = (self._raw[slot][tok] * (idx[tok] == e)).sum(-1)   # the raw score of e's slot
                    stats.norm_sum[e] += float(norm.sum())
                    stats.weighted_norm_sum[e] += float((norm * w.float()).sum())
                    stats.raw_weighted_norm_sum[e] += float((norm * raw).sum())
                out.index_add_(0, tok, (y * w[:, None]).to(out.dtype))
            return out
        return forward

    def _attention_norms(self, slot: int):
        """JetMoE's attention experts: each slot's output norm, unweighted and at its gate, recorded
        as :func:`attention_reduce` computes the slots."""
        stats = self.stats.layers[slot]

        def record(y, topo_info, tokens):
            order, rows, gates, sizes = topo_info
            with torch.no_grad():
                experts = pair_experts(sizes, y.device)
                norm = y.float().norm(dim=-1) * self._valid_for(tokens, y.device, slot)[rows]
                raw = self._raw[slot].reshape(-1)[order].float()
                for total, v in ((stats.norm_sum, norm), (stats.weighted_norm_sum, norm * gates.float()),
                                 (stats.raw_weighted_norm_sum, norm * raw)):
                    total += torch.zeros_like(total).index_add_(0, experts.cpu(), v.double().cpu())
        return record

    def _experts_forward(self, slot: int, original):
        stats = self.stats.layers[slot]
        if self.adapter.family.call == "scaled_input":
            return self._scaled_experts_forward(slot, original)
        if self.adapter.family.call == "dispatch":
            return self._dispatch_experts_forward(slot)
        if self.adapter.family.call == "combine":
            return self._combine_experts_forward(slot, original)

        def forward(hidden_states, top_k_index, top_k_weights):
            shape = hidden_states.shape   # [N, d], or DBRX's [B, T, d] (its experts flatten it)
            hidden_states = hidden_states.reshape(-1, shape[-1])
            out = torch.zeros_like(hidden_states)
            valid = self._valid_for(hidden_states.shape[0], hidden_states.device, slot)
            for e in torch.unique(top_k_index).tolist():
                tok, pos = torch.where(top_k_index == e)
                one_idx = torch.full((tok.numel(), 1), e, dtype=top_k_index.dtype, device=tok.device)
                ones = torch.ones((tok.numel(), 1), dtype=top_k_weights.dtype, device=tok.device)
                y = original(hidden_states[tok], one_idx, ones).reshape(-1, shape[-1])  # expert e's unweighted output
                w = top_k_weights[tok, pos]
                with torch.no_grad():
                    norm = y.float().norm(dim=-1) * valid[tok]
                    stats.norm_sum[e] += float(norm.sum())
                    stats.weighted_norm_sum[e] += float((norm * w.float()).sum())
                    stats.raw_weighted_norm_sum[e] += float((norm * self._raw[slot][tok, pos]).sum())
                out.index_add_(0, tok, (y * w[:, None]).to(out.dtype))
            return out.view(shape)
        return forward

    def __enter__(self) -> "RoutingCapture":
        hooks = self._hooks
        hooks.ensure_empty(self)
        try:
            hooks.on_input(self.model, self._model_pre_hook, with_kwargs=True)
            hooks.on_output(self.model, self._model_post_hook, with_kwargs=True)
            for slot, layer in enumerate(self.adapter.layers):
                hooks.on_output(layer.router, self._router_hook(slot))
                if self.norms and not layer.standalone:   # JetMoE's attention experts: at their output side
                    hooks.replace_method(layer.block, "reduce",
                                         attention_reduce(layer.block, record=self._attention_norms(slot)))
                elif self.norms:
                    if layer.call == "sorted":   # the block calls its linear maps itself: route it through the view
                        hooks.replace_forward(layer.block, through_experts(layer), replaces=True)
                    hooks.replace_forward(layer.experts, self._experts_forward(slot, layer.experts.forward))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        self._routed.clear()
        self._raw.clear()
        self._hooks.close()

    def __exit__(self, *exc) -> None:
        self._remove()
