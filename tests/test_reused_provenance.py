"""A resumed run reuses the work an earlier run kept, whatever moeguard made it (keys hold no version:
cached work survives a release that moves no number). Work kept by another version (another commit,
another torch) or by a moeguard that recorded none is warned about once per version and listed in the
run record's "reused", so a resumed run's numbers are never credited to a commit that did not make them."""

from __future__ import annotations

import json

import pytest

from moeguard import provenance

OTHER_COMMIT = "0" * 40


def _other() -> dict:
    return {**provenance.maker(), "git_commit": OTHER_COMMIT}


def test_an_eval_resumed_from_another_commit_s_kept_tasks_says_so_in_a_warning_and_its_record(tmp_path, monkeypatch,
                                                                                             capsys):
    from moeguard.cli import main
    from moeguard.io import MADE_BY
    from moeguard.tasks import evaluate as E

    args = ["eval", "--tasks", "arith-compare,docstring-topic", "--limit", "4", "--out", str(tmp_path / "r.json")]
    calls, real = [], E.evaluate_task

    def stop_second(model, tokenizer, task, **kw):
        calls.append(task.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, tokenizer, task, **kw)

    monkeypatch.setattr(E, "evaluate_task", stop_second)
    assert main(args) == 130
    kept = tmp_path / ".r.json.partial"
    # the folder names who made what it holds: this process alone
    assert json.loads((kept / MADE_BY).read_text()) == [provenance.maker()]
    (kept / MADE_BY).write_text(json.dumps([_other()]))    # as if an older commit had been interrupted
    monkeypatch.setattr(E, "evaluate_task", real)
    capsys.readouterr()
    with pytest.warns(UserWarning) as caught:
        assert main(args) == 0
    said = [str(w.message) for w in caught if "is reused" in str(w.message)]
    assert len(said) == 1, said
    assert said[0].startswith(f"{kept} was kept by another version: commit {OTHER_COMMIT} (this run: "
                              f"{provenance.maker()['git_commit']})"), said
    assert "to recompute it with this one, delete it" in said[0], said
    run = json.loads((tmp_path / "r.json").read_text())["run"]
    assert run["reused"] == [{"made_by": _other(), "what": [str(kept)],
                              "differs": {"git_commit": [OTHER_COMMIT, provenance.maker()["git_commit"]]}}]
    # the next command reused nothing: its record says nothing of the last one's
    assert main([*args[:-1], str(tmp_path / "s.json")]) == 0
    assert "reused" not in json.loads((tmp_path / "s.json").read_text())["run"]


def test_a_finished_stage_of_a_moeguard_that_recorded_no_version_is_reused_and_reported(tmp_path):
    from moeguard.audit.stages import DONE, StageStore
    from moeguard.report.auditrows import repro_rows

    def write(d):
        (d / "out.json").write_text("{}")

    StageStore(tmp_path).run("sweep", {"x": 1}, write)
    done = tmp_path / "stages" / "sweep" / DONE
    info = json.loads(done.read_text())
    assert info["made_by"] == provenance.maker()
    del info["made_by"]                                             # as stages finished before 2026-12-08
    done.write_text(json.dumps(info))
    provenance.start_command()
    with pytest.warns(UserWarning, match="recorded no version"):
        assert StageStore(tmp_path).run("sweep", {"x": 1}, lambda d: pytest.fail("ran again")).cached
    record = provenance.run_record({})
    assert record["reused"] == [{"made_by": None, "differs": None, "what": [str(done.parent)]}]
    doc = {"run": record, "backend": {"name": "local"}, "created_at": "now", "seconds": 1.0,
           "stages": [{"stage": "sweep", "cached": True, "seconds": 0.0}]}
    row = [r for r in repro_rows(doc) if r["item"] == "reused work"]
    assert row == [{"item": "reused work", "value": "1 kept piece(s) by a moeguard that recorded no version "
                                                     f"(before 2026-12-08): {done.parent}"}]
    # this version's own stage: nothing said
    provenance.start_command()
    info["made_by"] = provenance.maker()
    done.write_text(json.dumps(info))
    assert StageStore(tmp_path).run("sweep", {"x": 1}, lambda d: pytest.fail("ran again")).cached
    assert provenance.reused() == [] and "reused" not in provenance.run_record({})


