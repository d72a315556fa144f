"""What the merge methods measure on calibration data, in one forward pass over it:

- per expert, routing slots (``counts``), applied gate mass (the weights the block uses) and raw
  gate mass (the router's score before top-k renormalization), from :class:`RoutingCapture`;
- per layer, ``tokens`` of the task's tokens sampled uniformly at random (seeded), on which every
  expert is then run; what is kept of those outputs is the [E, E] cosine similarity of the
  experts' outputs (centre assignment) and each expert's mean output [E, H] (HC-SMoE's clusters).

Cost: one forward over the calibration batches, stopped before the head (its [B, T, V] logits,
2.5 GB a batch of 8 x 1024 at Qwen3's vocabulary, are never read), plus E x N expert evaluations per layer
(against k x T in the forward: E·N / (k·T) of the forward's expert compute, stated in the record).
Memory: the sampled inputs (N x H per layer) through the forward, then one layer's E x N x H
outputs at a time; the profiles keep E x (E + H) numbers per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeguard.attribution.context import track
from moeguard.models.adapter import MoEAdapter
from moeguard.models.attention_experts import AttentionContext
from moeguard.models.attention_experts import every_expert_output as every_attention_expert
from moeguard.models.hooks import RoutingCapture, capture_inputs, every_expert_output, expert_inputs, last_hidden
from moeguard.tasks.tokens import model_device


@dataclass(kw_only=True)
class LayerProfile:
    layer: int                    # decoder-layer index
    counts: torch.Tensor          # [E] routing slots received
    gate_mass: torch.Tensor       # [E] applied gate weights summed
    raw_gate_mass: torch.Tensor   # [E] raw router scores at the chosen experts summed
    similarity: torch.Tensor      # [E, E] cosine similarity of the experts' outputs on the same tokens
    mean_output: torch.Tensor     # [E, H] each expert's mean output (gate 1) over the sampled tokens

    @classmethod
    def from_outputs(cls, *, layer: int, counts, gate_mass, raw_gate_mass, outputs: torch.Tensor) -> "LayerProfile":
        """From every expert's outputs [E, N, H] on the same N tokens (gate 1)."""
        flat = outputs.reshape(outputs.shape[0], -1).double()
        flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return cls(layer=layer, counts=counts, gate_mass=gate_mass, raw_gate_mass=raw_gate_mass,
                   similarity=flat @ flat.T, mean_output=outputs.double().mean(dim=1))

    @property
    def num_experts(self) -> int:
        return int(self.counts.numel())

    def gate(self, which: str) -> torch.Tensor:
        return self.raw_gate_mass if which == "raw" else self.gate_mass


def calibrate(model, adapter: MoEAdapter, batches: list, *, tokens: int = 256, seed: int = 0,
              progress=None) -> tuple[list[LayerProfile], dict[str, Any]]:
    """Profiles of every MoE layer (in ``adapter.layers`` order) and what the calibration cost."""
    device = model_device(model)
    valid_total = sum(int(b.attention_mask.sum()) for b in batches)
    n = min(tokens, valid_total)
    # which of the valid tokens (in batch order) are sampled: known before the forward
    chosen = torch.randperm(valid_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    picked: dict[int, list[torch.Tensor]] = {slot: [] for slot in range(len(adapter.layers))}
    # experts inside an attention (JetMoE's) run alone only on their batch: their outputs are taken there
    outers = {slot: l.outer for slot, l in enumerate(adapter.layers) if not l.standalone}
    outputs: dict[int, list[torch.Tensor]] = {slot: [] for slot in outers}
    seen = 0
    items = track(progress, batches, "merge calibration")
    with torch.no_grad(), RoutingCapture(model, adapter=adapter, raw=True) as cap, expert_inputs(adapter) as store, \
            capture_inputs(outers) as contexts:
        for b in items:
            b = b.to(device)
            last_hidden(model, adapter, input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            valid = b.attention_mask.reshape(-1).bool()
            count = int(valid.sum())
            mine = chosen[(chosen >= seen) & (chosen < seen + count)] - seen
            seen += count
            for slot, (args, kwargs) in contexts.items():
                layer = adapter.layers[slot]
                y = every_attention_expert(layer.outer, layer.block, AttentionContext.from_call(args, kwargs))
                outputs[slot].append(y[valid.to(y.device)][mine.to(y.device)].float().cpu())   # [n, E, d]
            contexts.clear()
            for slot, hidden in store.items():
                if hidden.shape[0] != valid.numel():
                    raise RuntimeError(f"MoE layer {adapter.layers[slot].index}: its experts saw {hidden.shape[0]} "
                                       f"tokens, the batch has {valid.numel()}")
                picked[slot].append(hidden[valid.to(hidden.device)][mine.to(hidden.device)])
            store.clear()
    profiles = []
    for slot, layer in enumerate(adapter.layers):
        if slot in outputs:
            y = torch.cat(outputs[slot]).transpose(0, 1)                   # [E, N, H]
        else:
            h = torch.cat(picked[slot])                                    # [N, H]
            with torch.no_grad():
                y = every_expert_output(adapter, layer, h).float()         # [E, N, H], one layer at a time
        s = cap.stats.layers[slot]
        profiles.append(LayerProfile.from_outputs(layer=layer.index, counts=s.counts.clone(),
                                                  gate_mass=s.gate_mass.clone(), raw_gate_mass=s.raw_gate_mass.clone(),
                                                  outputs=y.cpu()))
        del y
    k = adapter.top_k
    cost = {"calibration_tokens": valid_total, "sampled_tokens": n, "forward_passes": 1,
            "expert_evaluations_per_layer": adapter.num_experts * n,
            # the sampled evaluations against the forward's own k·T expert evaluations
            "expert_compute_vs_forward": round(adapter.num_experts * n / max(1, k * valid_total), 4)}
    return profiles, cost
