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


def allowed_tokens(tokenizer, vocab: int, *, after_separator: bool = False) -> np.ndarray:
    """Ids a prefix may use: not special, decoding to visible text that re-tokenizes to the same id.
    ``after_separator``: re-tokenizes to it where it follows the separator (a suffix's first token:
    a SentencePiece tokenizer writes a word at a text's start as ``▁Hello``, after a newline as
    ``Hello``)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    # and every added token, marked special or not (a chat template's <|im_start|>, a fill-in-the-middle
    # marker; Qwen3's and DeepSeek-R1's <think>, <tool_call> are added with special false): all_special_ids
    # lists only the named ones, and a prefix of them is a template injection, not a routing hijack
    special |= set((getattr(tokenizer, "added_tokens_decoder", None) or {}))
    ok = []
    for i in range(vocab):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if not text.strip() or SEPARATOR in text:
            continue
        ids = following(tokenizer, text) if after_separator else tokenizer.encode(text, add_special_tokens=False)
        if ids == [i]:
            ok.append(i)
    if not ok:
        raise MoeguardError("no token of the vocabulary re-tokenizes to itself" + (" after a newline" if after_separator else ""),
                            hint="route-attack needs a usable vocabulary")
    return np.asarray(ok)


# How a request's text joins a crafted text and an input, in tokens. A search places token lists
# side by side; what is sent is one string, encoded whole. The two agree for byte-level tokenizers
# (GPT-2's, the embedded model's), not for SentencePiece ones (Llama, Mixtral, JetMoE, PhiMoE),
# which give any text's start a dummy '▁': "\n" alone is [▁, <0x0A>], inside a text [<0x0A>], and
# the word after it has no '▁'. So each piece is taken as it is encoded after some text
# (``tasks.tokens.continuation``, which task scoring uses for a verbalizer after its prompt).
_LEFT = "a"   # a text a separator follows (ends a word, merges with nothing after it)


def separator_ids(tokenizer) -> list[int]:
    """The separator's tokens between a crafted text and an input, as a request's text encodes them."""
    from moeguard.tasks.tokens import continuation

    return continuation(tokenizer, _LEFT, SEPARATOR)


def following(tokenizer, text: str) -> list[int]:
    """``text``'s tokens where it follows the separator (a prefix's input, a suffix's crafted text);
    its own tokens where the two merge (the measurement's ``tokenization_exact`` then says so)."""
    from moeguard.tasks.tokens import continuation

    return continuation(tokenizer, _LEFT + SEPARATOR, text)
