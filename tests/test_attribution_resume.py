"""An interrupted attribution resumes from the batches it finished: ``moeguard attribute`` keeps
them beside ``--out``, a study job in its own scratch folder, and a resumed run's scores equal an
uninterrupted run's bit for bit."""

from __future__ import annotations

import json

import pytest

from moeguard.cli import main

ARGS = ["attribute", "--task", "arith-compare", "--samples", "24", "--batch-size", "8"]   # 3 batches


def _counting(monkeypatch, *, stop_at: int | None):
    """kept_arrays, counting the terms asked for and those computed; KeyboardInterrupt at the
    ``stop_at``-th term asked for."""
    import moeguard.io as io

    asked, computed, real = [], [], io.kept_arrays

    def counting(folder, name, compute):
        asked.append(name)
        if stop_at is not None and len(asked) == stop_at:
            raise KeyboardInterrupt
        return real(folder, name, lambda: (computed.append(name), compute())[1])

    monkeypatch.setattr(io, "kept_arrays", counting)
    return asked, computed


@pytest.mark.parametrize("method, terms", [("ablation", 3), ("gradient", 3), ("ablation-screened", 6)])
def test_an_interrupted_attribute_resumes_from_its_finished_batches(tmp_path, monkeypatch, capsys, method, terms):
    assert main([*ARGS, "--method", method, "--out", str(tmp_path / "whole.json")]) == 0
    assert not (tmp_path / ".whole.json.partial").exists()          # gone once the scores are written
    asked, computed = _counting(monkeypatch, stop_at=2)
    capsys.readouterr()
    assert main([*ARGS, "--method", method, "--out", str(tmp_path / "cut.json")]) == 130
    err = capsys.readouterr().err
    kept = tmp_path / ".cut.json.partial"
    assert f"the batches scored so far are kept in {kept}" in err and "run the same command again" in err
    assert not (tmp_path / "cut.json").exists() and len(list(kept.glob("*.npz"))) == 1
    asked, computed = _counting(monkeypatch, stop_at=None)
    assert main([*ARGS, "--method", method, "--out", str(tmp_path / "cut.json")]) == 0
    assert len(asked) == terms and len(computed) == terms - 1    # the kept batch was read, not scored again
    whole, cut = (json.loads((tmp_path / f).read_text()) for f in ("whole.json", "cut.json"))
    assert cut["scores"] == whole["scores"] and not kept.exists()


def test_kept_batches_of_other_settings_are_not_reused(tmp_path, monkeypatch):
    _counting(monkeypatch, stop_at=3)
    assert main([*ARGS, "--method", "ablation", "--out", str(tmp_path / "s.json")]) == 130
    assert len(list((tmp_path / ".s.json.partial").glob("*.npz"))) == 2
    asked, computed = _counting(monkeypatch, stop_at=None)
    # another seed draws other calibration batches: every batch is scored afresh
    assert main([*ARGS, "--method", "ablation", "--seed", "1", "--out", str(tmp_path / "s.json")]) == 0
    assert len(computed) == 3
    _counting(monkeypatch, stop_at=2)
    assert main([*ARGS, "--method", "ablation", "--out", str(tmp_path / "t.json")]) == 130
    asked, computed = _counting(monkeypatch, stop_at=None)
    # gradient's terms are not ablation's, though both are [L, E] sums over the same batches
    assert main([*ARGS, "--method", "gradient", "--out", str(tmp_path / "t.json")]) == 0
    assert len(computed) == 3


