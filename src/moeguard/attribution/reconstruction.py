"""``reconstruction``: how far a layer's output moves when experts are dropped (NAEE's objective).

Lu et al. (2024, "Not All Experts are Equal") choose, per layer, the kept subset whose MoE
output best reconstructs the full layer's output on calibration tokens, searching subsets
exhaustively. Here the score of an expert is the mean squared reconstruction error when it
alone is dropped and its tokens re-routed among the rest; and for every keep count the best
subset is searched exhaustively when there are at most ``max_subsets`` candidates per layer,
greedily (drop the expert whose removal hurts least, repeat) otherwise. The subsets go in the
scores file and the planner uses them for uniform keeps.

**Cost at real sizes.** Re-running the block for every candidate subset costs one expert pass
per candidate; greedy at E experts tries about E^2 / 2 subsets per layer (8,128 at E = 128: days
on a CPU at Qwen3-30B-A3B's width). Where the experts' output is linear in their gate (every
family but Llama-4's input-scaled experts), the block's output moves only through the routed
sum, so with ``Y[e, n]`` every expert's output on token n at gate 1,

    error(S) = mean_n || sum_j c_j Y[u_j, n] ||^2 = mean_n c' G_n[u, u] c,

where ``c`` is the subset's routing weights followed by the full routing's negated, ``u`` their
experts, and ``G_n[e, f] = <Y[e, n], Y[f, n]>`` the per-token Gram matrix of expert outputs. ``G`` is
built once per layer (every expert on every token: E / k times a normal forward's expert work)
and a candidate then costs a routing and a (2k x 2k) form per token, with nothing re-run. Its
size (tokens x E^2 floats) is bounded by ``reconstruction_memory`` (1 GiB by default): at large
E the calibration tokens are subsampled further, and the tokens used are reported. The routing
of a subset is the masked model's (``pruned_router_params``, as ``mask_experts`` uses), and the
test matrix checks the two errors agree on every family. Llama-4 keeps the block replay.

**Memory.** Calibration inputs are subsampled batch by batch (each batch keeps its share of
``reconstruction_tokens``), so at most that many tokens per layer are ever held, not every
layer's whole calibration set (17 GB for fp32 Mixtral at 64 x 512 tokens).
"""

from itertools import combinations
from math import comb

import torch

from moeguard.attribution.base import MethodOutput, register_method
from moeguard.models.attention_experts import AttentionContext
from moeguard.models.attention_experts import every_expert_output as every_attention_expert
from moeguard.models.hooks import capture_inputs, every_expert_output, last_hidden, mask_experts, weights_in_place
from moeguard.models.routing import pruned_router_params, route_module, router_logits


def _block_out(block, x):
    out = block(x)
    return (out[0] if isinstance(out, tuple) else out).float()


class _Inputs:
    """Per MoE layer, the block's input and its router's and experts' inputs on a bounded sample of
    calibration tokens ([n, H] each, the same rows). Where two of them are one tensor (most
    families hand the block's input, flattened, to both), it is kept once."""

    def __init__(self, adapter, *, per_batch: int, generator: torch.Generator):
        self.adapter, self.per_batch, self.gen = adapter, per_batch, generator
        # "gram": experts inside an attention (JetMoE's) run alone only on their batch, so their Gram
        # matrices are taken there, for the sampled rows
        self.parts: dict[int, dict[str, list[torch.Tensor]]] = {
            l.index: {"block": [], "router": [], "experts": [], "gram": []} for l in adapter.layers}

    def add(self, model, batch) -> None:
        adapter = self.adapter
        blocks = {l.index: l.block for l in adapter.layers}
        routers = {l.index: l.router for l in adapter.layers}
        experts = {l.index: l.experts_input_module for l in adapter.layers}
        outers = {l.index: l.outer for l in adapter.layers if not l.standalone}
        with capture_inputs(blocks) as b_in, capture_inputs(routers) as r_in, capture_inputs(experts) as e_in, \
                capture_inputs(outers) as o_in:
            # stopped before the head: its [B, T, V] logits are not needed here
            last_hidden(model, adapter, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        use_cache=False)
        valid = batch.attention_mask.reshape(-1).bool()
        rows = torch.nonzero(valid.cpu()).squeeze(1)
        if len(rows) > self.per_batch:          # this batch's share of the token budget
            rows = rows[torch.randperm(len(rows), generator=self.gen)[:self.per_batch].sort().values]
        for i, (args, kwargs) in o_in.items():
            layer = adapter.layer(i)
            y = every_attention_expert(layer.outer, layer.block, AttentionContext.from_call(args, kwargs))
            y = y[rows.to(y.device)].float()                                     # [n, E, d]
            self.parts[i]["gram"].append(torch.einsum("ned,nfd->nef", y, y))
        for i, store in self.parts.items():
            taken: dict[tuple, torch.Tensor] = {}
            for key, captured in (("block", b_in), ("router", r_in), ("experts", e_in)):
                if i not in captured:           # a module a family does not call (recorded, not guessed)
                    continue
                args, kwargs = captured[i]
                h = kwargs.get("hidden_states", args[0] if args else None)
                h = h.reshape(-1, h.shape[-1])
                if h.shape[0] != valid.numel():
                    store[key].append(None)
                    continue
                same = (h.data_ptr(), tuple(h.shape), h.stride(), h.dtype)
                if same not in taken:
                    taken[same] = h[rows.to(h.device)]
                store[key].append(taken[same])

    def layer(self, index: int) -> dict[str, torch.Tensor | None]:
        """Each input of MoE layer ``index`` over every batch (None where one was not seen); inputs
        that were one tensor in every batch are one tensor here too."""
        out: dict[str, torch.Tensor | None] = {}
        for key, parts in self.parts[index].items():
            if not parts or any(p is None for p in parts):
                out[key] = None
                continue
            twin = next((k for k in out if len(parts) == len(self.parts[index][k])
                         and all(a is b for a, b in zip(parts, self.parts[index][k]))), None)
            out[key] = out[twin] if twin is not None else torch.cat(parts)
        return out


