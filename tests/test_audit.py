"""`moeguard audit` end to end: outputs, the risk definition, resuming, config changes, kills, Ray."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import SMALL_AUDIT, THREADS
from moeguard.audit.results import numbers_only
from moeguard.cli import main
from moeguard.testing import kill_cli_when


TASKS = {"arith-compare", "docstring-topic"}
STAGES_CACHED = {"model": True, "baseline": True, "attribution": True, "sweep": True, "recovery": True}


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_audit_writes_the_report_files_and_a_documented_results_schema(audit_run):
    doc = results(audit_run)
    assert doc["schema"] == "moeguard.audit/1"
    assert set(doc["tasks"]) == TASKS
    assert [s["stage"] for s in doc["stages"]] == ["model", "baseline", "attribution", "sweep", "recovery"]
    assert doc["run"]["versions"]["torch"] and "git_commit" in doc["run"] and doc["config"]["seed"] == 0
    plots = doc["files"]["plots"]
    for name in [plots["risk"], *plots["importance"].values(), *plots["retention"].values(), *plots["learning"].values()]:
        assert (audit_run / "plots" / name).stat().st_size > 10_000  # a drawn figure, not an empty file
    html = (audit_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(list((audit_run / "plots").glob("*.png")))
    assert "src=\"http" not in html and "<script" not in html  # self-contained: nothing to fetch
    md = (audit_run / "report.md").read_text()
    assert "## Task `arith-compare`" in md and "## Task `docstring-topic`" in md and "## Reproduce" in md


def test_the_best_stolen_model_of_each_task_is_traced(audit_run):
    doc = results(audit_run)
    md = (audit_run / "report.md").read_text()
    assert set(doc["tasks"]) == TASKS   # the loop below checks each
    for t, e in doc["tasks"].items():
        d = e["recovery"]["detectability"]
        keep = e["recovery"]["keep"]
        assert d["verdict"] == "derived" and d["p_value"] <= 1e-4, (t, d)
        assert d["kept_total"] == keep * 4 and d["kept_identified"] == d["kept_total"], (t, d)
        assert f"identifying {d['kept_identified']} of {d['kept_total']} kept experts" in md


def test_risk_levels_follow_their_definition(audit_run):
    from moeguard.audit.risk import HIGH, MEDIUM

    doc = results(audit_run)
    assert set(doc["tasks"]) == TASKS   # the loop below checks each
    for name, task in doc["tasks"].items():
        r = task["risk"]
        q, h = str(r["keep_quarter"]), str(r["keep_half"])
        best = lambda k: max(v["retention"][k] for v in task["methods"].values())  # noqa: E731
        assert r["pruned"][q] == pytest.approx(best(q)) and r["pruned"][h] == pytest.approx(best(h))
        rec = task["recovery"]
        finals = [s["final"] for s in rec["strategies"].values()]
        assert r["attacked"] == pytest.approx(max(best(str(rec["keep"])), *finals))
        # the level from its definition (the thresholds' edges: test_task_risk_on_hand_made_entries)
        want = ("high" if r["attacked"] >= HIGH else "unmeasured" if r["pruned"][h] is None
                else "medium" if r["pruned"][h] >= MEDIUM else "low")
        assert r["level"] == want, (name, r)
        assert r["reason"].startswith(f"keeping {rec['keep']} experts per layer retains" if want == "high" else
                                      f"keeping {h} experts per layer retains" if want == "medium" else f"{h} experts per layer retain")
        reached = [s["labels_to_target"] for s in rec["strategies"].values() if s["labels_to_target"] is not None]
        assert r["labels_to_recover"] == (min(reached) if reached else None)


def _entry(half_a=85.0, finals=(88.0, 93.0), reach=(None, 12.0), recovery=True, higher_is_better=True,
           full=(80.0, 50.0)):
    """An audit task entry: methods a, b at keeps 2 (N/4) and 4 (N/2) of 8 experts, and the
    recovery study's random and orphan strategies at keep 2 over 0..16 labels."""
    methods = {"a": {"retention": {"2": 40.0, "4": half_a}, "retention_above_baseline": {"2": 10.0, "4": 60.0}},
               "b": {"retention": {"2": 55.0, "4": 70.0}, "retention_above_baseline": {"2": 20.0, "4": 30.0}}}
    rec = {"keep": 2, "best": "orphan",
           "strategies": {"random": {"final": finals[0], "labels_to_target": reach[0], "labels": [0, 8, 16]},
                          "orphan": {"final": finals[1], "labels_to_target": reach[1], "labels": [0, 8, 16]}}}
    return {"methods": methods, "recovery": rec if recovery else None, "higher_is_better": higher_is_better,
            "full": {"score": full[0], "baseline": full[1]}}


