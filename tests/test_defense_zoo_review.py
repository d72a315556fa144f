"""From a read-only review of defense/, studies/defend.py and zoo/: goals not measured are not
missed, a protocol named by its checkpoint folder is read and hashed as its file, one harden or zoo
training at a time writes an output, and an interrupt promises a resume only when one was saved."""

from __future__ import annotations

import pytest

from moeguard.cli import main


def test_a_goal_not_measured_is_not_missed():
    from moeguard.studies.defend import goals

    cell = lambda r, scratch: {"summary": {"realigned_retention": r, **scratch}}   # noqa: E731
    doc = {"attacks": {"t": {"4": {"base": cell(95.0, {}), "hardened": cell(40.0, {})}}},
           "utility": {"t": {"cost_percent": 1.0}}}
    g = goals(doc, num_experts=8)
    # --no-scratch: no from-scratch baseline, so the moonshot is not measured (it read as MISSED)
    assert g["moonshot_no_better_than_scratch"]["met"] is None
    assert g["undefended_keeps_90"]["met"] is True and g["hardened_at_most_50"]["met"] is True
    doc["attacks"]["t"]["4"]["hardened"] = cell(40.0, {"no_better_than_scratch": False})
    assert goals(doc, num_experts=8)["moonshot_no_better_than_scratch"]["met"] is False
    # one task measured and missed, another not measured: missed, not "not measured"
    doc["attacks"]["u"] = {"4": {"base": cell(95.0, {}), "hardened": cell(40.0, {"no_better_than_scratch": None})}}
    doc["utility"]["u"] = {"cost_percent": 1.0}
    assert goals(doc, num_experts=8)["moonshot_no_better_than_scratch"]["met"] is False
    from moeguard.report.audit import _goal

    assert [_goal(x) for x in (True, False, None)] == ["met", "missed", "not measured"]


def test_a_harden_or_zoo_training_to_an_output_another_is_writing_is_refused(tmp_path, capsys):
    from moeguard.io import one_run

    out = tmp_path / "h"
    with one_run(out):
        assert main(["harden", "--method", "selective", "--steps", "3", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"another moeguard run is writing {out}" in err, err
        assert main(["zoo", "train", "--steps", "2", "--out", str(out)]) == 2
        assert f"another moeguard run is writing {out}" in capsys.readouterr().err
    assert not out.exists()


def test_zoo_train_interrupted_before_its_first_save_promises_no_resume(tmp_path, monkeypatch, capsys):
    from moeguard.zoo import train as T

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train_embedded", stop)
    out = tmp_path / "z"
    with pytest.raises(SystemExit) as e:
        main(["zoo", "train", "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 130 and "interrupted before the first saved training state" in err, err
    assert "run the same command again" not in err
