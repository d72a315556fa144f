"""Every JSON moeguard writes is valid JSON: NaN and Infinity (Python's bare tokens, which jq,
JavaScript and strict parsers refuse) are written as null, where a non-finite number means
something its producer says so (a broken model retains 0), and the readers of null do not break."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moeguard.analysis import mean_score, read_score, retention
from moeguard.io import dumps, json_safe, strict_loads, write_json


def test_write_json_holds_no_nan_or_infinity_and_keeps_every_finite_number(tmp_path):
    data = {"nan": math.nan, "inf": [math.inf, -math.inf, 1.5], "np32": np.float32("nan"),
            "np64": np.float64(math.inf), "ok32": np.float32(0.25), "tuple": (1.0, math.nan),
            "nested": {"deep": [{"x": -math.inf, "y": 3}]}, "text": "NaN", "flag": True, "none": None}
    path = write_json(tmp_path / "out.json", data)
    text = path.read_text()
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text
    back = strict_loads(text)   # would raise on a bare NaN or Infinity
    assert back == {"nan": None, "inf": [None, None, 1.5], "np32": None, "np64": None, "ok32": 0.25,
                    "tuple": [1.0, None], "nested": {"deep": [{"x": None, "y": 3}]}, "text": "NaN",
                    "flag": True, "none": None}
    assert isinstance(json_safe(np.float32(0.25)), float) and json_safe(7) == 7 and json_safe(True) is True


def test_strict_loads_refuses_what_dumps_never_writes():
    for text in ('{"a": NaN}', '[Infinity]', '{"a": -Infinity}'):
        assert json.loads(text) is not None        # Python's own reader takes them...
        with pytest.raises(ValueError, match="is not JSON"):
            strict_loads(text)                       # ...ours does not
    assert dumps({"a": float("nan")}) == '{"a": null}'


def test_a_score_that_is_not_a_number_retains_nothing_and_a_broken_reference_gives_no_retention():
    assert retention(math.nan, 0.8, higher_is_better=True) == 0.0        # broken weights: not a gap
    assert retention(math.nan, 12.0, higher_is_better=False) == 0.0
    assert retention(math.inf, 12.0, higher_is_better=False) == 0.0     # a hopeless perplexity
    assert retention(0.4, 0.8, higher_is_better=True) == 50.0
    assert retention(24.0, 12.0, higher_is_better=False) == 50.0
    for full in (math.nan, math.inf):
        assert retention(0.4, full, higher_is_better=True) is None
    assert retention(None, 0.8, higher_is_better=True) is None


def test_a_mean_over_scores_read_back_with_null_is_nan_and_retains_nothing():
    assert mean_score([0.5, 0.7]) == pytest.approx(0.6)
    m = mean_score([0.5, None])       # one seed's score was not finite: the mean is not a number
    assert math.isnan(m) and retention(m, 0.6, higher_is_better=True) == 0.0
    assert retention(0.5, mean_score([None]), higher_is_better=True) is None
    assert retention(read_score(None), 0.6, higher_is_better=True) == 0.0 and read_score(0.5) == 0.5


def test_the_attack_table_reads_a_null_score_as_nothing_retained():
    from moeguard.report.defense import attack_rows

    run = {"kind": "attack", "strategy": "random", "mode": "full", "lr": 1e-3, "epochs": 1, "seed": 0,
           "points": [{"labels": 0, "score": 0.4}, {"labels": 8, "score": None}]}
    doc = {"full": {"score": 0.8}, "higher_is_better": True, "task": "t", "runs": [run]}
    assert [r["retention"] for r in attack_rows(doc)] == [50.0, 0.0]


def test_a_job_file_that_holds_nan_runs_again_and_the_same_file_with_null_is_reused(tmp_path):
    from moeguard.studies.engine import Job, _record, load_done

    job = Job(stage="s", name="n", fn="m:f", args={})
    path = job.path(tmp_path)
    path.parent.mkdir(parents=True)
    record = _record(job, {"score": None})
    path.write_text(json.dumps(record))
    assert load_done(job, tmp_path) == record["result"]                  # the control: it is reused
    path.write_text(json.dumps(_record(job, {"score": math.nan})))     # written before the rule
    assert load_done(job, tmp_path) is None


def test_the_physical_check_compares_scores_that_were_not_finite():
    from moeguard.studies.sweep import _abs_diff

    assert _abs_diff(0.5, 0.5) == 0.0 and _abs_diff(0.5, 0.25) == 0.25
    assert _abs_diff(math.nan, None) == 0.0 and _abs_diff(math.inf, None) == 0.0   # null: an unknown non-number
    assert _abs_diff(math.nan, math.nan) == 0.0 and _abs_diff(math.inf, math.inf) == 0.0
    assert _abs_diff(math.nan, math.inf) is None                                     # different non-numbers
    assert _abs_diff(math.nan, 0.5) is None and _abs_diff(0.5, None) is None       # one is a number: mismatched
    assert json.loads(dumps({"d": _abs_diff(math.inf, 0.5)})) == {"d": None}


def test_the_scan_tables_print_a_null_number_as_a_dash():
    from moeguard.report.scan import suspect_rows

    doc = {"experts": [{"layer": 0, "expert": 1, "suspicion": None, "flags": [],
                        "effect": {"score": None, "start_token": "a", "continuation": "b"}}], "ranking": ["0:1"]}
    row = suspect_rows(doc)[0]
    assert row["suspicion"] == "-" and row["score (nats)"] == "-" and row["expert"] == "0:1"


def test_the_edges_of_retention_and_the_margin_over_the_baseline():
    from moeguard.analysis import above_baseline

    assert retention(math.nan, 0.0, higher_is_better=True) is None          # no reference beats "broken"
    assert above_baseline(math.nan, 0.8, 0.5, higher_is_better=True) == 0.0  # keeps nothing of the margin
    assert above_baseline(math.inf, 10.0, 40.0, higher_is_better=False) == 0.0   # was -inf: not JSON
    assert above_baseline(0.6, math.nan, 0.5, higher_is_better=True) is None
    assert above_baseline(0.65, 0.8, 0.5, higher_is_better=True) == pytest.approx(50.0)


def test_the_worst_case_over_runs_prefers_a_finite_score_and_counts_an_all_broken_label_count_as_zero():
    from moeguard.studies.attacksummary import envelope

    def run(mode, scores):
        return {"strategy": "random", "mode": mode, "lr": 1, "epochs": 1, "seed": 0,
                "points": [{"labels": x, "score": s} for x, s in zip((0, 8, 16), scores)]}

    e = envelope([run("full", [40.0, None, None]), run("lora", [40.0, 60.0, None])], True, 80.0, 20.0)
    assert e["labels"] == [0, 8, 16] and e["score"] == [40.0, 60.0, None]
    assert e["retention"] == [50.0, 75.0, 0.0] and e["above_baseline"][2] == 0.0   # not a gap
    assert e["argbest"][1]["mode"] == "lora" and e["argbest"][2]["mode"] == "full"
    assert strict_loads(dumps(e)) == json.loads(dumps(e))


def test_a_round_scored_from_a_result_read_back_with_null_retains_nothing():
    from moeguard.realign.loop import _point
    from moeguard.tasks.evaluate import TaskResult

    r = TaskResult(task="t", kind="language_modeling", metric="perplexity", score=None, higher_is_better=False,
                   metrics={}, n_samples=4, split="eval")
    assert _point(0, [], r, 12.0, {})["retention"] == 0.0
    ok = TaskResult(task="t", kind="language_modeling", metric="perplexity", score=24.0, higher_is_better=False,
                    metrics={}, n_samples=4, split="eval")
    assert _point(0, [], ok, 12.0, {})["retention"] == 50.0


def test_a_finished_audit_stage_whose_json_holds_nan_runs_again(tmp_path):
    from moeguard.audit.stages import StageStore

    runs = []

    def stage(text):
        def write(folder):
            runs.append(1)
            (folder / "sweep.json").write_text(text)
        return write

    assert not StageStore(tmp_path).run("sweep", {"a": 1}, stage('{"r": null}')).cached
    assert StageStore(tmp_path).run("sweep", {"a": 1}, stage('{"r": null}')).cached and len(runs) == 1
    StageStore(tmp_path / "old").run("sweep", {"a": 1}, stage('{"r": NaN} '))   # as json.dumps wrote it before
    again = StageStore(tmp_path / "old").run("sweep", {"a": 1}, stage('{"r": null}'))
    assert not again.cached and len(runs) == 3 and again.read("sweep.json") == {"r": None}
