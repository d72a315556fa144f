"""--device-map on every command that loads a model: checked at the edge against the devices this
machine has (one line, nothing written), carried by the model handle to every load, and saved in
the run record."""

from __future__ import annotations

import json

import pytest
import torch

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.loading import resolve
from moeguard.models.placement import check_device_map

# a device no machine here has: on a CPU-only torch "no cuda device is visible", on a GPU server
# "this machine has N cuda device(s)"; both name the flag and the value
MISSING = "cuda:99"

COMMANDS = [
    "eval",
    "attribute --task arith-compare --method frequency --out O",
    "merge --out O --method average --keep 2",
    "realign --model E --task arith-compare --out O",
    "route-attack --out O --layer 0 --expert 1",
    "monitor profile --out O",
    "monitor score --profile P --log L --out O",
    "serve --profile P --port 0",
    "scan --out O",
    "harden --out O",
    "sweep --out O",
    "recovery --task arith-compare --keep 2 --out O",
    "attack --task arith-compare --keep 2 --out O",
    "defend-eval --hardened E --out O",
    "audit --out O",
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.split(" --")[0] for c in COMMANDS])
def test_a_device_this_machine_lacks_is_one_line_before_any_work(cmd, tmp_path, capsys):
    out = tmp_path / "out"
    subs = {"O": str(out), "E": str(resolve(None).path), "P": str(tmp_path / "profile.json"),
            "L": str(tmp_path / "log.jsonl")}
    if cmd.startswith("serve"):   # a free port, bound before the model is resolved
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            subs["0"] = str(s.getsockname()[1])
    code = main([subs.get(a, a) for a in cmd.split()] + ["--device-map", MISSING])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    flag = "device_map" if cmd.startswith("audit") else "--device-map"
    assert f"{flag} {MISSING}: " in err and ("no cuda device is visible" in err or "cuda device(s)" in err), err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_the_device_map_values_accepted_and_refused():
    assert check_device_map(None) is None
    for v in ("auto", "balanced", "balanced_low_0", "sequential", "cpu", " cpu "):
        assert check_device_map(v) == v.strip()
    with pytest.raises(MoeguardError, match=r"--device-map 'gpu' is neither a placement nor a device") as e:
        check_device_map("gpu")
    assert "auto, balanced, balanced_low_0, sequential" in e.value.hint
    if not torch.cuda.is_available():
        with pytest.raises(MoeguardError, match=r"--device-map cuda: no cuda device is visible \(torch .*\)") as e:
            check_device_map("cuda")
        assert "drop --device-map to use the CPU" in e.value.hint
        if torch.version.cuda is None:
            assert "a CPU build" in str(e.value)
    else:
        n = torch.cuda.device_count()
        assert check_device_map("cuda") == "cuda" and check_device_map(f"cuda:{n - 1}") == f"cuda:{n - 1}"
        with pytest.raises(MoeguardError, match=rf"this machine has {n} cuda device\(s\)"):
            check_device_map(f"cuda:{n}")


def test_the_handle_places_every_load_and_an_explicit_map_wins(monkeypatch):
    from moeguard.edge import resolve_model
    from moeguard.models import loading

    seen = []
    monkeypatch.setattr(loading, "load_model", lambda arg, **kw: seen.append(kw["device_map"]))
    h = resolve_model(None, device_map="cpu")
    h.load()
    h.load(device_map="auto")
    resolve_model(None).load()
    assert h.device_map == "cpu" and seen == ["cpu", "auto", None]


def test_eval_on_a_device_map_gives_the_same_scores_and_records_it(tmp_path, capsys):
    plain, placed = tmp_path / "plain.json", tmp_path / "placed.json"
    assert main(["eval", "--tasks", "arith-compare", "--limit", "8", "--out", str(plain)]) == 0
    assert main(["eval", "--tasks", "arith-compare", "--limit", "8", "--out", str(placed), "--device-map", "cpu"]) == 0
    a, b = json.loads(plain.read_text()), json.loads(placed.read_text())
    assert a["tasks"]["arith-compare"]["metrics"] == b["tasks"]["arith-compare"]["metrics"]
    assert b["run"]["settings"]["device_map"] == "cpu" and "device_map" not in a["run"]["settings"]


