"""Review of audit/ and studies/: settings that failed only at the defense stage fail first, and a
job that loads another model by its path is re-run when that checkpoint is re-made in place."""

from __future__ import annotations

import json
import shutil

from moeguard.cli import main
from moeguard.models.loading import resolve


def _one_line(code, err, needle):
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_a_hardened_model_of_another_architecture_is_refused_before_any_stage(tmp_path, capsys):
    small = tmp_path / "small"
    assert main(["prune", "--plan", str(_plan(tmp_path)), "--out", str(small)]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    code = main(["audit", "--out", str(out), "--hardened", str(small), "--tasks", "arith-compare", "--no-recovery"])
    _one_line(code, capsys.readouterr().err, "the hardened model has 4 MoE layers of 4 experts, the base 4 of 8")
    assert not out.exists()


def _plan(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"keep": {str(l): [0, 1, 2, 3] for l in range(4)}}))
    return p


def test_a_defense_on_a_task_without_training_data_is_refused_before_any_stage(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "v.jsonl").write_text('{"q": "a", "y": "p"}\n{"q": "b", "y": "n"}\n')
    task = tmp_path / "evalonly.yaml"
    task.write_text(f"name: evalonly\nkind: classification\nsource: {{type: local, path: {data}, files: {{validation: v.jsonl}}}}\n"
                    "splits: {eval: validation}\nfields: {input: q, label: y}\nlabels: {p: ' yes', n: ' no'}\n")
    out = tmp_path / "run"
    code = main(["audit", "--out", str(out), "--tasks", f"arith-compare,{task}", "--recovery-tasks", "arith-compare",
                 "--defense", "entangle"])
    _one_line(code, capsys.readouterr().err, "task 'evalonly' has no train split, and the defense stage hardens")
    assert not out.exists()


def test_a_job_loading_another_model_by_path_is_scoped_by_its_weights(tmp_path):
    from moeguard.studies.engine import Job, Runtime, _scopes

    other = tmp_path / "hardened"
    shutil.copytree(resolve(None).path, other)
    scope = _scopes(Runtime(model=None))
    own, theirs = Job(stage="s", name="a", fn="m:f"), Job(stage="s", name="b", fn="m:f", args={"model": str(other)})
    before = scope(theirs)
    assert scope(own) == Runtime(model=None).scope() != before
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes())          # re-made in place: same path, new file
    import os
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _scopes(Runtime(model=None))(theirs) != before


def test_a_ray_job_bigger_than_any_node_is_refused_not_queued_forever():
    import pytest

    from moeguard.errors import MoeguardError
    from moeguard.studies.engine import RayBackend

    class FakeRay:
        @staticmethod
        def nodes():
            return [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 64.0}},
                    {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}]

    backend = RayBackend.__new__(RayBackend)     # no Ray started: only the check
    backend.ray, backend.gpus = FakeRay(), 0.0
    backend.check_fits(4)                        # the 4-CPU node takes it
    with pytest.raises(MoeguardError, match=r"each job asks Ray for 8 CPUs \(threads\), and the largest node has 4"):
        backend.check_fits(8)
    backend.gpus = 2.0
    with pytest.raises(MoeguardError, match="asks Ray for 2 GPUs"):
        backend.check_fits(1)


