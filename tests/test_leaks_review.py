"""From a read-only review of cleanup: the study engine's model cache is keyed by the files as they
are (a checkpoint rewritten in place between two studies of one process was handed out as cached),
and a study run from Python (run_local) leaves no model held after it."""

from __future__ import annotations

import os
import shutil

from moeguard.models.loading import EMBEDDED_MODEL_DIR
from moeguard.studies.engine import Context, Runtime


def test_a_checkpoint_rewritten_in_place_is_loaded_again(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(EMBEDDED_MODEL_DIR, ckpt)
    ctx = Context(Runtime(model=str(ckpt)))
    try:
        first, _ = ctx.model()
        assert ctx.model()[0] is first   # cached while the files stay as they were
        weights = next(ckpt.glob("*.safetensors"))
        st = weights.stat()
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # rewritten (prune --overwrite)
        assert ctx.model()[0] is not first
    finally:
        Context.release()


def test_run_local_leaves_no_model_held():
    from moeguard.studies.builtin import STUDIES
    from moeguard.studies.sweep import SweepConfig, SweepStudy, SweepStudyConfig

    assert "sweep" in STUDIES.names()
    cfg = SweepStudyConfig(sweep=SweepConfig(tasks=["arith-compare"], methods=["frequency"], keeps=[2], samples=8,
                                             eval_limit=8, random_seeds=1),
                           references={"arith-compare": None})
    from moeguard.studies import run_local

    run_local(SweepStudy(), cfg, threads=1)
    assert Context._models == {} and Context._derived == {}


def test_a_failure_before_training_puts_the_models_flags_back(monkeypatch, tmp_path):
    """harden set every requires_grad before restoring its saved state, and realign applied its mode
    before copying the weights, both outside the try that undoes them: an error there (the moments
    restored onto a full GPU, host memory for the copy) left a library caller's model changed."""
    import pytest
    import torch

    from moeguard import trainstate
    from moeguard.defense.harden import config_for, harden
    from moeguard.models.loading import load_model
    from moeguard.realign import modes
    from moeguard.realign.engine import FinetuneConfig
    from moeguard.realign.loop import ALConfig, run_active_learning

    model, tok, _ = load_model(None)
    for n, p in model.named_parameters():
        p.requires_grad_("experts" in n)
    before = {n: p.requires_grad for n, p in model.named_parameters()}

    def fail(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(trainstate, "load", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        harden(model, tok, config_for("selective", steps=1, tasks=("arith-compare",)), checkpoint=tmp_path / "s")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    monkeypatch.setattr(modes.Trainable, "state", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_active_learning(model, tok, "arith-compare", ALConfig(strategy="random", schedule=(8,), pool_size=16,
                                                                    eval_limit=8, finetune=FinetuneConfig(mode="router")))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not any(isinstance(m, torch.nn.Module) and type(m).__module__.startswith("peft") for m in model.modules())


def test_a_refusal_inside_a_resumable_block_leaves_no_stamp_only_folder(tmp_path, monkeypatch, capsys):
    """kept_progress removed a .OUT.partial holding only its settings stamp on an interrupt, not on a
    one-line refusal (a load failure, a log monitor score refuses after the block opened)."""
    from moeguard.cli import main
    from moeguard.errors import MoeguardError
    from moeguard.models.handle import ModelHandle

    def refuse(*a, **k):
        raise MoeguardError("the weights cannot be read", hint="check them")

    monkeypatch.setattr(ModelHandle, "load", refuse)
    assert main(["eval", "--tasks", "arith-compare", "--limit", "4", "--out", str(tmp_path / "r.json")]) == 2
    assert "the weights cannot be read" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