def test_a_study_command_hands_its_device_map_to_the_jobs(monkeypatch, tmp_path):
    """sweep -> run_to_dir -> the Runtime every job loads with (and its key)."""
    from moeguard import studies

    seen = {}

    def fake_run_study(study, cfg, *, jobs, runtime, backend, progress):
        seen["runtime"] = runtime
        raise MoeguardError("stopped by the test")   # one line, exit 2: nothing of the study runs

    monkeypatch.setattr(studies, "run_study", fake_run_study)
    assert main(["sweep", "--out", str(tmp_path / "o"), "--tasks", "arith-compare", "--methods", "frequency",
                 "--keep", "2", "--device-map", "cpu"]) == 2
    assert seen["runtime"].device_map == "cpu" and seen["runtime"].to_dict()["device_map"] == "cpu"


def test_a_gpu_map_on_ray_needs_gpus_per_job_and_gpus_per_job_needs_ray():
    from moeguard.studies.engine import make_backend

    with pytest.raises(MoeguardError, match="Ray tasks that ask for no GPU see none"):
        make_backend("ray", device_map="cuda")
    with pytest.raises(MoeguardError, match="--gpus-per-job 1 reserves GPUs for Ray tasks"):
        make_backend("local", gpus=1.0)
    assert make_backend("local", device_map="cuda").name == "local"      # the edge checks the device itself
    assert make_backend("ray", device_map="cpu", gpus=0.0).name == "ray"  # nothing started until it runs
    assert make_backend("ray", device_map="auto").name == "ray"           # a placement uses a CPU-only node's CPU
    for cpu in (None, "cpu"):   # GPUs held by every task, the model on the CPU
        with pytest.raises(MoeguardError, match=r"--gpus-per-job 1 reserves GPUs for each Ray task, and each job puts "
                                                r"its model on the CPU \(--device-map (not given|cpu)\)"):
            make_backend("ray", gpus=1.0, device_map=cpu)
    # a capped load without a map is accelerate's auto, the GPUs first: accepted
    assert make_backend("ray", gpus=1.0, max_memory=2**30).name == "ray"
    with pytest.raises(MoeguardError, match=r"--device-map cpu\)"):
        make_backend("ray", gpus=1.0, device_map="cpu", max_memory=2**30)


RAY_STUDIES = [
    "sweep --out O --tasks arith-compare --methods frequency --keep 2",
    "recovery --task arith-compare --keep 2 --method frequency --out O",
    "attack --task arith-compare --keep 2 --out O",
    "defend-eval --hardened E --out O",
]


