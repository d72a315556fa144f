"""Bigger than memory: `eval` and an audit (model, baseline, attribution and sweep stages) on a
synthetic Mixtral-8x7B-shaped checkpoint whose float32 weights exceed this machine's memory, under
`--max-memory`. Records wall time and the command's peak anonymous and file-backed resident memory
(sampled from /proc every 0.2 s: file-backed pages are the mmapped offload files, which the kernel
can drop; anonymous ones are what the cap is about).

    python benchmarks/offload.py [--layers 4] [--max-memory 4GiB] [--workdir /tmp/moeguard-scale]

Run it alone: it reads the whole checkpoint from disk for every forward.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from scale import write  # noqa: E402


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall time, exit code and peak RssAnon / RssFile in bytes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": ""}
    peaks = {"RssAnon": 0, "RssFile": 0}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)

    def sample():
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    out = {"command": " ".join(cmd[2:]), "rc": proc.returncode, "seconds": round(time.perf_counter() - t, 1),
           "peak_anon_bytes": peaks["RssAnon"], "peak_file_bytes": peaks["RssFile"]}
    if proc.returncode != 0:
        out["stderr_tail"] = err.strip().splitlines()[-3:]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moeguard-scale"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-memory", default="4GiB")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from moeguard.models.placement import parse_memory

    ckpt, rec = write("mixtral-8x7b", args.layers, args.workdir)
    fp32 = rec["bytes"] * 2   # the synthetic checkpoint is bfloat16; commands compute in float32
    total = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))) * 1024
    moeguard = [sys.executable, "-m", "moeguard.cli"]
    cap = ["--max-memory", args.max_memory]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "eval": run_measured(moeguard + ["eval", "--model", str(ckpt), "--tasks", "arith-compare", "--limit", "4",
                                             "--batch-size", "4", *cap, "--out", f"{tmp}/eval.json"]),
            "audit": run_measured(moeguard + ["audit", "--model", str(ckpt), "--out", f"{tmp}/audit",
                                              "--tasks", "arith-compare,docstring-topic", "--methods", "gate",
                                              "--keeps", "2", "--random-seeds", "1", "--eval-limit", "8", "--samples", "4",
                                              "--physical-checks", "0", "--no-deletion-curves", "--no-recovery",
                                              "--threads", "2", *cap]),
        }
        leftovers = sorted(str(p) for p in Path(tempfile.gettempdir()).glob("moeguard-offload-*"))
    cap_bytes = parse_memory(args.max_memory)
    for r in runs.values():
        r["peak_anon_over_cap"] = round(r["peak_anon_bytes"] / cap_bytes, 2)
    layer_fp32 = 3 * 8 * 4096 * 14336 * 4
    result = {
        "checkpoint": {"path": str(ckpt), "preset": "mixtral-8x7b", "layers": args.layers, "bytes_on_disk": rec["bytes"],
                       "float32_bytes": fp32, "largest_decoder_layer_float32_bytes": layer_fp32},
        "machine_memory_bytes": total, "float32_over_machine_memory": round(fp32 / total, 2),
        "max_memory": args.max_memory, "max_memory_bytes": cap_bytes,
        "runs": runs, "offload_folders_left": leftovers,
        "note": "the peak is about the cap + one decoder layer (accelerate moves whole layers) + activations; "
                "no in-memory run to compare with: the float32 weights do not fit this machine",
    }
    path = write_result("offload", result, args.out)
    for name, r in runs.items():
        print(f"{name}: rc {r['rc']}, {r['seconds']} s, peak anon {r['peak_anon_bytes'] / 2**30:.2f} GiB "
              f"(file-backed {r['peak_file_bytes'] / 2**30:.2f} GiB), cap {args.max_memory}")
    print(f"float32 weights {fp32 / 2**30:.1f} GiB on a {total / 2**30:.1f} GiB machine; written to {path}")


if __name__ == "__main__":
    main()
