"""Study commands, from a read-only review (2026-12-07): --threads on every study command (Ray's
refusal named it, and only the audit had it), and the run record says where a run ran."""

import json

import pytest

from moeguard.cli import main
from moeguard.errors import MoeguardError

SMALL = {
    "sweep": ["--tasks", "arith-compare", "--methods", "frequency", "--keep", "2"],
    "recovery": ["--task", "arith-compare", "--keep", "2"],
    "attack": ["--task", "arith-compare", "--keep", "2"],
}


@pytest.mark.parametrize("command", sorted(SMALL))
def test_every_study_command_takes_threads_for_its_jobs(command, tmp_path, monkeypatch):
    import moeguard.studies as studies

    seen = {}

    def fake_run_study(study, cfg, *, jobs, runtime, backend, progress):
        seen["runtime"] = runtime
        raise MoeguardError("stopped by the test")

    monkeypatch.setattr(studies, "run_study", fake_run_study)
    assert main([command, *SMALL[command], "--threads", "1", "--out", str(tmp_path / "o")]) == 2
    assert seen["runtime"].threads == 1


def test_a_sweep_s_run_record_says_where_it_ran(tmp_path):
    out = tmp_path / "s"
    assert main(["sweep", *SMALL["sweep"], "--random-seeds", "1", "--eval-limit", "8", "--samples", "8",
                 "--collateral-limit", "4", "--threads", "1", "--out", str(out)]) == 0
    run = json.loads((out / "sweep.json").read_text())["run"]
    assert run["settings"]["runtime"] == {"threads": 1, "backend": "local", "ray_address": None, "gpus_per_job": 0.0}
