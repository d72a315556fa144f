"""Everything that hooks into a live model lives here, and everything is undone in ``finally``.

- :class:`RoutingCapture` records routing statistics while the model runs (REAP-style: hooks on
  the routers, statistics reduced as they stream so memory does not grow with tokens).
- :func:`mask_experts` makes routers route only among kept experts without touching weights.

About 800 lines on purpose: the guide's rule is that every hook lives in one room and is removed
in ``finally``, and splitting the capture from the masking (or from the offload helpers,
``weights_in_place`` and ``last_hidden``) would make several rooms.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter, _get_path
from moeguard.models.attention_experts import AttentionContext
from moeguard.models.attention_experts import every_expert_output as every_attention_expert
from moeguard.models.routing import (pack_router_output, pair_experts, pruned_router_params, route_module,
                                     router_logits)


_ABSENT = object()


def _set_forward(module: nn.Module, fn, *, replaces: bool = False) -> tuple[str, object]:
    """Install ``fn`` as the module's instance forward; return what was there, for
    :func:`_restore_forward` (patches nest).

    A wrapper (``fn`` calls the forward it wraps) goes outside accelerate's device hook, which
    accelerate keeps in the instance forward. A replacement (``replaces``: ``fn`` computes the
    output itself from the module's weights) goes inside it, where accelerate's hook calls
    ``_old_forward``: under CPU or disk offload the weights are in place only around that call."""
    subs = [sub for sub in module.modules() if sub is not module and hasattr(sub, "_hf_hook")] if replaces else []
    if subs:
        # hooks on submodules that hold weights (HunYuan's router.wg) run only when those are
        # called: the replacement reads them directly, so it puts them in place itself
        inner = fn

        def fn(*args, **kwargs):
            with contextlib.ExitStack() as stack:
                for sub in subs:
                    stack.enter_context(weights_in_place(sub, recurse=False))
                return inner(*args, **kwargs)
    if replaces and hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        previous = module.__dict__["_old_forward"]
        module._old_forward = fn
        return "_old_forward", previous
    previous = module.__dict__.get("forward", _ABSENT)
    module.forward = fn
    return "forward", previous


def place_inner_blocks(model: nn.Module, adapter: MoEAdapter | None = None) -> int:
    """Under accelerate's offload, a sparse block whose own weights its outer module reads (JetMoE's
    attention calls its experts' ``map`` and ``reduce``, never their forward, and ``reduce`` adds the
    block's bias) would find them on "meta": each such outer module's forward puts them in place for
    its duration (for the model's life). Returns how many were wrapped; 0 when nothing is offloaded."""
    adapter = adapter or MoEAdapter(model)
    wrapped = 0
    for layer in adapter.layers:
        if layer.outer is None or not hasattr(layer.block, "_hf_hook"):
            continue

        def forward(*args, _original=layer.outer.forward, _block=layer.block, **kwargs):
            with weights_in_place(_block, recurse=False):
                return _original(*args, **kwargs)
        _set_forward(layer.outer, forward)
        wrapped += 1
    return wrapped


def _set_method(module: nn.Module, name: str, fn) -> tuple[str, object]:
    """Install ``fn`` as the module's instance attribute ``name`` (a method other than forward,
    JetMoE's attention ``reduce``); return what was there, for :func:`_restore_forward`."""
    previous = module.__dict__.get(name, _ABSENT)
    setattr(module, name, fn)
    return name, previous


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


def _restore_forward(module: nn.Module, previous: tuple[str, object]) -> None:
    attr, fn = previous
    if fn is _ABSENT:
        module.__dict__.pop(attr, None)  # back to the class's forward
    else:
        setattr(module, attr, fn)


@contextlib.contextmanager
def weights_in_place(module: nn.Module, *, recurse: bool = True) -> Iterator[None]:
    """The weights of ``module`` (and of its submodules, with ``recurse``) readable directly,
    outside a forward call. Under accelerate's CPU or disk offload they sit on "meta" except while
    their module runs; here its hooks put them in place on entry and take them out in ``finally``."""
    entered = []
    try:
        for sub in (module.modules() if recurse else [module]):
            hook = getattr(sub, "_hf_hook", None)
            if hook is not None:
                hook.pre_forward(sub)
                entered.append((sub, hook))
        yield
    finally:
        for sub, hook in reversed(entered):
            hook.post_forward(sub, None)


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
        self._handles: list = []
        self._patched: list[tuple[nn.Module, object]] = []
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
                stats.gate_mass += torch.zeros(E, device=w.device).index_add_(0, sel.reshape(-1), w.reshape(-1)).double().cpu()
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
                    stats.raw_gate_mass += torch.zeros(E, device=probs.device).index_add_(
                        0, sel.reshape(-1), raw if routed is None else raw * routed.to(raw)).double().cpu()
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
                stats.norm_sum += add
                stats.weighted_norm_sum += add       # the score is inside: raw (sigmoid, not renormalized)
                stats.raw_weighted_norm_sum += add
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
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._model_post_hook, with_kwargs=True))
            for slot, layer in enumerate(self.adapter.layers):
                self._handles.append(layer.router.register_forward_hook(self._router_hook(slot)))
                if self.norms and not layer.standalone:   # JetMoE's attention experts: at their output side
                    reduce = attention_reduce(layer.block, record=self._attention_norms(slot))
                    self._patched.append((layer.block, _set_method(layer.block, "reduce", reduce)))
                elif self.norms:
                    if layer.call == "sorted":   # the block calls its linear maps itself: route it through the view
                        self._patched.append((layer.block, _set_forward(layer.block, through_experts(layer), replaces=True)))
                    original = layer.experts.forward
                    previous = _set_forward(layer.experts, self._experts_forward(slot, original))
                    self._patched.append((layer.experts, previous))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._routed.clear()
        self._raw.clear()
        for module, previous in reversed(self._patched):
            _restore_forward(module, previous)
        self._patched.clear()

    def __exit__(self, *exc) -> None:
        self._remove()


