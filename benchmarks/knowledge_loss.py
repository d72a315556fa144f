"""Quality of attribution: does the best method beat random rankings, and does gradient track ablation?

    .venv/bin/python benchmarks/knowledge_loss.py [--from-run RUN] [--shared ../shared/data] [--zoo-model DIR]

Part 1 runs the default ``moeguard sweep`` on the embedded model and suite (or reads an existing
run's ``sweep.json`` with ``--from-run``). For every task and every keep level up to N/2, it checks
whether the best method (highest AUC) keeps more of the task than the random-ranking mean.
It also reports every method's Spearman correlation with ``ablation``.

Part 2 runs when ``../shared/data`` is present: the same study on SST-2 (classification),
WikiText-103 (language modeling) and SciTLDR (summarization). These go through the generic
local-file task definitions in ``examples/tasks`` with max_length capped at the zoo recipe's
256-token context. The model is the embedded recipe trained on those three train splits
(``moeguard zoo train --tasks ...``; about 8 minutes on 2 cores, cached in ``--zoo-model``).
When the folder is absent this part is recorded as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
SHARED_TASKS = ["sst2-local", "wikitext103-local", "scitldr-local"]


def moeguard(*args: str) -> None:
    cmd = [sys.executable, "-m", "moeguard.cli", *args]
    print("$ moeguard", " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def summarize(doc: dict) -> dict:
    E = doc["model"]["experts_per_layer"]
    E = int(next(iter(E.values())))
    out = {}
    for task, faith in doc["faithfulness"].items():
        methods = {m: v for m, v in faith.items() if m != "random"}
        best = max(methods, key=lambda m: methods[m]["auc"] if methods[m]["auc"] is not None else -1)
        rand = doc["random_summary"][task]
        rows = {}
        for p in doc["points"]:
            if p["task"] == task and p["method"] == best and p["keep"] <= E // 2:
                r = rand[str(p["keep"])]
                rows[str(p["keep"])] = {"best_retention": p["retention"], "random_mean": r["mean"],
                                        "random_std": r["std"], "beats_random_mean": p["retention"] > r["mean"]}
        out[task] = {
            "best_method": best, "best_auc": methods[best]["auc"], "random_auc_mean": faith["random"]["auc_mean"],
            "random_auc_std": faith["random"]["auc_std"],
            "auc": {m: v["auc"] for m, v in methods.items()},
            "spearman_vs_ablation": {m: v["spearman_vs_ablation"] for m, v in methods.items()},
            "keep_levels_up_to_half": rows,
            "goal_met": all(r["beats_random_mean"] for r in rows.values()),
        }
    return out


def run_sweep(out: Path, extra: list[str]) -> dict:
    started = time.perf_counter()
    moeguard("sweep", "--out", str(out), "--overwrite", *extra)
    doc = json.loads((out / "sweep.json").read_text())
    doc["_wall_seconds"] = time.perf_counter() - started
    return doc


def shared_tasks(shared: Path, workdir: Path) -> list[Path]:
    """The example local-file tasks, pointed at ``shared`` and capped at the recipe's context."""
    paths = []
    for name in SHARED_TASKS:
        spec = yaml.safe_load((ROOT / "examples" / "tasks" / f"{name}.yaml").read_text())
        spec["source"]["path"] = str(shared / Path(spec["source"]["path"]).name)
        spec["max_length"] = min(int(spec.get("max_length", 256)), 256)
        p = workdir / f"{name}.yaml"
        p.write_text(yaml.safe_dump(spec, sort_keys=False))
        paths.append(p)
    return paths


def shared_setup(shared: Path, workdir: Path, zoo_model: Path, *, skip: bool) -> tuple[list[Path] | None, str | None, float | None]:
    """The ``../shared/data`` tasks and the zoo model trained on them (cached in ``zoo_model``):
    (task paths, why the part is skipped, training seconds of this run)."""
    if skip:
        return None, "--skip-shared", None
    if not shared.is_dir():
        return None, f"{shared} not present", None
    paths = shared_tasks(shared, workdir)
    train_s = None
    if not (zoo_model / "config.json").exists():
        t = time.perf_counter()
        moeguard("zoo", "train", "--tasks", ",".join(map(str, paths)), "--out", str(zoo_model))
        train_s = time.perf_counter() - t
    return paths, None, train_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from-run", type=Path, help="summarize this sweep run instead of running the embedded sweep")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--zoo-model", type=Path, default=Path(tempfile.gettempdir()) / "moeguard-zoo-shared")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "moeguard-knowledge-loss")
    ap.add_argument("--skip-shared", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    if args.from_run:
        emb = json.loads((args.from_run / "sweep.json").read_text())
        emb["_wall_seconds"] = None
    else:
        emb = run_sweep(args.workdir / "embedded", [])
    result = {"embedded": {"settings": emb["settings"], "seconds": emb["seconds"], "wall_seconds": emb["_wall_seconds"],
                           "physical_checks": emb["physical_checks"], "tasks": summarize(emb)}}
    result["embedded"]["goal_met_all_tasks"] = all(t["goal_met"] for t in result["embedded"]["tasks"].values())

    tasks, skipped, train_s = shared_setup(args.shared, args.workdir, args.zoo_model, skip=args.skip_shared)
    if skipped:
        result["shared"] = {"skipped": skipped}
    else:
        card = json.loads((args.zoo_model / "moeguard_card.json").read_text())
        doc = run_sweep(args.workdir / "shared", ["--model", str(args.zoo_model), "--tasks", ",".join(map(str, tasks))])
        result["shared"] = {"model": {"train_seconds_this_run": train_s, "card_train_seconds": card["train_seconds"],
                                      "tasks": card["tasks"], "specialization_mean": card["specialization"]["mean"]},
                            "full_scores": doc["full"], "seconds": doc["seconds"], "physical_checks": doc["physical_checks"],
                            "tasks": summarize(doc)}
        result["shared"]["goal_met_all_tasks"] = all(t["goal_met"] for t in result["shared"]["tasks"].values())
    path = write_result("knowledge_loss", result, args.out)
    for part in ("embedded", "shared"):
        for task, t in result[part].get("tasks", {}).items():
            levels = ", ".join(f"k={k}: {r['best_retention']:.1f} vs {r['random_mean']:.1f}"
                               for k, r in t["keep_levels_up_to_half"].items())
            print(f"{part:9} {task:18} best={t['best_method']:<15} AUC {t['best_auc']:.1f} "
                  f"(random {t['random_auc_mean']:.1f}); {levels}; gradient rho="
                  f"{t['spearman_vs_ablation'].get('gradient')}")
    print(path)


if __name__ == "__main__":
    main()
