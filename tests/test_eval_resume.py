"""`moeguard eval --out F` keeps each task's result beside F as it finishes: a killed run resumes with
the tasks it had not finished, and gives what an uninterrupted run gives."""

from __future__ import annotations

import json

from moeguard.cli import main

TASKS = "arith-compare,docstring-topic,stdlib-docs,record-summary"


def _numbers(doc):
    """The results without their timing and stamps."""
    tasks = {n: {k: v for k, v in r.items() if k != "elapsed_s"} for n, r in doc["tasks"].items()}
    return tasks, doc["run"]["settings"], doc["settings"]


def test_an_interrupted_eval_resumes_from_the_tasks_it_finished(tmp_path, monkeypatch, capsys):
    from moeguard.tasks import evaluate as E

    args = ["eval", "--tasks", TASKS, "--limit", "8"]
    assert main([*args, "--out", str(tmp_path / "whole.json")]) == 0
    calls, real, stop_at = [], E.evaluate_task, [3]

    def interrupted(model, tokenizer, task, **kw):
        calls.append(task.name)
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return real(model, tokenizer, task, **kw)

    monkeypatch.setattr(E, "evaluate_task", interrupted)
    capsys.readouterr()
    code = main([*args, "--out", str(tmp_path / "cut.json")])
    err = capsys.readouterr().err
    assert code == 130 and "the tasks evaluated so far are kept in" in err and "run the same command again" in err
    kept = tmp_path / ".cut.json.partial"
    assert not (tmp_path / "cut.json").exists()
    assert sorted(f.name for f in kept.glob("task-*.json")) == ["task-arith-compare.json", "task-docstring-topic.json"]
    # a kept result a power loss left empty (written, renamed, its bytes never on disk) is evaluated
    # again: it was a JSONDecodeError traceback at every rerun
    (kept / "task-docstring-topic.json").write_text("")
    calls.clear()
    stop_at[0] = 0                                    # no interruption now
    assert main([*args, "--out", str(tmp_path / "cut.json")]) == 0
    assert calls == ["docstring-topic", "stdlib-docs", "record-summary"]   # only what was missing or unreadable
    whole, cut = (json.loads((tmp_path / f).read_text()) for f in ("whole.json", "cut.json"))
    assert _numbers(whole) == _numbers(cut) and not kept.exists()


def _stopping_at_second(calls: list, real):
    """evaluate_task that records each task and is interrupted (Ctrl-C) at the second."""
    def stop_second(model, tokenizer, task, **kw):
        calls.append(task.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, tokenizer, task, **kw)
    return stop_second


def test_a_partial_eval_of_other_settings_is_not_reused(tmp_path, monkeypatch):
    from moeguard.tasks import evaluate as E

    calls, real = [], E.evaluate_task
    monkeypatch.setattr(E, "evaluate_task", _stopping_at_second(calls, real))
    code = main(["eval", "--tasks", TASKS, "--limit", "8", "--out", str(tmp_path / "r.json")])
    assert code == 130
    first = TASKS.split(",")[0]
    assert [f.name for f in (tmp_path / ".r.json.partial").glob("task-*.json")] == [f"task-{first}.json"]   # a partial to refuse
    monkeypatch.setattr(E, "evaluate_task", lambda *a, **k: (calls.append(a[2].name), real(*a, **k))[1])
    calls.clear()
    assert main(["eval", "--tasks", TASKS, "--limit", "6", "--out", str(tmp_path / "r.json")]) == 0   # another limit
    assert calls == TASKS.split(",")
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["arith-compare"]["n_samples"] == 6


def test_a_partial_eval_placed_by_auto_on_another_kind_of_device_is_not_reused(tmp_path, monkeypatch):
    """--device-map auto keyed by its name alone: a run killed on a GPU resumed on a machine without one
    (or with CUDA_VISIBLE_DEVICES= set), mixing the two devices' numbers in one result."""
    from moeguard.models import placement
    from moeguard.tasks import evaluate as E

    calls, real = [], E.evaluate_task
    args = ["eval", "--tasks", TASKS, "--limit", "4", "--device-map", "auto", "--out", str(tmp_path / "r.json")]
    monkeypatch.setattr(placement, "placed_on", lambda device_map, capped=False: "cuda")   # as on a GPU machine
    monkeypatch.setattr(E, "evaluate_task", _stopping_at_second(calls, real))
    assert main(args) == 130
    monkeypatch.setattr(placement, "placed_on", lambda device_map, capped=False: "cpu")    # the same command where no GPU is seen
    monkeypatch.setattr(E, "evaluate_task", lambda *a, **k: (calls.append(a[2].name), real(*a, **k))[1])
    calls.clear()
    assert main(args) == 0
    assert calls == TASKS.split(","), calls   # every task again, the first one's kept result not reused
    assert json.loads((tmp_path / "r.json").read_text())["run"]["settings"]["placed_on"] == "cpu"


def test_placed_on_names_the_device_kind_a_strategy_lands_on(monkeypatch):
    import torch

    from moeguard.models.handle import resolve_model
    from moeguard.models.placement import placed_on

    assert (placed_on(None), placed_on("cpu"), placed_on("cuda:1")) == ("cpu", "cpu", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placed_on("auto") == "cpu" and placed_on("balanced") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert placed_on("auto") == "cuda" and placed_on("sequential") == "cuda"
    assert resolve_model(None, device_map="auto").placement == {"device_map": "auto", "placed_on": "cuda"}
    assert resolve_model(None, device_map="cpu").placement == {"device_map": "cpu"}
    assert resolve_model(None).placement == {}


def test_a_capped_eval_is_recorded_and_keyed_as_the_auto_map_it_loads_with(tmp_path, monkeypatch):
    """--max-memory without --device-map loads with accelerate's auto map (visible GPUs first): the record
    said the CPU, and a capped run killed on a GPU resumed on a machine without one. Where auto lands on the
    CPU (and disk) the entries are an uncapped CPU run's, whose stages a capped audit shares."""
    from moeguard.models import placement
    from moeguard.studies.engine import Runtime

    seen = []
    monkeypatch.setattr(placement, "placed_on", lambda device_map, capped=False: (seen.append(capped), "cuda")[1])
    assert main(["eval", "--tasks", "arith-compare", "--limit", "4", "--max-memory", "64MiB",
                 "--out", str(tmp_path / "r.json")]) == 0
    settings = json.loads((tmp_path / "r.json").read_text())["run"]["settings"]
    assert (settings["device_map"], settings["placed_on"]) == ("auto", "cuda") and settings["max_memory"] == 64 << 20
    assert seen and all(seen)   # asked without MPS, which a capped budget leaves out
    assert Runtime(model=None, max_memory=8 << 20).to_dict()["placed_on"] == "cuda"
    monkeypatch.setattr(placement, "placed_on", lambda device_map, capped=False: "cpu")
    assert "placed_on" not in Runtime(model=None, max_memory=8 << 20).to_dict()
    assert placement.capped_placement(None, 8 << 20) == {} and "placed_on" not in Runtime(model=None).to_dict()