def test_a_job_the_system_took_on_ray_is_retried_and_then_one_line(fake_ray_backend):
    """Ray's memory monitor or a lost node raised a RayError that is no RayTaskError: a traceback, and
    max_retries=0 meant no retry of an idempotent job."""
    import pytest
    import ray.exceptions

    from moeguard.errors import MoeguardError
    from moeguard.studies.engine import Job, Runtime

    asked, submitted = {}, []

    def submit(*a):
        submitted.append(a[0].name)
        return f"{a[0].name}#{len(submitted)}"

    def get(ref):
        if ref.startswith("t keep 4"):   # an error of Ray's own, not a lost worker: not retried
            raise ray.exceptions.RuntimeEnvSetupError()
        raise ray.exceptions.WorkerCrashedError()

    backend = fake_ray_backend(submit, get, asked=asked)
    job, other = (Job(stage="sweep", name=n, fn="x:y", args={}) for n in ("t keep 2", "t keep 4"))
    submitted = []
    with pytest.raises(MoeguardError, match=r"job sweep/t keep 4 could not run on Ray \(RuntimeEnvSetupError"):
        backend.run([job, other], Runtime(model=None, threads=1), lambda j, r: None)
    submitted.clear()
    with pytest.raises(MoeguardError, match=r"job sweep/t keep 2 was lost on Ray 3 times \(WorkerCrashedError"):
        backend.run([job], Runtime(model=None, threads=1), lambda j, r: None)
    # Ray's own retries are off (a task its memory monitor killed is otherwise retried without end): retried here
    assert asked["max_retries"] == 0 and submitted == ["t keep 2"] * 3


def test_ray_workers_are_sent_model_folders_by_their_absolute_path(fake_ray_backend, tmp_path, monkeypatch):
    """A node's worker runs in its own working directory: a relative --model (or the audit's hardened copy
    under a relative --out) was not found there, or, spelled org/name, taken for a hub id and downloaded."""
    from moeguard.studies.engine import Job, Runtime

    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "runs" / "hardened").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    sent = []

    def submit(job, runtime, scratch):
        sent.append((job.args.get("model"), runtime.model, job.key))
        return job.name

    backend = fake_ray_backend(submit, lambda ref: {})
    jobs = [Job(stage="s", name="a", fn="x:y", args={"model": "runs/hardened"}),
            Job(stage="s", name="b", fn="x:y", args={"model": "other/hub-id"}), Job(stage="s", name="c", fn="x:y")]
    keys = [j.key for j in jobs]
    done = []
    backend.run(jobs, Runtime(model="org/name", threads=1), lambda j, r: done.append(j.key))
    assert [(m, r) for m, r, _ in sent] == [(str(tmp_path / "runs" / "hardened"), str(tmp_path / "org" / "name")),
                                            ("other/hub-id", str(tmp_path / "org" / "name")),
                                            (None, str(tmp_path / "org" / "name"))]
    assert sorted(done) == sorted(keys)   # results are filed under the driver's keys


def test_numbers_only_keeps_a_number_named_run_below_the_top():
    """Detectability's best traced run is a number named 'run': it was dropped from every 'same numbers'
    comparison with the run records, at any depth."""
    from moeguard.audit.results import numbers_only

    doc = {"run": {"settings": {}}, "stages": [{"seconds": 1}], "files": {"a": "b"}, "seconds": 3.0,
           "detectability": {"best": {"run": 2, "auc": 0.9, "seconds": 1.0}, "run": {"settings": {"x": 1}}}}
    assert numbers_only(doc) == {"detectability": {"best": {"run": 2, "auc": 0.9}}}
    assert numbers_only({**doc, "detectability": {"best": {"run": 3, "auc": 0.9}}}) != numbers_only(doc)


def test_a_scan_the_config_file_turns_on_is_turned_off_by_a_flag(tmp_path, monkeypatch, capsys):
    """Flags win over the file, and --no-scan did not exist (a usage error)."""
    import moeguard.audit.run as audit_run
    from moeguard.cli import main
    from moeguard.errors import MoeguardError

    seen = {}

    def fake_run_audit(cfg, out, **kw):
        seen["scan"] = cfg.scan
        raise MoeguardError("stopped by the test")

    monkeypatch.setattr(audit_run, "run_audit", fake_run_audit)
    (tmp_path / "a.yaml").write_text("scan: true\n")
    assert main(["audit", "--config", str(tmp_path / "a.yaml"), "--no-scan", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == "moeguard: error: stopped by the test" and seen == {"scan": False}
