"""Repairs of transformers modules that do not compute their model, applied to each model moeguard
builds or loads (never to transformers' classes themselves: a model moeguard never touched, or one
loaded elsewhere in the same process, is left as transformers made it).

A repair swaps the class of the broken module instances for a subclass whose forward computes
what the model's reference implementation does; names, parameters and saved checkpoints are
unchanged, and deep copies keep the repair. Each entry says what is wrong; the test that
reproduces the bug (tests/test_encoder_decoder.py) fails when a locked transformers fixes it, and
the entry goes then.
"""

from __future__ import annotations

import types

import torch
from torch import nn

# model_type -> (the broken class's name, what is wrong, the replacement's factory)
_REPAIRS: dict[str, tuple[str, str, object]] = {}


def _nllb_moe_experts(broken: type) -> type:
    class NllbMoeExpertsRepaired(broken):
        """NLLB-MoE's experts as fairseq and transformers 4.x compute them: expert e runs on the
        tokens the router dispatched to it (a nonzero combine weight in column e), its output
        scaled by that weight and, in eval, by 1 - moe_token_dropout (token dropout in training)."""

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

    return NllbMoeExpertsRepaired


_REPAIRS["nllb-moe"] = (
    "NllbMoeExperts",
    "transformers 5.24's NllbMoeExperts picks each expert by the value of the router's 0/1 top-1 mask (a "
    "one_hot of a one-hot), not by its index: only experts 0 and 1 ever run. moeguard runs NLLB-MoE's "
    "top-2 mixture as fairseq and transformers 4.x do (models/upstream.py)",
    _nllb_moe_experts)

_REPAIRED: dict[type, type] = {}


def known_repair(model_type: str | None) -> str | None:
    """What is wrong with transformers' implementation of ``model_type`` that moeguard repairs, or None."""
    entry = _REPAIRS.get(model_type or "")
    return entry[1] if entry else None


def repair(model: nn.Module) -> int:
    """Repair ``model``'s broken modules in place (idempotent); returns how many were repaired now."""
    config = getattr(model, "config", None)
    entry = _REPAIRS.get(getattr(config, "model_type", None) or "")
    if entry is None:
        return 0
    name, _, factory = entry
    done = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__ != name:   # the broken class itself only: a repaired one is its subclass
            continue
        if cls not in _REPAIRED:
            _REPAIRED[cls] = factory(cls)
        module.__class__ = _REPAIRED[cls]
        if "_old_forward" in module.__dict__:   # accelerate's device hook kept the broken forward to call
            module._old_forward = types.MethodType(_REPAIRED[cls].forward, module)
        done += 1
    return done
