"""`moeguard attribute` + `moeguard prune` end to end on the embedded model (the acceptance)."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeguard.cli import main
from moeguard.models.adapter import MoEAdapter
from moeguard.models.hooks import mask_experts
from moeguard.models.loading import EMBEDDED_MODEL_DIR, load_model
from moeguard.studies.sweep import reduction
from moeguard.tasks.evaluate import evaluate_task


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def scores_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scores") / "scores.json"
    assert main(["attribute", "--task", "arith-compare", "--method", "gate", "--samples", "8", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, scores_file):
    before = _digest(EMBEDDED_MODEL_DIR)
    out = tmp_path_factory.mktemp("pruned") / "keep4"
    assert main(["prune", "--scores", str(scores_file), "--keep", "4", "--out", str(out), "--in-memory"]) == 0
    assert _digest(EMBEDDED_MODEL_DIR) == before  # the input is never modified
    return out


def test_scores_file_has_method_task_model_and_samples(scores_file):
    doc = json.loads(scores_file.read_text())
    assert doc["method"] == "gate" and doc["task"] == "arith-compare" and doc["samples"] == 8
    assert doc["model"] == "embedded" and len(doc["scores"]) == 4 and all(len(r) == 8 for r in doc["scores"].values())
    assert doc["run"]["versions"]["torch"]


def test_pruned_checkpoint_loads_in_vanilla_transformers(pruned):
    record = json.loads((pruned / "moeguard_pruning.json").read_text())
    keep = {int(l): v for l, v in record["keep"].items()}
    assert all(len(v) == 4 for v in keep.values()) and record["plan"]["rule"] == "keep=4"
    small = AutoModelForCausalLM.from_pretrained(pruned)
    assert small.config.num_local_experts == 4
    assert all(layer.mlp.gate.weight.shape[0] == 4 for layer in small.model.layers)
    full, tok, _ = load_model(None)
    expected = reduction(MoEAdapter(full), keep)["params"]
    assert sum(p.numel() for p in small.parameters()) == expected
    # the pruned checkpoint scores exactly what masking the full model scores
    tok2 = AutoTokenizer.from_pretrained(pruned)
    physical = evaluate_task(small, tok2, "arith-compare", limit=24, baseline=False)
    with mask_experts(full, keep):
        masked = evaluate_task(full, tok, "arith-compare", limit=24, baseline=False)
    assert physical.score == masked.score
    assert not (pruned / "moeguard_card.json").exists()  # the full model's card does not describe this one


def test_streaming_and_in_memory_agree_on_the_embedded_model(tmp_path, scores_file, pruned):
    out = tmp_path / "streamed"
    assert main(["prune", "--scores", str(scores_file), "--keep", "4", "--out", str(out), "--streaming"]) == 0
    with safe_open(pruned / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_prune_refuses_bad_requests_before_work(tmp_path, scores_file, pruned, capsys):
    before = _digest(pruned)
    assert main(["prune", "--scores", str(scores_file), "--keep", "4", "--out", str(pruned)]) == 2
    assert "already exists" in capsys.readouterr().err and _digest(pruned) == before
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep": {"0": [0, 1]}}))
    assert main(["prune", "--plan", str(plan), "--out", str(tmp_path / "x")]) == 2
    assert "does not name MoE layers" in capsys.readouterr().err
    assert main(["prune", "--plan", str(plan), "--scores", str(scores_file), "--out", str(tmp_path / "x")]) == 2
    assert "exactly one of --scores or --plan" in capsys.readouterr().err
    assert main(["prune", "--scores", str(scores_file), "--keep", "9", "--out", str(tmp_path / "x")]) == 2
    assert "layers have 8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_explicit_plan_and_plan_only(tmp_path, scores_file):
    plan_out = tmp_path / "budget.json"
    assert main(["prune", "--scores", str(scores_file), "--budget", "20", "--out", str(plan_out), "--plan-only"]) == 0
    doc = json.loads(plan_out.read_text())
    assert doc["kept_total"] == 20 and doc["rule"] == "budget=20"
    explicit = tmp_path / "explicit.json"
    explicit.write_text(json.dumps({"keep": {str(l): [0, 1, 2, 7] for l in range(4)}}))
    out = tmp_path / "explicit"
    assert main(["prune", "--plan", str(explicit), "--out", str(out)]) == 0
    record = json.loads((out / "moeguard_pruning.json").read_text())
    assert record["keep"] == {str(l): [0, 1, 2, 7] for l in range(4)}
    # the weights are the plan's: slot 3 holds original expert 7, and the router keeps rows 0, 1, 2, 7
    import torch
    from safetensors.torch import load_file

    from moeguard.models.loading import resolve

    src, cut = load_file(str(resolve(None).path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for l in range(4):
        block = f"model.layers.{l}.block_sparse_moe"
        for w in ("w1", "w2", "w3"):
            assert torch.equal(cut[f"{block}.experts.3.{w}.weight"], src[f"{block}.experts.7.{w}.weight"])
        assert f"{block}.experts.4.w1.weight" not in cut
        assert torch.equal(cut[f"{block}.gate.weight"], src[f"{block}.gate.weight"][[0, 1, 2, 7]])


def test_budget_prune_writes_a_per_layer_checkpoint_moeguard_loads(tmp_path, scores_file):
    out = tmp_path / "budget"
    assert main(["prune", "--scores", str(scores_file), "--budget", "20", "--out", str(out)]) == 0
    record = json.loads((out / "moeguard_pruning.json").read_text())
    keep = {int(l): v for l, v in record["keep"].items()}
    assert sum(len(v) for v in keep.values()) == 20 and len({len(v) for v in keep.values()}) > 1
    assert record["loadable_by"].startswith("moeguard")
    small, tok, _ = load_model(str(out))
    assert [l.router.weight.shape[0] for l in MoEAdapter(small).layers] == [len(keep[l]) for l in sorted(keep)]
    full, tok_full, _ = load_model(None)
    physical = evaluate_task(small, tok, "arith-compare", limit=24, baseline=False)
    with mask_experts(full, keep):
        masked = evaluate_task(full, tok_full, "arith-compare", limit=24, baseline=False)
    assert physical.score == masked.score


@pytest.mark.parametrize("command", ["prune", "merge"])
def test_in_memory_output_inside_or_around_the_input_is_refused_and_the_input_kept(command, tmp_path, capsys):
    import shutil

    model = tmp_path / "par" / "model"
    shutil.copytree(EMBEDDED_MODEL_DIR, model)
    before = _digest(model)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep": {str(l): [0, 1] for l in range(4)}} if command == "prune"
                               else {"clusters": {str(l): [[0, 1], [2]] for l in range(4)}}))
    extra = ["--method", "average"] if command == "merge" else []
    # inside it, and around it with --overwrite (whose swap deleted the folder holding the input)
    for out, flags in ((model / "sub", []), (tmp_path / "par", ["--overwrite"])):
        capsys.readouterr()
        code = main([command, "--model", str(model), "--plan", str(plan), *extra, "--out", str(out), "--in-memory", *flags])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert any(s in err for s in ("overlaps the source checkpoint", "inside the model folder", "holds) the input")), err
    assert _digest(model) == before and not (model / "sub").exists()


def test_attribute_refuses_a_budget_pruned_checkpoint_before_loading_it(tmp_path, capsys, monkeypatch):
    from moeguard.models.handle import ModelHandle

    out = tmp_path / "budget"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep": {"0": [0, 1, 2], "1": [0, 1, 2, 3, 4], "2": [0, 1], "3": [0, 1, 2, 3]}}))
    assert main(["prune", "--plan", str(plan), "--out", str(out)]) == 0
    monkeypatch.setattr(ModelHandle, "load", lambda *a, **k: pytest.fail("the weights were loaded"))
    capsys.readouterr()
    assert main(["attribute", "--model", str(out), "--task", "arith-compare", "--method", "gate",
                 "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "different expert counts [2, 3, 4, 5]" in err and len(err.strip().splitlines()) == 1, err


def test_prune_ends_with_a_summary_table_of_each_layer(tmp_path, scores_file, capsys):
    out = tmp_path / "p"
    capsys.readouterr()
    assert main(["prune", "--scores", str(scores_file), "--keep", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rec = json.loads((out / "moeguard_pruning.json").read_text())
    assert "experts kept" in text and "dropped" in text and "loadable by transformers" in text
    for layer, kept in rec["keep"].items():   # a row per layer: its kept experts, then the rest
        row = next(line for line in text.splitlines() if line.startswith("│") and line.split("│")[1].strip() == layer)
        cells = [c.strip() for c in row.split("│")[1:-1]]
        assert cells == [layer, "4/8", " ".join(map(str, kept)), " ".join(str(e) for e in range(8) if e not in kept)]
    title = " ".join(text.split())   # the title wraps at the table's width
    assert f"{rec['bytes_in'] / 2**20:,.1f} MiB -> {rec['bytes_out'] / 2**20:,.1f} MiB" in title
    assert f"({100 * rec['bytes_out'] / rec['bytes_in']:.0f}%)" in title


def test_the_prune_table_abbreviates_hundreds_of_experts():
    from rich.console import Console

    from moeguard.report.tables import prune_table

    rec = {"original_num_experts": 256, "keep": {"3": list(range(0, 64, 2))}, "plan": {"rule": "keep=32"},
           "bytes_in": 2**30, "bytes_out": 2**29, "loadable_by": "transformers"}
    c = Console(width=200, record=True)
    c.print(prune_table(rec))
    text = c.export_text()
    assert "32/256" in text and "0 2 4 6 8 10 12 14 16 18 20 22 24 26 28 30 ... (+16)" in text
    assert "1 3 5 7 9 11 13 15 17 19 21 23 25 27 29 31 ... (+208)" in text and "1,024.0 MiB -> 512.0 MiB (50%)" in text
    # a budget-pruned source: each layer against its own count
    rec = {"original_num_experts": 8, "original_experts_per_layer": {"0": 8, "1": 4}, "keep": {"0": [0, 5], "1": [1, 3]},
           "plan": {"rule": "keep=2"}}
    c = Console(width=200, record=True)
    c.print(prune_table(rec))
    rows = {r[0]: r[1:] for r in ([x.strip() for x in line.split("│")[1:-1]] for line in c.export_text().splitlines()
                                  if line.startswith("│"))}
    assert rows["0"] == ["2/8", "0 5", "1 2 3 4 6 7"] and rows["1"] == ["2/4", "1 3", "0 2"]
