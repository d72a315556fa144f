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
    import moeguard.kept as kept

    asked, computed, real = [], [], kept.kept_arrays

    def counting(folder, name, compute):
        if name.startswith("scores-"):   # a method's whole scores (kept around its terms): not a term
            return real(folder, name, compute)
        asked.append(name)
        if stop_at is not None and len(asked) == stop_at:
            raise KeyboardInterrupt
        return real(folder, name, lambda: (computed.append(name), compute())[1])

    monkeypatch.setattr(kept, "kept_arrays", counting)
    return asked, computed


def _stopping(real, calls: list, stop: list):
    """``real``, counting its calls in ``calls`` and interrupted (Ctrl-C) at the ``stop[0]``-th (0: never)."""
    def counted(*a, **k):
        calls.append(1)
        if stop[0] and len(calls) == stop[0]:
            raise KeyboardInterrupt
        return real(*a, **k)
    return counted


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
    # (terms told apart inside one folder, as a study job's holds several methods': the test below)


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
    calls, stop = [], [6]
    monkeypatch.setattr(E, "evaluate_task", _stopping(E.evaluate_task, calls, stop))
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


def test_the_merge_route_keeps_each_merged_point_and_calibrates_only_for_what_is_missing(tmp_path, monkeypatch):
    """The sweep job's merge route kept nothing: a kill in its evaluations merged, calibrated and
    evaluated every merged model again (calibration runs every expert on the task's tokens)."""
    import moeguard.studies.merge_route as R
    from moeguard.studies.engine import untimed

    args = ["sweep", "--tasks", "arith-compare,record-summary", "--methods", "frequency", "--keep", "4",
            "--samples", "8", "--eval-limit", "8", "--collateral-limit", "8", "--random-seeds", "1",
            "--no-deletion-curves", "--physical-checks", "0", "--route", "prune,merge", "--merge-methods", "average",
            "--merge-tokens", "32"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    evaluated, calibrated, stop = [], [], [3]
    real_profile = R.profile_model
    monkeypatch.setattr(R, "evaluate_task", _stopping(R.evaluate_task, evaluated, stop))
    monkeypatch.setattr(R, "profile_model", lambda *a, **k: (calibrated.append(1), real_profile(*a, **k))[1])
    # arith-compare's merge route: its point (the task and the collateral task) kept, killed in the random point
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    assert len(list((tmp_path / ".cut.partial" / "jobs" / "sweep").glob(".*.partial/evaluations/merge-*.json"))) == 2
    evaluated.clear(), calibrated.clear()
    stop[0] = 0
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    assert len(evaluated) == 1 + 3 and len(calibrated) == 2      # the random point, then record-summary's 3
    whole, cut = (json.loads((tmp_path / f / "sweep.json").read_text()) for f in ("whole", "cut"))
    for part in ("points", "random"):
        assert untimed(cut["merge"][part]) == untimed(whole["merge"][part])
    assert untimed(cut["merge"]["calibration"]) == untimed(whole["merge"]["calibration"])


def test_the_attack_s_merge_candidates_are_kept_and_read_back_as_they_were(tmp_path, monkeypatch):
    import dataclasses

    import moeguard.studies.merge_route as R
    from moeguard.attribution.run import make_context, score
    from moeguard.models.loading import load_model
    from moeguard.tasks.registry import get_task

    m, tok, _ = load_model(None)
    t = get_task("arith-compare")
    scores = {"frequency": score(make_context(m, tok, t, samples=8), "frequency")}
    args = dict(keep=4, merge_methods=("average", "frequency-weighted"), samples=8, eval_limit=8, seed=0, full_score=0.9)
    plain = R.attack_candidates(m, tok, t, scores, **args)
    first = R.attack_candidates(m, tok, t, scores, **args, kept=tmp_path)
    assert len(list(tmp_path.glob("merge-*.json"))) == 2
    monkeypatch.setattr(R, "merge_model", lambda *a, **k: pytest.fail("merged again"))
    monkeypatch.setattr(R, "profile_model", lambda *a, **k: pytest.fail("calibrated again"))
    again = R.attack_candidates(m, tok, t, scores, **args, kept=tmp_path)
    from moeguard.studies.engine import untimed

    bare = lambda pairs: [(json.loads(json.dumps(c)), untimed(dataclasses.asdict(r))) for c, r in pairs]  # noqa: E731
    assert bare(plain) == bare(first) and first == again     # read back with the time it took
    with pytest.raises(pytest.fail.Exception):   # another keep: merged afresh
        R.attack_candidates(m, tok, t, scores, **{**args, "keep": 3}, kept=tmp_path)


def test_a_kept_calibration_cost_is_read_without_calibrating(tmp_path, monkeypatch):
    import moeguard.studies.merge_route as R

    monkeypatch.setattr(R, "profile_model", lambda *a, **k: ({}, {"forward_passes": 3}))
    first = R._Calibration(None, [], adapter=None, tokens=8, seed=0, keep=tmp_path, key=["t"])
    assert first.profiles() == ({}, {"forward_passes": 3})
    monkeypatch.setattr(R, "profile_model", lambda *a, **k: pytest.fail("calibrated again"))
    assert R._Calibration(None, [], adapter=None, tokens=8, seed=0, keep=tmp_path, key=["t"]).cost() == {"forward_passes": 3}
    with pytest.raises(pytest.fail.Exception):   # other settings: not read
        R._Calibration(None, [], adapter=None, tokens=9, seed=0, keep=tmp_path, key=["u"]).cost()


def test_the_sweep_s_physical_checks_are_kept_as_they_finish(tmp_path, monkeypatch):
    import moeguard.studies.sweep as S
    from moeguard.models.loading import load_model
    from moeguard.pruning.evaluate import MaskedEvaluator
    from moeguard.tasks.registry import get_task

    m, tok, _ = load_model(None)
    cfg = S.SweepConfig(tasks=["arith-compare"], methods=["frequency"], keeps=[4], eval_limit=8, physical_checks=2)
    plans = [{str(l): [0, 1, 2, 3] for l in range(4)}, {str(l): [4, 5, 6, 7] for l in range(4)}]
    points = [{"task": "arith-compare", "method": f"m{i}", "keep": 4, "plan": plan, "score": 0.5, "params": 1}
              for i, plan in enumerate(plans)]
    run = lambda keep: S._physical_checks(m, tok, cfg, [get_task("arith-compare")], points,  # noqa: E731
                                          MaskedEvaluator(m, tok, keep=keep), None)
    plain, first = run(None), run(tmp_path)
    assert len(list(tmp_path.glob("physical-*.json"))) == 2 and plain == first
    monkeypatch.setattr(S, "prune_model", lambda *a, **k: pytest.fail("pruned again"))
    assert run(tmp_path) == first
    points[0]["score"] = 0.25                              # another point: checked afresh
    with pytest.raises(pytest.fail.Exception):
        run(tmp_path)


def test_only_results_json_holds_exactly_are_kept(tmp_path):
    """A NaN score is written as null, which a resumed run would read as another value: not kept."""
    from moeguard.pruning.evaluate import _Kept
    from moeguard.tasks.evaluate import TaskResult

    r = TaskResult(task="t", kind="classification", metric="accuracy", score=0.1 + 0.2, higher_is_better=True,
                   metrics={"accuracy": 0.1 + 0.2}, n_samples=3, split="validation", baseline={"majority": 0.5})
    k = _Kept(tmp_path, ["plan a", 32])
    k.write(r)
    assert k.read() == r and k.read().score == 0.1 + 0.2
    assert _Kept(tmp_path, ["plan b", 32]).read() is None              # another key: not this result
    bad = _Kept(tmp_path / "nan", ["plan a", 32])
    bad.write(TaskResult(**{**r.__dict__, "score": float("nan")}))
    assert not (tmp_path / "nan").exists() and bad.read() is None
    k.doc.path.write_text('{"key": "')                              # cut short: evaluated again
    assert k.read() is None


def test_the_loop_keeps_trained_weights_only_where_something_reads_them(tmp_path, monkeypatch):
    """Round 0's weights are the model's own, and after the last round only ``after`` (or a caller
    keeping the trainable) reads them: a one-round curve wrote a whole model's weights twice, unread.
    A curve resumed from such a state still equals an uninterrupted one."""
    import moeguard.realign.loop as loop
    from moeguard.models.loading import load_model
    from moeguard.realign.engine import FinetuneConfig
    from moeguard.studies.engine import untimed

    m, tok, _ = load_model(None)
    saves, real_save = [], loop._save_state
    monkeypatch.setattr(loop, "_save_state", lambda d, s, t, *, save_weights: (
        saves.append(save_weights), real_save(d, s, t, save_weights=save_weights))[1])

    def curve(schedule, state, **kw):
        cfg = loop.ALConfig(strategy="margin", schedule=schedule, pool_size=32, eval_limit=8, seed=0,
                            finetune=FinetuneConfig(mode="lora", min_steps=2, epochs=1, seed=0))
        return loop.run_active_learning(m, tok, "arith-compare", cfg, state_dir=state, **kw)[0]

    whole = curve((4, 8), tmp_path / "a")
    # round 0; round 1's pick (no weights), round 1; round 2's pick, round 2
    assert saves == [False, False, True, False, False]
    saves.clear()
    curve((4,), tmp_path / "b")
    assert saves == [False, False, False] and not (tmp_path / "b" / "current.safetensors").exists()
    saves.clear()
    curve((4,), tmp_path / "c", after=lambda trained: {"seen": True})
    assert saves == [False, False, True] and (tmp_path / "c" / "current.safetensors").exists()
    calls, real_ft = [], loop.finetune

    def stopped(*a, **k):
        calls.append(1)
        if len(calls) == stop[0]:
            raise KeyboardInterrupt
        return real_ft(*a, **k)

    # killed in round 2 (round 1's weights kept), and in round 1 (round 0 kept, no weights: the model's own)
    for stop, folder in (([2], "d"), ([1], "e")):
        calls.clear()
        monkeypatch.setattr(loop, "finetune", stopped)
        with pytest.raises(KeyboardInterrupt):
            curve((4, 8), tmp_path / folder)
        monkeypatch.setattr(loop, "finetune", real_ft)
        resumed = curve((4, 8), tmp_path / folder)
        assert untimed(resumed["points"]) == untimed(whole["points"]) and len(resumed["points"]) == 3


def test_terms_kept_in_one_folder_are_told_apart_by_method_key_options_and_batch(tmp_path):
    """A study job's folder holds the terms of every method it runs: each is named by its label,
    its key (the screened experts), the context's options and the batch's own tokens."""
    import torch

    from moeguard.attribution.context import Context
    from moeguard.tasks.batches import Batch

    def batch(v):
        ids = torch.full((1, 3), v)
        return Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())

    def ctx(batches, **options):
        return Context(model=None, tokenizer=None, adapter=None, task=None, batches=batches, keep=tmp_path,
                       options=options)

    seen = []

    def term(value):
        return lambda b: (seen.append(value), torch.full((2,), float(value), dtype=torch.float64))[1]

    base = ctx([batch(1), batch(2)])
    assert base.batch_sum("ablation", term(1), shape=(2,), key={0: [1]}).tolist() == [2.0, 2.0]
    assert base.batch_sum("ablation", term(9), shape=(2,), key={0: [1]}).tolist() == [2.0, 2.0]   # kept
    assert base.batch_sum("gradient", term(3), shape=(2,)).tolist() == [6.0, 6.0]
    assert base.batch_sum("ablation", term(4), shape=(2,), key={0: [2]}).tolist() == [8.0, 8.0]
    assert ctx([batch(1), batch(2)], masks_per_pass=2).batch_sum("ablation", term(5), shape=(2,),
                                                                key={0: [1]}).tolist() == [10.0, 10.0]
    # another batch at the same index is not the kept one
    assert ctx([batch(1), batch(7)]).batch_sum("ablation", term(6), shape=(2,), key={0: [1]}).tolist() == [7.0, 7.0]
    assert seen == [1, 1, 3, 3, 4, 4, 5, 5, 6]


