"""gradient's pruned routing in the router input's dtype, as the masked replays compute it
(2026-12-07 review): ERNIE returns its weights in that dtype, and in bf16 the pruned router's
weights came back in float32 beside the model's own in bf16 (a rounding offset on every token of
every plan; on the tiny model below it moves one score by 1e-5, on a real one it is noise in the
ranking ablation-screened picks from)."""

import pytest
import torch

import moeguard.attribution.gradient as gradient
from moeguard.attribution.context import Context
from moeguard.attribution.run import score
from moeguard.models.adapter import MoEAdapter
from moeguard.tasks.registry import get_task
from moeguard.testing import as_loaded_in, tiny_model

from test_attribution import _batches


@pytest.mark.parametrize("family", ["ernie4_5_moe", "granitemoe", "jetmoe", "mixtral", "deepseek_v3"])
def test_gradient_routes_the_pruned_router_to_weights_in_the_model_s_own_dtype(family, monkeypatch):
    """Granite's router returns float32 logits and its weights in the input's dtype: its spec (which
    replays its bf16 logits and cannot tell) said "the logits' dtype", so gradient's pruned weights came
    back in float32 beside the bf16 ones the model used (ERNIE's offset, in all four Granite families)."""
    model = as_loaded_in(tiny_model(family), torch.bfloat16)
    seen, own = [], []
    real, real_delta = gradient._pruned_weights, gradient._layer_delta

    def recording(*a, **k):
        w, sub = real(*a, **k)
        seen.append(w.dtype)
        return w, sub

    def delta(adapter, layer, trace, *a, **k):
        own.append(trace.weights.dtype)
        return real_delta(adapter, layer, trace, *a, **k)
    monkeypatch.setattr(gradient, "_pruned_weights", recording)
    monkeypatch.setattr(gradient, "_layer_delta", delta)
    ctx = Context(model=model, tokenizer=None, adapter=MoEAdapter(model), task=get_task("stdlib-code"),
                  batches=_batches(0), reference=[], options={})
    score(ctx, "gradient")
    assert seen and own and set(seen) == set(own), (set(seen), set(own))
