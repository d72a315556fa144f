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
    calls.clear()
    stop_at[0] = 0                                    # no interruption now
    assert main([*args, "--out", str(tmp_path / "cut.json")]) == 0
    assert calls == ["stdlib-docs", "record-summary"]   # only what was missing
    whole, cut = (json.loads((tmp_path / f).read_text()) for f in ("whole.json", "cut.json"))
    assert _numbers(whole) == _numbers(cut) and not kept.exists()


def test_a_partial_eval_of_other_settings_is_not_reused(tmp_path, monkeypatch):
    from moeguard.tasks import evaluate as E

    calls, real = [], E.evaluate_task

    def stop_second(model, tokenizer, task, **kw):
        calls.append(task.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, tokenizer, task, **kw)

    monkeypatch.setattr(E, "evaluate_task", stop_second)
    code = main(["eval", "--tasks", TASKS, "--limit", "8", "--out", str(tmp_path / "r.json")])
    assert code == 130
    first = TASKS.split(",")[0]
    assert [f.name for f in (tmp_path / ".r.json.partial").glob("task-*.json")] == [f"task-{first}.json"]   # a partial to refuse
    monkeypatch.setattr(E, "evaluate_task", lambda *a, **k: (calls.append(a[2].name), real(*a, **k))[1])
    calls.clear()
    assert main(["eval", "--tasks", TASKS, "--limit", "6", "--out", str(tmp_path / "r.json")]) == 0   # another limit
    assert calls == TASKS.split(",")
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["arith-compare"]["n_samples"] == 6