def test_scratch_folders_no_job_will_finish_are_removed(tmp_path):
    """A finished job's scratch goes when its result is found (a kill between the two left it), and
    once a study is done every scratch folder left in its stages goes (a job whose key changed since a
    killed run: its fine-tuned weights sat in a hidden folder for good)."""
    from moeguard.studies import Phase, run_studies
    from moeguard.studies.engine import Job, LocalBackend, Runtime, run_jobs

    job = Job(stage="s", name="x=2", fn="test_study_engine:square", args={"x": 2})
    rt, root = Runtime(model=None, threads=1), tmp_path / "jobs"
    run_jobs([job], root=root, runtime=rt, backend=LocalBackend())
    left = root / "s" / f".{job.key}-0123456789abcdef.partial"
    left.mkdir()
    run_jobs([job], root=root, runtime=rt, backend=LocalBackend())      # its result is read: the folder goes
    assert not left.exists()

    class One:
        name = "one"

        def plan(self, cfg):
            yield Phase("p", [job])

        def reduce(self, cfg, results):
            return results

    stale, other = root / "s" / ".feedfacefeedface-0123456789abcdef.partial", root / "t" / ".x-y.partial"
    stale.mkdir(parents=True), other.mkdir(parents=True)
    run_studies([(One(), None)], jobs=root, runtime=rt, backend=LocalBackend())
    assert not stale.exists() and other.exists()                        # only the stages the study ran


