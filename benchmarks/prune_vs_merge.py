"""The two compression routes side by side: pruning against each merging method, at keep 2/4/6.

    .venv/bin/python benchmarks/prune_vs_merge.py [--shared ../shared/data] [--zoo-model DIR] [--skip-shared]

Part 1, the embedded model and suite: ``moeguard sweep --route prune,merge`` with every merge
method, centres (and pruning plans) by ``reap``, ``reap-raw`` and ``frequency``. For every task
and keep level it records each route's best retention, each merge method's, the random bands,
and which route wins; then the wins are counted per task kind (classification, language
modeling, summarization).

Part 2, when ``../shared/data`` is present: the same on SST-2, WikiText-103 and SciTLDR, with the
zoo model trained on them (cached in ``--zoo-model``; ``benchmarks/knowledge_loss.py`` trains
the same one).

Part 3, the cost of merging: calibration plus the merge, in plain forward passes over the same
calibration batches (the callables alternate, medians of ``--repeats``).

Part 4, re-alignment (``--realign``): ``moeguard attack --routes prune,merge`` on one task of
each kind at keep 2 and 4, the same labels and the same grid for both routes: each route's best
pick before re-alignment, after it, and the stronger route. Cached per attack in ``--workdir``.

Run it alone: it uses both cores for about 25 minutes (part 4: about 10 more).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import alternating_medians, part_made, write_result
from knowledge_loss import moeguard, shared_setup

ROOT = Path(__file__).resolve().parents[1]
MERGE_METHODS = ["average", "frequency-weighted", "hc-smoe", "router-weighted"]
METHODS = ["reap", "reap-raw", "frequency"]
KEEPS = [2, 4, 6]


def sweep(out: Path, extra: list[str]) -> dict:
    started = time.perf_counter()
    moeguard("sweep", "--out", str(out), "--overwrite", "--route", "prune,merge", "--merge-methods",
             ",".join(MERGE_METHODS), "--methods", ",".join(METHODS), "--keep", ",".join(map(str, KEEPS)),
             "--no-deletion-curves", "--physical-checks", "0", *extra)
    doc = json.loads((out / "sweep.json").read_text())
    doc["_wall_seconds"] = round(time.perf_counter() - started, 1)
    return doc


def summarize(doc: dict, kinds: dict[str, str]) -> dict:
    """Per task and keep: each route's best (and each merge method's best), the random means and
    the winner; then wins per task kind, and how reap and reap-raw compare as pruning plans."""
    tasks = {}
    for task, by_keep in doc["routes"].items():
        rows = {}
        for k, row in by_keep.items():
            per_mm = {}
            for mm in MERGE_METHODS:
                pts = [p for p in doc["merge"]["points"] if p["task"] == task and p["keep"] == int(k)
                       and p["merge_method"] == mm and p["retention"] is not None]
                rnd = [p["retention"] for p in doc["merge"]["random"] if p["task"] == task and p["keep"] == int(k)
                       and p["merge_method"] == mm and p["retention"] is not None]
                best = max(pts, key=lambda p: p["retention"], default=None)
                per_mm[mm] = None if best is None else {
                    "best": round(best["retention"], 2), "by": best["method"],
                    "collateral": best.get("collateral_mean_retention"),
                    "random_mean": round(sum(rnd) / len(rnd), 2) if rnd else None}
            prune = {m: next((round(p["retention"], 2) for p in doc["points"] if p["task"] == task
                              and p["keep"] == int(k) and p["method"] == m), None) for m in METHODS}
            rows[k] = {**row, "prune_by_method": prune, "merge_by_method": per_mm}
        tasks[task] = {"kind": kinds.get(task), "keeps": rows}
    by_kind: dict[str, dict[str, int]] = {}
    for task, t in tasks.items():
        for k, row in t["keeps"].items():
            w = by_kind.setdefault(t["kind"], {"prune": 0, "merge": 0, "tie": 0})
            w[row.get("winner", "tie")] += 1
    reap = {"reap_higher": 0, "reap_raw_higher": 0, "equal": 0}
    for t in tasks.values():
        for row in t["keeps"].values():
            a, b = row["prune_by_method"]["reap"], row["prune_by_method"]["reap-raw"]
            if a is not None and b is not None:
                reap["reap_higher" if a > b else "reap_raw_higher" if b > a else "equal"] += 1
    return {"tasks": tasks, "wins_by_kind": by_kind, "reap_vs_reap_raw_pruning": reap,
            "full": doc["full"], "seconds": doc["seconds"], "wall_seconds": doc["_wall_seconds"]}


def task_kinds(names: list[str]) -> dict[str, str]:
    from moeguard.tasks.registry import get_task

    return {n: getattr(get_task(n).kind, "value", get_task(n).kind) for n in names}


def merge_cost(repeats: int, samples: int = 32, tokens: int = 256) -> dict:
    """Calibration + merge against plain forwards over the same batches (keep 4, reap centres).
    ``tokens``: per layer, the tokens every expert runs on (the part of the cost above one forward
    that grows with E x tokens)."""
    import torch

    from moeguard.attribution.run import make_context, score
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.loading import load_model
    from moeguard.pruning.merging.merge import merge_model, prepare
    from moeguard.tasks.batches import calibration_batches

    m, tok, _ = load_model(None)
    a = MoEAdapter(m)
    batches = calibration_batches(tok, "arith-compare", samples=samples, batch_size=8, seed=0)
    s = score(make_context(m, tok, "arith-compare", samples=samples, seed=0), "reap")

    def forward():
        with torch.no_grad():
            for b in batches:
                m(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    runs = {"forward": forward}
    for mm in MERGE_METHODS:
        runs[mm] = lambda mm=mm: merge_model(m, prepare(a, method=mm, scores=s, keep=4), batches=batches, tokens=tokens)
    med = alternating_medians(runs, repeats)
    calibration_tokens = sum(int(b.attention_mask.sum()) for b in batches)
    return {"samples": samples, "tokens_per_layer": tokens, "calibration_tokens": calibration_tokens,
            "expert_compute_vs_forward": round(a.num_experts * min(tokens, calibration_tokens)
                                               / (a.top_k * calibration_tokens), 3),
            "repeats": repeats,
            "forward_seconds": round(med["forward"], 4),
            "forward_equivalents": {mm: round(med[mm] / med["forward"], 2) for mm in MERGE_METHODS}}


REALIGN_TASKS = ["arith-compare", "stdlib-code", "record-summary"]   # classification, LM, summarization
ATTACK = ["--budget", "64", "--budgets", "16,64", "--methods", "reap,reap-raw,frequency", "--plans", "uniform",
          "--modes", "full,lora", "--lr-scales", "1", "--epochs", "4", "--seeds", "1", "--eval-limit", "64",
          "--pool-size", "256", "--samples", "32", "--no-scratch", "--routes", "prune,merge",
          "--merge-methods", "frequency-weighted,router-weighted"]


def realign(workdir: Path) -> dict:
    out = {"tasks": REALIGN_TASKS, "keeps": [2, 4], "flags": ATTACK, "runs": {}, "made": part_made()}
    for task in REALIGN_TASKS:
        for keep in (2, 4):
            run = workdir / f"attack-{task}-{keep}"
            argv = ["attack", "--task", task, "--keep", str(keep), "--out", str(run), *ATTACK]
            # reused only when made by the same command and commit (it was any attack.json at that path, recorded
            # under the current flags)
            stamp = workdir / f"attack-{task}-{keep}.command.json"
            from moeguard.provenance import maker

            # by this code: the commit, versions and, where the commit does not name it (-dirty), the source's digest
            wanted = {"argv": argv, "maker": maker()}
            if not (run / "attack.json").exists() or not stamp.exists() or json.loads(stamp.read_text()) != wanted:
                moeguard(*argv, *(["--overwrite"] if run.exists() else []))
                stamp.write_text(json.dumps(wanted))
            doc = json.loads((run / "attack.json").read_text())
            s = doc["summary"]
            routes = {r: {"pick": {k: v["pick"].get(k) for k in ("method", "merge_method", "retention")},
                          "after": s["realigned_retention_by_route"][r]} for r, v in doc["routes"].items()}
            out["runs"][f"{task} keep {keep}"] = {"routes": routes, "stronger_before": max(
                routes, key=lambda r: routes[r]["pick"]["retention"]), "stronger_after": s["stronger_route"],
                "envelope_after": s["realigned_retention"], "cells": len(doc["runs"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--zoo-model", type=Path, default=Path(tempfile.gettempdir()) / "moeguard-zoo-shared")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "moeguard-prune-vs-merge")
    ap.add_argument("--skip-shared", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--realign", action="store_true", help="also part 4 (re-alignment after either route)")
    ap.add_argument("--realign-only", action="store_true",
                    help="run part 4 and add it to the existing results file, keeping parts 1-3 as they are")
    ap.add_argument("--cost-only", action="store_true",
                    help="re-measure part 3 at 64 and 256 tokens per layer into the existing results file")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.cost_only:
        path = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "prune_vs_merge.json"
        old = json.loads(path.read_text())
        old.setdefault("parts_1_3", {"created_at": old.get("created_at"), "git_commit": old.get("git_commit")})
        # each part keeps its own maker: the file's stamp is its last writer's
        old["cost"] = {"by_tokens": [merge_cost(args.repeats, tokens=n) for n in (64, 256)], "made": part_made()}
        for k in ("benchmark", "created_at", "git_commit", "machine"):
            old.pop(k, None)
        write_result("prune_vs_merge", old, args.out)
        for c in old["cost"]["by_tokens"]:
            print(c["tokens_per_layer"], c["expert_compute_vs_forward"], c["forward_equivalents"])
        return
    if args.realign_only:
        path = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "prune_vs_merge.json"
        old = json.loads(path.read_text())
        args.workdir.mkdir(parents=True, exist_ok=True)
        old["realign"] = realign(args.workdir)
        # parts 1-3 keep the provenance of the run that made them
        old.setdefault("parts_1_3", {"created_at": old.get("created_at"), "git_commit": old.get("git_commit")})
        for k in ("benchmark", "created_at", "git_commit", "machine"):
            old.pop(k, None)
        write_result("prune_vs_merge", old, args.out)
        for name, r in old["realign"]["runs"].items():
            print(name, {k: (v["pick"]["retention"], v["after"]) for k, v in r["routes"].items()}, "->", r["stronger_after"])
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    common = ["--samples", "32", "--eval-limit", "64", "--collateral-limit", "32", "--random-seeds", "2"]

    result = {"settings": {"merge_methods": MERGE_METHODS, "methods": METHODS, "keeps": KEEPS, "sweep_flags": common}}
    result["cost"] = merge_cost(args.repeats)
    print("merge cost (forward-pass equivalents):", result["cost"]["forward_equivalents"], flush=True)
    emb = sweep(args.workdir / "embedded", common)
    result["embedded"] = summarize(emb, task_kinds(list(emb["routes"])))
    paths, skipped, _ = shared_setup(args.shared, args.workdir, args.zoo_model, skip=args.skip_shared)
    if skipped:
        result["shared"] = {"skipped": skipped}
    else:
        doc = sweep(args.workdir / "shared", ["--model", str(args.zoo_model), "--tasks", ",".join(map(str, paths)),
                                              *common])
        from moeguard.tasks.registry import adopt, get_task

        kinds = {}
        for p in paths:
            t = adopt(get_task(str(p)), origin=str(p))
            kinds[t.name] = getattr(t.kind, "value", t.kind)
        result["shared"] = summarize(doc, kinds)
    if args.realign:
        result["realign"] = realign(args.workdir)
    path = write_result("prune_vs_merge", result, args.out)
    for part in ("embedded", "shared"):
        for task, t in result[part].get("tasks", {}).items():
            for k, row in t["keeps"].items():
                p, m = row["prune"], row["merge"]
                print(f"{part:9} {task:18} keep {k}: prune {p['retention']:.1f} ({p['method']}) "
                      f"merge {m['retention']:.1f} ({m['method']}+{m['merge_method']}) -> {row['winner']}")
        if "wins_by_kind" in result[part]:
            print(part, "wins by kind:", result[part]["wins_by_kind"])
    print(path)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
