"""Study commands, from a read-only review (2026-12-07): --threads on every study command (Ray's
refusal named it, and only the audit had it), and the run record says where a run ran."""

import json

import pytest

from moeguard.cli import main
from moeguard.errors import MoeguardError

SMALL = {
    "sweep": ["--tasks", "arith-compare", "--methods", "frequency", "--keep", "2"],
    "recovery": ["--task", "arith-compare", "--keep", "2"],
    "attack": ["--task", "arith-compare", "--keep", "2"],
}


@pytest.mark.parametrize("command", sorted(SMALL))
def test_every_study_command_takes_threads_for_its_jobs(command, tmp_path, monkeypatch):
    import moeguard.studies as studies

    seen = {}

    def fake_run_study(study, cfg, *, jobs, runtime, backend, progress):
        seen["runtime"] = runtime
        raise MoeguardError("stopped by the test")

    monkeypatch.setattr(studies, "run_study", fake_run_study)
    assert main([command, *SMALL[command], "--threads", "1", "--out", str(tmp_path / "o")]) == 2
    assert seen["runtime"].threads == 1


def test_a_sweep_s_run_record_says_where_it_ran(tmp_path):
    out = tmp_path / "s"
    assert main(["sweep", *SMALL["sweep"], "--random-seeds", "1", "--eval-limit", "8", "--samples", "8",
                 "--collateral-limit", "4", "--threads", "1", "--out", str(out)]) == 0
    run = json.loads((out / "sweep.json").read_text())["run"]
    assert run["settings"]["runtime"] == {"threads": 1, "backend": "local", "ray_address": None, "gpus_per_job": 0.0}


def _one_line(code, err, needle):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines


@pytest.mark.parametrize("args, needle", [
    (["sweep", "--tasks", "arith-compare", "--methods", "frequency", "--keep", "2", "--route", "prune,merge",
      "--max-memory", "8GiB"], "--max-memory 8GiB is set with the merge route"),
    (["audit", "--route", "prune,merge", "--max-memory", "8GiB", "--no-recovery"],
     "max_memory 8GiB is set with the merge route"),
    (["attack", "--task", "arith-compare", "--keep", "2", "--target", "0"], "the attack's target is 0.0"),
])
def test_settings_that_failed_after_the_work_are_one_line_before_it(args, needle, tmp_path, capsys):
    capsys.readouterr()
    _one_line(main([*args, "--out", str(tmp_path / "o")]), capsys.readouterr().err, needle)
    assert not (tmp_path / "o").exists()


def test_the_attack_s_merge_route_is_refused_up_front_for_a_family_of_expert_modules():
    """Switch-style experts (one module each) cannot be merged: attack and defend-eval found out at
    the first merge, after the full evaluation, every attribution and every pruning plan."""
    from types import SimpleNamespace

    from moeguard.models.families import FAMILIES
    from moeguard.studies.attack import AttackConfig, preflight

    model = SimpleNamespace(family=FAMILIES.get("switch_transformers"), check_keep=lambda keep: None,
                            check_uniform=lambda *a, **k: None)
    cfg = AttackConfig(task="arith-compare", keep=2, routes=("prune", "merge"))
    with pytest.raises(MoeguardError, match="keeps one module per expert") as e:
        preflight(cfg, model)
    assert e.value.hint == "use the pruning route (--routes prune)"
    preflight(AttackConfig(task="arith-compare", keep=2, routes=("prune",)), model)   # the pruning route is fine


def test_zoo_suite_refuses_an_out_that_is_or_holds_the_standard_library_it_reads(tmp_path, capsys):
    lib = tmp_path / "work" / "lib"
    lib.mkdir(parents=True)
    (lib / "os.py").write_text("x = 1\n")
    for out in (lib, tmp_path / "work"):
        capsys.readouterr()
        code = main(["zoo", "suite", "--python-stdlib", str(lib), "--out", str(out), "--overwrite"])
        _one_line(code, capsys.readouterr().err, "is (or holds) the input")
        assert (lib / "os.py").read_text() == "x = 1\n"


def test_an_attack_job_on_the_runtime_s_own_model_is_scoped_by_it_not_by_the_embedded_model(monkeypatch):
    """model "" is the runtime's model (Context.model); the scope read it as the embedded model's
    files, so reinstalling moeguard re-ran every attack job on a user's own checkpoint."""
    import moeguard.models.identity as identity
    from moeguard.studies.engine import Job, Runtime, _scopes

    asked = []
    monkeypatch.setattr(identity, "weights_identity", lambda ref: asked.append(ref) or {"ref": ref})
    runtime = Runtime(model="/ckpt/mine", threads=1)
    scope = _scopes(runtime)
    assert asked == ["/ckpt/mine"]       # the runtime's own scope, once
    asked.clear()
    own = scope(Job(stage="s", name="n", fn="m:f", args={"model": ""}))
    assert own == scope(Job(stage="s", name="n", fn="m:f", args={})) and asked == []
    assert scope(Job(stage="s", name="n", fn="m:f", args={"model": "/ckpt/other"})) != own and asked == ["/ckpt/other"]


