"""From a read-only review of cleanup: the study engine's model cache is keyed by the files as they
are (a checkpoint rewritten in place between two studies of one process was handed out as cached),
and a study run from Python or a command leaves no model held after it."""

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
