"""A task given as a YAML path works in every command that takes --task/--tasks, the audit included
(whose stages and jobs carry task names: the file's task must be known by name in every worker)."""

import json
import random

import pytest

from moeguard.cli import main
from conftest import THREADS

NAME = "my-compare"
ATTACK = ["--budget", "8", "--budgets", "4,8", "--methods", "gate", "--plans", "uniform", "--modes", "lora",
          "--lr-scales", "1", "--epochs", "1", "--seeds", "1", "--eval-limit", "8", "--pool-size", "32",
          "--samples", "4", "--no-scratch"]
FT = ["--min-steps", "2", "--epochs", "1", "--eval-limit", "8", "--pool-size", "32"]

COMMANDS = {
    "eval": ["eval", "--tasks", "Y", "--limit", "8", "--out", "O"],
    "attribute": ["attribute", "--task", "Y", "--method", "gate", "--samples", "4", "--out", "O"],
    "sweep": ["sweep", "--tasks", "Y,arith-compare", "--methods", "gate", "--keep", "4", "--samples", "4",
              "--eval-limit", "8", "--collateral-limit", "4", "--random-seeds", "1", "--no-deletion-curves",
              "--physical-checks", "0", "--out", "O"],
    "realign": ["realign", "--model", "P", "--task", "Y", "--budget", "8", "--query-size", "8", *FT, "--out", "O"],
    "recovery": ["recovery", "--task", "Y", "--keep", "4", "--strategies", "random", "--budgets", "4,8", "--seeds", "1",
                 "--method", "gate", "--samples", "4", *FT, "--out", "O"],
    "attack": ["attack", "--task", "Y", "--keep", "4", *ATTACK, "--out", "O"],
    "harden": ["harden", "--tasks", "Y,arith-compare", "--steps", "1", "--out", "O"],
    "defend-eval": ["defend-eval", "--hardened", "H", "--tasks", "Y", "--keeps", "4", *ATTACK, "--out", "O"],
    "zoo train": ["zoo", "train", "--tasks", "Y", "--steps", "2", "--out", "O"],
    "merge": ["merge", "--plan", "PL", "--method", "frequency-weighted", "--task", "Y", "--samples", "4",
              "--tokens", "8", "--out", "O"],
    "route-attack": ["route-attack", "--task", "Y", "--layer", "0", "--expert", "1", "--prefix-tokens", "2",
                     "--steps", "1", "--candidates", "4", "--out", "O"],
    "scan": ["scan", "--tasks", "Y,arith-compare", "--contexts", "1", "--candidates", "1", "--chain", "2", "--samples", "2",
             "--out", "O"],
    "monitor profile": ["monitor", "profile", "--tasks", "Y,arith-compare", "--limit", "8", "--window", "2", "--out", "O"],
    "audit": ["audit", "--tasks", "Y,arith-compare", "--methods", "gate", "--keeps", "4", "--budgets", "4,8",
              "--recovery-seeds", "1", "--strategies", "random", "--random-seeds", "1", "--eval-limit", "8",
              "--recovery-eval-limit", "8", "--pool-size", "32", "--samples", "4", "--threads", str(THREADS), "--out", "O"],
}


@pytest.fixture(autouse=True)
def _no_task_adopted_before():
    """Each command adopts the file's task in this process: with worksteal, a worker that ran this
    module's tests around another module's made the files twice (taskfile0, taskfile1), and the
    second copy's task was refused as differing from the first's adopted one."""
    from moeguard.tasks import registry

    registry._reset_for_tests()
    yield
    registry._reset_for_tests()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("taskfile")
    rng = random.Random(0)
    for split, n in (("train", 96), ("test", 32)):
        rows = []
        for _ in range(n):
            a, b = rng.randrange(10, 100), rng.randrange(10, 100)
            rows.append({"q": f"Is {a} greater than {b}?", "label": "yes" if a > b else "no"})
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "task.yaml").write_text(
        f"name: {NAME}\nkind: classification\nsource: {{type: local, path: ., format: jsonl, "
        "files: {train: train.jsonl, test: test.jsonl}}\nsplits: {train: train, eval: test}\n"
        "fields: {input: q, label: label}\nprompt: \"{q}\\nAnswer:\"\nlabels: {'yes': ' yes', 'no': ' no'}\n")
    plan = d / "plan.json"
    plan.write_text(json.dumps({"keep": {str(l): [0, 1, 2, 3] for l in range(4)}}))
    assert main(["prune", "--plan", str(plan), "--out", str(d / "pruned")]) == 0
    assert main(["harden", "--method", "entangle", "--steps", "1", "--tasks", "arith-compare",
                 "--out", str(d / "hardened")]) == 0
    return d