def test_a_study_job_resumes_its_attribution_from_its_scratch_folder(tmp_path, monkeypatch):
    from moeguard.studies.engine import Job, LocalBackend, Runtime, run_jobs

    job = Job(stage="attribution", name="arith-compare", fn="moeguard.studies.common:attribution_job",
              args={"task": "arith-compare", "methods": ["ablation"], "samples": 24, "seed": 0})
    rt = Runtime(model=None, threads=1)
    whole = run_jobs([job], root=tmp_path / "a", runtime=rt, backend=LocalBackend())[0]
    _counting(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_jobs([job], root=tmp_path / "b", runtime=rt, backend=LocalBackend())
    [scratch] = (tmp_path / "b" / "attribution").glob(f".{job.key}-*.partial")
    assert len(list(scratch.glob("attribution/*.npz"))) == 2
    asked, computed = _counting(monkeypatch, stop_at=None)
    resumed = run_jobs([job], root=tmp_path / "b", runtime=rt, backend=LocalBackend())[0]
    assert len(asked) == 3 and len(computed) == 1
    assert resumed["ablation"]["scores"] == whole["ablation"]["scores"]
    assert not scratch.exists()                                    # the job's result is saved: its pieces go


MODE = {"fail": True}


def pieces(ctx, *, seed: int = 0) -> dict:
    """A job that keeps a piece in its scratch folder and fails, until MODE says to finish."""
    piece = ctx.scratch / "piece"
    seen = int(piece.read_text()) if piece.exists() else 0
    if not MODE["fail"]:
        return {"pieces_seen": seen}
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    piece.write_text(str(seen + 1))
    raise RuntimeError("stopped")


def test_a_job_s_scratch_folder_is_its_scope_s(tmp_path, monkeypatch):
    """Pieces kept under one model's weights are not handed to the same job on other weights; they
    go once the job's result is saved."""
    from moeguard.studies.engine import Job, LocalBackend, Runtime, run_jobs
    from moeguard.testing import tiny_model

    monkeypatch.setitem(MODE, "fail", True)
    for i, name in enumerate(("m1", "m2")):
        tiny_model("mixtral", seed=i).save_pretrained(tmp_path / name)
    job = Job(stage="s", name="pieces", fn="test_attribution_resume:pieces", args={})
    for name in ("m1", "m1", "m2"):
        with pytest.raises(RuntimeError, match="stopped"):
            run_jobs([job], root=tmp_path / "jobs", runtime=Runtime(model=str(tmp_path / name)), backend=LocalBackend())
    folders = (tmp_path / "jobs" / "s").glob(".*.partial")
    assert sorted((f / "piece").read_text() for f in folders) == ["1", "2"]   # m1's twice, m2's once
    monkeypatch.setitem(MODE, "fail", False)
    assert run_jobs([job], root=tmp_path / "jobs", runtime=Runtime(model=str(tmp_path / "m1")),
                    backend=LocalBackend())[0] == {"pieces_seen": 2}
    assert not list((tmp_path / "jobs" / "s").glob(".*.partial"))


def test_a_study_curve_killed_mid_curve_resumes_from_its_last_finished_round(tmp_path, monkeypatch, capsys):
    """A recovery curve job keeps its finished rounds (labels, score, trained weights) in its scratch
    folder: the rerun fine-tunes only the rounds left, and its curve equals an uninterrupted one."""
    import moeguard.realign.loop as loop
    from moeguard.studies.engine import untimed

    fast = ["--min-steps", "10", "--epochs", "1", "--eval-limit", "16", "--pool-size", "32"]
    args = ["recovery", "--task", "arith-compare", "--keep", "2", "--strategies", "margin", "--budgets", "4,8",
            "--seeds", "1", "--samples", "16", "--method", "frequency", *fast]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    calls, real = [], loop.finetune

    def counted(*a, **k):
        calls.append(1)
        if stop[0] and len(calls) == stop[0]:
            raise KeyboardInterrupt
        return real(*a, **k)

    stop = [4]   # random's two rounds, then margin's first; margin's second is interrupted
    monkeypatch.setattr(loop, "finetune", counted)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    [rounds] = (tmp_path / ".cut.partial" / "jobs" / "recovery").glob(".*.partial/rounds")
    assert len(json.loads((rounds / "loop.json").read_text())["rounds"]) == 2   # round 0 and 4 labels
    calls.clear()
    stop[0] = 0
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    assert len(calls) == 1                                         # margin's last round only
    whole, cut = (json.loads((tmp_path / f / "recovery.json").read_text()) for f in ("whole", "cut"))
    assert untimed(cut["curves"]) == untimed(whole["curves"]) and len(cut["curves"]) == 2
    assert not list((tmp_path / "cut" / "jobs" / "recovery").glob(".*.partial"))


def test_a_sweep_job_killed_half_way_resumes_from_its_kept_evaluations(tmp_path, monkeypatch, capsys):
    """The sweep job's masked evaluations are kept in its scratch folder as they finish: the rerun
    evaluates only those left, and the sweep equals an uninterrupted one (timings aside)."""
    import moeguard.pruning.evaluate as E
    from moeguard.studies.engine import untimed

    args = ["sweep", "--tasks", "arith-compare,record-summary", "--methods", "frequency", "--keep", "4",
            "--samples", "8", "--eval-limit", "8", "--collateral-limit", "8", "--random-seeds", "1",
            "--no-deletion-curves", "--physical-checks", "0"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    calls, real, stop = [], E.evaluate_task, [6]

    def counted(*a, **k):
        calls.append(1)
        if stop[0] and len(calls) == stop[0]:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(E, "evaluate_task", counted)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    # 5 evaluations ran: arith-compare's job finished (its 3 in its result file), record-summary's kept 2
    kept = list((tmp_path / ".cut.partial" / "jobs" / "sweep").glob(".*.partial/evaluations/eval-*.json"))
    assert len(kept) == 2
    calls.clear()
    stop[0] = 0
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    whole, cut = (json.loads((tmp_path / f / "sweep.json").read_text()) for f in ("whole", "cut"))
    assert whole["evaluations"]["run"] == 6 and len(calls) == 1    # the kept ones were read, not run again
    assert untimed(cut["points"]) == untimed(whole["points"]) and untimed(cut["random"]) == untimed(whole["random"])
    assert cut["evaluations"] == whole["evaluations"]


def test_only_results_json_holds_exactly_are_kept(tmp_path):
    """A NaN score is written as null, which a resumed run would read as another value: not kept."""
    from moeguard.pruning.evaluate import _Kept
    from moeguard.tasks.evaluate import TaskResult

    r = TaskResult(task="t", kind="classification", metric="accuracy", score=0.1 + 0.2, higher_is_better=True,
                   metrics={"accuracy": 0.1 + 0.2}, n_samples=3, split="validation", baseline={"majority": 0.5})
    k = _Kept(tmp_path / "a.json")
    k.write(r)
    assert k.read() == r and k.read().score == 0.1 + 0.2
    bad = _Kept(tmp_path / "b.json")
    bad.write(TaskResult(**{**r.__dict__, "score": float("nan")}))
    assert not bad.path.exists() and bad.read() is None
    (tmp_path / "c.json").write_text('{"task": "t"')                 # cut short: evaluated again
    assert _Kept(tmp_path / "c.json").read() is None
