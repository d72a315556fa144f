"""The study engine's cache: a finished job is reused only for the same arguments *and* the same
model weights, dtype and task definitions (its scope)."""

from __future__ import annotations

import os

from moeguard.studies.engine import Job, LocalBackend, Runtime, run_jobs

CALLS: list[int] = []


def square(ctx, *, x: int, seed: int = 0) -> dict:
    CALLS.append(x)
    return {"y": x * x}


def test_jobs_are_reused_in_their_scope_and_rerun_when_the_weights_change(tmp_path):
    from moeguard.testing import tiny_model

    model = tmp_path / "m"
    tiny_model("mixtral").save_pretrained(model)
    jobs = [Job(stage="s", name=f"x={x}", fn="test_study_engine:square", args={"x": x}) for x in (2, 3)]
    rt = Runtime(model=str(model), threads=1)
    CALLS.clear()
    assert [r["y"] for r in run_jobs(jobs, root=tmp_path / "jobs", runtime=rt, backend=LocalBackend())] == [4, 9]
    again = run_jobs(jobs, root=tmp_path / "jobs", runtime=Runtime(model=str(model), threads=2), backend=LocalBackend())
    assert [r["y"] for r in again] == [4, 9] and CALLS == [2, 3]          # threads do not change the scope
    run_jobs(jobs, root=tmp_path / "jobs", runtime=Runtime(model=str(model), dtype="bfloat16", threads=1),
             backend=LocalBackend())
    assert CALLS == [2, 3, 2, 3]                                         # another dtype: run again
    weights = model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, (st.st_atime, st.st_mtime + 5))                   # new weights at the same path
    run_jobs(jobs, root=tmp_path / "jobs", runtime=rt, backend=LocalBackend())
    assert CALLS == [2, 3, 2, 3, 2, 3]


