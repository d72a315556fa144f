"""Files of a sweep run, all derived from its JSON: CSV, plots and the summary table."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from moeguard.io import write_json, write_text
from moeguard.report import plots


def csv_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (pruned task, method, keep, evaluated task); random rankings as method 'random:<seed>'."""
    rows = []
    for p in doc["points"]:
        base = {"task": p["task"], "method": p["method"], "keep": p["keep"], "params": p["params"],
                "param_reduction_pct": round(p["param_reduction_pct"], 3), "memory_bytes": p["memory_bytes"]}
        rows.append({**base, "eval_task": p["task"], "score": p["score"], "retention": p["retention"],
                     "retention_above_baseline": p["retention_above_baseline"]})
        for other, c in (p.get("collateral") or {}).items():
            rows.append({**base, "eval_task": other, "score": c["score"], "retention": c["retention"],
                         "retention_above_baseline": None})
    for p in doc["random"]:
        rows.append({"task": p["task"], "method": f"random:{p['seed']}", "keep": p["keep"], "params": None,
                     "param_reduction_pct": None, "memory_bytes": None, "eval_task": p["task"], "score": p["score"],
                     "retention": p["retention"], "retention_above_baseline": p["retention_above_baseline"]})
    merge = doc.get("merge") or {}
    for p in merge.get("points", []):   # the merge route: method "merge:<merge method>:<attribution method>"
        base = {"task": p["task"], "method": f"merge:{p['merge_method']}:{p['method']}", "keep": p["keep"],
                "params": None, "param_reduction_pct": None, "memory_bytes": None}
        rows.append({**base, "eval_task": p["task"], "score": p["score"], "retention": p["retention"],
                     "retention_above_baseline": p["retention_above_baseline"]})
        for other, c in (p.get("collateral") or {}).items():
            rows.append({**base, "eval_task": other, "score": c["score"], "retention": c["retention"],
                         "retention_above_baseline": None})
    for p in merge.get("random", []):
        rows.append({"task": p["task"], "method": f"merge:{p['merge_method']}:random:{p['seed']}", "keep": p["keep"],
                     "params": None, "param_reduction_pct": None, "memory_bytes": None, "eval_task": p["task"],
                     "score": p["score"], "retention": p["retention"],
                     "retention_above_baseline": p["retention_above_baseline"]})
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Through a temporary sibling and a rename, like every other output. No rows (a study whose
    jobs all skipped) is an empty file, not an IndexError after the run's work is done."""
    buf = io.StringIO(newline="")
    if rows:
        # fields in first-seen order over all rows: a row may add a field the first lacks
        fields = list(dict.fromkeys(k for row in rows for k in row))
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return write_text(path, buf.getvalue())


def write_sweep(doc: dict[str, Any], scores: dict[str, dict[str, dict]], run_dir: Path) -> list[Path]:
    files = [write_json(run_dir / "sweep.json", doc)]
    for task, by_method in scores.items():
        (run_dir / "scores" / task).mkdir(parents=True, exist_ok=True)
        for method, s in by_method.items():
            files.append(write_json(run_dir / "scores" / task / f"{method}.json", s))
    files.append(write_csv(run_dir / "points.csv", csv_rows(doc)))
    for task, by_method in scores.items():
        files.append(plots.importance_heatmaps(task, by_method, run_dir / "plots" / f"importance_{task}.png"))
        files.append(plots.retention_curves(doc, task, run_dir / "plots" / f"retention_{task}.png"))
    if len(scores) > 1:
        for k in doc["settings"]["keeps"]:
            files.append(plots.collateral_plot(doc, k, run_dir / "plots" / f"collateral_keep{k}.png"))
    return files


def sweep_table(doc: dict[str, Any]):
    """Per task and method: retention at each keep level, the random mean beside it, AUC, rho."""
    from rich.table import Table

    keeps = doc["settings"]["keeps"]
    t = Table(title="Knowledge-loss sweep: retention % (random-ranking mean)", show_lines=False)
    for col in ["task", "method", *[f"keep {k}" for k in keeps], "AUC (random)", "ρ vs ablation"]:
        t.add_column(col, justify="left" if col in ("task", "method") else "right")
    for task, faith in doc["faithfulness"].items():
        rand = doc["random_summary"].get(task, {})
        for m in doc["settings"]["methods"]:
            cells = []
            for k in keeps:
                p = next((p for p in doc["points"] if p["task"] == task and p["method"] == m and p["keep"] == k), None)
                r = rand.get(str(k))
                cells.append("-" if p is None or p["retention"] is None else
                             f"{p['retention']:.1f}" + (f" ({r['mean']:.1f})" if r and r["mean"] is not None else ""))
            f = faith.get(m, {})
            a, ra = f.get("auc"), faith["random"]["auc_mean"]
            rho = f.get("spearman_vs_ablation")
            t.add_row(task, m, *cells, "-" if a is None else f"{a:.1f} ({ra:.1f})" if ra is not None else f"{a:.1f}",
                      "-" if rho is None else f"{rho:.2f}")
    return t


def routes_table(doc: dict[str, Any]):
    """Per task and keep level: the best retention by pruning and by merging (each with its
    route's random mean), and which route keeps more: the attacker takes the stronger."""
    from rich.table import Table

    t = Table(title="Compression routes: best retention % (random mean), the stronger route")
    for col in ("task", "keep", "prune: best (random)", "merge: best (random)", "stronger"):
        t.add_column(col, justify="left" if col in ("task", "stronger") else "right")

    def cell(r):
        if r is None:
            return "-"
        rm = "" if r["random_mean"] is None else f" ({r['random_mean']:.1f})"
        how = r["method"] + (f" + {r['merge_method']}" if r.get("merge_method") else "")
        return f"{r['retention']:.1f}{rm} {how}"

    for task, by_keep in doc.get("routes", {}).items():
        for k, row in by_keep.items():
            t.add_row(task, k, cell(row["prune"]), cell(row["merge"]),
                      row.get("winner", "-") + (f" ({row['margin']:+.1f})" if "margin" in row else ""))
    return t
