"""Shared bits of the benchmark scripts: machine facts and writing the JSON result."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}


def write_result(name: str, data: dict, out: str | None = None) -> Path:
    from moeguard.io import dumps
    from moeguard.provenance import git_commit

    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "git_commit": git_commit(), "machine": machine(), **data}
    from moeguard.io import write_text

    # strict JSON, as every moeguard output, through a renamed sibling: an interrupted rerun keeps the
    # committed result whole
    return write_text(path, dumps(doc, indent=2) + "\n")


def part_made() -> dict:
    """When and by which commit one part of a results file was made: a run that adds a part to an existing
    file (``--cost-only``, ``--realign-only``, one more defense) stamps it on that part, as write_result
    stamps the file; the file's own stamp is its last writer's."""
    from moeguard.provenance import git_commit

    return {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit()}


def alternating_medians(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each named callable, the callables taking turns ``repeats`` times so
    drift (thermal, other load) hits each alike: timing ratios side by side in one run. The
    order rotates every repeat: a fixed order read a routing capture as 0.82x a plain forward at
    Mixtral-8x7B's dimensions, which back-to-back runs of the two do not show (a position effect)."""
    import statistics
    import time

    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            fn = runs[name]
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def capture_medians(model, ids, mask, *, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of a plain no-grad forward of ``ids``/``mask``, of the same under
    ``RoutingCapture`` and under ``RoutingCapture(norms=True)`` (REAP's), taking turns."""
    import torch

    from moeguard.models.hooks import RoutingCapture

    def fwd():
        model(input_ids=ids, attention_mask=mask, use_cache=False)

    def captured(norms: bool):
        def run():
            with RoutingCapture(model, norms=norms):
                fwd()
        return run

    with torch.no_grad():
        for _ in range(warmup):
            fwd()
        return alternating_medians({"plain": fwd, "capture": captured(False), "capture_norms": captured(True)}, repeats)


def benign_prompts(limit: int = 100, tasks: tuple[str, ...] = ("arith-compare", "docstring-topic")) -> dict[str, list[str]]:
    """The monitor benchmarks' benign traffic: the first ``limit`` eval inputs of each task."""
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.registry import get_task

    return {t: [r["input"] for r in load_records(get_task(t), "eval", limit=limit)] for t in tasks}
