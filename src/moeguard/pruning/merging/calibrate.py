"""What the merge methods measure on calibration data, in one forward pass over it:

- per expert, routing slots (``counts``), applied gate mass (the weights the block uses) and raw
  gate mass (the router's score before top-k renormalization), from :class:`RoutingCapture`;
- per layer, ``tokens`` of the task's tokens sampled uniformly at random (seeded), on which every
  expert is then run: ``outputs`` [E, N, H], the basis of output similarity (HC-SMoE clusters on
  it) and of centre assignment.

Cost: one plain forward over the calibration batches, plus E x N expert evaluations per layer
(against k x T in the forward: E·N / (k·T) of the forward's expert compute, stated in the record).
Memory: E x N x H floats per layer, which ``tokens`` bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeguard.attribution.context import track
from moeguard.models.adapter import MoEAdapter
from moeguard.models.hooks import RoutingCapture, expert_inputs, expert_outputs


@dataclass(kw_only=True)
class LayerProfile:
    layer: int                    # decoder-layer index
    counts: torch.Tensor          # [E] routing slots received
    gate_mass: torch.Tensor       # [E] applied gate weights summed
    raw_gate_mass: torch.Tensor   # [E] raw router scores at the chosen experts summed
    outputs: torch.Tensor         # [E, N, H] each expert's output (gate 1) on the sampled tokens

    @property
    def num_experts(self) -> int:
        return int(self.counts.numel())

    def similarity(self) -> torch.Tensor:
        """[E, E] cosine similarity of the experts' outputs on the same tokens (flattened)."""
        flat = self.outputs.reshape(self.num_experts, -1).double()
        flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return flat @ flat.T

    def gate(self, which: str) -> torch.Tensor:
        return self.raw_gate_mass if which == "raw" else self.gate_mass


def calibrate(model, adapter: MoEAdapter, batches: list, *, tokens: int = 256, seed: int = 0,
              progress=None) -> tuple[list[LayerProfile], dict[str, Any]]:
    """Profiles of every MoE layer (in ``adapter.layers`` order) and what the calibration cost."""
    device = next(model.parameters()).device
    valid_total = sum(int(b.attention_mask.sum()) for b in batches)
    n = min(tokens, valid_total)
    # which of the valid tokens (in batch order) are sampled: known before the forward
    chosen = torch.randperm(valid_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    picked: dict[int, list[torch.Tensor]] = {slot: [] for slot in range(len(adapter.layers))}
    seen = 0
    items = track(progress, batches, "merge calibration")
    with torch.no_grad(), RoutingCapture(model, adapter=adapter) as cap, expert_inputs(adapter) as store:
        for b in items:
            b = b.to(device)
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            valid = b.attention_mask.reshape(-1).bool()
            count = int(valid.sum())
            mine = chosen[(chosen >= seen) & (chosen < seen + count)] - seen
            seen += count
            for slot, hidden in store.items():
                if hidden.shape[0] != valid.numel():
                    raise RuntimeError(f"MoE layer {adapter.layers[slot].index}: its experts saw {hidden.shape[0]} "
                                       f"tokens, the batch has {valid.numel()}")
                picked[slot].append(hidden[valid.to(hidden.device)][mine.to(hidden.device)])
            store.clear()
    profiles = []
    for slot, layer in enumerate(adapter.layers):
        h = torch.cat(picked[slot])                                        # [N, H]
        E = layer.num_experts
        experts = torch.arange(E, device=h.device).repeat_interleave(h.shape[0])
        with torch.no_grad():
            y = expert_outputs(adapter, layer, h.repeat(E, 1), experts,
                               torch.ones(len(experts), device=h.device, dtype=torch.float32))
        s = cap.stats.layers[slot]
        profiles.append(LayerProfile(layer=layer.index, counts=s.counts.clone(), gate_mass=s.gate_mass.clone(),
                                     raw_gate_mass=s.raw_gate_mass.clone(),
                                     outputs=y.float().reshape(E, h.shape[0], -1).cpu()))
    k = adapter.top_k
    cost = {"calibration_tokens": valid_total, "sampled_tokens": n, "forward_passes": 1,
            "expert_evaluations_per_layer": adapter.num_experts * n,
            # the sampled evaluations against the forward's own k·T expert evaluations
            "expert_compute_vs_forward": round(adapter.num_experts * n / max(1, k * valid_total), 4)}
    return profiles, cost