def normalize_keep(adapter: MoEAdapter, keep: Mapping) -> dict[int, list[int]]:
    """Validate a keep map {layer index: expert indices}; layers not named keep every expert."""
    out: dict[int, list[int]] = {}
    by_index = {l.index: l for l in adapter.layers}
    for key, experts in keep.items():
        try:
            li = int(key)
        except (TypeError, ValueError):
            raise MoeguardError(f"keep map has layer key {key!r}", hint="use decoder-layer indices") from None
        if li not in by_index:
            raise MoeguardError(f"keep map names layer {li}, which is not an MoE layer",
                                hint=f"MoE layers are {sorted(by_index)}")
        layer = by_index[li]
        kept = sorted({int(e) for e in experts})
        if len(kept) != len(list(experts)):
            raise MoeguardError(f"layer {li}: keep list {list(experts)} repeats an expert", hint="list each expert once")
        bad = [e for e in kept if not 0 <= e < layer.num_experts]
        if bad:
            raise MoeguardError(f"layer {li}: experts {bad} do not exist",
                                hint=f"expert indices run from 0 to {layer.num_experts - 1}")
        if len(kept) < adapter.family.min_experts:
            raise MoeguardError(
                f"layer {li}: keeping {len(kept)} expert(s) leaves no valid {adapter.family.name} router",
                hint=f"keep at least {adapter.family.min_experts} experts per layer for this family")
        out[li] = kept
    for layer in adapter.layers:
        out.setdefault(layer.index, list(range(layer.num_experts)))
    return out