def test_the_scan_s_ablation_screen_and_chains_resume_from_their_finished_pieces(tmp_path, monkeypatch):
    """The scan's usage part (every task's exact ablation) and its effects part (the screen of each benign
    context, the chains of each expert) keep their finished pieces (run.py gives them its partial folder:
    docs/scan.md): killed part-way, each resumes from them to the arrays of an uninterrupted run."""
    import numpy as np

    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.loading import load_model
    from moeguard.scan.effects import chains, screen
    from moeguard.scan.usage import usage_and_criticality
    from moeguard.tasks.registry import get_task

    m, tok, _ = load_model(None)
    adapter = MoEAdapter(m)
    tasks = [get_task("arith-compare")]
    contexts = [tok("The function returns")["input_ids"], tok("Answer the question")["input_ids"]]
    tokens = np.arange(100, 140)
    starts = {(s, e): np.array([101 + e, 120 + s]) for s in range(2) for e in range(8)}

    pieces = {   # each loop, and what an uninterrupted run's arrays are
        "ablation": lambda keep: usage_and_criticality(m, tok, tasks, samples=16, seed=0, keep=keep)["arith-compare"]
        ["criticality"],
        "screen": lambda keep: np.stack(screen(m, adapter, contexts, tokens, batch=16, keep=keep)),
        "chains": lambda keep: (lambda found: np.stack([found[k]["gains"] for k in starts]))(
            chains(m, adapter, contexts, starts, length=2, keep=keep))}
    for name, run in pieces.items():   # killed at its second piece (a batch, a context, an expert's chains)
        whole = run(None)
        _counting(monkeypatch, stop_at=2)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / name)
        asked, computed = _counting(monkeypatch, stop_at=None)
        assert np.array_equal(run(tmp_path / name), whole), name
        assert len(computed) == len(asked) - 1 and len(asked) == {"ablation": 2, "screen": 2, "chains": 16}[name]


