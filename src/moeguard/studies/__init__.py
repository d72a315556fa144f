"""One study engine: every study declares ``plan(config) -> jobs`` and ``reduce(results) -> document``.

A study's ``plan`` is a generator of :class:`Phase` objects. Each phase is a list of
independent :class:`~moeguard.studies.engine.Job` s; the runner executes them on the chosen
backend (this process or Ray), caches every finished job as a file and sends the results back
into the generator, which plans the next phase from them (the attacker's re-alignment grid
needs the pruning plan the first phase chose). ``reduce(config, results)`` then builds the
study's document from every phase's results, keyed by phase name: no model, no side effect,
so a study is reduced the same way whether its jobs ran here, on Ray, or in an earlier run.

Adding a study: one module with a config dataclass, its job functions, ``plan`` and
``reduce``, and one line in :mod:`moeguard.studies.builtin`. The CLI command and the audit
stage both call :func:`run_study`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Protocol

from moeguard.registry import Registry
from moeguard.studies.engine import Backend, Job, Runtime, run_jobs


@dataclass(frozen=True)
class Phase:
    name: str                        # key of its results in ``reduce``
    jobs: list[Job] = field(default_factory=list)
    label: str | None = None         # progress-bar text (default: the name)


Plan = Generator[Phase, list, None]


class Study(Protocol):
    name: str
    schema: str

    def plan(self, cfg: Any) -> Plan: ...

    def reduce(self, cfg: Any, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]: ...


STUDIES: Registry[Study] = Registry("study", loader="moeguard.studies.builtin")


def get_study(name: str) -> Study:
    return STUDIES.get(name)


def run_study(study: Study, cfg: Any, *, jobs: Path, runtime: Runtime, backend: Backend,
              progress: Any = None) -> dict[str, Any]:
    """Plan, run and reduce ``study`` for ``cfg``; finished jobs are kept under ``jobs`` so a
    killed or repeated run re-runs only what is missing."""
    return run_studies([(study, cfg)], jobs=jobs, runtime=runtime, backend=backend, progress=progress)[0]


def run_local(study: Study, cfg: Any, *, model: str | None = None, jobs: Path | None = None,
              threads: int | None = None, tasks: tuple = (), progress: Any = None) -> dict[str, Any]:
    """The Python API's one call: ``study`` on ``model`` (a path or hub id; None: the embedded
    model) in this process. ``jobs``: where finished jobs are kept (None: a temporary folder,
    so nothing resumes)."""
    import tempfile

    import torch

    from moeguard.studies.engine import LocalBackend

    from moeguard.studies.engine import Context

    runtime = Runtime(model=model, threads=threads or torch.get_num_threads(), tasks=tuple(tasks))
    try:
        if jobs is not None:
            return run_study(study, cfg, jobs=Path(jobs), runtime=runtime, backend=LocalBackend(), progress=progress)
        with tempfile.TemporaryDirectory(prefix="moeguard-jobs-") as tmp:
            return run_study(study, cfg, jobs=Path(tmp), runtime=runtime, backend=LocalBackend(), progress=progress)
    finally:
        Context.release()   # the caller's process keeps no model of the study's (it held them until exit)


def run_studies(items: list[tuple[Study, Any]], *, jobs: Path, runtime: Runtime, backend: Backend,
                progress: Any = None, label: str | None = None) -> list[dict[str, Any]]:
    """Several studies side by side (the recovery study of every task): their plans advance
    together and each round's phases run as one batch, so a Ray backend runs them all at once."""
    plans = [study.plan(cfg) for study, cfg in items]
    results: list[dict[str, list]] = [{} for _ in items]
    current: dict[int, Phase] = {}
    stages: set[str] = set()
    for i, p in enumerate(plans):
        try:
            current[i] = next(p)
        except StopIteration:
            pass
    while current:
        batch = [j for ph in current.values() for j in ph.jobs]
        stages.update(j.stage for j in batch)
        names = {ph.label or ph.name for ph in current.values()}
        done = run_jobs(batch, root=jobs, runtime=runtime, backend=backend, progress=progress,
                        label=label or ", ".join(sorted(names))) if batch else []
        at = 0
        for i in list(current):
            ph = current[i]
            res, at = done[at:at + len(ph.jobs)], at + len(ph.jobs)
            if ph.name in results[i]:
                raise ValueError(f"phase '{ph.name}' planned twice")
            results[i][ph.name] = res
            try:
                current[i] = plans[i].send(res)
            except StopIteration:
                del current[i]
    from moeguard.studies.engine import drop_stale_scratch

    drop_stale_scratch(jobs, stages)
    return [study.reduce(cfg, r) for (study, cfg), r in zip(items, results)]


def run_to_dir(study: Study, cfg: Any, *, out: Path, model: Any, settings: dict[str, Any],
               write: Callable[[dict[str, Any], Path], None], backend: str = "local",
               ray_address: str | None = None, tasks: Iterable = (), overwrite: bool = False,
               progress: Any = None, max_memory: int | None = None, gpus_per_job: float = 0.0,
               threads: int | None = None) -> dict[str, Any]:
    """A study run as a command runs it: resumable, into a folder. Its jobs run on ``backend``
    and are kept under ``.OUT.partial/jobs`` (a killed run with the same ``settings`` resumes);
    the document is stamped with the model's name and the run record (``settings``, versions,
    commit), written by ``write(doc, folder)`` and renamed to ``out`` when done.
    ``model``: the resolved :class:`~moeguard.models.handle.ModelHandle`; ``max_memory``: bytes
    of host memory its weights may take (the rest offloaded); ``gpus_per_job``: GPUs each Ray task
    asks for; ``threads``: torch threads per job and CPUs per Ray task (default: this machine's cores).
    The run record names where it ran (threads, backend, Ray address, GPUs per job: the thread count
    changes CPU float sums), which the resume stamp leaves out, as the audit's keys do."""
    import torch

    from moeguard.edge import data_stamps, file_tasks
    from moeguard.io import resumable_dir
    from moeguard.provenance import run_record
    from moeguard.studies.engine import make_backend

    runner = make_backend(backend, address=ray_address, gpus=gpus_per_job, device_map=model.device_map,
                          max_memory=max_memory)
    runtime = Runtime(model=model.arg, threads=threads or torch.get_num_threads(), tasks=file_tasks(tasks),
                      task_data=data_stamps(tasks), max_memory=max_memory,
                      device_map=model.device_map, ray_gpus=runner.gpus if runner.name == "ray" else None)
    try:
        # the cap changes where weights sit, not a number: a run restarted under another cap resumes
        # (the run record keeps the bytes); the jobs themselves are keyed apart when capped, where skipped
        # checks make them differ (SweepStudyConfig.capped)
        stamp = {**{k: v for k, v in settings.items() if k != "max_memory"},
                 **({"capped": True} if settings.get("max_memory") is not None else {})}
        with resumable_dir(out, overwrite=overwrite, settings=stamp) as work:
            doc = run_study(study, cfg, jobs=work / "jobs", runtime=runtime, backend=runner, progress=progress)
            if isinstance(doc.get("model"), dict):  # a sweep's model facts: name them
                doc["model"]["name"] = model.name
            else:
                doc["model"] = model.name
            doc["run"] = run_record({**settings, "runtime": {"threads": runtime.threads, "backend": backend,
                                                             "ray_address": ray_address, "gpus_per_job": gpus_per_job}})
            write(doc, work)
    finally:
        runner.close()
    return doc


__all__ = ["run_to_dir", "run_local", "run_studies", "Phase", "Study", "STUDIES", "get_study", "run_study", "Job", "Runtime", "Backend"]
