"""Repairs of transformers modules that do not compute their model, applied to each model moeguard
builds or loads (never to transformers' classes themselves: a model moeguard never touched, or one
loaded elsewhere in the same process, is left as transformers made it).

A repair swaps the class of the broken module instances for a subclass whose forward computes
what the model's reference implementation does; names, parameters and saved checkpoints are
unchanged, deep copies keep the repair, and a repaired model pickles (the subclass is this module's
attribute, made on first use). Each entry says what is wrong; the test that reproduces the bug
(tests/test_encoder_decoder.py) fails when a locked transformers fixes it, and the entry goes then.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _nllb_moe_experts():
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeExperts

    class NllbMoeExpertsRepaired(NllbMoeExperts):
        """NLLB-MoE's experts as fairseq and transformers 4.x compute them: expert e runs on the
        tokens the router dispatched to it (a nonzero combine weight in column e), its output
        scaled, in eval, by 1 - moe_token_dropout (token dropout in training), then by that weight."""

        def forward(self, hidden_states: torch.Tensor, router_mask: torch.Tensor, router_probs: torch.Tensor):
            # hidden_states [T, d]; router_probs [T, E] combine weights (0: not dispatched)
            out = torch.zeros_like(hidden_states)
            for e in (router_probs != 0).any(dim=0).nonzero().flatten().tolist():
                tok = torch.where(router_probs[:, e] != 0)[0]
                y = self[f"expert_{e}"](hidden_states[tok])
                if self.moe_token_dropout > 0:   # on the expert's output, then its weight (as 4.x orders them)
                    y = self.token_dropout(y) if self.training else y * (1 - self.moe_token_dropout)
                out.index_add_(0, tok, (y * router_probs[tok, e, None]).to(hidden_states.dtype))
            return out

    # pickled by reference to this module's attribute (module __getattr__ below)
    NllbMoeExpertsRepaired.__module__, NllbMoeExpertsRepaired.__qualname__ = __name__, "NllbMoeExpertsRepaired"
    return NllbMoeExpertsRepaired


# model_type -> (the broken class's name, the repaired class's name here, what is wrong, its factory)
_REPAIRS: dict[str, tuple[str, str, str, object]] = {
    "nllb-moe": (
        "NllbMoeExperts", "NllbMoeExpertsRepaired",
        "transformers 5.24's NllbMoeExperts picks each expert by the value of the router's 0/1 top-1 mask (a "
        "one_hot of a one-hot), not by its index: only experts 0 and 1 ever run. moeguard runs NLLB-MoE's "
        "top-2 mixture as fairseq and transformers 4.x do; a server running transformers 5.24 serves the bug "
        "unless it calls moeguard.models.upstream.repair(model) after loading",
        _nllb_moe_experts),
}
_MADE: dict[str, type] = {}


def __getattr__(name: str):
    """The repaired classes, made on first use (importing transformers' modeling code only then)."""
    for _, made_name, _, factory in _REPAIRS.values():
        if name == made_name:
            if name not in _MADE:
                _MADE[name] = factory()
            return _MADE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def known_repair(model_type: str | None) -> str | None:
    """What is wrong with transformers' implementation of ``model_type`` that moeguard repairs, or None."""
    entry = _REPAIRS.get(model_type or "")
    return entry[2] if entry else None


def repair(model: nn.Module) -> int:
    """Repair ``model``'s broken modules in place (idempotent); returns how many were repaired now."""
    config = getattr(model, "config", None)
    entry = _REPAIRS.get(getattr(config, "model_type", None) or "")
    if entry is None:
        return 0
    broken, made_name, _, _ = entry
    done = 0
    for module in model.modules():
        if type(module).__name__ != broken:   # the broken class itself only: a repaired one is its subclass
            continue
        fixed = __getattr__(made_name)
        if type(module) is not fixed.__bases__[0]:   # a same-named class of other code: not ours to repair
            continue
        module.__class__ = fixed
        if "_old_forward" in module.__dict__:   # accelerate's device hook kept the broken forward to call
            module._old_forward = types.MethodType(fixed.forward, module)
        done += 1
    return done
