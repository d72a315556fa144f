"""Tables and plots of hardening runs, attacks and defense evaluations, all derived from their JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeguard.analysis import read_score, retention


def harden_table(doc: dict[str, Any]):
    """Each objective term at the start and the end of hardening (means over 20 steps)."""
    from rich.table import Table

    what = {"utility": "task loss, full model (keep low)", "balance": "per-task routing imbalance (0 = even)",
            "pruned": "task loss, pruned model (pushed up)", "attack_before": "simulated attack: loss before",
            "attack_after": "simulated attack: loss after (pushed up)",
            "authorized_before": "authorized adaptation: loss before",
            "authorized_after": "authorized adaptation: loss after (keep low)"}
    t = Table(title=f"hardening with '{doc['method']}' ({len(doc['log'])} steps, {doc['seconds']:.0f} s, "
                    f"target loss {doc['target']:.2f})")
    for c in ("quantity", "first 20 steps", "last 20 steps"):
        t.add_column(c, justify="left" if c == "quantity" else "right")
    for k, v in doc["summary"].items():
        t.add_row(what.get(k, k), f"{v['first']:.3f}", f"{v['last']:.3f}")
    return t


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def attack_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (run, labels), the attacker's and the from-scratch learner's."""
    full, hib = doc["full"]["score"], doc["higher_is_better"]
    runs = doc["runs"] + ((doc.get("scratch") or {}).get("runs") or [])
    rows = []
    for r in runs:
        for p in r["points"]:
            # the route: a prune and a merge run of the same setting were two rows nothing told apart
            rows.append({"task": doc["task"], "route": r.get("route", "prune"), "kind": r["kind"],
                         "strategy": r["strategy"], "mode": r["mode"],
                         "lr": r["lr"], "epochs": r["epochs"], "seed": r["seed"], "labels": p["labels"],
                         "score": p["score"], "retention": retention(read_score(p["score"]), full, higher_is_better=hib)})
    return rows


MODE_COLORS = {"full": "C0", "lora": "C2", "router": "C4", "experts": "C5"}   # another mode: C7
ROUTE_STYLES = {"prune": "-", "merge": "-."}


