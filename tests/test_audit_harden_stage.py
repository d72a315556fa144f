"""The audit's hardening is a stage of its own (2026-12-07 review): the defense comparison after it
can fail, or change its settings, without the model being hardened again, and the checkpoint's
protocol names where it lies, not the stage's temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeguard.cli import main


def test_a_failed_defense_comparison_resumes_without_hardening_again(tmp_path, monkeypatch):
    import moeguard.defense.harden as harden_module
    import moeguard.studies.defend as defend

    run = tmp_path / "run"
    args = ["audit", "--out", str(run), "--tasks", "arith-compare", "--methods", "frequency", "--no-recovery",
            "--random-seeds", "1", "--eval-limit", "16", "--recovery-eval-limit", "16", "--pool-size", "32",
            "--samples", "8", "--defense", "selective", "--harden-steps", "2", "--threads", "1",
            "--defense-modes", "lora", "--defense-lr-scales", "1", "--defense-epochs", "1", "--defense-seeds", "1"]
    real_study = defend.DefendEvalStudy

    class Killed:
        def __init__(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(defend, "DefendEvalStudy", Killed)
    with pytest.raises(SystemExit) as stop:
        main([*args, "--defense-budget", "4"])
    assert stop.value.code == 130
    hardened = run / "stages" / "harden" / "hardened"
    assert (run / "stages" / "harden" / "done.json").exists() and not (run / "stages" / "defense").exists()
    made = {f.name: f.stat().st_mtime_ns for f in hardened.iterdir()}

    monkeypatch.setattr(defend, "DefendEvalStudy", real_study)
    calls = []
    real_harden = harden_module.harden
    monkeypatch.setattr(harden_module, "harden", lambda *a, **k: calls.append(1) or real_harden(*a, **k))
    # and with a setting only the comparison reads changed: the hardening is not re-done for it
    assert main([*args, "--defense-budget", "8"]) == 0
    assert calls == [], "the model was hardened again"
    assert {f.name: f.stat().st_mtime_ns for f in hardened.iterdir()} == made   # the jobs' identity of it
    doc = json.loads((run / "results.json").read_text())
    assert [s["stage"] for s in doc["stages"]] == ["model", "baseline", "attribution", "sweep", "harden", "defense"]
    assert [s["cached"] for s in doc["stages"] if s["stage"] == "harden"] == [True]
    # the protocol names the checkpoint where it lies (it named stages/.defense.tmp-KEY/hardened)
    proto = json.loads((hardened / "moeguard_protocol.json").read_text())
    assert proto["model"] == str(hardened) and hardened.is_dir()
    # with its run record, as `moeguard harden` writes it (it was {})
    record = json.loads((hardened / "moeguard_hardening.json").read_text())["run"]
    assert record["versions"]["torch"] and "git_commit" in record
    assert record["settings"]["method"] == "selective" and record["settings"]["steps"] == 2
    settings = json.loads((run / "stages" / "defense" / "defense.json").read_text())["settings"]
    assert settings["hardened"] == str(hardened)
    assert not (run / "jobs" / "harden-state").exists()
    assert not (tmp_path / ".run.lock").exists()   # the run's lock goes with it


def test_the_pool_and_eval_limit_the_defense_reads_are_not_said_to_have_no_effect():
    """pool_size and recovery_eval_limit set with --no-recovery were said to have no effect, and the
    defense comparison's attacker reads both."""
    import warnings

    from moeguard.audit.config import AuditConfig, check

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        check(AuditConfig(recovery=False, defense="entangle", pool_size=32, recovery_eval_limit=16))
        assert said == []
        check(AuditConfig(recovery=False, pool_size=32, recovery_eval_limit=16, budgets=[8]))
    assert [str(w.message) for w in said] == [
        "budgets is set, and the recovery stage is off: it has no effect (drop --no-recovery to run it)",
        "pool_size, recovery_eval_limit are set, and the recovery and defense stages are off: they have no effect "
        "(drop --no-recovery, or pass --defense NAME or --hardened PATH to run it)"]


