"""Synthetic real-dimension checkpoints (models/synthetic.py): the layout is what save_pretrained
writes, the writer streams deterministic values, and moeguard's own loader and pruner read them.
Presets are exercised at tiny dimensions here; benchmarks/scale.py writes them at real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moeguard.errors import MoeguardError
from moeguard.models.synthetic import PRESETS, disk_layout, layers_for_size, preset_config, write_synthetic
from moeguard.testing import checkpoint_tensors

# each preset's dimensions shrunk, its routing (experts, top-k, normalization) kept where small enough
TINY = {
    "mixtral-8x7b": dict(vocab_size=4096, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=2),
    "qwen3-30b-a3b": dict(vocab_size=4096, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=16, num_experts_per_tok=4),
    "olmoe-1b-7b": dict(vocab_size=4096, hidden_size=32, intermediate_size=16, num_attention_heads=4,
                        num_key_value_heads=4, num_experts=16, num_experts_per_tok=4),
}


def _saved(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                s = h.get_slice(k)
                out[k] = (s.get_dtype(), tuple(s.get_shape()))
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_layout_is_what_save_pretrained_writes(name, tmp_path):
    cfg = preset_config(name, **TINY[name])
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path / "saved")
    planned = {t.name: (t.dtype, t.shape) for t in disk_layout(cfg)}
    assert planned == _saved(tmp_path / "saved")
    # the real dimensions are the preset's: per-expert tensors of the real expert width
    real = {t.name: t.shape for t in disk_layout(preset_config(name, layers=1))}
    widths = {"mixtral-8x7b": 14336, "qwen3-30b-a3b": 768, "olmoe-1b-7b": 1024}
    assert any(s == (widths[name], preset_config(name).hidden_size) for s in real.values())


def test_writes_deterministic_loadable_checkpoints(tmp_path):
    cfg = preset_config("olmoe-1b-7b", **TINY["olmoe-1b-7b"])
    rec = write_synthetic(tmp_path / "a", cfg, seed=3, max_shard_bytes=20_000)
    write_synthetic(tmp_path / "b", cfg, seed=3, chunk_bytes=100)    # one shard, tiny chunks
    write_synthetic(tmp_path / "c", cfg, seed=4)
    assert len(rec["shards"]) > 1 and (tmp_path / "a" / "model.safetensors.index.json").exists()
    assert rec["bytes"] == sum(t.nbytes for t in disk_layout(cfg))
    assert json.loads((tmp_path / "a" / "moeguard_synthetic.json").read_text())["seed"] == 3

    a, b, c = (checkpoint_tensors(tmp_path / x) for x in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)     # sharding and chunking change nothing
    w = "model.layers.0.mlp.experts.3.up_proj.weight"
    assert not torch.equal(a[w], c[w])                                          # the seed does
    assert torch.equal(a["model.norm.weight"], torch.ones_like(a["model.norm.weight"]))
    assert abs(float(a[w].float().std()) - cfg.initializer_range) < 0.3 * cfg.initializer_range
    # vanilla transformers and moeguard's loader read it; the embedded tokenizer is inside the vocabulary
    from moeguard.models.loading import load_model

    model, tok, _ = load_model(str(tmp_path / "a"))
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj[3].to(torch.bfloat16),
                       a["model.layers.0.mlp.experts.3.down_proj.weight"])
    ids = tok("def add(a, b): return a + b", return_tensors="pt")
    assert int(ids["input_ids"].max()) < cfg.vocab_size
    assert model(**ids).logits.shape[-1] == cfg.vocab_size


def test_streaming_pruner_reads_it(tmp_path):
    from moeguard.pruning.checkpoint import prune_checkpoint

    cfg = preset_config("mixtral-8x7b", **TINY["mixtral-8x7b"])
    write_synthetic(tmp_path / "src", cfg, max_shard_bytes=50_000)
    rec = prune_checkpoint(tmp_path / "src", tmp_path / "pruned", {0: [1, 6], 1: [0, 7]})
    assert rec["num_experts"] == 2
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert pruned.config.num_local_experts == 2
    src, out = checkpoint_tensors(tmp_path / "src"), checkpoint_tensors(tmp_path / "pruned")
    key = "model.layers.{}.block_sparse_moe.experts.{}.w1.weight"
    assert torch.equal(out[key.format(0, 1)], src[key.format(0, 6)])
    assert torch.equal(out[key.format(1, 0)], src[key.format(1, 0)]) and key.format(1, 2) not in out


def test_refusals_are_one_line(tmp_path):
    with pytest.raises(MoeguardError, match="unknown synthetic preset 'mixtral-8x7'.*did you mean mixtral-8x7b"):
        preset_config("mixtral-8x7")
    with pytest.raises(MoeguardError, match="layers is 0"):
        preset_config("olmoe-1b-7b", layers=0)
    cfg = preset_config("olmoe-1b-7b", **TINY["olmoe-1b-7b"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(MoeguardError, match=r"output .*out already exists"):
        write_synthetic(tmp_path / "out", cfg)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    with pytest.raises(MoeguardError, match="vocabulary has 100 ids, the tokenizer written with it 4096"):
        write_synthetic(tmp_path / "small", preset_config("olmoe-1b-7b", **{**TINY["olmoe-1b-7b"], "vocab_size": 100}))
    assert not (tmp_path / "small").exists()
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_layers_for_size():
    per = {n: sum(t.nbytes for t in disk_layout(preset_config("olmoe-1b-7b", layers=n, **TINY["olmoe-1b-7b"])))
           for n in (1, 2, 3, 4)}
    n = layers_for_size("olmoe-1b-7b", per[3] - 1, **TINY["olmoe-1b-7b"])
    assert n == 3 and per[n] >= per[3] - 1 > per[n - 1]


def test_loading_hands_freed_heap_back_where_the_libc_allows(tmp_path, monkeypatch):
    import ctypes

    from moeguard.models import loading

    cfg = preset_config("olmoe-1b-7b", **TINY["olmoe-1b-7b"])
    write_synthetic(tmp_path / "m", cfg)
    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(pad)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    loading.load_model(str(tmp_path / "m"))
    assert calls == [0]

    def missing(name):
        raise OSError("no libc here")
    monkeypatch.setattr(ctypes, "CDLL", missing)     # macOS, musl: nothing to trim, loading unaffected
    model, _, _ = loading.load_model(str(tmp_path / "m"))
    assert model.config.num_experts == 16