def test_task_risk_on_hand_made_entries():
    from moeguard.audit.risk import task_risk

    # high: orphan's 93% after 16 labels beats pruning alone (55% at keep 2) and is >= 90
    r = task_risk(_entry(), num_experts=8, min_keep=1)
    assert (r["keep_quarter"], r["keep_half"]) == (2, 4)
    assert r["pruned"] == {"2": 55.0, "4": 85.0} and r["best_method"] == {"2": "b", "4": "a"}
    assert r["pruned_above_baseline"] == {"2": 20.0, "4": 60.0}
    assert r["attacked"] == 93.0 and r["recovered"] == 93.0 and r["level"] == "high"
    assert r["labels_to_recover"] == 12.0 and r["random_labels_to_recover"] is None
    assert r["recovery_budget"] == 16 and r["best_strategy"] == "orphan"
    assert r["margin_over_baseline_pct"] == pytest.approx(37.5) and r["weak_task"] is False  # (80-50)/80
    # exactly 90 after the attack is still high
    assert task_risk(_entry(finals=(90.0, 85.0)), num_experts=8, min_keep=1)["level"] == "high"
    # medium: 89.9 after the attack, but half the experts keep exactly 90 with no fine-tuning
    r = task_risk(_entry(half_a=90.0, finals=(80.0, 89.9), reach=(None, None)), num_experts=8, min_keep=1)
    assert r["attacked"] == 89.9 and r["level"] == "medium" and r["labels_to_recover"] is None
    # low: neither; both strategies reach the target, the fewer labels count
    r = task_risk(_entry(half_a=89.9, finals=(80.0, 85.0), reach=(20.0, 14.5)), num_experts=8, min_keep=1)
    assert r["level"] == "low" and r["labels_to_recover"] == 14.5 and r["random_labels_to_recover"] == 20.0
    # no recovery study: the attack is pruning alone at N/4; perplexity margin (30-10)/30 of the baseline
    r = task_risk(_entry(recovery=False, higher_is_better=False, full=(10.0, 30.0)), num_experts=8, min_keep=1)
    assert r["attacked"] == 55.0 and r["level"] == "low" and r["labels_to_recover"] is None
    assert r["margin_over_baseline_pct"] == pytest.approx(200 / 3) and r["weak_task"] is False
    # a task the full model barely beats its baseline on is flagged: (80-75)/80 = 6.25% < 10%
    r = task_risk(_entry(full=(80.0, 75.0)), num_experts=8, min_keep=1)
    assert r["weak_task"] is True and "barely better than the trivial baseline" in r["reason"], r["reason"]
    # one the full model does worse than its baseline on (switch_audit's docstring-topic: 20.3 against 25)
    # is no better, not "barely better": (20.3-25)/20.3 = -23.15%
    r = task_risk(_entry(full=(20.3, 25.0)), num_experts=8, min_keep=1)
    assert r["weak_task"] is True and "barely" not in r["reason"], r["reason"]
    assert "no better than the trivial baseline, by 23.1%: it has not learned this task" in r["reason"], r["reason"]
    # half the experts never measured (--keeps 2 only): not "low", which nothing measured
    e = _entry(finals=(80.0, 85.0), reach=(None, None))
    for m in e["methods"].values():
        m["retention"].pop("4")
        m["retention_above_baseline"].pop("4")
    r = task_risk(e, num_experts=8, min_keep=1)
    assert r["level"] == "unmeasured" and r["reason"].startswith("4 experts per layer were not measured (add 4 to --keeps)")
    # measured, with no retention defined (the full model scores 0): not "unmeasured", whose fix was to add a
    # keep that was already there
    e = _entry(finals=(None, None), reach=(None, None), full=(0.0, 50.0))
    for m in e["methods"].values():
        m["retention"] = {"2": None, "4": None}
    r = task_risk(e, num_experts=8, min_keep=1)
    assert r["level"] == "undefined" and r["reason"].startswith(
        "no retention is defined: the full model's score on this task is 0.0 (0, or not a finite number)"), r["reason"]
    assert "--keeps" not in r["reason"]
    from moeguard.report.audit import _verdict

    doc = {"tasks": {"t": {"risk": r}, "u": {"risk": {"level": "low"}}}, "model": {"family": "mixtral", "num_experts": 8,
                                                                                 "top_k": 2}}
    assert "1 undefined (t: the full model scores 0 or not a number there, so no retention is defined)" in _verdict(doc)
    # the best strategy by its point saving, and whether its interval says it saves labels at all
    assert task_risk(_entry(), num_experts=8, min_keep=1)["best_strategy_saves_labels"] is False
    e = _entry()
    e["recovery"]["saves_labels"] = "orphan"
    assert task_risk(e, num_experts=8, min_keep=1)["best_strategy_saves_labels"] is True


