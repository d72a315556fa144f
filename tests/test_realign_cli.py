"""`moeguard realign` and `moeguard recovery` end to end on the embedded model (the acceptance)."""

import json

import pytest

from moeguard.cli import main
from moeguard.testing import kill_cli_when
from moeguard.analysis import auc as curve_auc, labels_to_target, savings
from moeguard.studies.recoverysummary import summarize

KEEP2 = {"keep": {str(l): [0, 1] for l in range(4)}}
FAST = ["--min-steps", "30", "--epochs", "1", "--eval-limit", "32", "--pool-size", "64"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    d = tmp_path_factory.mktemp("pruned")
    plan = d / "plan.json"
    plan.write_text(json.dumps(KEEP2))
    assert main(["prune", "--plan", str(plan), "--out", str(d / "keep2")]) == 0
    return d / "keep2"


def realign_args(pruned, out, *extra):
    return ["realign", "--model", str(pruned), "--task", "arith-compare", "--budget", "24", "--query-size", "8",
            "--save-every", "5", "--out", str(out), *FAST, *extra]


def test_realign_writes_a_loadable_checkpoint_and_its_learning_curve(pruned, tmp_path):
    out = tmp_path / "run"
    assert main(realign_args(pruned, out, "--strategy", "orphan")) == 0
    curve = json.loads((out / "learning_curve.json").read_text())
    assert [p["labels"] for p in curve["points"]] == [0, 8, 16, 24]
    picked = [i for p in curve["points"] for i in p["selected"]]
    assert len(picked) == len(set(picked)) == 24
    # the original (the pruning record's source) gives retention; orphan needed it too
    assert curve["full_score"] > 0
    assert all(p["retention"] == pytest.approx(100 * p["score"] / curve["full_score"]) for p in curve["points"])
    assert not (out / "state").exists() and (out / "moeguard_pruning.json").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == 2
    from moeguard.tasks.evaluate import evaluate_task
    from transformers import AutoTokenizer

    score = evaluate_task(model, AutoTokenizer.from_pretrained(out), "arith-compare", limit=32, baseline=False).score
    assert score == pytest.approx(curve["points"][-1]["score"])


def test_realign_lora_saves_merged_weights(pruned, tmp_path):
    out = tmp_path / "lora"
    assert main(realign_args(pruned, out, "--mode", "lora", "--budget", "8")) == 0
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())
    # merged into the model's own tensors: the same names, the adapted ones changed, the rest not
    import torch
    from safetensors.torch import load_file

    before, after = load_file(str(pruned / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(after) == set(before)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and not any("norm" in n or "embed" in n for n in changed), sorted(changed)


def test_killed_realign_resumes_to_the_same_result(pruned, tmp_path):
    straight = tmp_path / "straight"
    assert main(realign_args(pruned, straight, "--seed", "5")) == 0
    out = tmp_path / "killed"
    state = tmp_path / ".killed.partial" / "state"

    def in_round_two() -> bool:  # inside round 2's fine-tune, after one of its checkpoints
        loop = state / "loop.json"
        if not (loop.exists() and (state / "finetune" / "state.json").exists()):
            return False
        try:
            return len(json.loads(loop.read_text())["rounds"]) >= 2
        except ValueError:
            return False

    kill_cli_when(realign_args(pruned, out, "--seed", "5"), in_round_two)
    assert not out.exists() and state.exists()
    # the fine-tune was another commit's: the curve's run record (made before the run) lists its state
    from moeguard import provenance

    meta = state / "finetune" / "state.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "made_by": [{**provenance.maker(), "git_commit": "0" * 40}]}))
    try:
        with pytest.warns(UserWarning, match="finetune was kept by another version: commit 0000"):
            assert main(realign_args(pruned, out, "--seed", "5")) == 0
    finally:
        provenance.start_command()
    a = json.loads((straight / "learning_curve.json").read_text())
    b = json.loads((out / "learning_curve.json").read_text())
    assert [g["what"] for g in b["run"]["reused"]] == [[str(state / "finetune")]]   # the partial was this version's
    assert [p["score"] for p in b["points"]] == [p["score"] for p in a["points"]]
    assert [p["selected"] for p in b["points"]] == [p["selected"] for p in a["points"]]
    assert any(p.get("finetune", {}).get("resumed_from", 0) > 0 for p in b["points"]), "nothing was resumed"
    # the weights too, not only the scores a small eval set gives them
    from safetensors.torch import load_file

    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_a_resumed_realign_does_not_score_the_original_again(pruned, tmp_path, monkeypatch, capsys):
    """The original's score and the orphan strategy's shares are kept beside --out until the run is in
    place: a rerun after a kill loads the pruned model only (the original is the larger one)."""
    import moeguard.realign.loop as loop
    from moeguard.edge import ModelHandle

    args = lambda out: realign_args(pruned, out, "--strategy", "orphan", "--budget", "16")  # noqa: E731
    assert main(args(tmp_path / "straight")) == 0
    assert not (tmp_path / ".straight.original").exists()
    calls, real = [], loop.finetune

    def second_killed(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(loop, "finetune", second_killed)
        assert main(args(tmp_path / "cut")) == 130
    kept = tmp_path / ".cut.original"
    assert len(list(kept.glob(".original-*.npz"))) == 1                  # the score and the shares
    loads, load = [], ModelHandle.load
    with monkeypatch.context() as mp:
        mp.setattr(ModelHandle, "load", lambda self, **k: (loads.append(self.name), load(self, **k))[1])
        assert main(args(tmp_path / "cut")) == 0
    assert loads == [str(pruned)] and not kept.exists()
    # one run at a time: a second run to the same --out is refused before it reads or replaces what is kept
    from moeguard.kept import held_for

    capsys.readouterr()
    with held_for(tmp_path / "cut2"):
        assert main(args(tmp_path / "cut2")) == 2
    err = capsys.readouterr().err
    assert f"another moeguard run is writing {tmp_path / 'cut2'}" in err and err.count("\n") == 1
    a, b = (json.loads((tmp_path / x / "learning_curve.json").read_text()) for x in ("straight", "cut"))
    assert b["full_score"] == a["full_score"]
    assert [p["selected"] for p in b["points"]] == [p["selected"] for p in a["points"]]
    assert [p["score"] for p in b["points"]] == [p["score"] for p in a["points"]]


def test_bad_requests_fail_with_one_line_before_work(pruned, tmp_path, capsys, monkeypatch):
    from moeguard.models.handle import ModelHandle

    monkeypatch.setattr(ModelHandle, "load", lambda *a, **k: pytest.fail("the weights loaded"))   # before work

    def refused(argv, needle):
        code, err = main(argv), capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("moeguard: error:"), err   # one line
        assert needle in lines[0], lines[0]

    out = tmp_path / "x"
    refused(realign_args(pruned, out, "--budget", "100"), "larger than a pool of 64")
    refused(realign_args(pruned, out, "--query-size", "0"), "Invalid value for '--query-size'")
    refused(realign_args(pruned, out, "--strategy", "margin", "--task", "stdlib-docs"), "applies to classification")
    data = tmp_path / "data"
    data.mkdir()
    (data / "v.jsonl").write_text('{"q": "a", "y": "p"}\n{"q": "b", "y": "n"}\n')
    task = tmp_path / "nolabels.yaml"
    task.write_text(f"name: nolabels\nkind: classification\nsource: {{type: local, path: {data}, files: {{validation: v.jsonl}}}}\n"
                    "splits: {eval: validation}\nfields: {input: q, label: y}\nlabels: {p: ' yes', n: ' no'}\n")
    refused(realign_args(pruned, out, "--task", str(task)), "no train split, so there are no labels")
    assert not out.exists()


def test_recovery_study_json_has_curves_targets_and_savings(tmp_path, capsys):
    out = tmp_path / "rec"
    args = ["recovery", "--task", "arith-compare", "--keep", "2", "--strategies", "margin", "--budgets", "8,16",
            "--seeds", "2", "--samples", "16", "--method", "frequency", "--out", str(out), *FAST]
    assert main(args) == 0
    doc = json.loads((out / "recovery.json").read_text())
    assert doc["schema"] == "moeguard.recovery/2" and set(doc["summary"]["strategies"]) == {"random", "margin"}
    assert len(doc["curves"]) == 4 and {c["seed"] for c in doc["curves"]} == {0, 1}
    s = doc["summary"]["strategies"]["margin"]
    assert s["labels"] == [0, 8, 16] and len(s["mean"]) == 3
    assert s["savings_vs_random"]["bound"] in {"exact", "at least", "loses", "neither"}
    assert (out / "learning_curves.png").stat().st_size > 1000 and (out / "curves.csv").exists()
    assert len(list((out / "jobs" / "recovery").glob("*.json"))) == 5  # prepare + 2 strategies x 2 seeds
    # every derived number carries its spread over seeds and a bootstrap interval
    u = s["savings_vs_random"]["uncertainty"]
    assert u["n"] + u["missing"] == 2 and u["ci"]["level"] == 0.95 and u["ci"]["resamples"] == 2000
    # the rule as stated: a saving whose bootstrap interval lies strictly above zero, from 10 seeds or more
    assert s["seeds"] == 2 and s["saves_labels"] is False and doc["summary"]["min_seeds"] == 10
    assert doc["summary"]["rule"].startswith("a strategy saves labels")
    assert set(s["uncertainty"]) == {"labels_to_target", "auc", "final"}
    # the same study again: every job comes from its saved result, the numbers are the same
    import moeguard.realign.loop as rec

    def boom(*a, **k):
        raise AssertionError("a finished job ran again")

    original = rec.run_active_learning
    rec.run_active_learning = boom
    try:
        partial = tmp_path / ".rec2.partial"
        partial.mkdir()
        # a resumed run reads the jobs its partial folder holds
        import shutil

        shutil.copytree(out / "jobs", partial / "jobs")
        settings = json.loads((out / "recovery.json").read_text())["run"]["settings"]
        settings.pop("runtime")   # recorded, not stamped: where a run ran is not what it computes
        (partial / ".moeguard-settings.json").write_text(json.dumps(settings, sort_keys=True, default=str))
        assert main(args[:-len(FAST) - 2] + ["--out", str(tmp_path / "rec2"), *FAST]) == 0
    finally:
        rec.run_active_learning = original
    again = json.loads((tmp_path / "rec2" / "recovery.json").read_text())
    assert again["summary"]["strategies"] == doc["summary"]["strategies"]


def test_recovery_on_the_merge_route_re_aligns_the_merged_model(tmp_path, capsys):
    """``--route merge``: the study merges each layer to --keep experts (the attack harness's merge
    candidate), records the merge plan, and every curve starts from exactly that merged model."""
    from moeguard.attribution.run import make_context, score
    from moeguard.models.loading import load_model
    from moeguard.studies.merge_route import attack_candidates
    from moeguard.tasks.registry import get_task

    out = tmp_path / "rec"
    args = ["recovery", "--task", "arith-compare", "--keep", "2", "--strategies", "random", "--budgets", "8",
            "--seeds", "1", "--samples", "16", "--method", "frequency", "--route", "merge", "--merge-method",
            "average", "--out", str(out), *FAST]
    assert main(args) == 0
    doc = json.loads((out / "recovery.json").read_text())
    assert doc["route"] == "merge" and doc["merge_method"] == "average" and doc["plan"]["rule"] == "merge"
    assert doc["settings"]["route"] == "merge" and "given_scores" not in doc["settings"]
    clusters = doc["plan"]["merge"]["clusters"]
    assert len(clusters) == 4 and all(len(c) == 2 and sorted(sum(c, [])) == list(range(8)) for c in clusters.values())
    # the merged model scored at 0 labels is the harness's candidate for the same method and merge method
    m, tok, _ = load_model(None)
    t = get_task("arith-compare")
    full = doc["full_score"]
    [(cand, r)] = attack_candidates(m, tok, t, {"frequency": score(make_context(m, tok, t, samples=16, batch_size=8,
                                                                                 seed=0), "frequency")},
                                    keep=2, merge_methods=("average",), samples=16, eval_limit=32, seed=0,
                                    full_score=full)
    assert cand["merge"]["clusters"] == clusters and doc["pruned"]["score"] == r.score
    assert doc["curves"][0]["points"][0]["score"] == r.score
    # a pruning plan does not apply to the merge route; an unknown merge method is one line
    assert main(args[:-len(FAST) - 2] + ["--merge-method", "avg", "--out", str(tmp_path / "bad"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "unknown merge method 'avg'" in err and "Traceback" not in err and not (tmp_path / "bad").exists()


def test_labels_to_target_interpolates_and_reports_never():
    assert labels_to_target([0, 8, 16], [80, 90, 100], 95) == pytest.approx(12.0)
    assert labels_to_target([0, 8, 16], [96, 90, 100], 95) == 0.0
    assert labels_to_target([0, 8, 16], [80, 90, 94], 95) is None
    assert curve_auc([0, 10, 20], [80, 90, 100]) == pytest.approx(90.0)


def test_savings_are_exact_bounded_or_losing():
    assert savings(32, 64, budget=128) == {"percent": 50.0, "bound": "exact"}
    assert savings(32, None, budget=128)["bound"] == "at least" and savings(32, None, budget=128)["percent"] == 75.0
    assert savings(None, 64, budget=128)["bound"] == "loses"
    assert savings(None, None, budget=128)["percent"] is None
    curves = [{"strategy": s, "seed": 0, "points": [{"labels": x, "retention": y} for x, y in zip([0, 8, 16], ys)]}
              for s, ys in [("random", [80, 85, 96]), ("orphan", [80, 96, 97]), ("coreset", [80, 81, 82])]]
    summary = summarize(curves, ["random", "orphan", "coreset"], target=95)
    assert summary["best"] == "orphan" and summary["strategies"]["coreset"]["savings_vs_random"]["bound"] == "loses"


def test_a_partial_run_of_other_weights_at_the_same_path_is_not_resumed(pruned, tmp_path, monkeypatch):
    import shutil

    from moeguard.realign import loop

    model = tmp_path / "m"
    shutil.copytree(pruned, model)
    out = tmp_path / "out"

    def stop(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(loop, "run_active_learning", stop)
    with pytest.raises(RuntimeError, match="killed"):
        main(realign_args(model, out))
    partial = tmp_path / ".out.partial"
    (partial / "left-by-the-first-run").write_text("x")
    with pytest.raises(RuntimeError, match="killed"):                 # the same weights: the partial run is kept for resuming
        main(realign_args(model, out))
    assert (partial / "left-by-the-first-run").exists()
    weights = model / "model.safetensors"             # re-pruned in place: same path, other weights
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="killed"):
        main(realign_args(model, out))
    assert not (partial / "left-by-the-first-run").exists()


def test_an_out_that_is_the_pruning_record_s_source_is_refused_before_any_load(tmp_path, capsys, monkeypatch):
    """realign's original defaults to the record's source, an input the command line never named:
    --out there --overwrite replaced the unpruned checkpoint with the realigned one."""
    import shutil

    from moeguard.models.loading import resolve

    source = tmp_path / "orig"
    shutil.copytree(resolve(None).path, source)
    (tmp_path / "plan.json").write_text(json.dumps(KEEP2))
    assert main(["prune", "--model", str(source), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "p")]) == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in source.iterdir())
    monkeypatch.setattr("moeguard.models.handle.ModelHandle.load", lambda *a, **k: pytest.fail("a model loaded"))
    capsys.readouterr()
    assert main(realign_args(tmp_path / "p", source, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"output {source} is (or holds) the input {source}" in err, err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in source.iterdir()) == before
