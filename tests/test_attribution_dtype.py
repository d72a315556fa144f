"""gradient's pruned routing in the router input's dtype, as the masked replays compute it
(2026-12-07 review): ERNIE returns its weights in that dtype, and in bf16 the pruned router's
weights came back in float32 beside the model's own in bf16 (a rounding offset on every token of
every plan; on the tiny model below it moves one score by 1e-5, on a real one it is noise in the
ranking ablation-screened picks from)."""

import torch

import moeguard.attribution.gradient as gradient
from moeguard.attribution.context import Context
from moeguard.attribution.run import score
from moeguard.models.adapter import MoEAdapter
from moeguard.tasks.registry import get_task
from moeguard.testing import as_loaded_in, tiny_model

from test_attribution import _batches


def test_gradient_routes_the_pruned_router_in_the_router_input_s_dtype(monkeypatch):
    model = as_loaded_in(tiny_model("ernie4_5_moe"), torch.bfloat16)
    seen = []
    real = gradient.route_module

    def recording(*a, **k):
        w, sub = real(*a, **k)
        seen.append((k.get("input_dtype"), w.dtype))
        return w, sub
    monkeypatch.setattr(gradient, "route_module", recording)
    ctx = Context(model=model, tokenizer=None, adapter=MoEAdapter(model), task=get_task("stdlib-code"),
                  batches=_batches(0), reference=[], options={})
    score(ctx, "gradient")
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}, set(seen)