def test_run_seeds_stay_within_the_seeds_every_setting_accepts():
    """--seed SEED_MAX with 2 seeds gave the second run SEED_MAX + 1, refused by FinetuneConfig after the
    baseline, attribution and sweep stages (or the attack's pick phase)."""
    from moeguard.config import SEED_MAX, run_seeds
    from moeguard.studies.attack import AttackConfig, _seeds
    from moeguard.studies.recovery import RecoveryConfig, seeds_of

    assert run_seeds(3, 3) == [3, 4, 5] and run_seeds(SEED_MAX, 2) == [SEED_MAX, 0]
    assert seeds_of(RecoveryConfig(task="arith-compare", keep=2, seed=SEED_MAX, seeds=2)) == [SEED_MAX, 0]
    assert _seeds(AttackConfig(task="arith-compare", keep=2, seed=SEED_MAX, seeds=2)) == [SEED_MAX, 0]


def test_an_audit_task_with_no_method_auc_recovers_with_the_default_method():
    """A full score of 0 leaves every retention undefined: best_method refused with 'pass --method',
    which the audit lacks, at every resume."""
    import warnings

    from moeguard.audit.optional import _recovery_method

    sweep = {"faithfulness": {"t": {"ablation": {"auc": None}, "gate": {"auc": None}, "random": {"auc": None}},
                              "u": {"gate": {"auc": 0.4}, "frequency": {"auc": 0.7}}}}
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert _recovery_method(sweep, "t") == "ablation"
    assert "no attribution method has a deletion AUC" in str(said[0].message)
    assert _recovery_method(sweep, "u") == "frequency"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _recovery_method({"faithfulness": {"t": {"gate": {"auc": None}}}}, "t") == "gate"


def test_a_budget_pruned_or_one_expert_checkpoint_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """attack, recovery and monitor profile refused a budget-pruned checkpoint only after the load (the
    attack after scoring the full model), and scan one keeping a single expert per layer after its weights
    part, with a hint naming methods scan does not have."""
    from moeguard.models.handle import ModelHandle

    (tmp_path / "b.json").write_text(json.dumps({"keep": {"0": [0, 1, 2, 3], "1": [0, 1, 2, 3, 4, 5, 6, 7],
                                                          "2": [0, 1, 2, 3, 4, 5, 6, 7], "3": [0, 1, 2, 3, 4, 5, 6, 7]}}))
    assert main(["prune", "--plan", str(tmp_path / "b.json"), "--out", str(tmp_path / "budget")]) == 0
    (tmp_path / "one.json").write_text(json.dumps({"keep": {str(l): [3] for l in range(4)}}))
    assert main(["prune", "--plan", str(tmp_path / "one.json"), "--out", str(tmp_path / "one")]) == 0
    loads = []
    monkeypatch.setattr(ModelHandle, "load", lambda self, *a, **k: loads.append(self.name))
    b = str(tmp_path / "budget")
    for args, needle in (
            (["attack", "--model", b, "--task", "arith-compare", "--keep", "2"], "the attack's attribution needs one count"),
            (["recovery", "--model", b, "--task", "arith-compare", "--keep", "2", "--method", "frequency"],
             "the recovery study's attribution needs one count"),
            (["monitor", "profile", "--model", b], "the routing monitor needs one count per layer"),
            (["scan", "--model", str(tmp_path / "one")], "keeps 1 expert(s) per layer, and the scan's criticality")):
        capsys.readouterr()
        _one_line(main([*args, "--out", str(tmp_path / f"o-{args[0]}")]), capsys.readouterr().err, needle)
    assert loads == []


def test_shared_checks_name_the_flags_of_the_command_that_ran_them(tmp_path, capsys):
    """The label pool's hint said --budget to recovery and the audit (theirs is --budgets), and the scan's
    said --contexts to the audit (its is --scan-contexts): following the fix was 'No such option'."""
    for args, needle in ((["recovery", "--task", "arith-compare", "--keep", "2", "--method", "frequency",
                           "--pool-size", "100"], "or lower --budgets"),
                         (["audit", "--tasks", "arith-compare", "--pool-size", "100"], "or lower --budgets"),
                         (["audit", "--tasks", "arith-compare", "--no-recovery", "--scan", "--scan-contexts", "100000"],
                          "a smaller --scan-contexts")):
        capsys.readouterr()
        code = main([*args, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and needle in err, err
