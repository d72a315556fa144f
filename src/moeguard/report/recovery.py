"""Files of a recovery study or a re-alignment run, all derived from their JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeguard.analysis import labels_text
from moeguard.io import write_json
from moeguard.report.plots import _plt
from moeguard.report.sweep import write_csv


def curve_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (strategy, seed, labels)."""
    rows = []
    for c in doc["curves"]:
        for p in c["points"]:
            rows.append({"task": c["task"], "strategy": c["strategy"], "seed": c["seed"], "labels": p["labels"],
                         "score": p["score"], "retention": p["retention"], "train_s": p.get("train_s"),
                         "select_s": p.get("select_s")})
    return rows


def learning_curves(doc: dict[str, Any], out: Path) -> Path:
    """Retention vs labels per strategy: mean line, min-max band over seeds, the target line."""
    plt = _plt()
    summary = doc["summary"]
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    nan = lambda v: [float("nan") if x is None else x for x in v]  # noqa: E731 -- a point no seed measured
    for i, (name, s) in enumerate(summary["strategies"].items()):
        color = "0.35" if name == "random" else f"C{i}"
        ax.plot(s["labels"], nan(s["mean"]), marker="o", ms=3, color=color, lw=2.2 if name == "random" else 1.6,
                ls="--" if name == "random" else "-", label=_legend(name, s))
        ax.fill_between(s["labels"], nan(s["min"]), nan(s["max"]), color=color, alpha=0.15, lw=0)
    ax.axhline(summary["target"], color="crimson", lw=0.8, ls=":")
    ax.text(0.01, summary["target"], f" {summary['target']:g}% of the full model", color="crimson", fontsize=8,
            va="bottom", transform=ax.get_yaxis_transform())
    labels = next(iter(summary["strategies"].values()))["labels"]
    ax.set_xscale("symlog", linthresh=min([l for l in labels if l > 0] or [1]))  # 0 labels stays on the axis
    ax.set_xlim(left=0, right=max(labels) * 1.05)
    ax.set_xticks([l for l in labels])
    ax.set_xticklabels([str(l) for l in labels], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("labeled samples (line: mean over seeds; band: min to max)")
    ax.set_ylabel(f"retention of {doc['metric']} (%)")
    keep = doc.get("settings", {}).get("keep")
    title = f"Recovery of '{doc['task']}'" + (f" after pruning to {keep} experts per layer" if keep else "")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def _legend(name: str, s: dict[str, Any]) -> str:
    reach = s["labels_to_target"]
    text = f"{name}: {'not reached' if reach is None else f'{labels_text(reach)} labels'}"
    sv = s.get("savings_vs_random")
    if sv and sv.get("percent") is not None:
        pct = sv["percent"]
        text += (f", {'≥' if sv['bound'] == 'at least' else ''}{_percent(pct)}% fewer than random" if pct >= 0
                 else f", {_percent(-pct)}% more than random")
    return text


def write_recovery(doc: dict[str, Any], run_dir: Path) -> list[Path]:
    files = [write_json(run_dir / "recovery.json", doc), write_json(run_dir / "plan.json", doc["plan"])]
    files.append(write_csv(run_dir / "curves.csv", curve_rows(doc)))
    files.append(learning_curves(doc, run_dir / "learning_curves.png"))
    return files


def recovery_table(doc: dict[str, Any]):
    from rich.table import Table

    s = doc["summary"]
    t = Table(title=f"Recovery of '{doc['task']}' (pruned model: {_fmt(doc['pruned_retention'])}% retained; "
                    f"target {s['target']:g}%)")
    for col in ["strategy", "labels to target", "per seed", "savings vs random [95% CI]", "AUC", "final"]:
        t.add_column(col, justify="left" if col == "strategy" else "right")
    for name, r in s["strategies"].items():
        reach = labels_text(r["labels_to_target"])
        seeds = ", ".join(labels_text(x, none="-") for x in r["labels_to_target_per_seed"])
        t.add_row(name, reach, seeds, savings_text(name, r), _fmt(r["auc"]), _fmt(r["final"]))
    return t


def savings_text(name: str, summary: dict[str, Any]) -> str:
    """'≥ 40%', '25%', 'loses', ... for one strategy's summary; '-' for random itself."""
    sv = summary.get("savings_vs_random")
    if name == "random" or not sv:
        return "-"
    ci = ((sv.get("uncertainty") or {}).get("ci") or {})
    interval = (f" [{ci['low']:.0f}, {ci['high']:.0f}]" if ci.get("low") is not None and not ci.get("degenerate")
                else "")
    if sv["percent"] is not None:
        return f"{'≥ ' if sv['bound'] == 'at least' else ''}{_percent(sv['percent'])}%{interval}"
    if sv["bound"] == "exact":      # random needs no label: the pruned model already meets the target
        return "– (already at target)"
    return sv["bound"] + (interval if sv["bound"] == "loses" else "")


def _percent(x: float) -> str:
    """Whole percent, except that a saving short of 100% is never printed as 100% (no labels at all)."""
    return f"{x:.1f}" if 99.5 <= x < 100 else f"{x:.0f}"


def realign_table(curve: dict[str, Any]):
    from rich.table import Table

    t = Table(title=f"Re-alignment of '{curve['task']}' with '{curve['strategy']}'")
    for col in ["labels", curve["metric"], "retention %", "train s"]:
        t.add_column(col, justify="right")
    for p in curve["points"]:
        t.add_row(str(p["labels"]), _fmt(p["score"]), _fmt(p["retention"]), _fmt(p.get("train_s")))
    return t


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"