@contextlib.contextmanager
def mask_experts(model: nn.Module, keep: Mapping, *, adapter: MoEAdapter | None = None) -> Iterator[MoEAdapter]:
    """Route only among ``keep[layer]`` experts inside the block; weights are not touched.

    The router computes exactly what the physically pruned model's router computes (same
    clamped top-k, same group handling), then maps indices back to original expert ids.
    """
    adapter = adapter or MoEAdapter(model)
    keep = normalize_keep(adapter, keep)
    spec, call = adapter.family.routing, adapter.family.call
    patched, top_ks, states = [], [], []
    try:
        for layer in adapter.layers:
            kept = keep[layer.index]
            params = pruned_router_params(adapter.family, adapter.moe_config, kept, layer.num_experts)
            router = layer.router
            # a capacity the router keeps between calls (NLLB-MoE): every router of the masked model, a
            # full one too, starts from the config's, as a freshly pruned model's do, and the unmasked
            # routers get their own back after
            if params.top2_capacity:
                states.append((router, router.__dict__.get("expert_capacity", _ABSENT)))
                router.expert_capacity = params.capacity
            if len(kept) == layer.num_experts:
                continue
            # on the logits' device at the call: an offloaded router's weight is on "meta" until then
            kept_t = torch.tensor(kept)

            # *args: a router may take the block's selection bias too (MiniMax-M2, LFM2); the layer
            # reads that same tensor itself
            # (NLLB-MoE's router takes its layer's attention mask: the padding it leaves out)
            def forward(hidden_states, *args, _layer=layer, _kept=kept_t, _params=params):
                lead = hidden_states.shape[:-1]   # [T], or Switch's [B, S] (capacity counts per sequence)
                logits = router_logits(_layer, hidden_states, spec)
                _kept = _kept.to(logits.device)
                weights, sub_idx = route_module(_layer, logits, spec, _params, kept=_kept,
                                                input_dtype=hidden_states.dtype,
                                                sequences=lead[0] if len(lead) == 2 else 1,
                                                padding_mask=args[0] if spec.top2_capacity and args else None)
                masked = torch.full_like(logits, float("-inf"))
                masked[:, _kept] = logits[:, _kept]
                return pack_router_output(call, masked, weights, _kept[sub_idx], shape=lead)

            patched.append((router, _set_forward(router, forward, replaces=True)))
            top_ks.extend(_clamp_block_top_k(layer, params.top_k))
        yield adapter
    finally:
        for router, previous in reversed(patched):
            _restore_forward(router, previous)
        for router, value in states:
            if value is _ABSENT:
                router.__dict__.pop("expert_capacity", None)
            else:
                router.expert_capacity = value
        for block, k in reversed(top_ks):
            block.top_k = k


def _clamp_block_top_k(layer, top_k: int) -> list[tuple[nn.Module, int]]:
    """A block that routes the router's logits itself (DBRX) picks its own top-k of them: with
    fewer experts kept than that, it would add dropped experts at weight 0; JetMoE's attention
    sizes its query heads by its top-k. So these modules' top-k is clamped as the pruned model's.
    Returns what to restore."""
    out = []
    for module in layer.top_k_holders:
        if module.top_k != top_k:
            out.append((module, module.top_k))
            module.top_k = top_k
    return out


# --------------------------------------------------------------------------- attribution hooks

@contextlib.contextmanager
def capture_inputs(modules: Mapping[int, nn.Module]) -> Iterator[dict[int, tuple]]:
    """Record ``(args, kwargs)`` (detached) of each module's latest call inside the block.

    On decoder layers this is what replaying the model from a layer needs: the hidden states
    plus the exact masks and rotary tables transformers computed for that layer (sliding-window
    layers get their own mask); on MoE blocks it is the layer-local input.
    """
    store: dict[int, tuple] = {}
    handles = []

    def hook_for(key):
        def hook(module, args, kwargs):
            store[key] = (tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()})
        return hook

    try:
        for key, module in modules.items():
            handles.append(module.register_forward_pre_hook(hook_for(key), with_kwargs=True))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def expert_inputs(adapter: MoEAdapter) -> Iterator[dict[int, torch.Tensor]]:
    """Per MoE layer slot, the [N, H] tokens (N = B*T, flattened) that entered its experts in the
    latest forward: the experts' own input, or the block's input where the experts take a
    score-scaled input (Llama-4) or the block runs them itself (JetMoE). What running an expert on
    the layer's real tokens needs. Experts inside an attention are left out: they run on a batch
    (``attention_experts.every_expert_output``)."""
    store: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(slot):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            store[slot] = h.reshape(-1, h.shape[-1]).detach()
        return hook

    try:
        for slot, layer in enumerate(adapter.layers):
            if not layer.standalone:   # experts inside an attention take no tokens alone (attention_experts)
                continue
            handles.append(layer.experts_input_module.register_forward_pre_hook(hook_for(slot), with_kwargs=True))
        yield store
    finally:
        for h in handles:
            h.remove()


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

    handle = _get_path(model, adapter.family.final_norm_path).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    except _StopAtHead:
        pass
    finally:
        handle.remove()
    if "hidden" not in store:
        raise RuntimeError(f"the forward never reached {adapter.family.final_norm_path}")
    return store["hidden"]


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


