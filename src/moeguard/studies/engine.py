"""The study engine's jobs and the backends that run them: in this process, or as Ray tasks.

A :class:`Job` names a function (``module:function``) and JSON arguments; its result is JSON.
That is all a backend needs, so a job runs the same way in this process, in a local Ray
worker or on a cluster node, and a finished job is a file ``jobs/<stage>/<key>.json`` whose
key hashes the function and its arguments: a re-run skips it, a changed argument re-runs it.

Determinism across backends: every job seeds Python, NumPy and torch from its own ``seed``
argument and runs with the audit's ``threads`` (CPU float sums change with the thread count),
and the driver reads every result back from its JSON file, so a local and a Ray audit with
the same settings produce the same numbers.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from moeguard.errors import MoeguardError, suggest
from moeguard.io import digest, dumps, strict_loads, write_json

BACKENDS = ("local", "ray")


# fields that hold wall-clock measurements: they differ between two runs of the same job
TIMING_FIELDS = frozenset({"seconds", "created_at", "train_s", "select_s", "eval_s", "elapsed_s", "tokens_per_second"})


def untimed(value: Any) -> Any:
    """``value`` without its :data:`TIMING_FIELDS`, at any depth."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMING_FIELDS}
    if isinstance(value, list | tuple):
        return [untimed(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class Job:
    stage: str
    name: str                      # what the progress bar and the job file's record show
    fn: str                        # "module:function"; called as fn(ctx, **args)
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        # an upstream job's result passed on as an argument carries its wall-clock time: without
        # dropping it, recomputing that job (a resumed run, another host) would rename every job
        # downstream and redo them for a timing difference
        text = json.dumps({"fn": self.fn, "args": untimed(self.args)}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def path(self, root: Path) -> Path:
        return root / self.stage / f"{self.key}.json"


def _trusted() -> bool:
    from moeguard.models.families import trusts_inferred_families

    return trusts_inferred_families()


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """How jobs load the model and use the machine; the same for every job of an audit."""

    model: str | None
    dtype: str | None = None
    device_map: str | None = None
    threads: int = 1
    # bytes of host memory the weights may take (the rest offloaded to disk); where the weights
    # sit changes no number, so it is in neither a job's scope nor a stage's key
    max_memory: int | None = None
    # tasks defined in the user's YAML files: jobs name their task, and a worker process (a Ray
    # node included) knows only the built-in names until these are adopted there
    tasks: tuple = ()
    # the built-in tasks' data stamps (edge.data_stamps: a hub dataset's commit), in the keys beside the
    # user's task definitions: a dataset that moved must not resume jobs scored on its old records
    task_data: tuple = ()
    # --trust-inferred-family as it was when the runtime was made: a Ray worker starts without it, and
    # refused the model the command had accepted (it changes no number, so it is in no key)
    trust_inferred: bool = field(default_factory=_trusted)
    # the GPUs each Ray task asks for (None: the jobs run in this process). A placement (auto...) lands
    # where the workers run, which the driver does not see: Ray hides every GPU from a task that asks for
    # none, and a head node without a GPU keyed its GPU workers' results as the CPU's
    ray_gpus: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"model": self.model, "dtype": self.dtype, "device_map": self.device_map, "threads": self.threads}
        from moeguard.models.placement import capped_placement

        # where auto lands (a cap without a map is auto too): GPU jobs and stages must not resume on the CPU
        # (here; on Ray, where its tasks run); the device_map entry stays as given
        placed = capped_placement(self.device_map, self.max_memory).get("placed_on")
        if self.ray_gpus is not None and (placed is not None or self.max_memory is not None):
            placed = "cuda" if self.ray_gpus > 0 else None if self.device_map is None else "cpu"
        if placed is not None:
            d["placed_on"] = placed
        if self.tasks:  # in the model stage's key, so an edited task file (or its data) re-runs the stages
            from moeguard.tasks.loaders import task_identity

            d["tasks"] = [task_identity(t) for t in self.tasks]
        if self.task_data:
            d["task_data"] = [list(x) for x in self.task_data]
        return d

    def scope(self) -> str:
        """What a finished job's result depends on besides its arguments: the model (and its weight
        files and config), dtype, device map and the user's task definitions. A job file
        from another scope is not reused (a resumed folder pointed at other weights re-runs)."""
        from moeguard.models.identity import weights_identity

        d = self.to_dict()
        d.pop("threads")  # how many cores, not what is computed
        d["weights"] = weights_identity(self.model)
        return digest(d)


class Context:
    """What a job function gets: the study's models (each loaded once per process) and copies
    derived from them (a pruned model), built once per process and tag."""

    _models: dict[str, tuple] = {}
    _derived: dict[tuple, Any] = {}
    # two: defend-eval alternates a base model and its hardened version; more would only hold memory
    MAX_MODELS = 2

    def __init__(self, runtime: Runtime, scratch: Path | None = None):
        self.runtime = runtime
        # the job's own folder for finished pieces of its work (an attribution's batches), kept until
        # its result is saved: a job cut short by a kill resumes from them (None: where the driver's
        # folder is not this process's, a Ray cluster's node)
        self.scratch = scratch

    def scratch_for(self, part: str) -> Path | None:
        """The job's folder for one part of its work (``attribution``: the costly methods' batches;
        ``evaluations``: masked evaluations; ``rounds``: a re-alignment's finished rounds, its trained
        weights included), or None where the job has no scratch folder (the job's folder is made by the
        driver, a part's by whoever writes in it)."""
        return self.scratch / part if self.scratch is not None else None

    def model(self, ref: str | None = "", /):
        """(model, tokenizer) of ``ref`` (a checkpoint path or hub id; default: the runtime's model).
        Jobs must hand it back unchanged (masking and fine-tuning restore it)."""
        ref = self.runtime.model if ref == "" else ref
        key = self._key(ref)
        if key not in Context._models:
            import torch

            from moeguard.models.loading import load_model

            dtype = getattr(torch, self.runtime.dtype) if self.runtime.dtype else None
            if len(Context._models) >= self.MAX_MODELS:   # before the load: never three models held at once
                while len(Context._models) >= self.MAX_MODELS:
                    Context._models.pop(next(iter(Context._models)))
                Context._derived.clear()
                from moeguard.models.loading import release_memory

                release_memory()
            m, tok, _ = load_model(ref, dtype=dtype, device_map=self.runtime.device_map,
                                   max_memory=self.runtime.max_memory)
            Context._derived.clear()
            Context._models[key] = (m, tok)
        return Context._models[key]

    @classmethod
    def release(cls) -> None:
        """Drop every model and copy this process holds: a stage that loads its own (the audit's
        hardening and scan) would otherwise sit beside the studies' models, and accelerate's ``auto``
        plan counts only the memory the driver reports free (a harden copy went to the CPU and was
        refused as offloaded; with one device it ran out of memory)."""
        from moeguard.models.loading import release_memory

        cls._models.clear()
        cls._derived.clear()
        release_memory()

    def _key(self, ref: str | None) -> str:
        # the files as they are now, too: a checkpoint rewritten in place (prune --overwrite) between two
        # studies of one process was handed out as the model cached before
        return json.dumps({**self.runtime.to_dict(), "model": ref, "max_memory": self.runtime.max_memory,
                           "files": _on_disk(ref)}, sort_keys=True)

    def derived(self, tag: tuple, make: Callable[[], Any]):
        """A model derived from one of the study's (a pruned copy), built once per process and
        ``tag`` (which must name the source model and everything the copy depends on). The
        runtime (dtype, device map, memory cap) is part of the tag here: a copy pruned in memory
        is never handed to a capped run, nor a float32 one to a bfloat16 run."""
        tag = (self._key(self.runtime.model), *tag)
        if tag not in Context._derived:
            if Context._derived:   # one at a time: pruned copies of a large model are large
                Context._derived.clear()
                import gc

                gc.collect()   # accelerate's hooks hold offloaded copies in cycles; their folders go with them
            Context._derived[tag] = make()
        return Context._derived[tag]


def execute(job: Job, runtime: Runtime, scratch: str | None = None) -> dict[str, Any]:
    """Run one job here. Used by both backends (a Ray worker calls this too). ``scratch``: the
    job's folder for finished pieces of its work (:func:`scratch_path`), which the driver made with
    its makers' list (``provenance.mark``). A worker that does not see that list (a Ray cluster's node
    without the driver's files at the same path) keeps nothing: a folder made there would resume
    nothing and stay behind on the node."""
    import numpy as np
    import torch

    from moeguard.io import MADE_BY
    from moeguard.tasks.registry import adopt

    if scratch is not None and not (Path(scratch) / MADE_BY).is_file():
        scratch = None

    for t in runtime.tasks:
        adopt(t)
    from moeguard.models.families import trust_inferred_families

    # a worker process holds this job's setting, as the driver did; a library caller's own is put back
    previous = trust_inferred_families(runtime.trust_inferred)
    try:
        torch.set_num_threads(runtime.threads)
        seed = int(job.args.get("seed", 0))
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        module, _, name = job.fn.partition(":")
        fn = getattr(importlib.import_module(module), name)
        result = fn(Context(runtime, Path(scratch) if scratch else None), **job.args)
    finally:
        trust_inferred_families(previous)
    return json.loads(dumps(result))  # exactly what the job file will hold (NaN and inf as null)


def _record(job: Job, result: dict[str, Any], scope: str | None = None) -> dict[str, Any]:
    from moeguard.provenance import maker

    # made_by: the driver's versions and commit (a Ray worker's are the cluster's own environment's)
    return {"job": {"stage": job.stage, "name": job.name, "fn": job.fn, "key": job.key}, "scope": scope,
            "args": job.args, "result": result, "made_by": maker()}


def scratch_path(job: Job, root: Path, scope: str) -> Path:
    """Where ``job`` keeps finished pieces of its work until its result is saved: beside its result
    file, named by its key and scope (a resumed folder pointed at other weights starts afresh)."""
    return root / job.stage / f".{job.key}-{scope}.partial"


def _drop_scratch(job: Job, root: Path) -> None:
    """The job's scratch folders, of every scope: its result is saved (a stale scope's would stay)."""
    import shutil

    for p in (root / job.stage).glob(f".{job.key}-*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def drop_stale_scratch(root: Path, stages) -> None:
    """Every job scratch folder left in ``stages`` once a study has finished all its jobs there: those
    of jobs whose key changed since a killed run (another setting), which no job will finish now
    (a fine-tune's weights, up to a pruned model's size, were left in a hidden folder)."""
    import shutil

    for stage in stages:
        for p in (root / stage).glob(".*.partial"):
            shutil.rmtree(p, ignore_errors=True)


def load_done(job: Job, root: Path, scope: str | None = None) -> dict[str, Any] | None:
    path = job.path(root)
    if not path.is_file():
        return None
    try:
        saved = strict_loads(path.read_text(encoding="utf-8"))
    # a file is only ever renamed into place whole; a damaged one runs again, as does one that holds
    # NaN or Infinity (written before every result went through io.dumps: its readers expect null)
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("job"), dict) or "result" not in saved \
            or saved["job"].get("key") != job.key or saved.get("scope") != scope:
        return None
    from moeguard.provenance import reusing

    reusing(str(path), saved.get("made_by"), fix="delete it (or start the run over)")
    return saved["result"]


def _scopes(runtime: Runtime) -> Callable[[Job], str]:
    """Each job's scope: the runtime's, and the weights of another model a job loads by its path
    (``args["model"]``: defend-eval's base or hardened side, an attack's other model), so a
    checkpoint re-made at the same path re-runs its jobs instead of serving the old results."""
    from moeguard.models.identity import weights_identity

    base, memo = runtime.scope(), {}

    def scope(job: Job) -> str:
        other = job.args.get("model")
        # "" is the runtime's model (Context.model): it was read as the embedded model's files, so a
        # reinstall re-ran every attack job of a user's own checkpoint
        if not isinstance(other, str) or other in ("", runtime.model):
            return base
        if other not in memo:
            memo[other] = digest([base, weights_identity(other)])
        return memo[other]
    return scope


def run_jobs(jobs: list[Job], *, root: Path, runtime: Runtime, backend: "Backend", progress: Any = None,
             label: str = "jobs") -> list[dict[str, Any]]:
    """Results of ``jobs`` in their order; finished ones are read from ``root``, the rest run
    on ``backend`` and are saved as each completes (a kill loses only the running ones)."""
    results: dict[str, dict[str, Any]] = {}
    todo = []
    scope = _scopes(runtime)
    for j in jobs:
        done = load_done(j, root, scope(j))
        if done is None:
            todo.append(j)
        else:
            results[j.key] = done
            _drop_scratch(j, root)   # a kill between its result and this left them
    bar = progress.add_task(f"{label} ({len(jobs) - len(todo)} cached)", total=len(jobs),
                            completed=len(jobs) - len(todo)) if progress is not None else None
    unique = list({j.key: j for j in todo}.values())

    def finished(job: Job, result: dict[str, Any]) -> None:
        path = job.path(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, _record(job, result, scope(job)))
        _drop_scratch(job, root)
        results[job.key] = result  # already as JSON holds it (execute round-trips it)
        if bar is not None:
            progress.update(bar, advance=sum(1 for j in todo if j.key == job.key), description=f"{label}: {job.name}")

    def scratch(job: Job) -> Path:   # what a killed run of the job kept there is this run's to reuse
        from moeguard.provenance import mark

        folder = scratch_path(job, root, scope(job))
        mark(folder, fix="delete it (or start the run over)")
        return folder

    backend.run(unique, runtime, finished, scratch=scratch)
    if bar is not None:
        progress.update(bar, description=label)
    return [results[j.key] for j in jobs]


class Backend:
    name = "base"

    def run(self, jobs: list[Job], runtime: Runtime, finished: Callable[[Job, dict], None], *,
            scratch: Callable[[Job], Path] | None = None) -> None:
        """Run ``jobs``, calling ``finished`` with each result; ``scratch(job)``: the job's folder for
        finished pieces of its work, made here with its makers' list and passed on to every job
        (``execute`` keeps nothing where its process does not see that list)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}

    def close(self) -> None:
        pass


class LocalBackend(Backend):
    """One job after another in this process (the model is loaded once)."""

    name = "local"

    def run(self, jobs, runtime, finished, *, scratch=None):
        for job in jobs:
            finished(job, execute(job, runtime, str(scratch(job)) if scratch is not None else None))


RAY_RETRIES = 2   # a job whose worker the system took is submitted again this many times


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


class RayBackend(Backend):
    """Each job a Ray task: a local Ray started here, or ``address`` of a running cluster.

    Each task asks for ``runtime.threads`` CPUs and ``gpus`` GPUs, so Ray packs as many jobs
    per node as its resources allow. A CPU worker keeps its loaded model between tasks; a task that
    asks for GPUs runs in a fresh worker (Ray's ``max_calls=1`` for GPU tasks: a reused worker's CUDA
    context stays on the GPU it first had), so each GPU job loads the model again. A job whose worker
    the system took (killed for memory, a node gone) is submitted again twice, here (Ray's own retry
    of a task its memory monitor killed has no limit); a job's own error is not retried."""

    name = "ray"

    def __init__(self, *, address: str | None = None, gpus: float = 0.0, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise MoeguardError("--backend ray needs Ray, which is not installed",
                                hint="pip install 'moeguard[ray]' (or pip install ray), or use --backend local") from None
        self.ray, self.address, self.gpus = ray, address, gpus
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = num_cpus
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise MoeguardError(f"could not start or reach Ray at {address or 'a new local instance'}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                    hint="check --ray-address (ray://host:10001 or host:6379), or leave it out "
                                         "for a local Ray") from None
            self._started = True

    def describe(self):
        resources = self.ray.cluster_resources()
        return {"backend": self.name, "address": self.address or "local",
                "cluster_cpus": resources.get("CPU"), "cluster_gpus": resources.get("GPU", 0)}

    def check_fits(self, threads: int) -> None:
        """A task asking for more CPUs (or GPUs) than any node has waits forever in Ray's queue:
        refuse it in one line, naming what the largest node offers. An autoscaling cluster may
        add bigger nodes; its nodes' sizes are not known here, so only the nodes alive are used."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive", True)]
        if not nodes:
            return
        cpus = max(float(n.get("CPU", 0)) for n in nodes)
        gpus = max(float(n.get("GPU", 0)) for n in nodes)
        if threads > cpus:
            raise MoeguardError(f"each job asks Ray for {threads} CPUs (threads), and the largest node has {cpus:g}",
                                hint=f"pass --threads {int(cpus)} or fewer (the default is this machine's cores)")
        if self.gpus > gpus:
            raise MoeguardError(f"each job asks Ray for {self.gpus:g} GPUs (gpus_per_job), and the largest node has "
                                f"{gpus:g}", hint=f"pass --gpus-per-job {gpus:g} or fewer")

    def run(self, jobs, runtime, finished, *, scratch=None):
        if not jobs:
            return
        ray = self.ray
        # a cluster's nodes keep pieces where they see the driver's run folder (a shared filesystem, as
        # docs/audit.md asks for); a node that does not keeps none (execute checks)
        # absolute: a node's worker runs in its own working directory, not the driver's (a relative --out)
        where = (lambda j: os.path.abspath(scratch(j))) if scratch is not None else (lambda j: None)
        self.check_fits(runtime.threads)
        # max_retries=0, retried here instead: Ray retries a task its memory monitor killed without end
        # unless max_retries is 0 (reloading the model each time), and counts no other limit for them
        remote = ray.remote(num_cpus=runtime.threads, num_gpus=self.gpus, max_retries=0)(execute)
        lost = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                getattr(ray.exceptions, "OutOfMemoryError", ray.exceptions.WorkerCrashedError))
        # the model paths too (the runtime's, a job's "model": the audit's hardened copy under a relative --out):
        # a relative one is not found there, or, spelled org/name, is taken for a hub id and downloaded
        sent = replace(runtime, model=_for_nodes(runtime.model))
        pending = {remote.remote(_job_for_nodes(j), sent, where(j)): j for j in jobs}
        tries: dict[int, int] = {}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    job = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                        if isinstance(cause, MoeguardError):
                            raise cause from None
                        raise RuntimeError(f"job {job.stage}/{job.name} failed on Ray: {cause!r}") from exc
                    except lost as exc:   # the system took its worker: out of memory, a node gone
                        n = tries[id(job)] = tries.get(id(job), 0) + 1
                        if n <= RAY_RETRIES:   # jobs are idempotent: the driver writes every result
                            pending[remote.remote(_job_for_nodes(job), sent, where(job))] = job
                            continue
                        raise MoeguardError(f"job {job.stage}/{job.name} was lost on Ray {n} times "
                                            f"({type(exc).__name__}: {_first_line(exc)})",
                                            hint="if out of memory, give each job more room (--threads packs fewer "
                                                 "jobs per node) or use larger nodes; rerun the same command to "
                                                 "resume with the jobs finished") from None
                    except ray.exceptions.RayError as exc:   # Ray's own failure (its runtime environment, store)
                        raise MoeguardError(f"job {job.stage}/{job.name} could not run on Ray "
                                            f"({type(exc).__name__}: {_first_line(exc)})",
                                            hint="check the cluster (ray status); rerun the same command to resume "
                                                 "with the jobs finished") from None
                    finished(job, result)
        finally:
            for ref in pending:  # interrupted or failed: don't leave work running on the cluster
                ray.cancel(ref, force=True)

    def close(self):
        if self._started:
            self.ray.shutdown()


def _for_nodes(ref: str | None) -> str | None:
    """A model reference as a Ray node's worker finds it: a folder here by its absolute path (a worker
    runs in its own working directory, not the driver's); a hub id, or None, as it is."""
    if ref and not os.path.isabs(ref) and os.path.isdir(os.path.expanduser(ref)):
        return os.path.abspath(os.path.expanduser(ref))
    return ref


def _job_for_nodes(job: Job) -> Job:
    """``job`` with its "model" argument as :func:`_for_nodes` gives it (its key, from the driver's
    arguments, is the driver's to use: only the worker reads this copy)."""
    if "model" not in job.args or _for_nodes(job.args["model"]) == job.args["model"]:
        return job
    return replace(job, args={**job.args, "model": _for_nodes(job.args["model"])})


def _on_disk(ref: str | None) -> list:
    """A local checkpoint's weight and config files by name, size and modification time (what a
    rewrite changes; cheap enough for every job's lookup); [] for a hub id or a missing folder."""
    from moeguard.models.loading import EMBEDDED_MODEL_DIR

    folder = EMBEDDED_MODEL_DIR if ref in (None, "", "embedded") else Path(str(ref)).expanduser()
    try:
        files = sorted([*folder.glob("*.safetensors"), folder / "config.json"])
        return [[f.name, st.st_size, st.st_mtime_ns] for f in files if f.exists() for st in [f.stat()]]
    except OSError:
        return []


def make_backend(name: str, *, address: str | None = None, gpus: float = 0.0, num_cpus: int | None = None,
                 device_map: str | None = None, max_memory: int | None = None) -> Backend:
    """The backend ``name``, with the GPUs each Ray task asks for; ``device_map``: where each job
    puts its model, checked against them (before any work); ``max_memory``: a capped load, which
    without a map is accelerate's auto (the GPUs first)."""
    import math

    if not math.isfinite(gpus) or gpus < 0 or 0 < gpus < 1e-4:   # NaN passed every comparison, to Ray's ValueError
        raise MoeguardError(f"--gpus-per-job is {gpus:g}; expected 0 or a number of GPUs from 0.0001 (Ray's "
                            "resolution)", hint="pass e.g. --gpus-per-job 1, or 0.5 to share a GPU between two jobs")
    if gpus and name == "local":   # it was accepted and ignored
        raise MoeguardError(f"--gpus-per-job {gpus:g} reserves GPUs for Ray tasks, and with --backend local the jobs "
                            "run in this process", hint="add --backend ray, or drop --gpus-per-job")
    from moeguard.models.placement import PLACEMENTS

    single = device_map is not None and str(device_map).strip() not in (*PLACEMENTS, "cpu")
    if name == "ray" and not gpus and single:   # a placement (auto...) uses the CPU where a node has no GPU
        # Ray hides every GPU from a task that asks for none (CUDA_VISIBLE_DEVICES is empty there)
        raise MoeguardError(f"--device-map {device_map} puts each job's model on a GPU, and Ray tasks that ask for no "
                            "GPU see none", hint="pass --gpus-per-job 1 (or a fraction, to share a GPU between jobs)")
    on_cpu = str(device_map).strip() == "cpu" if device_map is not None else max_memory is None
    if name == "ray" and gpus and on_cpu:
        # each task held its GPUs and loaded its model on the CPU, without a word (days on a real checkpoint)
        raise MoeguardError(f"--gpus-per-job {gpus:g} reserves GPUs for each Ray task, and each job puts its model on "
                            f"the CPU (--device-map {device_map or 'not given'})",
                            hint="add --device-map auto (spread over the job's GPUs; also with --max-memory) or cuda "
                                 "(one GPU a job), or drop --gpus-per-job")
    if name == "local":
        if address:
            raise MoeguardError("--ray-address goes with --backend ray", hint="add --backend ray, or drop --ray-address")
        return LocalBackend()
    if name == "ray":
        return RayBackend(address=address, gpus=gpus, num_cpus=num_cpus)
    raise MoeguardError(f"unknown backend '{name}'", hint=suggest(name, list(BACKENDS)))