def _mentions(out, text):
    """The JSON outputs that name ``text`` outside their run records (which echo the command's
    settings, so they name the task whether or not its file was used)."""
    def work(doc):
        if isinstance(doc, dict):
            return {k: work(v) for k, v in doc.items() if k not in ("run", "settings")}
        return [work(v) for v in doc] if isinstance(doc, list) else doc

    found = [out] if out.is_file() else [f for f in out.rglob("*.json")]
    return [f for f in found if text in json.dumps(work(json.loads(f.read_text())))]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_yaml_task_path_works(command, files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the YAML's relative data path is resolved against its own folder
    out = tmp_path / "out"
    subs = {"Y": str(files / "task.yaml"), "Y,arith-compare": f"{files / 'task.yaml'},arith-compare",
            "O": str(out), "P": str(files / "pruned"), "H": str(files / "hardened"),
            "PL": str(files / "plan.json")}
    code = main([subs.get(a, a) for a in COMMANDS[command]])
    assert code == 0, capsys.readouterr().err
    assert _mentions(out, NAME), f"{command} wrote nothing that names the task {NAME}"
    if command == "attribute":   # the scores are the file's task's, and the run names the file it came from
        doc = json.loads(out.read_text())
        assert doc["task"] == NAME and doc["run"]["settings"]["task_file"] == str(files / "task.yaml")
    if command == "audit":
        doc = json.loads((out / "results.json").read_text())
        assert set(doc["tasks"]) == {NAME, "arith-compare"}
        assert NAME in (out / "report.md").read_text()


def test_every_command_taking_tasks_is_covered(capsys):
    import re

    from moeguard.cli import app
    from test_cli_bad_input import _commands

    taking = []
    for cmd in _commands(app):
        capsys.readouterr()
        assert main([*cmd.split(), "--help"]) == 0
        if re.search(r"--tasks?\b", capsys.readouterr().out):
            taking.append(cmd)
    assert sorted(taking) == sorted(COMMANDS)


def test_a_file_task_may_not_shadow_another_definition(files, tmp_path, capsys):
    clash = tmp_path / "clash.yaml"
    clash.write_text((files / "task.yaml").read_text().replace(f"name: {NAME}", "name: arith-compare")
                     .replace("path: .", f"path: {files}"))
    code = main(["audit", "--tasks", str(clash), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "differs from the task of that name" in err and "another name" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))


def test_a_fresh_worker_process_knows_the_file_task_through_the_runtime(files, tmp_path):
    """What a Ray worker sees: a new interpreter that knows only the built-in names gets the job
    (which names its task) and the runtime (which carries the file's task). Without the task in
    the runtime the same job fails by name, so the check can fail."""
    import pickle
    import subprocess
    import sys

    from moeguard.studies.engine import Job, Runtime
    from moeguard.tasks.registry import get_task

    task = get_task(str(files / "task.yaml"))
    job = Job(stage="baseline", name=NAME, fn="moeguard.studies.common:baseline_job",
              args={"task": NAME, "limits": [4], "seed": 0})
    runtimes = [Runtime(model=None, threads=1), Runtime(model=None, threads=1, tasks=(task,))]
    (tmp_path / "job.pkl").write_bytes(pickle.dumps((job, runtimes)))
    script = f"""
import json, pickle
from moeguard.studies.engine import execute
from moeguard.errors import MoeguardError
job, (bare, carrying) = pickle.loads(open({str(tmp_path / 'job.pkl')!r}, 'rb').read())
try:
    execute(job, bare)
    print(json.dumps("no error"))
except MoeguardError as e:
    print(json.dumps(e.one_line()))
print(json.dumps(execute(job, carrying)["4"]["task"]))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    without, with_task = [json.loads(line) for line in r.stdout.strip().splitlines()[-2:]]
    assert f"unknown task '{NAME}'" in without
    assert with_task == NAME


def test_a_missing_train_file_is_found_at_the_edge_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import json

    from moeguard.cli import main
    import moeguard.models.handle as handle

    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"s": f"{i} > 3?", "y": i % 2}) + "\n" for i in range(8)))
    (tmp_path / "t.yaml").write_text("name: typo-train\nkind: classification\nsource: {type: local, path: ., format: jsonl, "
                                     "files: {train: trian.jsonl, test: test.jsonl}}\nsplits: {train: train, eval: test}\n"
                                     "fields: {input: s, label: y}\nlabels: {0: ' no', 1: ' yes'}\n")
    monkeypatch.setattr(handle.ModelHandle, "load", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["eval", "--tasks", str(tmp_path / "t.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "trian.jsonl" in err