def draw_attack(ax, doc: dict[str, Any], *, title: str | None = None, runs: bool = True) -> None:
    """Retention vs labels: every attacker run (thin; a colour per mode, a line style per route), the
    worst-case envelope (bold), the best from-scratch curve (dashed), the target line."""
    full, hib = doc["full"]["score"], doc["higher_is_better"]
    w = doc["worst_case"]
    ax.set_title(title or f"'{doc['task']}' pruned to {doc['keep']} experts/layer", fontsize=9)
    if not w["labels"]:   # every run diverged from its first step: no point to draw (max() of none was a traceback)
        ax.text(0.5, 0.5, f"every attacker run diverged ({len(doc['runs'])} runs): no curve", ha="center",
                va="center", transform=ax.transAxes, fontsize=8)
        ax.set_axis_off()
        return
    if runs:
        modes = list(dict.fromkeys(r["mode"] for r in doc["runs"]))
        routes = list(dict.fromkeys(r.get("route", "prune") for r in doc["runs"]))
        for mode in modes:
            ax.plot([], [], color=MODE_COLORS.get(mode, "C7"), lw=0.8, alpha=0.5, label=f"one attacker run ({mode})")
        if len(routes) > 1:
            for route in routes:
                ax.plot([], [], color="0.4", lw=0.8, ls=ROUTE_STYLES.get(route, ":"), label=f"route: {route}")
        for r in doc["runs"]:
            if r["points"]:
                ax.plot([p["labels"] for p in r["points"]],
                        [retention(read_score(p["score"]), full, higher_is_better=hib) for p in r["points"]],
                        color=MODE_COLORS.get(r["mode"], "C7"), ls=ROUTE_STYLES.get(r.get("route", "prune"), ":"),
                        lw=0.6, alpha=0.25)
    ax.plot(w["labels"], w["retention"], color="crimson", lw=2.2, marker="o", ms=3,
            label=f"attacker, worst case (AUC {_fmt(doc['summary']['auc'])})")
    sc = doc.get("scratch")
    if sc:
        b = sc["best"]
        ax.plot(b["labels"], b["retention"], color="0.2", lw=1.6, ls="--", marker="s", ms=3,
                label=f"from scratch, best (AUC {_fmt(doc['summary'].get('scratch_auc'))})")
    target = doc["summary"]["target"]
    ax.axhline(target, color="crimson", lw=0.7, ls=":")
    labels = w["labels"]
    ax.set_xscale("symlog", linthresh=min([l for l in labels if l > 0] or [1]))
    ax.set_xlim(left=0, right=max(labels) * 1.05)
    ax.set_xticks(labels)
    ax.set_xticklabels([str(l) for l in labels], fontsize=8)
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("labels")
    ax.set_ylabel(f"retention of {doc['metric']} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def attack_plot(doc: dict[str, Any], out: Path) -> Path:
    from moeguard.report.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    draw_attack(ax, doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def write_attack(doc: dict[str, Any], run_dir: Path) -> list[Path]:
    from moeguard.io import write_json
    from moeguard.report.sweep import write_csv

    files = [write_json(run_dir / "attack.json", doc)]
    rows = attack_rows(doc)
    if rows:
        files.append(write_csv(run_dir / "curves.csv", rows))
    files.append(attack_plot(doc, run_dir / "attack_curves.png"))
    return files


def attack_table(doc: dict[str, Any]):
    from rich.table import Table

    s = doc["summary"]
    best = doc["attribution"]["best"]
    how = (f"merging by {best['method']} + {best['merge_method']}" if best.get("route") == "merge"
           else f"pruning by {best['method']} ({best['plan']})")
    t = Table(title=f"Attack on '{doc['task']}' at keep {doc['keep']}: {how}, {len(doc['runs'])} re-alignment runs"
                    + (f" over routes {', '.join(doc['routes'])}" if doc.get("routes") else ""))
    for c in ("labels", "worst case retention %", "above baseline %", "best setting", "from scratch %"):
        t.add_column(c, justify="right")
    w = doc["worst_case"]
    sc = (doc.get("scratch") or {}).get("best")
    for i, x in enumerate(w["labels"]):
        a = w["argbest"][i]
        setting = "-" if x == 0 else f"{a['strategy']} {a['mode']} lr {a['lr']:.0e} x{a['epochs']:g}" + (
            f" ({a['route']})" if a.get("route") else "")
        scr = sc["retention"][sc["labels"].index(x)] if sc and x in sc["labels"] else None
        t.add_row(str(x), _fmt(w["retention"][i]), _fmt(w["above_baseline"][i]), setting, _fmt(scr))
    t.caption = (f"labels to {s['target']:g}%: {_fmt(s['labels_to_target'], '.0f')}; AUC {_fmt(s['auc'])}"
                 + (f"; from scratch AUC {_fmt(s.get('scratch_auc'))}; area between {_fmt(s.get('area_between'))}"
                    if doc.get("scratch") else "")
                 + (f"; after re-alignment by route: {', '.join(f'{r} {_fmt(v)}' for r, v in s['realigned_retention_by_route'].items())}"
                    f" (stronger: {s['stronger_route']})" if s.get("realigned_retention_by_route") else ""))
    return t


def defense_plot(doc: dict[str, Any], out: Path) -> Path:
    """One row per (task, keep): the attack on the base model beside the attack on the hardened one."""
    from moeguard.report.plots import _plt

    plt = _plt()
    cells = [(t, k, v) for t, by in doc["attacks"].items() for k, v in by.items()]
    fig, axes = plt.subplots(len(cells), 2, figsize=(11, 3.4 * len(cells)), squeeze=False, layout="constrained")
    for row, (t, k, v) in enumerate(cells):
        for col, who in enumerate(("base", "hardened")):
            d = v[who]
            draw_attack(axes[row, col], d, title=f"{who}: '{t}' pruned to {k} experts/layer\n"
                                                 f"pruned {_fmt(d['summary']['pruned_retention'])}% -> re-aligned "
                                                 f"{_fmt(d['summary']['realigned_retention'])}% (worst case)")
        top = max(axes[row, 0].get_ylim()[1], axes[row, 1].get_ylim()[1])
        for ax in axes[row]:
            ax.set_ylim(0, top)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def utility_plot(doc: dict[str, Any], out: Path) -> Path:
    """Full-model score per task, base beside hardened, with the trivial baseline marked."""
    from moeguard.report.plots import _plt

    plt = _plt()
    names = list(doc["utility"])
    fig, axes = plt.subplots(1, len(names), figsize=(2.4 * len(names) + 1, 3.2), squeeze=False, layout="constrained")
    for ax, n in zip(axes[0], names):
        u = doc["utility"][n]
        ax.bar([0, 1], [read_score(u["base"]), read_score(u["hardened"])], color=["C0", "crimson"])   # null: no bar
        if u.get("baseline") is not None:
            ax.axhline(u["baseline"], color="0.3", ls=":", lw=0.8)
        ax.set_xticks([0, 1], ["base", "hardened"], fontsize=8)
        ax.set_title(f"{n}\n{u['metric']}: cost {_fmt(u['cost_percent'])}%", fontsize=8)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_defense(doc: dict[str, Any], run_dir: Path) -> list[Path]:
    from moeguard.io import write_json

    files = [write_json(run_dir / "defense.json", doc)]
    files.append(defense_plot(doc, run_dir / "defense_curves.png"))
    files.append(utility_plot(doc, run_dir / "utility.png"))
    return files


def defense_table(doc: dict[str, Any]):
    from rich.table import Table

    t = Table(title=f"defense evaluation: {doc.get('hardened')} vs {doc.get('base')}")
    for c in ("task", "keep", "utility cost %", "base: pruned -> re-aligned %", "hardened: pruned -> re-aligned %",
              "hardened above baseline %", "from scratch %", "extra labels"):
        t.add_column(c, justify="left" if c == "task" else "right")
    for task, by in doc["attacks"].items():
        for k, v in by.items():
            b, h = v["base"]["summary"], v["hardened"]["summary"]
            extra = extra_labels_text(v["extra_labels"])
            t.add_row(task, k, _fmt(doc["utility"][task]["cost_percent"]),
                      f"{_fmt(b['pruned_retention'])} -> {_fmt(b['realigned_retention'])}",
                      f"{_fmt(h['pruned_retention'])} -> {_fmt(h['realigned_retention'])}",
                      _fmt(h.get("realigned_above_baseline")), _fmt(h.get("scratch_retention")), extra)
    return t


def extra_labels_text(x: dict[str, Any] | None, spec: str = ".0f") -> str:
    """``studies.defend.extra_labels`` as text: '≥ 120' when the hardened model never reaches the
    target (a lower bound), '≤ -80' when the base model never does (an upper bound: the defense
    made the attack easier by at least that much), 'neither' when neither does."""
    if not x or x.get("labels") is None:
        return "neither" if x and x.get("bound") == "neither" else "–"
    return {"at least": "≥ ", "at most": "≤ "}.get(x.get("bound"), "") + format(x["labels"], spec)
