"""From a read-only review of the documented journeys: a pruned or merged checkpoint names its
source so that it resolves from any folder; prune and merge given scores of another model and no
--model are refused; merge on scores of a task from a YAML file says which file to pass."""

from __future__ import annotations

import json
import shutil

import pytest

from moeguard.cli import main
from moeguard.models.loading import EMBEDDED_MODEL_DIR


def _one_line(code, err, *needles):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("moeguard: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    path = tmp_path_factory.mktemp("scores") / "scores.json"
    assert main(["attribute", "--task", "arith-compare", "--method", "frequency", "--samples", "8",
                 "--out", str(path)]) == 0
    return path


def test_an_in_memory_prune_of_a_folder_named_relatively_records_its_absolute_path(tmp_path, monkeypatch):
    """'source': 'ckpt' (as typed) was read by realign from its own folder: another checkpoint named
    ckpt there, of the same shape, became the original that every retention divides by."""
    shutil.copytree(EMBEDDED_MODEL_DIR, tmp_path / "ckpt")
    (tmp_path / "plan.json").write_text(json.dumps({"keep": {str(l): [0, 1, 2, 3] for l in range(4)}}))
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "--model", "ckpt", "--plan", "plan.json", "--in-memory", "--out", "small"]) == 0
    record = json.loads((tmp_path / "small" / "moeguard_pruning.json").read_text())
    assert record["source"] == str((tmp_path / "ckpt").resolve())
    assert main(["prune", "--plan", "plan.json", "--in-memory", "--out", "emb"]) == 0   # the embedded model: by name
    assert json.loads((tmp_path / "emb" / "moeguard_pruning.json").read_text())["source"] == "embedded"


def test_scores_of_another_model_are_refused_without_model(scores, tmp_path, capsys):
    """The docs' recipe had no --model: a zoo model's scores pruned the embedded model, without a word."""
    doc = json.loads(scores.read_text())
    doc["model"] = "zoo/my-model"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    for argv in (["prune", "--scores", str(other), "--keep", "4", "--out", str(tmp_path / "p")],
                 ["merge", "--scores", str(other), "--keep", "4", "--method", "average", "--out", str(tmp_path / "m")]):
        capsys.readouterr()
        _one_line(main(argv), capsys.readouterr().err, "scores model 'zoo/my-model', and no --model was given",
                  "pass --model zoo/my-model")
    assert not (tmp_path / "p").exists() and not (tmp_path / "m").exists()
    # a sweep's or an audit's scores name the embedded model by the folder transformers loaded it from
    doc["model"] = str(EMBEDDED_MODEL_DIR)
    own = tmp_path / "own.json"
    own.write_text(json.dumps(doc))
    assert main(["prune", "--scores", str(own), "--keep", "4", "--out", str(tmp_path / "plan.json"), "--plan-only"]) == 0
    # the output's own check comes first (a file where a folder goes), then the scores' model
    (tmp_path / "f.txt").write_text("x")
    capsys.readouterr()
    _one_line(main(["merge", "--scores", str(other), "--keep", "4", "--method", "average", "--out",
                    str(tmp_path / "f.txt"), "--overwrite"]), capsys.readouterr().err, "is a file; this command writes a folder")


def test_merge_on_scores_of_a_file_task_names_the_file_to_pass(tmp_path, monkeypatch, capsys):
    """Its help says the task defaults to the scores' task: one from a YAML file is registered only in
    the process that read it ('unknown task' with no way forward)."""
    from moeguard.tasks import registry

    src = EMBEDDED_MODEL_DIR.parent.parent / "tasks" / "embedded" / "arith-compare.yaml"
    (tmp_path / "mine.yaml").write_text(src.read_text().replace("name: arith-compare", "name: arith-mine"))
    registry.get_task("arith-compare")
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_origins", dict(registry._origins))
    monkeypatch.chdir(tmp_path)
    assert main(["attribute", "--task", "mine.yaml", "--method", "frequency", "--samples", "8", "--out", "s.json"]) == 0
    monkeypatch.setattr(registry, "_registry", {k: v for k, v in registry._registry.items() if k != "arith-mine"})
    capsys.readouterr()
    _one_line(main(["merge", "--scores", "s.json", "--keep", "4", "--method", "router-weighted", "--out", "m"]),
              capsys.readouterr().err, "s.json scores task 'arith-mine', which is not a registered task here",
              "pass --task mine.yaml")
    assert main(["merge", "--scores", "s.json", "--keep", "4", "--method", "router-weighted", "--task", "mine.yaml",
                 "--samples", "8", "--out", "m"]) == 0


def test_recovery_takes_a_sweeps_method_for_the_model_it_names_as_a_path(tmp_path, monkeypatch):
    """The sweep's model was compared by the name as typed: './ckpt' and 'ckpt' were refused as two
    models, and another folder's 'ckpt' accepted as this one."""
    from moeguard.errors import MoeguardError
    from moeguard.models.loading import resolve
    from moeguard.studies.recovery import best_method

    for where in ("a", "b"):
        shutil.copytree(EMBEDDED_MODEL_DIR, tmp_path / where / "ckpt")
    sweep = lambda name: {"faithfulness": {"t": {"gate": {"auc": 0.9}, "frequency": {"auc": 0.5}}},  # noqa: E731
                          "run": {"settings": {"model": name}}}
    monkeypatch.chdir(tmp_path / "a")
    ref = resolve("./ckpt")
    assert best_method(sweep("ckpt"), "t", model=ref) == "gate"
    assert best_method(sweep(str(tmp_path / "a" / "ckpt")), "t", model=resolve("ckpt")) == "gate"
    with pytest.raises(MoeguardError, match="the sweep ranks methods on model '.*b/ckpt'; this study is on 'ckpt'"):
        best_method(sweep(str(tmp_path / "b" / "ckpt")), "t", model=resolve("ckpt"))
    monkeypatch.chdir(tmp_path / "b")   # the sweep's relative 'ckpt' is this folder's: not a's model
    with pytest.raises(MoeguardError, match="this study is on"):
        best_method(sweep("ckpt"), "t", model=ref)
