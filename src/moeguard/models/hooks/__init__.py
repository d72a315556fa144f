"""Everything that hooks into a live model, and everything undone in ``finally``.

The guide's rule (llm-compressor's REAP): hooks in one place, removed in ``finally``. The place is
:class:`~moeguard.models.hooks.registry.Hooks`: every forward hook, pre-hook and forward patch goes
through one, and its close removes them all (``tests/test_hooks_registry.py`` reads the sources so
that nothing registers a hook elsewhere). This package holds the hooks the pipeline shares:

- ``registry``: :class:`Hooks`, forward patching under accelerate's offload, ``weights_in_place``;
- ``capture``: :class:`RoutingCapture`, routing statistics as the model runs;
- ``masking``: :func:`mask_experts`, routing among kept experts without touching weights;
- ``tracing``: a module's inputs, the experts' inputs, the last hidden state, expert traces with
  gradients;
- ``experts``: running a layer's experts through their own kernels.

The monitor's and the defense's hook functions stay in their packages; they attach through
:class:`Hooks` too.
"""

from moeguard.models.hooks.capture import LayerStats, RoutingCapture, RoutingStats
from moeguard.models.hooks.experts import (attention_reduce, chosen_rows, every_expert_output, expert_outputs,
                                           through_experts)
from moeguard.models.hooks.masking import drop_one_per_chunk, mask_experts, normalize_keep
from moeguard.models.hooks.registry import Hooks, on_grad, place_inner_blocks, weights_in_place
from moeguard.models.hooks.tracing import (ExpertTrace, capture_inputs, check_head, expert_inputs, last_hidden,
                                           trace_experts)

__all__ = ["ExpertTrace", "Hooks", "LayerStats", "RoutingCapture", "RoutingStats", "attention_reduce",
           "capture_inputs", "check_head", "chosen_rows", "drop_one_per_chunk", "every_expert_output", "expert_inputs",
           "expert_outputs", "last_hidden", "mask_experts", "normalize_keep", "on_grad", "place_inner_blocks",
           "through_experts", "trace_experts", "weights_in_place"]