def test_jobs_and_job_scratch_of_other_versions_are_listed_once_per_version(tmp_path, recwarn):
    from moeguard.studies.engine import Job, LocalBackend, Runtime, run_jobs, scratch_path

    rt, root = Runtime(model=None, threads=1), tmp_path / "jobs"
    jobs = [Job(stage="s", name=f"x={x}", fn="test_study_engine:square", args={"x": x}) for x in (2, 3, 4)]
    run_jobs(jobs[:2], root=root, runtime=rt, backend=LocalBackend())
    assert [json.loads(j.path(root).read_text())["made_by"] for j in jobs[:2]] == [provenance.maker()] * 2
    other = {**provenance.maker(), "torch": "2.12.0"}
    for j in jobs[:2]:
        rec = json.loads(j.path(root).read_text())
        j.path(root).write_text(json.dumps({**rec, "made_by": other}))
    # the third job was killed half-way by a moeguard that recorded no version: its scratch holds a piece
    scratch = scratch_path(jobs[2], root, rt.scope())
    scratch.mkdir(parents=True)
    (scratch / ".piece.npz").write_bytes(b"")
    recwarn.clear()
    assert run_jobs(jobs, root=root, runtime=rt, backend=LocalBackend()) == [{"y": 4}, {"y": 9}, {"y": 16}]
    got = provenance.reused()
    assert got == [{"made_by": other, "differs": {"torch": ["2.12.0", provenance.maker()["torch"]]},
                    "what": [str(jobs[0].path(root)), str(jobs[1].path(root))]},
                   {"made_by": None, "differs": None, "what": [str(scratch)]}]
    said = [str(w.message) for w in recwarn if "is reused" in str(w.message)]
    assert len(said) == 2 and "torch 2.12.0 (this run: " in said[0] and "recorded no version" in said[1], said
    assert not scratch.exists()   # its job finished: the scratch goes, its marker with it


def test_a_training_state_lists_every_version_that_trained_it(tmp_path):
    import torch

    from moeguard import trainstate

    net = torch.nn.Linear(2, 2)
    params = dict(net.named_parameters())
    opt = torch.optim.AdamW(net.parameters())
    state = tmp_path / "state"
    trainstate.save(state, tag="t", step=1, params=params, optimizer=opt)
    meta = json.loads((state / trainstate.META).read_text())
    assert meta["made_by"] == [provenance.maker()]
    (state / trainstate.META).write_text(json.dumps({**meta, "made_by": [_other()]}))
    loaded = trainstate.load(state, tag="t", params=params)
    # read is not reused: a trainer may refuse the state (zoo train, harden check its meta) and start over
    assert loaded.step == 1 and provenance.reused() == []
    trainstate.save(state, tag="t", step=1, params=params, optimizer=opt)   # started over: this run's alone
    assert json.loads((state / trainstate.META).read_text())["made_by"] == [provenance.maker()]
    (state / trainstate.META).write_text(json.dumps({**meta, "made_by": [_other()]}))
    with pytest.warns(UserWarning, match=f"{state} was kept by another version: commit {OTHER_COMMIT}"):
        trainstate.load(state, tag="t", params=params).restore(params, opt)
    trainstate.save(state, tag="t", step=2, params=params, optimizer=opt)   # the resumed run's saves
    trainstate.save(state, tag="t", step=3, params=params, optimizer=opt)
    assert json.loads((state / trainstate.META).read_text())["made_by"] == [_other(), provenance.maker()]
    # a state of another run (another tag) is not this run's lineage, nor a later run's once it is cleared
    trainstate.save(state, tag="u", step=1, params=params, optimizer=opt)
    assert json.loads((state / trainstate.META).read_text())["made_by"] == [provenance.maker()]
    trainstate.clear(state)
    trainstate.save(state, tag="t", step=1, params=params, optimizer=opt)
    assert json.loads((state / trainstate.META).read_text())["made_by"] == [provenance.maker()]


def test_a_kept_document_of_another_version_is_read_and_listed(tmp_path, recwarn):
    from moeguard.kept import KeptJSON

    doc = KeptJSON(tmp_path / "plan.json", {"k": 1})
    doc.write({"plan": [1, 2]})
    assert doc.read() == {"plan": [1, 2]} and provenance.reused() == []
    raw = json.loads(doc.path.read_text())
    doc.path.write_text(json.dumps({**raw, "made_by": _other()}))
    assert doc.read() == {"plan": [1, 2]}
    assert provenance.reused()[0]["what"] == [str(doc.path)]
    assert sum("is reused" in str(w.message) for w in recwarn) == 1


def test_realign_s_kept_original_names_its_own_maker(tmp_path, recwarn, monkeypatch):
    from moeguard.realign.api import _OriginalKept

    out = tmp_path / "realigned"
    folder = tmp_path / ".realigned.original"
    other = _other()
    with monkeypatch.context() as m:   # an older commit scored the original under other settings
        m.setattr(provenance, "maker", lambda: other)
        _OriginalKept(out, {"s": 2}).write(0.5, None)
    _OriginalKept(out, {"s": 1}).write(0.75, None)
    # the folder holds both settings' pieces: each names its own maker
    assert _OriginalKept(out, {"s": 1}).read() == (0.75, None) and provenance.reused() == []
    assert _OriginalKept(out, {"s": 2}).read() == (0.5, None)
    assert provenance.reused() == [{"made_by": _other(), "what": [str(folder)],
                                    "differs": {"git_commit": [OTHER_COMMIT, provenance.maker()["git_commit"]]}}]