def test_strategies_with_recovery_off_are_said_unused_not_refused():
    """--no-recovery --strategies orphan was refused for lacking random (a stage that does not run), and
    --no-recovery --strategies random,hybrid was ignored in silence."""
    import warnings

    from moeguard.audit.config import AuditConfig, check
    from moeguard.errors import MoeguardError

    for given in (["orphan"], ["random", "hybrid"]):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            check(AuditConfig(recovery=False, strategies=given))
        assert [str(w.message) for w in said] == [
            "strategies is set, and the recovery stage is off: it has no effect (drop --no-recovery to run it)"]
    with pytest.raises(MoeguardError, match="lack 'random'"):
        check(AuditConfig(strategies=["orphan"]))


def test_a_second_audit_on_a_running_one_s_folder_is_one_line_and_touches_nothing(tmp_path, capsys):
    """Two audits on one --out swept each other's temporary stage folders, shared the hardening
    state and, with --overwrite, emptied the running one's stages under it."""
    from moeguard.audit.run import lock_run_dir

    run = tmp_path / "run"
    (run / "stages" / "baseline").mkdir(parents=True)
    (run / "audit.json").write_text("{}")
    with lock_run_dir(run):             # the running audit
        capsys.readouterr()
        code = main(["audit", "--out", str(run), "--tasks", "arith-compare", "--no-recovery", "--overwrite"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"another audit is running in {run}" in err[0], err
        assert "give this run another --out" in err[0]
        assert (run / "stages" / "baseline").is_dir()     # --overwrite emptied nothing
    assert not (tmp_path / ".run.lock").exists()


def test_the_run_lock_is_one_for_every_spelling_of_the_folder(tmp_path, monkeypatch):
    """--out . raised ValueError (a path with an empty name) building the lock beside it."""
    from moeguard.audit.run import lock_run_dir
    from moeguard.errors import MoeguardError

    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "link").symlink_to(run)
    monkeypatch.chdir(run)
    with lock_run_dir(Path(".")):
        for other in (run, tmp_path / "link", Path("../run")):
            with pytest.raises(MoeguardError, match="another audit is running in"):
                with lock_run_dir(other):
                    pass
    assert not (tmp_path / ".run.lock").exists()


def test_the_defense_is_checked_on_every_defense_task_and_the_hardening_before_any_stage(tmp_path, monkeypatch):
    """Only the first defense task's attack pool was checked, and the hardening's own checks (authorized
    patterns matching no parameter of the family) ran in the harden stage, after every other stage."""
    from transformers import AutoTokenizer

    from moeguard.audit.config import AuditConfig
    from moeguard.audit.run import resolve
    from moeguard.errors import MoeguardError
    from moeguard.models.loading import EMBEDDED_MODEL_DIR
    from moeguard.models.tokenizer_files import save_tokenizer
    from moeguard.testing import tiny_model

    # a defense task whose train split holds fewer records than the attacker's pool and budget ask
    cfg = AuditConfig(tasks=("arith-compare", "stdlib-code"), defense="entangle",
                      defense_tasks=("arith-compare", "stdlib-code"), recovery=False, defense_budget=2000, pool_size=2000)
    with pytest.raises(MoeguardError) as e:
        resolve(cfg)
    assert "stdlib-code" in e.value.message, e.value.message   # the second task's pool, before any stage
    # JetMoE's attention is self_attention.kv_proj: selective's default patterns match none of it
    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    model = tmp_path / "jetmoe"
    tiny_model("jetmoe", vocab_size=len(tok)).save_pretrained(model)
    save_tokenizer(tok, model)
    with pytest.raises(MoeguardError, match="match no parameter"):
        resolve(AuditConfig(model=str(model), tasks=("arith-compare",), defense="selective", recovery=False))


def test_a_hardened_model_s_protocol_is_read_and_checked_before_any_stage(tmp_path, capsys):
    """defend-eval reads and checks the hardened checkpoint's protocol first; the audit read it in its defense
    stage, after every other stage, and a malformed or non-covering one failed there."""
    import shutil

    from moeguard.models.loading import resolve

    h = tmp_path / "h"
    shutil.copytree(resolve(None).path, h)
    for text, needle in (("{broken", "is not valid JSON"),
                         ('{"schema": "moeguard.protocol/1", "modes": ["full"], "authorized_parameters": ["nothing.*"]}',
                          "match")):
        (h / "moeguard_protocol.json").write_text(text)
        capsys.readouterr()
        code = main(["audit", "--out", str(tmp_path / "a"), "--tasks", "arith-compare", "--hardened", str(h),
                     "--no-recovery"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and needle in err, err
        assert not (tmp_path / "a").exists()
