"""`harden`, `attack`, `defend-eval` and `realign --protocol` end to end on the embedded model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moeguard.cli import main
from moeguard.defense.attack import envelope, summarize_attack
from moeguard.defense.evaluate import extra_labels

SMALL_ATTACK = ["--budget", "16", "--budgets", "8,16", "--methods", "frequency,gate", "--modes", "full,lora",
                "--lr-scales", "1,10", "--epochs", "1", "--seeds", "2", "--eval-limit", "32", "--pool-size", "64",
                "--samples", "16"]


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    out = tmp_path_factory.mktemp("h") / "selective"
    assert main(["harden", "--method", "selective", "--steps", "3", "--out", str(out)]) == 0
    return out


def test_harden_writes_a_loadable_checkpoint_its_log_and_a_protocol(hardened):
    from transformers import AutoModelForCausalLM

    doc = json.loads((hardened / "moeguard_hardening.json").read_text())
    assert doc["method"] == "selective" and len(doc["log"]) == 3
    # every term of the objective is logged, so its movement can be read from the run
    assert {"utility", "balance", "pruned", "attack_after", "authorized_after"} <= set(doc["log"][0])
    assert doc["run"]["settings"]["steps"] == 3 and "versions" in doc["run"]
    proto = json.loads((hardened / "moeguard_protocol.json").read_text())
    assert proto["modes"] == ["lora"] and all("self_attn" in p for p in proto["authorized_parameters"])
    m = AutoModelForCausalLM.from_pretrained(hardened)
    from moeguard.models.loading import load_model

    base, _, _ = load_model(None)
    changed = [n for n, p in m.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed  # it trained


def test_harden_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    assert main(["harden", "--method", "entangel", "--out", str(tmp_path / "a")]) == 2
    assert "entangle" in capsys.readouterr().err  # the suggestion
    assert main(["harden", "--keep", "8", "--steps", "1", "--out", str(tmp_path / "b")]) == 2
    assert main(["harden", "--tasks", "no-such-task", "--steps", "1", "--out", str(tmp_path / "c")]) == 2
    assert main(["harden", "--method", "selective", "--authorized", "*.nothing.*", "--steps", "1",
                 "--out", str(tmp_path / "d")]) == 2
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
    assert s["pruned_retention"] == pytest.approx(doc["attribution"]["best"]["retention"], abs=1e-6) or w["retention"][0] is not None
    sc = doc["scratch"]
    assert len(sc["runs"]) == 2 * 1 * 2 and all(r["mode"] == "full" for r in sc["runs"])
    assert s["area_between"] == pytest.approx(s["auc"] - s["scratch_auc"])
    assert (out / "attack_curves.png").stat().st_size > 10_000 and (out / "curves.csv").exists()


def test_attack_bad_inputs_exit_2(tmp_path):
    common = ["attack", "--task", "arith-compare", "--out", str(tmp_path / "x")]
    assert main([*common, "--keep", "8"]) == 2
    assert main([*common, "--keep", "4", "--budget", "16", "--budgets", "8,12"]) == 2
    assert main([*common, "--keep", "4", "--methods", "nope"]) == 2
    assert main([*common, "--keep", "4", "--modes", "fulll"]) == 2
    assert main([*common, "--keep", "4", "--lr-scales", "a,b"]) == 2
    assert main([*common, "--keep", "4", "--budget", "5000"]) == 2
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
    assert u["cost_percent"] == pytest.approx(100 - 100 * u["hardened"] / u["base"])
    cell = doc["attacks"]["arith-compare"]["4"]
    # one from-scratch baseline shared by both: the same raw scores
    assert [r["points"] for r in cell["base"]["scratch"]["runs"]] == [r["points"] for r in cell["hardened"]["scratch"]["runs"]]
    assert set(doc["goals"]) >= {"undefended_keeps_90", "hardened_at_most_50", "utility_cost_at_most_2",
                                 "moonshot_no_better_than_scratch", "authorized_path_at_least_90"}
    assert doc["goals"]["hardened_at_most_50"]["values"]["arith-compare"] == cell["hardened"]["summary"]["realigned_retention"]
    assert doc["protocol"]["tasks"]["arith-compare"]["ratio_percent"] is not None
    assert (out / "defense_curves.png").exists() and (out / "utility.png").exists()


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
    assert s["labels_to_target"] == pytest.approx(6.0)
    assert s["area_between"] == pytest.approx(s["auc"] - s["scratch_auc"]) and s["no_better_than_scratch"] is False
    assert extra_labels({"labels_to_target": 6.0}, {"labels_to_target": None}, 8) == \
        {"labels": 2.0, "bound": "at least", "note": "the hardened model is not brought to the target within 8 labels"}
    assert extra_labels({"labels_to_target": 6.0}, {"labels_to_target": 7.5}, 8)["labels"] == 1.5