@pytest.mark.parametrize("cmd", RAY_STUDIES, ids=[c.split(" --")[0] for c in RAY_STUDIES])
def test_on_ray_the_workers_check_their_own_devices(cmd, monkeypatch, tmp_path, capsys):
    """A Ray head node often has no GPU: a GPU map was refused there although the workers have one.
    With --backend ray the edge checks the spelling only and the jobs get the map as given (each
    worker's load checks its devices); a misspelled map is still one line before any work."""
    from moeguard import studies

    seen = {}

    def fake_run_study(study, cfg, *, jobs, runtime, backend, progress):
        seen["runtime"], seen["backend"] = runtime, backend
        raise MoeguardError("stopped by the test")

    monkeypatch.setattr(studies, "run_study", fake_run_study)
    subs = {"O": str(tmp_path / "o"), "E": str(resolve(None).path)}
    args = [subs.get(a, a) for a in cmd.split()] + ["--backend", "ray", "--gpus-per-job", "1"]
    assert main(args + ["--device-map", MISSING]) == 2
    # Ray itself may print a notice as it starts in this process (its token authentication): ours is the last line
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == "moeguard: error: stopped by the test" and "Traceback" not in err, err
    assert seen["runtime"].device_map == MISSING and seen["backend"].name == "ray"
    seen.clear()
    assert main(args + ["--device-map", "gpu-please"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'gpu-please' is neither a placement nor a device" in err and len(err.splitlines()) == 1, err
    assert not seen   # refused at the edge


def test_an_audit_on_ray_leaves_the_device_check_to_the_workers(monkeypatch, tmp_path, capsys):
    import moeguard.audit.run as audit_run

    seen = {}

    def fake_run_audit(cfg, out, *, backend, model, progress=None, command=None):
        seen["device_map"], seen["backend"] = cfg.device_map, backend.name
        raise MoeguardError("stopped by the test")

    monkeypatch.setattr(audit_run, "run_audit", fake_run_audit)
    base = ["audit", "--out", str(tmp_path / "o"), "--device-map", MISSING]
    assert main(base + ["--backend", "ray", "--gpus-per-job", "1"]) == 2
    assert capsys.readouterr().err.strip() == "moeguard: error: stopped by the test"
    assert seen == {"device_map": MISSING, "backend": "ray"}
    seen.clear()
    # the scan and defense stages load the model on the driver: its devices are checked there, before any stage
    assert main(base + ["--backend", "ray", "--gpus-per-job", "1", "--scan"]) == 2
    err = capsys.readouterr().err
    assert f"device_map {MISSING}: " in err and len(err.splitlines()) == 1 and not seen, err
    assert main(base) == 2    # local: this machine's devices, before any work
    err = capsys.readouterr().err
    assert f"device_map {MISSING}: " in err and ("no cuda device is visible" in err or "cuda device(s)" in err), err
    assert not seen


def test_a_pruned_copy_of_a_model_spread_over_gpus_is_dispatched_as_its_source(monkeypatch):
    """Built on meta and filled, the pruned copy of a model spread over two GPUs had no accelerate hooks: its
    first layer on the second GPU got the first's hidden states (the sweep's physical check, recovery, attack
    cells, merges). Faked here: the source's map names two GPUs, and dispatch_model is recorded."""
    import accelerate

    from moeguard.models.prune import prune_model
    from moeguard.testing import tiny_model

    model = tiny_model("mixtral")
    seen = []
    monkeypatch.setattr(accelerate, "dispatch_model", lambda m, device_map: (seen.append(device_map), m)[1])
    small, _ = prune_model(model, {0: [0, 1, 2, 3]})
    assert seen == []                                           # one device: no hooks
    placed = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "lm_head": 1}
    model.hf_device_map = placed
    small, _ = prune_model(model, {0: [0, 1, 2, 3]})
    assert seen == [placed]
    model.hf_device_map = {**placed, "model.layers.1": "cpu"}   # offloaded: never pruned in memory, no dispatch
    prune_model(model, {0: [0, 1, 2, 3]})
    assert len(seen) == 1
    # on one device a model built elsewhere (the from-scratch baseline, initialized on the CPU) is moved there
    import torch

    import moeguard.tasks.tokens as tokens
    from moeguard.models.prune import placed_like

    del model.hf_device_map
    real = tokens.model_device
    monkeypatch.setattr(tokens, "model_device", lambda m: torch.device("meta") if m is model else real(m))
    moved = placed_like(tiny_model("mixtral", seed=1), model)
    assert {p.device.type for p in moved.parameters()} == {"meta"}


def test_apple_mps_is_refused_in_one_line_and_left_out_of_a_memory_cap(monkeypatch):
    """On Apple Silicon accelerate's strategies fill MPS first and --device-map mps was accepted: moeguard's
    float64 scoring then failed there with a traceback, and --max-memory's cap held nothing (MPS, the host's
    own memory, was in the budget at all the RAM free)."""
    import torch

    from moeguard.errors import MoeguardError
    from moeguard.models import placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "device_count", lambda: 1)
    for value in ("auto", "mps", "mps:0"):
        with pytest.raises(MoeguardError, match="Apple's MPS device") as e:
            placement.check_device_map(value)
        assert e.value.hint == "drop --device-map to use the CPU"
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {"mps": 64 << 30, "cpu": 64 << 30, "disk": 1 << 40})
    settings, made = placement.offload_settings(8 << 30)
    assert settings["max_memory"] == {"cpu": 8 << 30}, settings
    made.rmdir()


def test_a_copy_dispatched_over_gpus_is_collected_when_dropped(monkeypatch):
    """accelerate's hooks hold a dispatched model in reference cycles: `del` left each merged or pruned copy
    over the GPUs until a rare full collection, so the merge route's candidates (and the sweep's physical
    checks, the attack's pick) piled up. Faked here: every copy counts as spread, and the collection is
    recorded."""
    import moeguard.studies.merge_route as merge_route
    from moeguard.attribution.run import make_context, score
    from moeguard.models.loading import load_model
    from moeguard.tasks.registry import get_task

    m, tok, _ = load_model(None)
    t = get_task("arith-compare")
    scores = {"frequency": score(make_context(m, tok, t, samples=4, batch_size=4, seed=0), "frequency")}
    released = []
    monkeypatch.setattr(merge_route, "spread", lambda model: True)
    monkeypatch.setattr(merge_route, "release_memory", lambda: released.append(1))
    out = merge_route.attack_candidates(m, tok, t, scores, keep=4, merge_methods=("average", "frequency-weighted"),
                                        samples=4, eval_limit=4, seed=0, full_score=50.0)
    assert len(out) == 2 and released == [1, 1]
