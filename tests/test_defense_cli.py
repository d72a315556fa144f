"""`harden`, `attack`, `defend-eval` and `realign --protocol` end to end on the embedded model."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from moeguard.cli import main
from moeguard.studies.attacksummary import envelope, summarize_attack
from moeguard.studies.defend import extra_labels

SMALL_ATTACK = ["--budget", "16", "--budgets", "8,16", "--methods", "frequency,gate", "--modes", "full,lora",
                "--lr-scales", "1,10", "--epochs", "1", "--seeds", "2", "--eval-limit", "32", "--pool-size", "64",
                "--samples", "16"]


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    out = tmp_path_factory.mktemp("h") / "selective"
    assert main(["harden", "--method", "selective", "--steps", "3", "--save-every", "2", "--out", str(out)]) == 0
    return out


def test_harden_writes_a_loadable_checkpoint_its_log_and_a_protocol(hardened):
    from transformers import AutoModelForCausalLM

    doc = json.loads((hardened / "moeguard_hardening.json").read_text())
    assert doc["method"] == "selective" and len(doc["log"]) == 3
    # every term of the objective is logged, so its movement can be read from the run
    assert {"utility", "balance", "pruned", "attack_after", "authorized_after"} <= set(doc["log"][0])
    assert doc["run"]["settings"]["steps"] == 3 and "versions" in doc["run"]
    assert doc["run"]["settings"]["save_every"] == 2 and not hardened.with_name(f".{hardened.name}.harden-state").exists()
    proto = json.loads((hardened / "moeguard_protocol.json").read_text())
    assert proto["modes"] == ["lora"] and all("self_attn" in p for p in proto["authorized_parameters"])
    m = AutoModelForCausalLM.from_pretrained(hardened)
    from moeguard.models.loading import load_model

    base, _, _ = load_model(None)
    changed = [n for n, p in m.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed  # it trained


def refused(args, capsys) -> str:
    """Run a command that must be refused: exit code 2, no traceback and one ``moeguard: error:``
    line, returned with its whitespace collapsed and ``_`` read as ``-`` (a setting's name and its
    flag alike)."""
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("moeguard: error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    return " ".join(errors[0].split()).replace("_", "-")


def names_keep(line: str, keep: int, experts: int) -> bool:
    """The line names the refused keep level and the experts per layer it is judged against."""
    return re.search(rf"keep\D*\b{keep}\b", line) is not None and f"{experts} experts" in line


def test_harden_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    line = refused(["harden", "--method", "entangel", "--out", str(tmp_path / "a")], capsys)
    assert "'entangel'" in line and "entangle" in line.replace("entangel", "")  # the bad name and the suggestion
    line = refused(["harden", "--keep", "8", "--steps", "1", "--out", str(tmp_path / "b")], capsys)
    assert names_keep(line, 8, 8), line
    line = refused(["harden", "--tasks", "no-such-task", "--steps", "1", "--out", str(tmp_path / "c")], capsys)
    assert "no-such-task" in line
    line = refused(["harden", "--method", "selective", "--authorized", "*.nothing.*", "--steps", "1",
                    "--out", str(tmp_path / "d")], capsys)
    assert "*.nothing.*" in line and "match" in line.lower()  # the pattern, and that it matched nothing
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    d = tmp_path_factory.mktemp("pruned")
    plan = d / "plan.json"
    plan.write_text(json.dumps({"keep": {str(l): [0, 1, 2, 3] for l in range(4)}}))
    assert main(["prune", "--plan", str(plan), "--out", str(d / "keep4")]) == 0
    return d / "keep4"


def test_realign_with_a_protocol_trains_only_the_authorized_parameters(pruned, hardened, tmp_path, capsys):
    proto = hardened / "moeguard_protocol.json"
    base = ["realign", "--model", str(pruned), "--task", "arith-compare", "--budget", "8", "--query-size", "8",
            "--min-steps", "5", "--epochs", "1", "--eval-limit", "16", "--pool-size", "32", "--protocol", str(proto)]
    assert main([*base, "--mode", "full", "--out", str(tmp_path / "full")]) == 2
    assert "does not authorize --mode full" in capsys.readouterr().err
    assert not (tmp_path / "full").exists()
    assert main([*base, "--mode", "lora", "--out", str(tmp_path / "lora")]) == 0
    before, after = load_file(str(pruned / "model.safetensors")), load_file(str(tmp_path / "lora" / "model.safetensors"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("self_attn" in n for n in changed)
    curve = json.loads((tmp_path / "lora" / "learning_curve.json").read_text())
    assert curve["settings"]["finetune"]["only"] == json.loads(proto.read_text())["authorized_parameters"]


def test_realign_rejects_a_file_that_is_not_a_protocol(pruned, tmp_path, capsys):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"schema": "something/1"}))
    assert main(["realign", "--model", str(pruned), "--task", "arith-compare", "--protocol", str(bad),
                 "--out", str(tmp_path / "o")]) == 2
    assert "not a moeguard protocol" in capsys.readouterr().err


def test_attack_reports_the_worst_case_over_its_grid_and_a_from_scratch_baseline(tmp_path):
    out = tmp_path / "attack"
    assert main(["attack", "--task", "arith-compare", "--keep", "4", "--out", str(out), *SMALL_ATTACK]) == 0
    doc = json.loads((out / "attack.json").read_text())
    # every method x plan kind was tried and the attacker kept the best one
    cands = doc["attribution"]["candidates"]
    assert {(c["method"], c["plan"]) for c in cands} == {(m, p) for m in ("frequency", "gate") for p in ("uniform", "budgeted")}
    # the document names the methods the pick ran (settings keep the user's list as given)
    assert doc["attribution"]["methods"] == ["frequency", "gate"]
    assert doc["attribution"]["best"]["retention"] == max(c["retention"] for c in cands)
    # 2 modes x 2 lrs x 1 epochs x 2 seeds; lr spans the mode default and 10x
    assert len(doc["runs"]) == 8
    assert {r["lr"] for r in doc["runs"] if r["mode"] == "full"} == {2e-4, 2e-3}
    # the worst case is the maximum over every run at every label count, never a mean
    w = doc["worst_case"]
    for i, x in enumerate(w["labels"]):
        scores = [p["score"] for r in doc["runs"] for p in r["points"] if p["labels"] == x]
        assert w["score"][i] == max(scores)
    assert w["labels"] == [0, 8, 16]
    s = doc["summary"]
    # the attacker starts from its pick: the pruned model's retention is the best candidate's, and
    # every re-alignment run starts (0 labels) from that pruned model
    assert s["pruned_retention"] == doc["attribution"]["best"]["retention"]
    assert w["retention"][0] == pytest.approx(s["pruned_retention"])
    sc = doc["scratch"]
    assert len(sc["runs"]) == 2 * 1 * 2 and all(r["mode"] == "full" for r in sc["runs"])
    # the summary is the one of the written curves (its arithmetic: test_summary_and_extra_labels)
    assert {k: v for k, v in s.items() if k != "uncertainty"} == summarize_attack(doc, target=s["target"])
    b = sc["best"]
    common = [x for x in w["labels"] if x in b["labels"] and x > 0]
    assert s["area_between"] is not None and common and s["no_better_than_scratch"] == all(
        w["retention"][w["labels"].index(x)] <= b["retention"][b["labels"].index(x)] + 1e-9 for x in common)
    assert (out / "attack_curves.png").stat().st_size > 10_000 and (out / "curves.csv").exists()


def test_attack_on_both_routes_takes_the_envelope_over_pruning_and_merging(tmp_path):
    out = tmp_path / "attack"
    assert main(["attack", "--task", "arith-compare", "--keep", "2", "--out", str(out), "--budget", "8",
                 "--budgets", "8", "--methods", "frequency", "--plans", "uniform", "--modes", "lora", "--lr-scales", "1",
                 "--epochs", "1", "--seeds", "1", "--eval-limit", "8", "--pool-size", "32", "--samples", "8",
                 "--no-scratch", "--routes", "prune,merge", "--merge-methods", "average,hc-smoe"]) == 0
    doc = json.loads((out / "attack.json").read_text())
    cands = doc["attribution"]["candidates"]
    assert {(c.get("route", "prune"), c.get("merge_method")) for c in cands} == {
        ("prune", None), ("merge", "average"), ("merge", "hc-smoe")}
    assert set(doc["routes"]) == {"prune", "merge"}
    merge_pick = doc["routes"]["merge"]["pick"]
    assert merge_pick["retention"] == max(c["retention"] for c in cands if c.get("route") == "merge")
    # one cell per route (1 strategy x 1 mode x 1 lr x 1 epochs x 1 seed); the merge cell starts from the merged model
    assert sorted(r.get("route", "prune") for r in doc["runs"]) == ["merge", "prune"]
    cell = next(r for r in doc["runs"] if r.get("route") == "merge")
    assert cell["points"][0]["score"] == pytest.approx(merge_pick["score"])
    # the worst case is the envelope over both routes, never below either
    w = doc["worst_case"]
    for route in ("prune", "merge"):
        rw = doc["routes"][route]["worst_case"]
        assert rw["labels"] and len(rw["labels"]) == len(rw["retention"])   # the loop below checks each
        for x, v in zip(rw["labels"], rw["retention"]):
            assert w["retention"][w["labels"].index(x)] >= v
    by = doc["summary"]["realigned_retention_by_route"]
    assert doc["summary"]["realigned_retention"] == max(by.values())
    assert doc["summary"]["stronger_route"] == max(by, key=by.get)
    assert doc["attribution"]["best"]["retention"] == max(c["retention"] for c in cands)
    # curves.csv says which route each row is (the same setting twice, with nothing to tell them apart)
    import csv

    with open(out / "curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["route"] for r in rows} == {"prune", "merge"}


def test_attack_bad_inputs_exit_2(tmp_path, capsys):
    common = ["attack", "--task", "arith-compare", "--out", str(tmp_path / "x")]
    line = refused([*common, "--keep", "8"], capsys)
    assert names_keep(line, 8, 8), line
    line = refused([*common, "--keep", "4", "--budget", "16", "--budgets", "8,12"], capsys)
    assert "12" in line and "16" in line and "budget" in line, line  # the budgets and the budget they must end at
    line = refused([*common, "--keep", "4", "--methods", "nope"], capsys)
    assert "'nope'" in line and "method" in line, line
    line = refused([*common, "--keep", "4", "--modes", "fulll"], capsys)
    assert "'fulll'" in line and "mode" in line, line
    line = refused([*common, "--keep", "4", "--lr-scales", "a,b"], capsys)
    assert "lr-scales" in line and "'a" in line, line  # the setting and its bad value
    line = refused([*common, "--keep", "4", "--routes", "merge", "--merge-methods", "avg"], capsys)
    assert "'avg'" in line and "merge method" in line and "average" in line, line
    line = refused([*common, "--keep", "4", "--routes", "prune,melt"], capsys)
    assert "'melt'" in line and "merge" in line, line
    line = refused([*common, "--keep", "4", "--budget", "5000"], capsys)
    assert "5000" in line and "pool" in line, line  # more labels than the pool holds
    assert not (tmp_path / "x").exists()


def test_defend_eval_compares_utility_attacks_and_the_protocol(hardened, tmp_path):
    out = tmp_path / "eval"
    args = ["defend-eval", "--hardened", str(hardened), "--tasks", "arith-compare", "--out", str(out),
            *SMALL_ATTACK]
    args[args.index("--seeds") + 1] = "1"
    args[args.index("--modes") + 1] = "full"
    assert main(args) == 0
    doc = json.loads((out / "defense.json").read_text())
    u = doc["utility"]["arith-compare"]
    # the cost's arithmetic: test_utility_cost_is_the_percent_of_the_base_score_lost; here its wiring
    assert (u["cost_percent"] > 0) == (u["hardened"] < u["base"])
    assert doc["goals"]["utility_cost_at_most_2"]["values"]["arith-compare"] == u["cost_percent"]
    cell = doc["attacks"]["arith-compare"]["4"]
    # one from-scratch baseline shared by both: the same raw scores (and some: two empty lists were equal)
    assert cell["base"]["scratch"]["runs"], cell["base"]["scratch"]
    assert [r["points"] for r in cell["base"]["scratch"]["runs"]] == [r["points"] for r in cell["hardened"]["scratch"]["runs"]]
    assert set(doc["goals"]) >= {"undefended_keeps_90", "hardened_at_most_50", "utility_cost_at_most_2",
                                 "moonshot_no_better_than_scratch", "authorized_path_at_least_90"}
    assert doc["goals"]["hardened_at_most_50"]["values"]["arith-compare"] == cell["hardened"]["summary"]["realigned_retention"]
    # the authorized path's score against full fine-tuning of the base, means over seeds
    p = doc["protocol"]["tasks"]["arith-compare"]
    import numpy as np

    assert p["ratio_percent"] == pytest.approx(100 * np.mean(p["authorized"]) / np.mean(p["full_ft_base"]))
    assert (out / "defense_curves.png").stat().st_size > 10_000 and (out / "utility.png").stat().st_size > 10_000


def test_envelope_takes_the_best_score_per_label_count_and_min_for_perplexity():
    runs = [{"strategy": "random", "mode": "full", "lr": 1, "epochs": 1, "seed": 0,
             "points": [{"labels": 0, "score": 10.0}, {"labels": 8, "score": 30.0}]},
            {"strategy": "random", "mode": "lora", "lr": 2, "epochs": 1, "seed": 0,
             "points": [{"labels": 0, "score": 10.0}, {"labels": 8, "score": 50.0}]}]
    e = envelope(runs, True, 100.0, 0.0)
    assert e["score"] == [10.0, 50.0] and e["argbest"][1]["mode"] == "lora"
    p = envelope(runs, False, 5.0, 100.0)
    assert p["score"] == [10.0, 30.0] and p["retention"] == pytest.approx([50.0, 5.0 / 30.0 * 100])


def test_summary_and_extra_labels():
    doc = {"budget": 8, "runs": [], "attribution": {"best": {"retention": 40.0}},
           "worst_case": {"labels": [0, 4, 8], "retention": [40.0, 90.0, 100.0], "above_baseline": [0, 0, 0]},
           "scratch": {"best": {"labels": [0, 4, 8], "retention": [50.0, 60.0, 70.0]}}}
    s = summarize_attack(doc, target=95)
    # 90 at 4 labels, 100 at 8: 95 is crossed halfway, at 6
    assert s["labels_to_target"] == pytest.approx(6.0)
    assert s["pruned_retention"] == 40.0 and s["realigned_retention"] == 100.0 and s["scratch_retention"] == 70.0
    # mean retention over 0..8 labels: ((40+90)/2*4 + (90+100)/2*4) / 8 = 80; scratch ((50+60)/2*4 + (60+70)/2*4) / 8 = 60
    assert s["auc"] == pytest.approx(80.0) and s["scratch_auc"] == pytest.approx(60.0)
    assert s["area_between"] == pytest.approx(20.0)
    assert s["scratch_labels_to_target"] is None  # 70 never reaches 95
    assert s["no_better_than_scratch"] is False  # 90 > 60 at 4 labels
    assert extra_labels({"labels_to_target": 6.0}, {"labels_to_target": None}, 8) == \
        {"labels": 2.0, "bound": "at least", "note": "the hardened model is not brought to the target within 8 labels"}
    assert extra_labels({"labels_to_target": 6.0}, {"labels_to_target": 7.5}, 8)["labels"] == 1.5


def test_utility_cost_is_the_percent_of_the_base_score_lost():
    """Hand-computed costs: accuracy 80 -> 76 loses 5%; 40 -> 42 gains (cost -5%); perplexity
    10 -> 12.5 keeps 10/12.5 = 80% of the base, a cost of 20% (direction-aware, not 100 - 125)."""
    from moeguard.studies.attack import AttackConfig
    from moeguard.studies.defend import DefendEvalConfig, DefendEvalStudy

    cfg = DefendEvalConfig(tasks=("arith-compare",), keeps=(), attack=AttackConfig(task="arith-compare", keep=4),
                           utility_tasks=("docstring-topic", "stdlib-code"))
    utility = [{"score": 80.0, "baseline": {"score": 50.0}}, {"score": 76.0},   # arith-compare: base, hardened
               {"score": 40.0, "baseline": {"score": 25.0}}, {"score": 42.0},   # docstring-topic
               {"score": 10.0, "baseline": {"score": 30.0}}, {"score": 12.5}]   # stdlib-code (perplexity)
    doc = DefendEvalStudy().reduce(cfg, {"utility": utility, "pick": [], "grid": []})
    u = doc["utility"]
    assert u["arith-compare"]["cost_percent"] == pytest.approx(5.0)
    assert u["docstring-topic"]["cost_percent"] == pytest.approx(-5.0)
    assert u["stdlib-code"]["cost_percent"] == pytest.approx(20.0) and u["stdlib-code"]["metric"] == "perplexity"
    assert u["arith-compare"]["baseline"] == 50.0
    goal = doc["goals"]["utility_cost_at_most_2"]
    assert goal["met"] is False and goal["values"] == pytest.approx({"arith-compare": 5.0, "docstring-topic": -5.0,
                                                                     "stdlib-code": 20.0})


def test_defend_eval_reads_a_protocol_named_by_its_checkpoint_folder(hardened):
    """``--protocol DIR`` (the hardened folder, which holds the protocol): the file inside it is what
    the run hashes and records (hashing the folder was an IsADirectoryError traceback)."""
    from moeguard.defense.protocol import FILENAME
    from moeguard.edge import resolve_model, resolve_tasks
    from moeguard.studies.attack import AttackConfig
    from moeguard.studies.defend import resolve

    b, h = resolve_model(None), resolve_model(str(hardened))
    cfg, path = resolve(base=b, hardened=h, tasks=resolve_tasks(["arith-compare"]), utility_tasks=[], keeps=None,
                        attack=AttackConfig(task="arith-compare", keep=1), protocol=hardened)
    assert path == hardened / FILENAME and path.is_file() and cfg.protocol["modes"]


def test_an_attack_plan_the_family_cannot_be_cut_to_is_recorded_and_not_picked(monkeypatch):
    """DeepSeek's group-limited routing needs the same keep in every layer: a budgeted plan that keeps
    6 and 2 was picked when it scored best, and pruning it failed after the whole evaluation (at every
    resume). Now it is recorded as unbuildable, never scored, and the pick is a plan that can be built."""
    import moeguard.attribution.run as attribution_run
    from moeguard.attribution.base import Scores
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.loading import load_model
    from moeguard.studies.attack import pick_job
    from moeguard.testing import tiny_model

    _, tok, _ = load_model(None)
    m = tiny_model("deepseek_v3", vocab_size=len(tok))
    layers = [l.index for l in MoEAdapter(m).layers]
    # layer 0's scores concentrated on 6 experts, the last layer's on 2: the budget of 8 goes 6 + 2
    rows = torch.tensor([[9.0] * 6 + [0.1, 0.1], [9.0, 9.0] + [0.1] * 6], dtype=torch.float64)[:len(layers)]
    monkeypatch.setattr(attribution_run, "score", lambda c, name: Scores(
        method=name, task="arith-compare", model="tiny", samples=1, tokens=1, layers=layers, num_experts=8, top_k=2,
        scores=rows))

    class Ctx:
        def model(self, ref):
            return m, tok

        def scratch_for(self, part):   # no scratch folder: nothing kept
            return None

    out = pick_job(Ctx(), task="arith-compare", keep=4, methods=["frequency"], plans=["uniform", "budgeted"],
                   samples=4, eval_limit=4, seed=0)
    by_plan = {c["plan"]: c for c in out["candidates"]}
    assert by_plan["budgeted"]["keep"] == {str(layers[0]): [0, 1, 2, 3, 4, 5], str(layers[1]): [0, 1]}
    assert by_plan["budgeted"]["score"] is None and "group-limited routing" in by_plan["budgeted"]["unbuildable"]
    assert out["best"]["plan"] == "uniform" and out["best"]["score"] is not None
    for routes in (("prune",), ("prune", "merge")):   # with the merge route's candidates built: a ValueError in its picks
        with pytest.raises(Exception, match="no pruning plan of the attack can be built") as e:
            pick_job(Ctx(), task="arith-compare", keep=4, methods=["frequency"], plans=["budgeted"], samples=4,
                     eval_limit=4, seed=0, routes=routes, merge_methods=("average",))
        assert type(e.value).__name__ == "MoeguardError" and "--plans uniform" in e.value.hint