def test_a_folder_killed_before_its_first_piece_holds_no_one_s_work(tmp_path):
    from moeguard.io import MADE_BY, STAMP

    folder = tmp_path / "f"
    folder.mkdir()
    (folder / STAMP).write_text("{}")
    (folder / MADE_BY).write_text(json.dumps([_other()]))
    provenance.mark(folder, fix="delete it")
    assert provenance.reused() == [] and json.loads((folder / MADE_BY).read_text()) == [provenance.maker()]
    (folder / ".piece.npz").write_bytes(b"")
    provenance.mark(folder, fix="delete it")   # this version's own piece: nothing to say
    assert provenance.reused() == []


def test_where_the_commit_does_not_name_the_code_the_maker_holds_a_digest_of_it(monkeypatch):
    provenance.maker.cache_clear()
    try:
        monkeypatch.setattr(provenance, "git_commit", lambda: None)   # a wheel: no commit, version 0.1.0
        made = provenance.maker()
        assert made["git_commit"] is None and made["source"] == provenance.source_digest()
        assert len(made["source"]) == 16 and provenance.run_record({})["source"] == made["source"]
        assert provenance.maker_of(provenance.run_record({})) == made
        provenance.maker.cache_clear()
        monkeypatch.setattr(provenance, "git_commit", lambda: "a" * 40)
        assert "source" not in provenance.maker() and "source" not in provenance.run_record({})
        assert provenance.maker_of(provenance.run_record({})) == provenance.maker()
    finally:
        provenance.maker.cache_clear()


def scratch_seen(ctx, *, seed: int = 0) -> dict:
    """A job that says whether it was given a folder to keep pieces in."""
    return {"scratch": None if ctx.scratch is None else str(ctx.scratch)}


def test_a_worker_keeps_pieces_only_where_it_sees_the_driver_s_folder(tmp_path, fake_ray_backend):
    from moeguard.io import MADE_BY
    from moeguard.studies.engine import Job, Runtime, execute

    job, rt = Job(stage="s", name="j", fn="test_reused_provenance:scratch_seen", args={}), Runtime(model=None, threads=1)
    folder = tmp_path / ".k-s.partial"
    # a cluster node without the run folder: no folder to keep in (one made there would stay behind)
    assert execute(job, rt, str(folder)) == {"scratch": None} and not folder.exists()
    provenance.mark(folder, fix="delete it")                  # the driver's mark, seen on a shared filesystem
    assert (folder / MADE_BY).is_file() and execute(job, rt, str(folder)) == {"scratch": str(folder)}
    # a cluster (--ray-address) is handed the folder too: the worker decides
    sent = []
    backend = fake_ray_backend(lambda *a: (sent.append(a), "ref")[1], lambda ref: {"ok": 1}, address="ray://head:10001")
    backend.run([job], rt, lambda j, r: None, scratch=lambda j: folder)
    assert sent == [(job, rt, str(folder))]


def test_trace_sketches_of_other_code_without_a_commit_are_not_read(tmp_path, monkeypatch):
    """trace keys its kept sketches by the commit: a wheel (no commit) or a -dirty checkout edited
    between a kill and the rerun read the old code's sketches under the new one's name."""
    from moeguard.trace.resume import keyed

    first = keyed(tmp_path, "suspect", {"s": 1})
    monkeypatch.setattr(provenance, "maker", lambda: {"git_commit": None, "source": "1" * 16})
    one = keyed(tmp_path, "suspect", {"s": 1})
    monkeypatch.setattr(provenance, "maker", lambda: {"git_commit": None, "source": "2" * 16})
    assert keyed(tmp_path, "suspect", {"s": 1}) != one and one != first


def test_a_training_state_a_trainer_refused_is_not_the_next_save_s_lineage(tmp_path):
    import torch

    from moeguard import trainstate

    net = torch.nn.Linear(2, 2)
    params, opt = dict(net.named_parameters()), torch.optim.AdamW(net.parameters())
    state = tmp_path / "state"
    trainstate.save(state, tag="t", step=1, params=params, optimizer=opt)
    meta = json.loads((state / trainstate.META).read_text())
    (state / trainstate.META).write_text(json.dumps({**meta, "made_by": [_other()]}))
    trainstate.load(state, tag="t", params=params).restore(params, opt)   # a run resumed it ...
    trainstate.load(state, tag="t", params=params)                      # ... a later one read it and refused
    trainstate.save(state, tag="t", step=1, params=params, optimizer=opt)
    assert json.loads((state / trainstate.META).read_text())["made_by"] == [provenance.maker()]
