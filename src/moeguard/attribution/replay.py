"""Run the model from a decoder layer's cached input: the cheap path to exact ablations.

One plain forward records every decoder layer's inputs (:func:`capture_inputs`); masking an
expert of layer l then only re-runs layers l..end and the head. Several masks run in one
call by stacking copies of the batch (``copies``), each copy routed with its own mask.
"""

from __future__ import annotations

import torch

from moeguard.models.adapter import MoEAdapter


def _tile(value, batch: int, copies: int):
    if copies == 1:
        return value
    if isinstance(value, torch.Tensor):
        # per-sample tensors have the batch on dim 0; broadcast ones (size 1) stay as they are
        return torch.cat([value] * copies) if value.dim() and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, tuple):
        return tuple(_tile(v, batch, copies) for v in value)
    return value


def replay(adapter: MoEAdapter, inputs: dict[int, tuple], start: int, *, copies: int = 1) -> torch.Tensor:
    """Logits of the model run from decoder layer ``start`` on its recorded input.

    ``inputs`` comes from ``capture_inputs`` over ``adapter.decoder_layers``; returns
    [copies * B, T, V] with the batch tiled ``copies`` times (copy-major).
    """
    return adapter.head(replay_hidden(adapter, inputs, start, copies=copies))


LOGITS_PER_CHUNK = 1 << 26     # 256 MB of float32 logits


def target_nll(adapter: MoEAdapter, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per batch row, with the LM head run only where there is a target.

    A classification prompt has one or two target tokens, so skipping the head elsewhere removes
    most of its cost (the head is about half of the embedded model's FLOPs)."""
    labels = labels.to(hidden.device)   # the last layer's device (a multi-GPU map puts the batch on the first)
    sel = labels[:, 1:] != -100                        # [B, T-1]
    h = hidden[:, :-1][sel]                            # [n, H]
    targets = labels[:, 1:][sel]
    # at most LOGITS_PER_CHUNK logits at once: ablation's batched masks put thousands of target
    # tokens through a 152k-entry head (Qwen3), 1.2 GB of logits and as much again for the softmax
    rows_per_chunk = max(1, LOGITS_PER_CHUNK // max(1, adapter.vocab_size))
    parts = []
    for a in range(0, len(h), rows_per_chunk):
        logits = adapter.head(h[a:a + rows_per_chunk]).float()                                 # [n', V]
        parts.append(torch.nn.functional.cross_entropy(logits, targets[a:a + rows_per_chunk].to(logits.device),
                                                       reduction="none"))
    if not parts:   # a batch without targets adds nothing (kept in the graph: gradient's backward runs on it)
        return hidden[:, :1, :1].float().sum((1, 2)) * 0.0
    nll = torch.cat(parts) if len(parts) != 1 else parts[0]
    rows = torch.arange(labels.shape[0])[:, None].expand_as(sel)[sel.cpu()]
    # summed on the CPU, in its order: CUDA's index_add_ adds repeated rows with atomics in a varying order,
    # so ablation's nll - base moved by ~1e-3 nats between runs of one --seed (differentiable all the same)
    return torch.zeros(labels.shape[0], dtype=nll.dtype).index_add_(0, rows, nll.cpu()).to(nll.device)


def replay_hidden(adapter: MoEAdapter, inputs: dict[int, tuple], start: int, *, copies: int = 1) -> torch.Tensor:
    """The last decoder layer's output [copies * B, T, H] when run from layer ``start``."""
    args, kwargs = inputs[start]
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    batch = hidden.shape[0]
    hidden = torch.cat([hidden] * copies) if copies > 1 else hidden
    for i in range(start, len(adapter.decoder_layers)):
        args, kwargs = inputs[i]
        # no KV cache: a replay must not append to the one the recording forward may have used
        kwargs = {k: (None if k in ("cache", "past_key_values", "past_key_value") else _tile(v, batch, copies))
                  for k, v in kwargs.items() if k != "hidden_states"}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        out = adapter.decoder_layers[i](hidden, *[_tile(a, batch, copies) for a in args[1:]], **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden
