"""Real-dimension checkpoints with synthetic weights, written by streaming (``benchmarks/scale.py``).

Every other number in moeguard comes from a 3.9 M-parameter model, where interpreter overhead
hides what dominates at real sizes. A checkpoint here has a real model's layer shapes (hidden
size, expert width, expert count, attention heads, vocabulary) but only a few layers and random
weights: it measures what capturing, attributing, pruning and re-aligning *cost* at real
dimensions, never what a method *finds*.

- **Layout**: the keys, shapes and dtypes ``save_pretrained`` writes for the family, from
  transformers' own save conversion (``revert_weight_conversion``) applied to the model built on
  the meta device: fused in-memory experts come out split per expert exactly as on the hub.
  ``tests/test_synthetic.py`` compares it with a saved tiny model of each preset's family.
- **Weights**: each tensor from its own seeded generator (the seed and the key's CRC-32), so a
  tensor's values do not depend on which others are written: matrices N(0, initializer_range),
  norm weights 1, biases 0. Written row chunk by row chunk (at most ``chunk_bytes`` of one tensor
  in memory), shard by shard, the index last, into a temporary folder renamed when complete.
- **Tokenizer**: the embedded model's (4,096 ids, inside every preset's vocabulary), so the
  embedded tasks tokenize as they do on the embedded model; the embedding and the head keep
  the real vocabulary's size, and with it their real cost.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeguard.errors import MoeguardError, suggest
from moeguard.io import dumps

# The real models' text-stack dimensions (their hub config.json), minus the layer count.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral-8x7b": ("mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "olmoe-1b-7b": ("olmoe", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def preset_config(name: str, *, layers: int = 2, dtype: str = "bfloat16", **overrides):
    """The config of preset ``name`` with ``layers`` decoder layers (every one MoE)."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise MoeguardError(f"unknown synthetic preset '{name}': {suggest(name, list(PRESETS))}",
                            hint=f"choose one of {sorted(PRESETS)}")
    if layers < 1:
        raise MoeguardError(f"layers is {layers}", hint="pass at least 1 layer")
    model_type, dims = PRESETS[name]
    return AutoConfig.for_model(model_type, **{**dims, "num_hidden_layers": layers, "dtype": dtype, **overrides})


@dataclass(frozen=True)
class Planned:
    """One tensor to write (``pruning.shards.write_safetensors`` reads these fields)."""

    name: str
    dtype: str              # safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int

    @property
    def out_name(self) -> str:
        return self.name


_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32"}


def disk_layout(config) -> list[Planned]:
    """(key, dtype, shape) of every tensor ``save_pretrained`` writes for ``config``, from the
    meta-device model through transformers' own save conversion; tied weights once."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    from moeguard.models.loading import model_class

    dtype = getattr(torch, str(getattr(config, "dtype", None) or "float32").replace("torch.", ""))
    with torch.device("meta"):
        model = model_class(config).from_config(config, dtype=dtype)
    shared = dict(model.named_parameters(remove_duplicate=False))
    unique = dict(model.named_parameters())
    state = {k: v for k, v in model.state_dict().items() if k in unique or k not in shared}
    out = []
    for key, t in sorted(revert_weight_conversion(model, state).items()):
        st = _ST_DTYPE.get(str(t.dtype).replace("torch.", ""))
        if st is None:
            raise MoeguardError(f"tensor {key} has dtype {t.dtype}, which the synthetic writer does not generate",
                                hint=f"use one of {sorted(_ST_DTYPE)}")
        out.append(Planned(key, st, tuple(t.shape), t.numel() * t.element_size()))
    return out


def layers_for_size(name: str, size_bytes: int, **overrides) -> int:
    """The fewest layers for which preset ``name`` in bf16 is at least ``size_bytes``."""
    one, two = (sum(t.nbytes for t in disk_layout(preset_config(name, layers=n, **overrides))) for n in (1, 2))
    per_layer = two - one
    return max(1, -(-(size_bytes - (one - per_layer)) // per_layer))


class _Generated:
    """Row chunks of synthetic tensors, as bytes (the reader ``write_safetensors`` expects)."""

    def __init__(self, *, seed: int, std: float, chunk_bytes: int):
        self.seed, self.std, self.chunk_bytes = seed, std, chunk_bytes

    def chunks(self, t: Planned):
        import torch

        dtype = getattr(torch, {v: k for k, v in _ST_DTYPE.items()}[t.dtype])
        leaf = t.name.rsplit(".", 1)[-1]
        kind = "bias" if leaf == "bias" or leaf.endswith("_bias") else \
            "norm" if len(t.shape) == 1 and "norm" in t.name else "normal"
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(t.name.encode())) % (1 << 63))
        rows, row_numel = (t.shape[0], math.prod(t.shape[1:])) if t.shape else (1, 1)
        step = max(1, self.chunk_bytes // max(1, row_numel * torch.empty((), dtype=dtype).element_size()))
        for a in range(0, rows, step):
            n = min(step, rows - a) * row_numel
            if kind == "bias":
                x = torch.zeros(n, dtype=dtype)
            elif kind == "norm":
                x = torch.ones(n, dtype=dtype)
            else:
                x = (torch.randn(n, generator=g) * self.std).to(dtype)
            yield x.view(torch.uint8).numpy()


def write_synthetic(out: str | Path, config, *, seed: int = 0, max_shard_bytes: int = 2 << 30,
                    chunk_bytes: int = 64 << 20, overwrite: bool = False, progress=None) -> dict[str, Any]:
    """Write a checkpoint of ``config`` with synthetic weights to ``out`` (module docstring);
    returns its record, also written to ``out/moeguard_synthetic.json``."""
    from moeguard.io import atomic_dir, check_output
    from moeguard.models.loading import EMBEDDED_MODEL_DIR
    from moeguard.pruning.shards import assign_shards, check_space, write_index, write_safetensors

    out = check_output(out, overwrite=overwrite)
    vocab = json.loads((EMBEDDED_MODEL_DIR / "config.json").read_text())["vocab_size"]
    if int(getattr(config, "vocab_size", 0) or 0) < vocab:
        raise MoeguardError(f"the config's vocabulary has {config.vocab_size} ids, the tokenizer written with it {vocab}",
                            hint=f"give the config a vocab_size of at least {vocab}")
    plan = disk_layout(config)
    total = sum(t.nbytes for t in plan)
    check_space(out, total)
    shards = assign_shards(plan, sharded=True, max_shard_bytes=max_shard_bytes)
    task = progress.add_task(f"writing synthetic {config.model_type}", total=total) if progress is not None else None
    advance = (lambda n: progress.advance(task, n)) if progress is not None else None
    reader = _Generated(seed=seed, std=float(getattr(config, "initializer_range", 0.02)), chunk_bytes=chunk_bytes)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name, tensors in shards:
            write_safetensors(tmp / name, tensors, reader, metadata={"format": "pt"}, advance=advance)
        write_index(tmp, shards, total)
        config.save_pretrained(tmp)
        for f in TOKENIZER_FILES:
            shutil.copy2(EMBEDDED_MODEL_DIR / f, tmp / f)
        record = {"model_type": config.model_type, "seed": seed, "dtype": str(config.dtype).replace("torch.", ""), "bytes": total,
                  "tensors": len(plan), "largest_tensor_bytes": max(t.nbytes for t in plan),
                  "shards": [name for name, _ in shards], "layers": config.num_hidden_layers,
                  "note": "synthetic weights: for measuring cost at real dimensions, not for any result about a model"}
        (tmp / "moeguard_synthetic.json").write_text(dumps(record, indent=2) + "\n")
    return record