def _gram(adapter, layer, x: torch.Tensor, *, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """[N, E, E] per-token Gram matrices of every expert's output at gate 1 (float32). Tokens go
    in chunks whose every-expert output is at most ``chunk_bytes``: the experts' kernel holds
    about five such tensors at once (inputs repeated E times, gate/up, activation, output, the
    einsum's copy), 1.5 GiB over the loaded model at Qwen3-30B-A3B's E = 128 with 256 MB chunks."""
    E, N, H = layer.num_experts, x.shape[0], x.shape[1]
    out = torch.empty(N, E, E, dtype=torch.float32, device=x.device)
    step = max(1, chunk_bytes // max(1, E * H * 4))
    for a in range(0, N, step):
        y = every_expert_output(adapter, layer, x[a:a + step]).float()      # [E, n, H]
        out[a:a + step] = torch.einsum("end,fnd->nef", y, y)
    return out


def _sample(rows: torch.Tensor, budget: int, gen: torch.Generator) -> torch.Tensor | None:
    """``budget`` of the rows, at random and in order, or None when there are no more than that."""
    if rows.shape[0] <= budget:
        return None
    return torch.randperm(rows.shape[0], generator=gen)[:budget].sort().values.to(rows.device)


class _FastError:
    """error(kept) from the Gram matrices (module docstring); kept lists original expert ids."""

    def __init__(self, adapter, layer, router_in: torch.Tensor, experts_in: torch.Tensor | None,
                 gram: torch.Tensor | None = None):
        self.adapter, self.layer = adapter, layer
        self.E = layer.num_experts
        self.spec = adapter.family.routing
        with weights_in_place(layer.router):   # read outside the router's forward (offloaded: "meta")
            self.logits = router_logits(layer, router_in, self.spec)
        self.dtype = router_in.dtype
        # float32; each gathered block in float64. Taken on the batches for experts inside an attention
        self.G = gram if gram is not None else _gram(adapter, layer, experts_in)
        w, idx = self._route(list(range(self.E)))
        self.full = (-w, idx)

    def _route(self, kept: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        params = pruned_router_params(self.adapter.family, self.adapter.moe_config, kept, self.E)
        kept_t = torch.tensor(kept, device=self.logits.device)
        w, sub = route_module(self.layer, self.logits, self.spec, params, kept=kept_t, input_dtype=self.dtype)
        return w.double(), kept_t[sub]

    def __call__(self, kept) -> float:
        w, idx = self._route(list(kept))
        c = torch.cat([w, self.full[0]], dim=1)                                # [N, 2k]
        u = torch.cat([idx, self.full[1]], dim=1)
        n = torch.arange(u.shape[0], device=u.device)[:, None, None]
        g = self.G[n, u[:, :, None], u[:, None, :]].double()                   # [N, 2k, 2k]
        return float(torch.einsum("np,npq,nq->n", c, g, c).clamp_min(0).mean())


@register_method("reconstruction", "mean squared error of the layer output when the expert is dropped; "
                 "best kept subsets searched exhaustively (greedily when too many)",
                 causal_only="runs every expert on every token through fused expert tensors, which one module per expert lacks")
def reconstruction(ctx) -> MethodOutput:
    adapter, model = ctx.adapter, ctx.model
    max_subsets = int(ctx.options.get("max_subsets", 256))
    max_tokens = int(ctx.options.get("reconstruction_tokens", 8192))
    memory = int(ctx.options.get("reconstruction_memory", 1 << 30))
    E, min_keep = adapter.num_experts, max(1, adapter.family.min_experts)
    fast = adapter.family.call != "scaled_input"
    gen = torch.Generator().manual_seed(ctx.seed)
    total = sum(int(b.attention_mask.sum()) for b in ctx.batches)
    budget = max_tokens if not fast else min(max_tokens, max(1, memory // (E * E * 8)))
    if total > budget:
        import warnings

        why = f"the Gram matrices of {E} experts fill reconstruction_memory" if budget < max_tokens \
            else "reconstruction_tokens cap"
        warnings.warn(f"reconstruction: {min(budget, total)} of {total} calibration tokens per layer used ({why})",
                      stacklevel=2)
    # every batch keeps a share in proportion to its tokens: the budget is never exceeded and is used
    # whole (equal shares left short batches' unused share out: 564 of a 600-token budget used)
    sizes = [int(b.attention_mask.sum()) for b in ctx.batches]
    shares = sizes if total <= budget else _shares(sizes, budget)
    used = sum(min(n, k) for n, k in zip(sizes, shares))
    inputs = _Inputs(adapter, per_batch=shares[0] if shares else 0, generator=gen)
    with torch.no_grad():
        for batch, share in zip(ctx.batches, shares):
            inputs.per_batch = share
            inputs.add(model, batch.to(ctx.device))
    scores = torch.zeros(len(adapter.layers), E, dtype=torch.float64)
    subsets: dict[int, dict[int, list[int]]] = {}
    with torch.no_grad():
        for row, layer in enumerate(ctx.track(adapter.layers, "reconstruction")):
            seen = inputs.layer(layer.index)
            r_in, e_in = seen["router"], seen["experts"]
            if seen["gram"] is not None:   # experts inside an attention (JetMoE's)
                keep = _sample(r_in, budget, gen)
                G = seen["gram"]
                r_in, G = (r_in, G) if keep is None else (r_in[keep], G[keep])
                error = _FastError(adapter, layer, r_in, None, gram=G)
            elif fast and r_in is not None and e_in is not None:
                keep = _sample(r_in, budget, gen)
                if keep is not None:
                    e_in = e_in[keep] if e_in is not r_in else None
                    r_in = r_in[keep]
                    e_in = r_in if e_in is None else e_in
                error = _FastError(adapter, layer, r_in, e_in)
            else:
                x = seen["block"]
                keep = _sample(x, budget, gen)
                x = (x if keep is None else x[keep])[None]
                full = _block_out(layer.block, x)

                def error(kept, _layer=layer, _x=x, _full=full):
                    with mask_experts(model, {_layer.index: list(kept)}, adapter=adapter):
                        return float((_block_out(_layer.block, _x) - _full).pow(2).sum(-1).mean())

            for e in range(E):
                scores[row, e] = error([x_ for x_ in range(E) if x_ != e]) if E - 1 >= min_keep else 0.0
            greedy = list(range(E))
            for k in range(E - 1, min_keep - 1, -1):
                if comb(E, k) <= max_subsets:
                    best = min(combinations(range(E), k), key=error)
                else:
                    drop = min(greedy, key=lambda d: error([x_ for x_ in greedy if x_ != d]))
                    best = [x_ for x_ in greedy if x_ != drop]
                greedy = sorted(best)
                subsets.setdefault(k, {})[layer.index] = sorted(best)
    return MethodOutput(scores=scores, tokens=used, subsets=subsets)


def _shares(sizes: list[int], budget: int) -> list[int]:
    """Per-batch token shares in proportion to each batch's tokens, summing to ``budget`` (largest
    remainders first; ties to the earlier batch)."""
    total = sum(sizes)
    exact = [budget * n / total for n in sizes]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (shares[i] - exact[i], i))[:budget - sum(shares)]:
        shares[i] += 1
    return shares
