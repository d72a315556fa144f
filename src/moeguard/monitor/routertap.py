"""The target layer's router, read in one forward (``RouterTap``: its logits and top-k choice, the
forward stopped there when nothing after it matters), the checks of a (layer, expert) target, and
the tokens a crafted text may use: what ``route-attack`` (``hijack.py``) and the expert scan's
effect search share."""

from __future__ import annotations

import numpy as np
import torch

from moeguard.errors import MoeguardError
from moeguard.models.hooks import Hooks

SEPARATOR = "\n"   # what separates a crafted text from the input: never inside an allowed token


class _Stop(Exception):
    """Raised by the router hook: the rest of the forward cannot change the objective."""


class RouterTap:
    """Layer ``slot``'s router logits and top-k selection for the next forward; with
    ``stop=True`` the forward ends there. The hook is removed on exit, whatever happens."""

    def __init__(self, adapter, slot: int, *, stop: bool = True):
        self.layer = adapter.layers[slot]
        self.router = self.layer.router
        self.stop = stop
        self.logits: torch.Tensor | None = None      # [B*T, E]
        self.index: torch.Tensor | None = None       # [B*T, k]
        self._hooks = Hooks()

    def _hook(self, module, args, output):
        self.logits, _, self.index = self.layer.unpack(output)
        if self.stop:
            raise _Stop

    def __enter__(self) -> "RouterTap":
        self._hooks.ensure_empty(self)
        self._hooks.on_output(self.router, self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.close()

    def run(self, model, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            model(**inputs)
        except _Stop:
            pass
        return self.logits, self.index


def check_pair(moe: list[int], counts: dict[int, int], layer: int, expert: int | None, *,
               name: str = "this model") -> None:
    """A one-line error, listing what exists, unless ``layer`` is one of the MoE layers ``moe``
    and ``expert`` (when given) one of its ``counts[layer]`` experts. The command checks from the
    config before loading; the library from the loaded model: the same rule and words."""
    if layer not in moe:
        raise MoeguardError(f"layer {layer} is not an MoE layer of {name} (its MoE layers: {moe})",
                            hint=f"pass --layer with one of {moe}, or 'all'")
    if expert is not None and not 0 <= expert < counts[layer]:
        E = counts[layer]
        raise MoeguardError(f"expert {expert} does not exist in layer {layer} ({E} experts: 0..{E - 1})",
                            hint=f"pass --expert between 0 and {E - 1}, or --all")


def check_target(adapter, layer: int, expert: int) -> int:
    """The slot of MoE layer ``layer`` of a loaded model (``check_pair``'s rule)."""
    layers = [l.index for l in adapter.layers]
    check_pair(layers, {l.index: l.num_experts for l in adapter.layers}, layer, expert)
    return layers.index(layer)


def allowed_tokens(tokenizer, vocab: int) -> np.ndarray:
    """Ids a prefix may use: not special, decoding to visible text that re-tokenizes to the same id."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ok = []
    for i in range(vocab):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if text.strip() and SEPARATOR not in text and tokenizer.encode(text, add_special_tokens=False) == [i]:
            ok.append(i)
    if not ok:
        raise MoeguardError("no token of the vocabulary re-tokenizes to itself", hint="route-attack needs a usable vocabulary")
    return np.asarray(ok)
