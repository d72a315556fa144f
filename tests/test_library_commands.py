"""What the CLI's commands do is callable from the library (cli/ parses options and prints): eval,
the monitor's profile and score, the families' type check; and the CSV every study writes."""

from __future__ import annotations

import csv
import json

import pytest

from moeguard.errors import MoeguardError


def test_write_csv_takes_no_rows_and_rows_that_add_fields(tmp_path):
    from moeguard.report.sweep import write_csv

    # no rows (every job of a study skipped) is an empty file, not an IndexError after the work
    assert write_csv(tmp_path / "none.csv", []).read_text() == ""
    # a later row's extra field is a column (DictWriter refused it: ValueError)
    write_csv(tmp_path / "r.csv", [{"a": 1, "b": 2}, {"a": 3, "b": 4, "c": 5}])
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": "5"}]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # written through a renamed sibling


def test_eval_runs_from_the_library_and_refuses_overwrite_without_out(tmp_path):
    from moeguard.tasks.evalrun import run_eval

    common = dict(model=None, tasks=["arith-compare"], limit=4, batch_size=4, device_map=None, max_memory=None, seed=0)
    with pytest.raises(MoeguardError, match="--overwrite replaces an existing --out, and no --out was given"):
        run_eval(out=None, overwrite=True, **common)
    doc = run_eval(out=tmp_path / "r.json", overwrite=False, **common)
    assert json.loads((tmp_path / "r.json").read_text())["run"]["settings"] == doc["run"]["settings"]
    assert doc["run"]["settings"]["tasks"] == ["arith-compare"] and doc["run"]["settings"]["limit"] == 4


def test_model_types_are_checked_with_the_nearest_names():
    from moeguard.models.catalog import check_model_types

    assert check_model_types(" mixtral, qwen2_moe ") == ["mixtral", "qwen2_moe"]
    with pytest.raises(MoeguardError, match=r"--model-types names \['mixtrall'\].*did you mean mixtral"):
        check_model_types("mixtrall")
    with pytest.raises(MoeguardError, match="names no model type"):
        check_model_types(" , ")


def test_monitor_profile_and_score_run_from_the_library(tmp_path):
    from moeguard.monitor.commands import profile_tasks, score_log

    prof, handle, prompts = profile_tasks(out=tmp_path / "p.json", tasks=["arith-compare", "docstring-topic"], limit=40,
                                          window=8, early=(), slice_len=0, reply_tokens=0, model=None, device_map=None,
                                          overwrite=False, seed=3)
    assert list(prompts) == ["arith-compare", "docstring-topic"] and handle.name == "embedded"
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["run"]["settings"]["seed"] == 3 and saved["requests"] == prof.meta["requests"]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"id": i, "client": "c", "time": i, "prompt": p}) + "\n"
                           for i, p in enumerate(prompts["arith-compare"][:16])))
    notes = []
    summary, _ = score_log(profile=tmp_path / "p.json", log=log, out=tmp_path / "s", window=None, alpha=0.01,
                           log_prompts=False, period=None, baseline=None, history=None, period_alpha=None,
                           period_clients=False, accept=None, no_period_requests=False, model=None, device_map=None,
                           overwrite=False, note=notes.append)
    assert summary["requests"] == 16 and summary["windows"] == 2 and notes == []
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["requests"] == 16


def test_monitor_library_calls_check_their_options_before_loading(tmp_path, monkeypatch):
    from moeguard.monitor.commands import profile_log, profile_tasks

    def too_late(*a, **k):
        raise AssertionError("the model was resolved before the options were checked")

    monkeypatch.setattr("moeguard.edge.resolve_model", too_late)
    common = dict(out=tmp_path / "p.json", early=(), slice_len=0, model=None, device_map=None, overwrite=False, seed=0)
    with pytest.raises(MoeguardError, match="--window is 0"):
        profile_tasks(tasks=None, limit=40, window=0, reply_tokens=0, **common)
    with pytest.raises(MoeguardError, match="--reply-tokens is 999"):
        profile_log(log=tmp_path / "log.jsonl", topics="auto", window=8, reply_tokens=999, **common)
    with pytest.raises(MoeguardError, match="early window lengths"):
        profile_tasks(tasks=None, limit=40, window=8, reply_tokens=0, **{**common, "early": (9,)})
