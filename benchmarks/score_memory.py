"""Peak memory of ``monitor score`` on a model with many (layer, expert) cells, where the [requests,
layers, experts] arrays it holds dominate: this code beside another commit's (``--before SRC``), in
one run, with the outputs checked equal.

    .venv/bin/python benchmarks/score_memory.py [--before /tmp/before/src] [--days 15] [--per-day 600]
        [--layers 8] [--experts 256] [--out JSON]

The committed results ran ``--experts 512 --before /tmp/before/src`` (a ``git worktree`` of the parent
commit, 57361f9; ``score_memory.json``) and ``--experts 512`` (``score_memory_now.json``), each alone.

The model is a tiny Mixtral made here (hidden size 32, top-8 of ``--experts`` in ``--layers``
layers, the embedded tokenizer's vocabulary), saved as safetensors; its profile is built by
``monitor profile`` on three embedded tasks. The log is ``--days`` days of ``--per-day`` requests
(the tasks' eval inputs, clients of 4 to 16 requests). Each scenario runs ``moeguard`` in its own
process and reads its resident memory when ``score`` starts (``at_start_mib``: the model, the
profile, the log's records and a --history's requests loaded) and its peak from then on
(``peak_mib``; ``added_mib``, the difference, is what ``score`` holds on top):

- ``plain``: ``score`` over the whole log, no periods;
- ``period``: the same with ``--period 24h --baseline 14 --period-clients``;
- ``daily``: the last day alone with the first run's ``periods.jsonl`` as ``--history`` (the
  earlier days' requests read back from ``period_requests/``): a daily run.

``estimate_mib``: what ``monitor/footprint.py`` counts for the scenario (the arrays ``score`` holds, a
lower bound that the CLI checks against the machine's memory before the model loads), to be read
beside ``peak_mib`` (the arrays of a --history are resident at the start, in ``at_start_mib``).

A cell's value is 8 bytes a request (float64): ``cells x 8`` bytes a request is the unit the
arrays grow in (``array_mib``: one [requests, layers, experts] array of the log's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_result

TASKS = ("arith-compare", "docstring-topic", "code-naming")
HERE = Path(__file__).resolve().parent
# Each scenario's process: the peak resident memory from the moment ``score`` starts (after the model
# and profile loaded, and a --history's requests were read), by resetting the kernel's high-water mark
# there (/proc/self/clear_refs "5", Linux 4.0+) and reading VmHWM at the end; and the resident memory
# at that start. What ``score`` itself adds is the difference.
PROBE = """
import json, sys, warnings
warnings.simplefilter("ignore")
import moeguard.monitor.score as S
from moeguard.cli import main

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

seen = {}
real = S.score

def score(*a, **k):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    seen["start_kib"] = status("VmRSS")
    return real(*a, **k)

S.score = score
code = main(sys.argv[2:])
json.dump({"code": code, "hwm_kib": status("VmHWM"), **seen}, open(sys.argv[1], "w"))
"""


def build(folder: Path, layers: int, experts: int, seed: int) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    from moeguard.cli import main
    from moeguard.models.loading import EMBEDDED_MODEL_DIR
    from moeguard.models.tokenizer_files import save_tokenizer
    from moeguard.testing import tiny_model

    model = folder / "model"
    tiny_model("mixtral", seed=seed, vocab_size=4096, num_hidden_layers=layers, num_local_experts=experts,
               num_experts_per_tok=8, max_position_embeddings=512).save_pretrained(model)
    save_tokenizer(AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR), model)   # the embedded tokenizer's vocabulary
    prof = folder / "profile.json"
    if main(["monitor", "profile", "--model", str(model), "--tasks", ",".join(TASKS), "--limit", "120",
             "--window", "8", "--out", str(prof), "--seed", str(seed)]) != 0:
        raise SystemExit("monitor profile failed")
    return model, prof


def log_rows(days: int, per_day: int, seed: int) -> list[dict]:
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.registry import get_task

    rng = random.Random(seed)
    pool = [r["input"] for t in TASKS for r in load_records(get_task(t), "eval")[120:]]
    rows = []
    for d in range(days):
        client, left = 0, 0
        for i in range(per_day):
            if left == 0:
                client, left = client + 1, rng.randint(4, 16)
            left -= 1
            rows.append({"id": f"d{d}-{i}", "client": f"u{d}-{client}", "time": f"2026-11-{d + 1:02d}T"
                         f"{i * 24 // per_day:02d}:{rng.randrange(60):02d}:00Z", "prompt": rng.choice(pool)})
    return rows


def run(src: Path, args: list[str], folder: Path) -> dict:
    """``moeguard ARGS`` in a process of its own with ``src`` first on the path: its exit code, peak
    resident memory and seconds."""
    stats = folder / f"stats-{time.monotonic_ns()}.json"
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, str(stats), *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0 or not stats.exists():
        raise SystemExit(f"moeguard {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    got = json.loads(stats.read_text())
    if got["code"] != 0:
        raise SystemExit(f"moeguard {' '.join(args)} exited {got['code']}:\n{done.stderr[-2000:]}")
    return {"peak_mib": round(got["hwm_kib"] / 1024, 1), "at_start_mib": round(got["start_kib"] / 1024, 1),
            "added_mib": round((got["hwm_kib"] - got["start_kib"]) / 1024, 1), "seconds": round(seconds, 1)}


def outputs(folder: Path) -> dict[str, str]:
    """What a score run wrote that must not depend on the code's memory use (timings and provenance out)."""
    out = {}
    for name in ("scores.jsonl", "windows.jsonl", "alerts.jsonl", "periods.jsonl"):
        f = folder / name
        if f.exists():
            out[name] = f.read_text()
    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("run", None)
    out["summary.json"] = json.dumps(summary, sort_keys=True)
    kept = folder / "period_requests"
    if kept.exists():
        import hashlib

        out["period_requests"] = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(kept.iterdir()))).hexdigest()
    return out