def test_the_weights_identity_sees_a_rewrite_within_the_second_a_time_keeping_copy_and_the_config(tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from moeguard.models.identity import weights_identity
    from moeguard.testing import tiny_model

    model = tmp_path / "m"
    tiny_model("mixtral").save_pretrained(model)
    weights = model / "model.safetensors"
    first = weights_identity(str(model))
    assert weights_identity(str(model)) == first                        # nothing changed: the same identity
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))          # the same bytes, rewritten 1 ns later
    assert weights_identity(str(model)) != first
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights_identity(str(model)) == first
    # other weights of the same shapes (the same size), written within the same second
    tensors = {k: v + 1.0 for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == st.st_size
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))          # 1 ns later: seconds saw no change
    assert int(weights.stat().st_mtime) == int(st.st_mtime) and weights_identity(str(model)) != first
    # a copy that keeps the original's time (cp -p, rsync -a): the bytes differ
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights_identity(str(model)) != first
    # the same weights, another top-k in config.json
    other = tmp_path / "k1"
    shutil.copytree(model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_experts_per_tok"] = 1
    (other / "config.json").write_text(json.dumps(cfg))
    a, b = weights_identity(str(model)), weights_identity(str(other))
    assert a["files"] == b["files"] and a["config"] != b["config"]


def test_a_one_byte_edit_in_a_time_keeping_copy_is_seen_whole_and_can_be_missed_sampled(tmp_path, monkeypatch):
    import struct

    from moeguard.models import identity
    from moeguard.models.identity import weights_identity
    from moeguard.testing import tiny_model

    model = tmp_path / "m"
    tiny_model("mixtral").save_pretrained(model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    size, start = len(data), 8 + struct.unpack("<Q", data[:8])[0]
    n, block = identity._SAMPLES, identity._BLOCK
    blocks = [(size * i // n, size * i // n + block) for i in range(n)]
    # the first weight byte outside every sampled block (a small tuned tensor, as router-only training leaves)
    at = next(o for o in range(start, size) if not any(a <= o < b for a, b in blocks))
    st = weights.stat()
    whole_before = weights_identity(str(model))
    monkeypatch.setattr(identity, "_WHOLE", 0)
    sampled_before = weights_identity(str(model))
    data[at] ^= 0x01
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))             # a copy that kept the time
    assert weights_identity(str(model)) == sampled_before               # sampled: unseen (documented)
    monkeypatch.setattr(identity, "_WHOLE", 256 << 20)
    assert weights_identity(str(model)) != whole_before                 # whole, as for any checkpoint <= 256 MiB: seen


def test_an_upstream_result_passed_on_names_the_job_by_its_numbers_not_its_timing():
    # a recovery curve job takes its prepare job's evaluation, which records how long it took:
    # recomputing the prepare (a resumed run) must not rename the curve job and redo it
    def curve(initial):
        return Job(stage="recovery", name="curve", fn="m:f", args={"seed": 0, "initial": initial})

    first = curve({"score": 52.08, "elapsed_s": 0.123, "per_round": [{"labels": 8, "train_s": 1.5}]})
    again = curve({"score": 52.08, "elapsed_s": 0.1, "per_round": [{"labels": 8, "train_s": 2.0}]})
    assert first.key == again.key
    assert curve({"score": 52.09, "elapsed_s": 0.123, "per_round": [{"labels": 8, "train_s": 1.5}]}).key != first.key
    assert curve({"score": 52.08, "elapsed_s": 0.1, "per_round": [{"labels": 16, "train_s": 2.0}]}).key != first.key


def test_a_hub_ids_identity_is_the_commit_its_cached_config_resolves_to(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from moeguard.models.identity import weights_identity

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert weights_identity("org/moe") == {"name": "org/moe", "files": []}    # not cached: the name only
    repo = tmp_path / "models--org--moe"

    def publish(commit: str, config: str) -> None:         # what a download leaves: a snapshot, main -> it
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text(config)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    publish("a" * 40, '{"num_experts_per_tok": 2}')
    first = weights_identity("org/moe")
    assert first["revision"] == "a" * 40 and first["config"] and weights_identity("org/moe") == first
    # main moved to a new commit (the same config, new weights): the key changes, so stages re-run
    publish("b" * 40, '{"num_experts_per_tok": 2}')
    moved = weights_identity("org/moe")
    assert moved["revision"] == "b" * 40 and moved != first and moved["config"] == first["config"]
    assert weights_identity("org/other") == {"name": "org/other", "files": []}


def test_a_hardened_models_protocol_file_is_part_of_its_identity(tmp_path):
    from moeguard.models.identity import weights_identity
    from moeguard.testing import tiny_model

    model = tmp_path / "hardened"
    tiny_model("mixtral").save_pretrained(model)
    plain = weights_identity(str(model))
    (model / "moeguard_protocol.json").write_text('{"modes": ["full"]}')
    first = weights_identity(str(model))
    (model / "moeguard_protocol.json").write_text('{"modes": ["lora"]}')   # an edited protocol: stages re-run
    assert "protocol" not in plain and first != plain and weights_identity(str(model)) != first


def trusted(ctx, *, seed: int = 0) -> dict:
    from moeguard.models.families import trusts_inferred_families

    return {"trusted": trusts_inferred_families()}


def test_a_worker_holds_the_trust_in_inferred_families_the_command_was_given():
    """A Ray worker starts with the flag off: --trust-inferred-family was lost there, and the worker
    refused the model the command had accepted."""
    from moeguard.models.families import trust_inferred_families
    from moeguard.studies.engine import execute

    before = trust_inferred_families(True)
    try:
        runtime = Runtime(model=None, threads=1)            # made while the flag holds
        assert runtime.trust_inferred and "trust_inferred" not in runtime.to_dict()   # in no key
        trust_inferred_families(False)                      # a fresh worker process
        plain = Runtime(model=None, threads=1)
        job = Job(stage="s", name="t", fn="test_study_engine:trusted", args={})
        assert execute(job, runtime) == {"trusted": True}
        from moeguard.models.families import trusts_inferred_families

        assert not trusts_inferred_families()               # a library caller's own setting is put back
        assert execute(job, plain) == {"trusted": False}
    finally:
        trust_inferred_families(before)


def test_a_built_in_hub_task_s_dataset_commit_is_in_the_jobs_scope(monkeypatch):
    """An audit's and a study's keys held the user's task files only: a built-in hub task (glue-sst2) whose
    dataset moved to a new commit in the cache resumed jobs scored on the old records beside new ones."""
    from moeguard.edge import data_stamps
    from moeguard.studies.engine import Runtime
    from moeguard.tasks import loaders
    from moeguard.tasks.registry import get_task

    tasks = [get_task("glue-sst2"), get_task("arith-compare")]
    scopes = []
    for commit in ("1111", "1111", "2222"):
        monkeypatch.setattr(loaders, "_hub_revision", lambda name, revision="main", c=commit: c)
        stamps = data_stamps(tasks)
        assert [name for name, _ in stamps] == ["glue-sst2"]   # the embedded task changes only with moeguard
        scopes.append(Runtime(model=None, task_data=stamps).scope())
    assert scopes[0] == scopes[1] != scopes[2]
    assert "task_data" not in Runtime(model=None, task_data=data_stamps(tasks[1:])).to_dict()   # embedded keys as before


def test_a_study_s_scope_holds_where_a_placement_strategy_lands(monkeypatch):
    """An audit or study with device_map auto was keyed by the name alone: killed on a GPU host and resumed
    where none is visible, its stages and jobs mixed the two devices' numbers."""
    from moeguard.models import placement
    from moeguard.studies.engine import Runtime

    scopes = []
    for kind in ("cuda", "cuda", "cpu"):
        monkeypatch.setattr(placement, "placed_on", lambda device_map, capped=False, k=kind: k)
        scopes.append(Runtime(model=None, device_map="auto").scope())
    assert scopes[0] == scopes[1] != scopes[2]
    assert "placed_on" not in Runtime(model=None, device_map="cpu").to_dict()   # a device names its own kind
    assert "placed_on" not in Runtime(model=None).to_dict()                     # keys of runs without one unchanged


def test_on_ray_a_placement_is_keyed_where_the_tasks_run_not_where_the_driver_is(monkeypatch):
    """Ray hides every GPU from a task that asks for none: `--device-map auto` without --gpus-per-job ran
    on the workers' CPUs and was keyed `cuda` from a GPU driver (a local resume reused those jobs as GPU
    results); a head node without a GPU keyed its GPU workers' jobs `cpu`."""
    from moeguard.models import placement

    for driver in ("cuda", "cpu"):
        monkeypatch.setattr(placement, "placed_on", lambda device_map, capped=False, k=driver: k)
        assert Runtime(model=None, device_map="auto", ray_gpus=0.0).to_dict()["placed_on"] == "cpu"
        assert Runtime(model=None, device_map="auto", ray_gpus=1.0).to_dict()["placed_on"] == "cuda"
        assert Runtime(model=None, device_map="auto").to_dict()["placed_on"] == driver   # local: where it runs
        # a cap without a map (accelerate's auto): on the workers' CPUs keyed as an uncapped CPU run, as locally
        assert "placed_on" not in Runtime(model=None, max_memory=2**30, ray_gpus=0.0).to_dict()
        assert Runtime(model=None, max_memory=2**30, ray_gpus=0.5).to_dict()["placed_on"] == "cuda"
    # a device names its own kind, and a run without a map is unchanged
    assert "placed_on" not in Runtime(model=None, device_map="cuda:0", ray_gpus=1.0).to_dict()
    assert Runtime(model=None, ray_gpus=0.0).to_dict() == Runtime(model=None).to_dict()


def test_a_process_evicts_a_model_before_loading_another_and_stages_release_them_all(monkeypatch):
    """Context held up to two models and loaded a third before evicting one, and nothing released them before
    the audit's harden and scan stages loaded their own full copies (on a GPU: out of memory, or under auto a
    harden copy pushed to the CPU and refused as offloaded)."""
    import moeguard.models.loading as loading
    from moeguard.studies.engine import Context, Runtime

    held_at_load = []
    monkeypatch.setattr(loading, "load_model", lambda ref, **k: (held_at_load.append(len(Context._models)),
                                                                (object(), object(), None))[1])
    monkeypatch.setattr(Context, "_models", {})
    monkeypatch.setattr(Context, "_derived", {})
    ctx = Context(Runtime(model=None))
    for ref in ("a", "b", "c"):
        ctx.model(ref)
    assert held_at_load == [0, 1, 1] and len(Context._models) == 2   # the third loaded with one other held
    Context.release()
    assert Context._models == {} and Context._derived == {}
    import inspect

    from moeguard.audit import optional

    for stage in (optional.harden_stage, optional.scan_stage):
        assert "Context.release()" in inspect.getsource(stage)