def test_the_merge_route_s_recovery_keeps_its_ablation_batches(tmp_path, monkeypatch):
    """``recovery --route merge`` scores its method in the prepare job as the pruning route does,
    and keeps the finished batches there too (it ran the whole ablation again on a resume)."""
    args = ["recovery", "--task", "arith-compare", "--keep", "2", "--strategies", "random", "--budgets", "4",
            "--seeds", "1", "--samples", "16", "--method", "ablation", "--route", "merge", "--merge-method", "average",
            "--min-steps", "2", "--epochs", "1", "--eval-limit", "8", "--pool-size", "16", "--out", str(tmp_path / "r")]
    _counting(monkeypatch, stop_at=2)
    assert main(args) == 130
    asked, computed = _counting(monkeypatch, stop_at=None)
    assert main(args) == 0
    assert len(asked) == 2 and len(computed) == 1



def test_a_torn_kept_original_is_scored_again_not_a_traceback(tmp_path):
    """A power loss can leave the kept shares empty beside the JSON that names them (a SafetensorError
    at every rerun); a kept plan or score of other settings is not read."""
    import torch

    from moeguard.realign.api import _OriginalKept

    kept = _OriginalKept(tmp_path / "out", {"a": 1})
    kept.write(0.1 + 0.2, torch.arange(4, dtype=torch.float32))
    score, shares = kept.read()
    assert score == 0.1 + 0.2 and shares.dtype == torch.float32 and torch.equal(shares, torch.arange(4.0))
    assert _OriginalKept(tmp_path / "out", {"a": 2}).read() == (None, None)
    [f] = kept.folder.glob(".original-*.npz")
    f.write_bytes(f.read_bytes()[:20])                               # cut short by a power loss
    assert kept.read() == (None, None)
    kept.write(float("nan"), None)                                   # nothing JSON-exact to keep: not kept
    assert kept.read() == (None, None)
    kept.drop()
    assert not kept.folder.exists()