@pytest.mark.parametrize("merged", [(50.0, 92.0), (60.0, 80.0), (95.0, 70.0), (None, None)])
def test_adding_the_merge_route_never_lowers_a_risk_number(merged):
    from moeguard.audit.risk import task_risk

    for recovery in (True, False):
        base = task_risk(_entry(recovery=recovery), num_experts=8, min_keep=1)
        e = _entry(recovery=recovery)
        e["routes"] = {k: {"merge": None if v is None else {"retention": v, "method": "b", "merge_method": "hc-smoe"}}
                       for k, v in zip(("2", "4"), merged)}
        r = task_risk(e, num_experts=8, min_keep=1)
        for k in ("2", "4"):
            assert r["pruned"][k] >= base["pruned"][k]
            assert r["pruned"][k] == max(base["pruned"][k], merged[int(k) // 2 - 1] or 0)
            assert r["route"][k] == ("merge" if (merged[int(k) // 2 - 1] or 0) > base["pruned"][k] else "prune")
        assert r["attacked"] >= base["attacked"]
        assert ["low", "medium", "high"].index(r["level"]) >= ["low", "medium", "high"].index(base["level"])
    # merging keeps 92% of the task with half the experts and no fine-tuning: medium, and the reason says merging won
    r = task_risk({**_entry(recovery=False), "routes": {"4": {"merge": {"retention": 92.0, "method": "b",
                                                                     "merge_method": "hc-smoe"}}}},
                  num_experts=8, min_keep=1)
    assert r["level"] == "medium" and r["best_method"]["4"] == "b + hc-smoe merge"
    assert "merging beats pruning at 4 per layer" in r["reason"]
    # the family's minimum raises N/4: with min_keep 3 the quarter level is 3, or the next level measured (4)
    assert task_risk(_entry(recovery=False), num_experts=8, min_keep=3)["keep_quarter"] == 4


def test_the_risk_levels_are_the_models_whatever_keeps_the_run_swept():
    """N/4 and N/2 of 64 experts are 16 and 32 when the sweep measured them (deletion curves);
    only a level it did not measure moves to the next one it did."""
    from moeguard.audit.risk import task_risk

    def entry(levels):
        e = _entry(recovery=False)
        for v in e["methods"].values():
            v["retention"] = {str(k): 95.0 for k in levels}
            v["retention_above_baseline"] = {str(k): 90.0 for k in levels}
        return e
    every = task_risk(entry(range(2, 64)), num_experts=64)
    assert (every["keep_quarter"], every["keep_half"]) == (16, 32)
    assert task_risk(entry([16, 32, 48]), num_experts=64)["keep_quarter"] == 16
    sparse = task_risk(entry([32, 48]), num_experts=64)   # no deletion curves, N/4 not swept
    assert (sparse["keep_quarter"], sparse["keep_half"]) == (32, 32)


@pytest.mark.parametrize("merge_finals", [(70.0, 95.0), (60.0, 80.0)])
def test_the_attack_takes_the_stronger_route_after_re_alignment(merge_finals):
    """With the merge route the merged model is re-aligned too: ``attacked`` is the best over both
    routes' re-aligned models (never lower than pruning's alone), ``labels_to_recover`` the fewest
    labels on either, and the reason says when merging won after re-alignment."""
    from moeguard.audit.risk import task_risk

    base = task_risk(_entry(finals=(80.0, 85.0), reach=(None, None)), num_experts=8, min_keep=1)
    e = _entry(finals=(80.0, 85.0), reach=(None, None))
    e["recovery"]["merge"] = {"keep": 2, "best": None, "merge_method": "average",
                              "strategies": {"random": {"final": merge_finals[0], "labels_to_target": None,
                                                        "labels": [0, 8, 16]},
                                             "orphan": {"final": merge_finals[1], "labels_to_target": 9.5,
                                                        "labels": [0, 8, 16]}}}
    r = task_risk(e, num_experts=8, min_keep=1)
    assert r["recovered_by_route"] == {"prune": 85.0, "merge": max(merge_finals)}
    assert r["attacked"] == max(base["attacked"], *merge_finals) >= base["attacked"]
    assert r["labels_to_recover"] == 9.5 and base["labels_to_recover"] is None
    if max(merge_finals) > 85.0:
        assert r["attack_route"] == "merge" and r["level"] == "high"
        assert "after re-alignment merging keeps more: 95% against pruning's 85%" in r["reason"]
    else:
        assert r["attack_route"] == "prune" and "after re-alignment" not in r["reason"]
    assert "attack_route" not in base and "recovered_by_route" not in base   # prune-only: fields as before


def test_an_audit_with_the_merge_route_re_aligns_the_merged_model_too(tmp_path):
    """End to end, small: the recovery stage re-aligns the sweep's best merge at the recovery keep
    beside the pruned model, and the risk and report take both routes."""
    run = tmp_path / "run"
    assert main(["audit", "--out", str(run), "--tasks", "arith-compare", "--methods", "frequency", "--keeps", "2,4",
                 "--route", "prune,merge", "--merge-methods", "average", "--random-seeds", "1", "--no-deletion-curves",
                 "--physical-checks", "0", "--strategies", "random", "--budgets", "8", "--recovery-seeds", "1",
                 "--eval-limit", "16", "--collateral-limit", "8", "--recovery-eval-limit", "16", "--pool-size", "32",
                 "--samples", "8", "--threads", str(THREADS)]) == 0
    doc = results(run)
    e = doc["tasks"]["arith-compare"]
    rec, r = e["recovery"], e["risk"]
    merged = json.loads((run / "stages" / "recovery" / "recovery" / "arith-compare.merge.json").read_text())
    assert merged["route"] == "merge" and merged["merge_method"] == "average" == rec["merge"]["merge_method"]
    assert merged["plan"]["rule"] == "merge" and merged["attribution"]["method"] == e["routes"]["2"]["merge"]["method"]
    finals = {route: max(s["final"] for s in x["strategies"].values()) for route, x in (("prune", rec),
                                                                                         ("merge", rec["merge"]))}
    assert r["recovered_by_route"] == pytest.approx(finals)
    assert r["attack_route"] == max(finals, key=finals.get)
    start = max(e["methods"]["frequency"]["retention"]["2"], e["routes"]["2"]["merge"]["retention"])
    assert r["attacked"] == pytest.approx(max(start, *finals.values()))
    md = (run / "report.md").read_text()
    assert "| route | strategy |" in md and "| merge (average) | random |" in md


def test_rerunning_the_same_command_skips_every_stage_with_the_same_numbers(audit_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(audit_run, run)
    before = results(run)
    assert main(["audit", "--out", str(run), *SMALL_AUDIT]) == 0
    after = results(run)
    assert {s["stage"]: s["cached"] for s in after["stages"]} == STAGES_CACHED
    assert numbers_only(after) == numbers_only(before)


def test_another_thread_count_or_no_recovery_reuses_every_stage_it_computes_the_same(audit_run, tmp_path):
    """How many cores is not what is computed: --threads (or another machine's core count) re-ran
    every stage, and --no-recovery every baseline evaluation."""
    run = tmp_path / "run"
    shutil.copytree(audit_run, run)
    args = list(SMALL_AUDIT)
    args[args.index("--threads") + 1] = str(THREADS + 1)
    assert main(["audit", "--out", str(run), *args, "--no-recovery"]) == 0
    assert {s["stage"]: s["cached"] for s in results(run)["stages"]} == {
        k: v for k, v in STAGES_CACHED.items() if k != "recovery"}


def test_a_config_change_reruns_only_the_stages_it_affects(audit_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(audit_run, run)
    jobs_before = {p.name for p in (run / "jobs" / "recovery").glob("*.json")}
    args = list(SMALL_AUDIT)
    args[args.index("--recovery-seeds") + 1] = "2"
    assert main(["audit", "--out", str(run), *args]) == 0
    doc = results(run)
    cached = {s["stage"]: s["cached"] for s in doc["stages"]}
    assert cached == {"model": True, "baseline": True, "attribution": True, "sweep": True, "recovery": False}
    jobs_after = {p.name for p in (run / "jobs" / "recovery").glob("*.json")}
    assert jobs_before < jobs_after  # the first seed's runs were reused, the second seed's added
    assert len(doc["tasks"]["arith-compare"]["recovery"]["strategies"]["random"]["auc_per_seed"]) == 2


def test_a_killed_audit_resumes_on_ray_to_the_numbers_of_an_uninterrupted_local_run(audit_run, tmp_path):
    # One run checks two things (each costs a whole audit): a killed run resumes from its finished
    # jobs, and the Ray backend runs the rest to the local backend's numbers. Without Ray it
    # resumes locally, so the resume is checked anyway.
    import importlib.util

    backend = "ray" if importlib.util.find_spec("ray") else "local"
    run = tmp_path / "run"
    # the stages before recovery as the uninterrupted run left them (their caching is tested
    # below and in test_a_config_change_reruns_only_the_stages_it_affects): the killed process
    # goes straight to the recovery stage instead of recomputing them
    shutil.copytree(audit_run, run)
    for leftover in ("stages/recovery", "jobs/recovery", "results.json", "report.md", "report.html", "plots"):
        path = run / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    # kill it in the recovery stage, after some of its jobs finished
    kill_cli_when(["audit", "--out", str(run), *SMALL_AUDIT],
                  lambda: len(list((run / "jobs" / "recovery").glob("*.json"))) >= 1, timeout=240, poll=0.2)
    assert not (run / "stages" / "recovery").exists()  # never marked complete with partial outputs
    assert not (run / "results.json").exists()
    survived = {p: p.stat().st_mtime_ns for p in (run / "jobs" / "recovery").glob("*.json")}
    todo = len(survived)
    assert todo >= 1    # the kill came after a finished job, so the resume has something to keep
    assert main(["audit", "--out", str(run), "--backend", backend, *SMALL_AUDIT]) == 0
    doc = results(run)
    assert {s["stage"]: s["cached"] for s in doc["stages"]}["sweep"] is True
    assert all(p.stat().st_mtime_ns == t for p, t in survived.items())  # finished jobs were not redone
    assert len(list((run / "jobs" / "recovery").glob("*.json"))) > todo   # the resumed run did the rest
    # ... under the uninterrupted run's job names: a recomputed upstream job's timing renames nothing
    assert {p.name for p in (run / "jobs").rglob("*.json")} == {p.name for p in (audit_run / "jobs").rglob("*.json")}
    assert doc["backend"]["backend"] == backend
    if backend == "ray":
        assert doc["backend"]["cluster_cpus"] >= 1
    assert numbers_only(doc) == numbers_only(results(audit_run))


def test_adding_the_scan_runs_only_its_stage_and_adds_its_section(audit_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(audit_run, run)
    before = results(run)
    assert main(["audit", "--out", str(run), *SMALL_AUDIT, "--scan", "--scan-contexts", "1"]) == 0
    doc = results(run)
    assert {s["stage"]: s["cached"] for s in doc["stages"]} == {
        "model": True, "baseline": True, "attribution": True, "sweep": True, "recovery": True, "scan": False}
    scan = json.loads((run / doc["scan"]["file"]).read_text())
    assert scan["schema"] == "moeguard.scan/1" and scan["tasks"] == ["arith-compare", "docstring-topic"]
    assert doc["scan"]["ranking"] == scan["ranking"] and len(doc["scan"]["experts"]) == 8
    assert scan["settings"]["samples"] == 16 and scan["settings"]["contexts"] == 1   # the audit's settings
    # the clean embedded model: no expert over the backdoor threshold
    assert doc["scan"]["flagged"]["backdoor-suspect"] == [] and "no expert is over" in scan_line(run)
    md = (run / "report.md").read_text()
    assert f"| {scan['ranking'][0]} |" in md and "## Expert scan" in md
    assert 'id="scan"' in (run / "report.html").read_text()
    for key in ("tasks", "collateral", "physical_checks"):   # the other sections' numbers did not move
        assert numbers_only(doc[key]) == numbers_only(before[key]), key


def scan_line(run: Path) -> str:
    md = (run / "report.md").read_text()
    return md.split("## Expert scan", 1)[1].strip().splitlines()[0].lower()


@pytest.mark.parametrize("args, needle", [
    (["--keeps", "8"], "impossible"),
    (["--backend", "spark"], "unknown backend"),
    (["--ray-address", "127.0.0.1:1"], "--ray-address goes with --backend ray"),
    (["--strategies", "orphan"], "lack 'random'"),
    (["--recovery-tasks", "stdlib-code"], "not among the audited tasks"),
    (["--tasks", "no-such-task"], "no-such-task"),
    (["--budgets", "32,8"], "not increasing"),
    (["--scan-references", "ref"], "without scan"),
    (["--scan", "--scan-references", "no-such-scan"], "reference scan no-such-scan/scan.json does not exist"),
])
def test_bad_settings_exit_2_with_one_line_before_any_work(tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    assert main(["audit", "--out", str(out), "--tasks", "arith-compare", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_without_recovery_the_recovery_keep_is_neither_defaulted_nor_checked(tmp_path):
    """A top-k as large as the experts (OLMoE's top-8 at E = 8) leaves recovery no keep to default
    to; an audit without recovery must not be refused for it, and one with recovery must be."""
    from moeguard.audit.config import build
    from moeguard.audit.run import resolve
    from moeguard.errors import MoeguardError
    from moeguard.testing import tiny_model

    tiny_model("mixtral", num_experts_per_tok=8).save_pretrained(tmp_path / "m")
    flags = {"model": str(tmp_path / "m"), "tasks": ["arith-compare"], "keeps": [2]}
    cfg, _ = resolve(build({}, {**flags, "recovery": False}))
    assert cfg.recovery_keep is None and cfg.keeps == [2] and not cfg.recovery
    with pytest.raises(MoeguardError, match="keep level 8 is impossible for 8 experts per layer"):
        resolve(build({}, flags))
    assert resolve(build({}, {**flags, "recovery": False, "recovery_keep": 3}))[0].recovery_keep == 3
    with pytest.raises(MoeguardError, match="keep level 9 is impossible"):   # given: still checked
        resolve(build({}, {**flags, "recovery": False, "recovery_keep": 9}))


def test_config_file_settings_are_checked_and_flags_win(tmp_path, capsys):
    from moeguard.audit.config import build, load_yaml

    cfg_file = tmp_path / "audit.yaml"
    cfg_file.write_text("keeps: [2, 4]\nbudgets: 8,16\nrecovery_seeds: 3\nbackend: local\n")
    cfg = build(load_yaml(cfg_file), {"recovery_seeds": 1, "budgets": None})
    assert cfg.keeps == [2, 4] and cfg.budgets == [8, 16] and cfg.recovery_seeds == 1
    cfg_file.write_text("keep: [2]\n")
    assert main(["audit", "--out", str(tmp_path / "r"), "--config", str(cfg_file)]) == 2
    assert "did you mean keeps" in capsys.readouterr().err
    cfg_file.write_text("recovery_seeds: many\n")
    assert main(["audit", "--out", str(tmp_path / "r"), "--config", str(cfg_file)]) == 2
    assert "expected int" in capsys.readouterr().err


def test_an_existing_folder_that_is_not_an_audit_run_is_left_alone(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert main(["audit", "--out", str(out), "--tasks", "arith-compare", *extra]) == 2
        assert "not an audit run directory" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_audit_with_a_defense_compares_base_and_hardened_in_the_report(tmp_path):
    hardened = tmp_path / "hardened"
    assert main(["harden", "--method", "entangle", "--steps", "2", "--tasks", "arith-compare", "--out", str(hardened)]) == 0
    run = tmp_path / "run"
    args = ["--tasks", "arith-compare", "--methods", "frequency,gate", "--no-recovery", "--random-seeds", "1",
            "--eval-limit", "32", "--recovery-eval-limit", "32", "--pool-size", "64", "--samples", "16",
            "--hardened", str(hardened), "--defense-budget", "8", "--threads", str(THREADS),
            "--defense-modes", "full,lora", "--defense-lr-scales", "1", "--defense-epochs", "4"]
    assert main(["audit", "--out", str(run), *args]) == 0
    doc = results(run)
    assert [s["stage"] for s in doc["stages"]] == ["model", "baseline", "attribution", "sweep", "defense"]
    d = doc["defense"]
    assert d["hardened"] == str(hardened) and set(d["utility"]) == {"arith-compare"}
    cell = d["summaries"]["arith-compare"]["4"]
    assert {"base", "hardened"} <= set(cell) and cell["hardened"]["pruned_retention"] is not None
    assert "undefended_keeps_90" in d["goals"]
    # the attacker's best model of each side, traced against the model it was cut from
    det = d["detectability"]["arith-compare"]["4"]
    for side in ("base", "hardened"):
        x = det[side]
        assert x["verdict"] == "derived" and x["p_value"] <= 1e-4 and x["kept_total"] == 16, (side, x)
        assert x["traced_runs"] == 2 and x["mode"] in ("full", "lora"), (side, x)
    md = (run / "report.md").read_text()
    assert (f"cut from the hardened release ({det['hardened']['mode']}, 8 labels) were stolen, `moeguard trace` "
            f"would find it") in md and f"identifying {det['hardened']['kept_identified']} of 16 kept experts" in md
    html = (run / "report.html").read_text()
    assert 'id="defense"' in html and 'data-plot="defense_curves.png"' in html and 'data-plot="utility.png"' in html
    # without recovery the headline falls back to pruning alone
    r = doc["tasks"]["arith-compare"]["risk"]
    assert r["attacked"] == r["pruned"][str(r["keep_quarter"])] and r["labels_to_recover"] is None


def test_the_model_card_gives_each_kind_of_experts_its_own_size():
    """JetMoE's MLP and attention experts differ in size: the card shows each, not their mean."""
    from moeguard.report.auditrows import card_rows

    p = {"per_expert": 2048, "per_expert_by_block": {"mlp": 3072, "self_attention.experts": 1024}}
    rows = {r["fact"]: r["value"] for r in card_rows({"model": {"name": "m", "family": "jetmoe", "parameters": p}})}
    assert rows["per expert"] == "mlp 3.07K (3,072); self_attention.experts 1.02K (1,024)"
    rows = {r["fact"]: r["value"] for r in card_rows({"model": {"name": "m", "parameters": {"per_expert": 2048}}})}
    assert rows["per expert"] == "2.05K (2,048)"


def test_an_audit_interrupted_while_hardening_resumes_the_hardening(tmp_path, monkeypatch):
    from moeguard import trainstate

    real, saves = trainstate.save, []

    def save_then_stop(*a, **k):       # the process dies right after the first state is on disk
        real(*a, **k)
        saves.append(k["step"])
        raise KeyboardInterrupt
    monkeypatch.setattr(trainstate, "save", save_then_stop)
    run = tmp_path / "run"
    args = ["audit", "--out", str(run), "--tasks", "arith-compare", "--methods", "frequency", "--no-recovery",
            "--random-seeds", "1", "--eval-limit", "16", "--recovery-eval-limit", "16", "--pool-size", "32",
            "--samples", "8", "--defense", "entangle", "--harden-steps", "3", "--harden-save-every", "2",
            "--defense-budget", "4",
            "--threads", str(THREADS), "--defense-modes", "lora", "--defense-lr-scales", "1", "--defense-epochs", "1",
            "--defense-seeds", "1"]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 130 and saves == [2] and (run / "jobs" / "harden-state" / "state.json").exists()
    monkeypatch.setattr(trainstate, "save", real)
    assert main(args) == 0
    log = json.loads((run / "stages" / "harden" / "hardening.json").read_text())
    assert log["resumed_from"] == 2 and [r["step"] for r in log["log"]] == list(range(1, 4))
    # saved as `moeguard harden` saves it, with its record (and a protocol for a defense with one)
    kept = json.loads((run / "stages" / "harden" / "hardened" / "moeguard_hardening.json").read_text())
    assert kept["method"] == "entangle" and kept["resumed_from"] == 2
    assert not (run / "jobs" / "harden-state").exists()


def test_overwrite_empties_an_old_run_only_once_the_new_inputs_are_good(tmp_path, capsys):
    from moeguard.cli import main

    run = tmp_path / "run"
    (run / "stages" / "baseline").mkdir(parents=True)
    (run / "stages" / "baseline" / "done.json").write_text("{}")
    (run / "audit.json").write_text('{"schema": "moeguard.audit-run/1", "config": {}}')
    capsys.readouterr()
    assert main(["audit", "--out", str(run), "--overwrite", "--model", str(tmp_path / "nosuch")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # the mistyped model lost nothing: the old run is still there to resume or inspect
    assert (run / "stages" / "baseline" / "done.json").exists() and (run / "audit.json").exists()


@pytest.mark.parametrize("damage", ["marker-list", "marker-bytes", "file-cut", "file-gone"])
def test_a_damaged_finished_stage_runs_again_instead_of_failing_the_resume(tmp_path, damage):
    from moeguard.audit.stages import StageStore

    runs = []

    def stage(folder):
        runs.append(1)
        (folder / "baseline.json").write_text('{"accuracy": 0.5}')

    StageStore(tmp_path).run("baseline", {"a": 1}, stage)
    folder = tmp_path / "stages" / "baseline"
    if damage == "marker-list":
        (folder / "done.json").write_text("[]")
    elif damage == "marker-bytes":
        (folder / "done.json").write_bytes(b"\xff\xfe{")
    elif damage == "file-cut":
        (folder / "baseline.json").write_text('{"accu')
    else:
        (folder / "baseline.json").unlink()
    again = StageStore(tmp_path).run("baseline", {"a": 1}, stage)
    assert len(runs) == 2 and not again.cached and again.read("baseline.json") == {"accuracy": 0.5}
    assert StageStore(tmp_path).run("baseline", {"a": 1}, stage).cached and len(runs) == 2   # whole again: reused


@pytest.mark.parametrize("content", [b"[]", b'{"job": "x"}', b"\xff{", b'{"job": {"key": "K"}, "scope": null}'])
def test_a_damaged_job_file_is_run_again(tmp_path, content):
    from moeguard.studies.engine import Job, load_done

    job = Job(stage="s", name="n", fn="m:f", args={})
    path = job.path(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.replace(b"K", job.key.encode()))
    assert load_done(job, tmp_path) is None


def test_settings_of_a_stage_that_is_off_are_said_and_harden_steps_without_a_defense_refused():
    import warnings

    from moeguard.audit.config import AuditConfig, check
    from moeguard.errors import MoeguardError

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        check(AuditConfig(recovery=False, budgets=[8, 16], scan_contexts=2))
        check(AuditConfig())                                    # nothing set: nothing said
    texts = [str(w.message) for w in said]
    assert texts == ["budgets is set, and the recovery stage is off: it has no effect (drop --no-recovery to run it)",
                     "scan_contexts is set, and the scan stage is off: it has no effect (pass --scan to run it)"], texts
    with pytest.raises(MoeguardError, match=r"harden_steps 5 sets the hardening, and no --defense hardens in this audit "
                                            r"\(--hardened names a checkpoint already hardened\)") as e:
        check(AuditConfig(hardened="x", harden_steps=5))
    assert e.value.hint == "leave harden_steps out"          # not --defense, which --hardened refuses
    with pytest.raises(MoeguardError, match="harden_steps 5 and harden_save_every 2 set the hardening, and no") as e:
        check(AuditConfig(harden_steps=5, harden_save_every=2))
    assert e.value.hint == "pass --defense NAME to harden within the audit, or leave harden_steps and harden_save_every out"
    check(AuditConfig(defense="entangle", harden_steps=5, harden_save_every=2))


def test_a_kept_scan_document_is_trusted_only_when_it_reads_whole(tmp_path):
    """A kill mid-write left a damaged scan.json in the job's folder: every resume copied it into the
    stage, and the report failed reading it."""
    from moeguard.io import whole_json as _whole_json

    f = tmp_path / "scan.json"
    assert not _whole_json(f)                     # none yet: scan
    f.write_text('{"schema": "moeguard.scan/1", "experts": [')
    assert not _whole_json(f)                     # cut short: scan again
    f.write_text('{"schema": "moeguard.scan/1", "experts": []}')
    assert _whole_json(f)