def counted(prof_path: Path, log: Path, *, period: bool, history: Path | None = None) -> tuple[float, int]:
    """What ``monitor score`` (this code) counts before the model loads for a scenario: the estimate in
    MiB (``footprint.check_score``, as the CLI calls it) and the requests the --history brings."""
    from moeguard.monitor.footprint import check_score
    from moeguard.monitor.periodhistory import read_history
    from moeguard.monitor.periodrequests import held_requests, wanted
    from moeguard.monitor.profile import Profile
    from moeguard.monitor.score import read_log

    prof = Profile.from_dict(json.loads(prof_path.read_text()), where=str(prof_path))
    want = [] if history is None else wanted(read_history(history, period=86400, digest=prof.neighbours.digest,
                                                          shape=prof.mean.shape, baseline=14, alpha=0.01,
                                                          clients_test=True), baseline=14)
    need = check_score(prof, read_log(log), period=86400.0 if period else None, history=history, want=want)
    return round(need / 2**20, 1), (held_requests(history, want)[0] if history is not None else 0)


def scenarios(src: Path, tag: str, work: Path, model: Path, prof: Path, logs: dict[str, Path]) -> dict:
    base = ["monitor", "score", "--model", str(model), "--profile", str(prof)]
    period = ["--period", "24h", "--baseline", "14"]
    got: dict[str, dict] = {}
    got["plain"] = run(src, [*base, "--log", str(logs["all"]), "--out", str(work / f"{tag}-plain")], work)
    got["period"] = run(src, [*base, "--log", str(logs["all"]), "--out", str(work / f"{tag}-period"), *period,
                              "--period-clients"], work)
    run(src, [*base, "--log", str(logs["first"]), "--out", str(work / f"{tag}-first"), *period, "--period-clients"], work)
    got["daily"] = run(src, [*base, "--log", str(logs["last"]), "--out", str(work / f"{tag}-daily"), *period,
                             "--period-clients", "--history", str(work / f"{tag}-first" / "periods.jsonl")], work)
    kept = json.loads((work / f"{tag}-daily" / "summary.json").read_text())["period_requests"]
    got["daily"]["history_periods_read"] = kept["read"]
    if tag == "now":   # the estimate, and the history's requests counted as the run counts them, exist in this code only
        history = work / f"{tag}-first" / "periods.jsonl"
        for name, log, on, h in (("plain", "all", False, None), ("period", "all", True, None), ("daily", "last", True, history)):
            got[name]["estimate_mib"], held = counted(prof, logs[log], period=on, history=h)
        got["daily"]["history_requests"] = held
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="another commit's src folder (a git worktree's), run beside this one")
    ap.add_argument("--days", type=int, default=15)
    ap.add_argument("--per-day", type=int, default=600)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args()
    now = HERE.parent / "src"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        model, prof = build(work, a.layers, a.experts, a.seed)
        rows = log_rows(a.days, a.per_day, a.seed)
        last = f"2026-11-{a.days:02d}"
        logs = {"all": rows, "first": [r for r in rows if not r["time"].startswith(last)],
                "last": [r for r in rows if r["time"].startswith(last)]}
        for name, part in list(logs.items()):
            logs[name] = work / f"{name}.jsonl"
            logs[name].write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"model and profile: {time.perf_counter() - t0:.0f} s", flush=True)
        before_commit = subprocess.run(["git", "-C", str(a.before), "rev-parse", "HEAD"], capture_output=True,
                                       text=True).stdout.strip() or None if a.before else None
        result = {"settings": vars(a) | {"before": str(a.before) if a.before else None, "cells": a.layers * a.experts,
                                         "before_commit": before_commit},
                  "requests": len(rows), "array_mib": round(len(rows) * a.layers * a.experts * 8 / 2**20, 1)}
        result["now"] = scenarios(now, "now", work, model, prof, logs)
        print(json.dumps(result["now"]), flush=True)
        if a.before:
            result["before"] = scenarios(a.before, "before", work, model, prof, logs)
            print(json.dumps(result["before"]), flush=True)
            same = {tag: outputs(work / f"now-{tag}") == outputs(work / f"before-{tag}")
                    for tag in ("plain", "period", "first", "daily")}
            result["outputs_equal"] = same
            result["peak_ratio"] = {k: round(result["now"][k]["peak_mib"] / result["before"][k]["peak_mib"], 3)
                                    for k in ("plain", "period", "daily")}
            result["added_ratio"] = {k: round(result["now"][k]["added_mib"] / result["before"][k]["added_mib"], 3)
                                     for k in ("plain", "period", "daily")}
            if not all(same.values()):
                print(f"outputs differ: {same}", file=sys.stderr)
    path = write_result("score_memory", result, a.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