def test_a_finished_method_s_scores_are_kept_whole_and_not_scored_again(tmp_path, monkeypatch):
    """A pick job (or `attribute`) killed in a later method scored the earlier ones again: the cheap
    ones are a pass over the calibration set each, reconstruction a search."""
    import dataclasses

    import moeguard.attribution.run as run
    from moeguard.attribution.run import make_context, score
    from moeguard.models.loading import load_model

    m, tok, _ = load_model(None)
    # reap first: its capture (norms) is not the plain one frequency reads, which a skipped reap would
    # have left uncaptured; reconstruction's token cut is said on the resumed run too
    names, opts = ("reap", "frequency", "reconstruction"), {"reconstruction_tokens": 5}
    context = lambda **kw: make_context(m, tok, "arith-compare", samples=8, options=opts, **kw)  # noqa: E731
    with pytest.warns(UserWarning, match="reconstruction: 5 of"):
        plain, kept = (dict((n, score(c, n)) for n in names) for c in (context(), context(keep=tmp_path)))
    assert sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.glob(".scores-*.npz")) == [
        ".scores-frequency", ".scores-reap", ".scores-reconstruction"]
    real = run.get_method

    def unrun(name):
        if name == "frequency" and not list(tmp_path.glob(".scores-frequency-*")):   # killed in it: scored
            return real(name)
        return dataclasses.replace(real(name), fn=lambda ctx: pytest.fail(f"{name} was scored again"))

    monkeypatch.setattr(run, "get_method", unrun)
    [frequency] = tmp_path.glob(".scores-frequency-*")
    frequency.unlink()                                  # as if killed while scoring frequency
    with pytest.warns(UserWarning, match="reconstruction: 5 of"):
        again = {n: score(context(keep=tmp_path), n) for n in names}
    bare = lambda s: {k: v for k, v in s.to_dict().items() if k != "seconds"}  # noqa: E731
    for n in names:
        assert bare(again[n]) == bare(kept[n]) == bare(plain[n]) and again[n].scores.equal(plain[n].scores)
    for n in ("reap", "reconstruction"):
        assert again[n].seconds == kept[n].seconds      # the time the method took, not the read's
    assert plain["reconstruction"].subsets and again["reconstruction"].subsets == plain["reconstruction"].subsets
    # other calibration batches (another seed): scored afresh
    with pytest.raises(pytest.fail.Exception, match="reap was scored again"):
        score(context(seed=1, keep=tmp_path), "reap")