@contextlib.contextmanager
def drop_one_per_chunk(adapter: MoEAdapter, layer_index: int, drops: Sequence[int], *, rows: int) -> Iterator[None]:
    """Batched single-expert masks for one layer: the input batch is ``len(drops)`` copies of a
    ``rows``-token batch, and copy ``c`` routes as if expert ``drops[c]`` were pruned (exactly
    what :func:`mask_experts` does with every other expert kept)."""
    layer = adapter.layer(layer_index)
    router, spec = layer.router, adapter.family.routing
    E = layer.num_experts
    plans = []
    for e in drops:
        kept = [x for x in range(E) if x != e]
        plans.append((torch.tensor(kept), pruned_router_params(adapter.family, adapter.moe_config, kept, E)))

    def forward(hidden_states, *args):
        logits = router_logits(layer, hidden_states, spec)
        if logits.shape[0] != rows * len(plans):
            raise RuntimeError(f"expected {rows} x {len(plans)} tokens, got {logits.shape[0]}")
        masked, weights, index = [], [], []
        for c, (kept, params) in enumerate(plans):
            kept = kept.to(logits.device)
            part = logits[c * rows:(c + 1) * rows]
            w, sub = route_module(layer, part, spec, params, kept=kept, input_dtype=hidden_states.dtype)
            m = torch.full_like(part, float("-inf"))
            m[:, kept] = part[:, kept]
            masked.append(m), weights.append(w), index.append(kept[sub])
        return pack_router_output(adapter.family.call, torch.cat(masked), torch.cat(weights), torch.cat(index))

    previous, top_ks = _set_forward(router, forward, replaces=True), []
    try:
        top_ks = _clamp_block_top_k(layer, min(p.top_k for _, p in plans))
        yield
    finally:
        _restore_forward(router, previous)
        for block, k in top_ks:
            block.top_k = k


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
    handles, patched = [], []

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
                out.register_hook(lambda g: setattr(trace, "grad", g.detach()))
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
                out.register_hook(lambda g: setattr(trace, "grad", g.view(E, N, -1)[0].detach()))
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

    try:
        for layer in adapter.layers:
            t = traces[layer.index]
            handles.append(layer.router.register_forward_hook(router_hook(t, layer)))
            if not layer.standalone:
                handles.append(layer.outer.register_forward_pre_hook(context_hook(t), with_kwargs=True))
                reduce = attention_reduce(layer.block, record=attention_slots(t), on_output=output_grad(t))
                patched.append((layer.block, _set_method(layer.block, "reduce", reduce)))
                continue
            if call == "sorted":   # the block calls its linear maps itself: route it through the view
                patched.append((layer.block, _set_forward(layer.block, through_experts(layer), replaces=True)))
            original = layer.experts.forward
            if call == "scaled_input":
                handles.append(layer.block.register_forward_pre_hook(block_hook(t)))
                forward = scaled_experts_forward(t, original, layer.num_experts)
            else:
                forward = experts_forward(t, original)
            patched.append((layer.experts, _set_forward(layer.experts, forward)))
        yield traces
    finally:
        for h in handles:
            h.remove()
        for module, previous in reversed(patched):
            _restore_forward(module, previous)


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
