"""The study engine's cache: a finished job is reused only for the same arguments *and* the same
model weights, dtype and task definitions (its scope)."""

from __future__ import annotations

import os

from moeguard.studies.engine import Job, LocalBackend, Runtime, run_jobs

CALLS: list[int] = []


def square(ctx, *, x: int, seed: int = 0) -> dict:
    CALLS.append(x)
    return {"y": x * x}


def test_jobs_are_reused_in_their_scope_and_rerun_when_the_weights_change(tmp_path):
    from moeguard.testing import tiny_model

    model = tmp_path / "m"
    tiny_model("mixtral").save_pretrained(model)
    jobs = [Job(stage="s", name=f"x={x}", fn="test_study_engine:square", args={"x": x}) for x in (2, 3)]
    rt = Runtime(model=str(model), threads=1)
    CALLS.clear()
    assert [r["y"] for r in run_jobs(jobs, root=tmp_path / "jobs", runtime=rt, backend=LocalBackend())] == [4, 9]
    assert run_jobs(jobs, root=tmp_path / "jobs", runtime=Runtime(model=str(model), threads=2),
                    backend=LocalBackend()) and CALLS == [2, 3]          # threads do not change the scope
    run_jobs(jobs, root=tmp_path / "jobs", runtime=Runtime(model=str(model), dtype="bfloat16", threads=1),
             backend=LocalBackend())
    assert CALLS == [2, 3, 2, 3]                                         # another dtype: run again
    weights = model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, (st.st_atime, st.st_mtime + 5))                   # new weights at the same path
    run_jobs(jobs, root=tmp_path / "jobs", runtime=rt, backend=LocalBackend())
    assert CALLS == [2, 3, 2, 3, 2, 3]
