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
    assert _abs_diff(math.nan, None) == 0.0 and _abs_diff(math.inf, None) == 0.0   # both not numbers: agree
    assert _abs_diff(math.nan, 0.5) is None and _abs_diff(0.5, None) is None       # one is: mismatched
    assert json.loads(dumps({"d": _abs_diff(math.inf, 0.5)})) == {"d": None}


def test_the_scan_tables_print_a_null_number_as_a_dash():
    from moeguard.report.scan import suspect_rows

    doc = {"experts": [{"layer": 0, "expert": 1, "suspicion": None, "flags": [],
                        "effect": {"score": None, "start_token": "a", "continuation": "b"}}], "ranking": ["0:1"]}
    row = suspect_rows(doc)[0]
    assert row["suspicion"] == "-" and row["score (nats)"] == "-" and row["expert"] == "0:1"
