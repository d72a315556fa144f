"""From a read-only review of models/: a model whose logits are scaled past its LM head is refused by
the methods that score through the head, an unreadable weight file is one line, and running out of
memory while loading says so (its hint was to fix config.json)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from moeguard.errors import MoeguardError


def test_methods_that_score_through_the_head_refuse_a_model_that_scales_its_logits():
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.hooks import check_head
    from moeguard.testing import tiny_model

    model = tiny_model("mixtral").eval()
    ids = torch.arange(1, 9)[None]
    adapter = MoEAdapter(model)
    check_head(model, adapter, ids)   # final norm, LM head: as the model computes
    assert adapter._head_checked
    # what Cohere2-MoE's forward does after its LM head (logit_scale 0.0625), which adapter.head lacks
    model.register_forward_hook(lambda mod, args, out: out.__class__(logits=out.logits * 0.0625))
    with pytest.raises(MoeguardError, match="logits are not its final norm and LM head"):
        check_head(model, MoEAdapter(model), ids)


def test_ablation_refuses_a_scaled_head_before_scoring(monkeypatch):
    from moeguard.attribution.run import make_context, score
    from moeguard.models.loading import load_model

    model, tok, _ = load_model(None)
    model.register_forward_hook(lambda mod, args, out: out.__class__(logits=out.logits * 0.0625))
    ctx = make_context(model, tok, "arith-compare", samples=4, batch_size=4)
    for method in ("ablation", "gradient"):
        with pytest.raises(MoeguardError, match="methods that score through the head would measure another function"):
            score(ctx, method)


def test_an_unreadable_weight_file_or_index_is_one_line(tmp_path, monkeypatch):
    from moeguard.models.safetensorsfiles import check_safetensors, safetensors_files

    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-1.safetensors"}}')
    (tmp_path / "model-1.safetensors").write_bytes(b"x" * 16)
    real = Path.read_text

    def denied(self, *a, **k):   # what mode 000 gives a user who is not root
        if self.name.endswith(".json"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(MoeguardError, match=r"cannot read .*index.json \(Permission denied\)"):
        safetensors_files(tmp_path)
    import builtins

    real_open = builtins.open

    def no_open(file, *a, **k):
        if str(file).endswith(".safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", no_open)
    with pytest.raises(MoeguardError, match=r"cannot read .*model-1.safetensors \(Permission denied\)"):
        check_safetensors(tmp_path / "model-1.safetensors")


def test_out_of_memory_while_loading_names_memory_not_the_config(monkeypatch):
    import transformers

    from moeguard.models.loading import load_model

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", oom)
    with pytest.raises(MoeguardError) as e:
        load_model(None)
    said = e.value.one_line()
    assert "out of memory" in said and "--device-map auto" in said and "config.json" not in said, said
