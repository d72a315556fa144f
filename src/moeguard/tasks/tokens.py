"""Tokenization and padding helpers shared by evaluation, training examples and active learning.

Every part of moeguard that turns a task record into token ids goes through these functions,
so evaluation, fine-tuning and the active learner read a record the same way: text is encoded
without special tokens, and the tokenizer's BOS token (when it has one) is prepended by the
caller with :func:`bos_ids`.

torch is imported only by the functions that build tensors, so task definitions and kinds
can use this module without paying for torch.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from moeguard.tasks.base import Task


# Each (tokenizer, text) is tokenized once: a sweep scores the same eval records under dozens of
# pruning plans, and a recovery study under every round; the ids are a pure function of both.
_CACHE_SIZE = 100_000
# and at most this many characters of text held per tokenizer (the ids take about as much again):
# 100,000 summarization articles of 4,000 characters each held ~1 GB beside a model's memory cap
_CACHE_CHARS = 64_000_000
_cache: "weakref.WeakKeyDictionary[Any, OrderedDict[str, tuple[int, ...]]]" = weakref.WeakKeyDictionary()
_held: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()   # characters in each memo


def encode(tokenizer, text: str) -> list[int]:
    """The token ids of ``text``, without special tokens (memoized per tokenizer, LRU)."""
    try:
        memo = _cache.get(tokenizer)
        if memo is None:
            memo = _cache[tokenizer] = OrderedDict()
    except TypeError:  # not weak-referenceable: no memo
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = memo.get(text)
    if ids is None:
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(text) > _CACHE_CHARS // 100:   # a whole document: tokenized again when needed, not held
            return list(ids)
        memo[text] = ids
        held = _held.get(tokenizer, 0) + len(text)
        while len(memo) > _CACHE_SIZE or held > _CACHE_CHARS:
            old, _ = memo.popitem(last=False)
            held -= len(old)
        _held[tokenizer] = held
    else:
        memo.move_to_end(text)
    return list(ids)


def continuation(tokenizer, context: str, text: str) -> list[int]:
    """``text``'s tokens where it follows ``context`` in one string: the tail of the pair's encoding
    (lm-evaluation-harness' ``_encode_pair``), so a verbalizer or target is scored and trained on the
    tokens the model sees after its prompt. A SentencePiece tokenizer (Llama's, Mixtral's, JetMoE's,
    PhiMoE's) gives any text's start a dummy '▁', so ``" yes"`` alone is ``▁▁yes``, not the ``▁yes``
    that follows "Answer:"; GPT-2's byte-level one (the embedded model's) encodes it the same either
    way. Where the two do not split there (the context's own tokens change: a word continued without
    a space, or Qwen's ':' joined to a newline after it), ``text``'s own tokens."""
    head = encode(tokenizer, context)
    whole = encode(tokenizer, context + text)
    return whole[len(head):] if whole[:len(head)] == head and len(whole) > len(head) else encode(tokenizer, text)


def bos_ids(tokenizer) -> list[int]:
    """``[bos_token_id]``, or ``[]`` for a tokenizer without a BOS token."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def decoder_start(model) -> int | None:
    """An encoder-decoder's decoder start token (its tasks run through the seq2seq head: the
    encoder reads the prompt, the decoder scores the target); None for a causal LM."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    start = getattr(config, "decoder_start_token_id", None)
    return int(start if start is not None else config.pad_token_id)


def both_stacks(model, ids, mask=None) -> dict:
    """Keyword inputs that run every layer of ``model`` on token rows ``ids`` [B, S]: a causal LM
    reads them; an encoder-decoder's encoder reads them and its decoder reads them too, after its
    start token (teacher-forced), so routing features see every MoE layer of both stacks."""
    import torch

    out = {"input_ids": ids, **({"attention_mask": mask} if mask is not None else {})}
    first = decoder_start(model)
    if first is not None:
        out["decoder_input_ids"] = torch.cat([torch.full_like(ids[:, :1], first), ids[:, :-1]], dim=1)
        if mask is not None:
            out["decoder_attention_mask"] = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
    return out


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the pad token, else EOS, else 0 (padding is always masked out)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # always masked out, so any valid id will do


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS and the model's generation-config EOS
    (an int or a list), deduplicated in that order."""
    ids = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        ids += value if isinstance(value, list) else ([] if value is None else [value])
    return list(dict.fromkeys(int(i) for i in ids))


def model_device(model) -> "torch.device":
    """Where the model's inputs go: the device of its first parameter (CPU for a model without
    parameters), or, for a model accelerate dispatched with offloaded weights (on "meta" until
    they run), the device its hooks run it on."""
    import torch

    hook = getattr(model, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
    return torch.device("cpu") if device.type == "meta" else device


def pad_batch(seqs: Sequence[list[int]], pad: int, *, left: bool,
              device) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(input_ids, attention_mask)`` [B, longest] of ``seqs`` padded with ``pad`` on the right,
    or on the ``left`` (for generation), moved to ``device``."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def fit_prompt(tokenizer, rec: dict[str, Any], max_length: int) -> list[int]:
    """Prompt ids (BOS + ``rec["input"]``) of at most ``max_length`` tokens.

    Cuts the end of the source text (``rec["source_text"]``) rather than the prompt's edges:
    the article's start carries most of a news summary and the instruction at the end must
    survive.
    """
    bos = bos_ids(tokenizer)
    ids = bos + encode(tokenizer, rec["input"])
    excess = len(ids) - max_length
    source = rec.get("source_text") or ""
    if excess > 0 and source and source in rec["input"]:
        src_ids = encode(tokenizer, source)
        keep = max(0, len(src_ids) - excess - 8)  # slack: re-tokenizing the cut may differ a little
        shorter = rec["input"].replace(source, tokenizer.decode(src_ids[:keep]), 1)
        ids = bos + encode(tokenizer, shorter)
    if len(ids) > max_length:  # fallback: keep the end, where the instruction is
        ids = bos + ids[len(bos):][-(max_length - len(bos)):]
    return ids


# what a checkpoint's generation_config may say that is structure, not a decoding choice: kept
_STRUCTURAL = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "forced_bos_token_id",
               "forced_eos_token_id")


def greedy_generate(model, config, **kwargs):
    """``model.generate(generation_config=config, **kwargs)`` with nothing of the checkpoint's own
    decoding settings. generate() fills every field a passed config leaves None from
    ``model.generation_config`` (a repetition penalty, no_repeat_ngram_size, min_new_tokens,
    suppressed or banned tokens: processors applied even in greedy decoding, which made ROUGE depend
    on the checkpoint's file); for the call, the model's config is one holding only its token ids."""
    from transformers import GenerationConfig

    # a peft wrapper (LoRA re-alignment) generates through its base model, which reads its own config
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = getattr(target, "generation_config", None)
    ids = {k: getattr(own, k, None) for k in _STRUCTURAL} if own is not None else {}
    target.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    try:
        return model.generate(generation_config=config, **kwargs)
    finally:
        target.generation_config = own


def generation_config(task: "Task", pad: int, eos: list[int], tokenizer) -> Any:
    """Greedy decoding of at most ``task.max_new_tokens`` tokens, as a fresh ``GenerationConfig``
    (run it with :func:`greedy_generate`, which keeps the checkpoint's own settings out)."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=task.max_new_tokens,
                            pad_token_id=pad, eos_token_id=eos or None, bos_token_id=tokenizer.bos_token_id)
