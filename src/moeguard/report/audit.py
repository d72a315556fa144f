"""The audit's report: results.json first, then plots, report.md and one self-contained
report.html (plots embedded as data URIs, inline CSS, no script, nothing fetched), all
derived from the JSON and the stages' files, so a saved run can be re-rendered.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.analysis import floored, labels_text
from moeguard.io import atomic_dir, write_json, write_text
from moeguard.report import plots
from moeguard.report.plots import _plt
from moeguard.report.recovery import savings_text
from moeguard.report.scan import flag_rows, scan_text, suspect_rows

LEVEL_COLORS = {"high": "#c0392b", "medium": "#d68910", "low": "#1e8449"}


def _fmt(x, spec: str = ".1f", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def risk_plot(doc: dict[str, Any], out: Path) -> Path:
    """Per task: best retention at N/2 and N/4 experts with no fine-tuning, and after the attack."""
    plt = _plt()
    names = list(doc["tasks"])
    risks = [doc["tasks"][t]["risk"] for t in names]

    def keep(key: str, generic: str) -> str:   # a level shared by every task, or the generic name (each bar differs)
        return f"{risks[0][key]} experts/layer" if len({r[key] for r in risks}) == 1 else generic

    realigned = any(doc["tasks"][t].get("recovery") for t in names)
    series = [(f"{keep('keep_half', 'half the experts')}, pruned", [r["pruned"].get(str(r["keep_half"])) for r in risks]),
              (f"{keep('keep_quarter', 'a quarter of the experts')}, pruned", [r["pruned"].get(str(r["keep_quarter"])) for r in risks]),
              (f"{keep('attack_keep', 'the attack keep')}, " + ("after the attack" if realigned else "pruned (no re-alignment)"),
               [r["attacked"] for r in risks])]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(names) + 2), 4.2), layout="constrained")
    x = np.arange(len(names))
    w = 0.8 / len(series)
    for i, (label, vals) in enumerate(series):
        v = [np.nan if a is None else a for a in vals]
        bars = ax.bar(x + (i - 1) * w, v, w, label=label, color=["#7fb3d5", "#2e86c1", "#1b4f72"][i])
        for b, val in zip(bars, vals):
            if val is not None:
                ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, floored(val, 0), ha="center", fontsize=7)
    ax.axhline(90, color="crimson", lw=0.9, ls="--", label="90% (the risk levels' line)")
    ax.set_xticks(x, [f"{n}\n{r['level'].upper()} risk" for n, r in zip(names, risks)], fontsize=8)
    for tick, r in zip(ax.get_xticklabels(), risks):
        tick.set_color(LEVEL_COLORS[r["level"]])
    ax.set_ylabel("retention of the task's score (%)")
    ax.set_ylim(0, max(120, np.nanmax([a for _, v in series for a in v if a is not None] or [100]) + 10))
    ax.set_title("How much of each task survives an attacker who prunes experts")
    ax.legend(fontsize=8, loc="upper left", ncols=2, bbox_to_anchor=(0, -0.14))
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def make_plots(doc: dict[str, Any], stages: dict[str, Path], folder: Path) -> dict[str, Any]:
    """Every plot of the report into ``folder``; returns {section: {task: file name}}."""
    from moeguard.report.defense import defense_plot, utility_plot
    from moeguard.report.recovery import learning_curves

    sweep = json.loads((stages["sweep"] / "sweep.json").read_text())
    files: dict[str, Any] = {"risk": risk_plot(doc, folder / "risk.png").name, "importance": {}, "retention": {},
                             "learning": {}, "collateral": None, "defense": []}
    for t in doc["tasks"]:
        scores = {m: json.loads((stages["attribution"] / "scores" / t / f"{m}.json").read_text())
                  for m in doc["config"]["methods"]}
        files["importance"][t] = plots.importance_heatmaps(t, scores, folder / f"importance_{t}.png").name
        files["retention"][t] = plots.retention_curves(sweep, t, folder / f"retention_{t}.png").name
        rec = stages.get("recovery")
        if rec is not None and (rec / "recovery" / f"{t}.json").exists():
            rdoc = json.loads((rec / "recovery" / f"{t}.json").read_text())
            files["learning"][t] = learning_curves(rdoc, folder / f"learning_{t}.png").name
    if len(doc["tasks"]) > 1:
        k = min(doc["config"]["keeps"])
        files["collateral"] = plots.collateral_plot(sweep, k, folder / f"collateral_keep{k}.png").name
    if "defense" in stages:
        d = json.loads((stages["defense"] / "defense.json").read_text())
        files["defense"] = [defense_plot(d, folder / "defense_curves.png").name,
                            utility_plot(d, folder / "utility.png").name]
    return files


def write_report(doc: dict[str, Any], out: Path, stages: dict[str, Path]) -> None:
    with atomic_dir(out / "plots", overwrite=True) as tmp:
        files = make_plots(doc, stages, tmp)
    doc["files"] = {"plots": files, "results": "results.json", "report_md": "report.md",
                    "report_html": "report.html"}
    write_json(out / "results.json", doc)
    write_text(out / "report.md", render_markdown(doc))
    write_text(out / "report.html", render_html(doc, out / "plots"))


# --------------------------------------------------------------------------- tables as data

def risk_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    """One row per task, under the same columns. A keep level shared by every task is in its column's
    name; one that differs between tasks (a task outside --recovery-tasks is attacked at N/4, the
    others at --recovery-keep) is in each cell. Retention is rounded down (89.96 is 89.9, never the
    90.0 the levels' rule reads as met)."""
    risks = [e["risk"] for e in doc["tasks"].values()]
    shared = {key: len({r[key] for r in risks}) == 1 for key in ("keep_half", "keep_quarter", "attack_keep")}

    def head(key: str, what: str, r: dict[str, Any], generic: str) -> str:
        return f"{what}, {r[key]}/layer" if shared[key] else f"{what}, {generic}"

    def at(key: str, r: dict[str, Any]) -> str:
        return "" if shared[key] else f" at {r[key]}/layer"

    rows = []
    for t, e in doc["tasks"].items():
        r = e["risk"]
        h, q = str(r["keep_half"]), str(r["keep_quarter"])
        attack = floored(r["attacked"]) + "%" + at("attack_keep", r)
        if not e.get("recovery"):   # no re-alignment ran for it: the number is pruning's alone
            attack += " (pruned only)"
        rows.append({"task": t, "risk": r["level"], "metric": e["metric"],
                     "full (baseline)": _fmt(e["full"]["score"], ".4g") + f" ({_fmt(e['full']['baseline'], '.4g')})",
                     head("keep_half", "pruned", r, "N/2"): floored(r["pruned"].get(h)) + "%" + at("keep_half", r)
                     + _by_merge(r, h),
                     head("keep_quarter", "pruned", r, "N/4"): floored(r["pruned"].get(q)) + "%" + at("keep_quarter", r)
                     + _by_merge(r, q),
                     head("attack_keep", "after attack", r, "its keep"): attack,
                     "labels to target": labels_text(r["labels_to_recover"]) if e.get("recovery") else "–",
                     "best strategy": r.get("best_strategy") or ("none beats random" if e.get("recovery") else "–")})
    return rows


def _by_merge(risk: dict[str, Any], k: str) -> str:
    return " (by merging)" if risk.get("route", {}).get(k) == "merge" else ""


def method_rows(doc: dict[str, Any], task: str) -> list[dict[str, str]]:
    e = doc["tasks"][task]
    keeps = [str(k) for k in doc["config"]["keeps"]]
    rows = []
    for m, v in e["methods"].items():
        row = {"method": m}
        for k in keeps:
            rnd = e["random"].get(k)
            row[f"keep {k}"] = _fmt(v["retention"].get(k)) + (f" (rand {_fmt(rnd['mean'])})" if rnd else "")
        row["AUC"] = _fmt(v["auc"])
        row["ρ vs ablation"] = _fmt(v["spearman_vs_ablation"], ".2f")
        row["seconds"] = _fmt(v["seconds"], ".1f")
        rows.append(row)
    ra = e["random_auc"]
    rows.append({"method": "random rankings", **{f"keep {k}": (_fmt(e['random'][k]['mean']) + f" ± {_fmt(e['random'][k]['std'])}")
                                                if k in e["random"] else "–" for k in keeps},
                 "AUC": _fmt(ra.get("auc_mean")) + (f" ± {ra['auc_std']:.1f}" if ra.get("auc_std") is not None else ""),
                 "ρ vs ablation": "–", "seconds": "–"})
    routes = e.get("routes") or {}
    if routes:   # the merge route: its best per keep (which centres and merge method), its own random band
        cell = lambda r: "–" if not r else (_fmt(r["retention"]) + f" ({r['method']} + {r['merge_method']}"  # noqa: E731
                                           + (f", rand {r['random_mean']:.1f})" if r.get("random_mean") is not None else ")"))
        rows.append({"method": "merge route (best)", **{f"keep {k}": cell((routes.get(k) or {}).get("merge")) for k in keeps},
                     "AUC": "–", "ρ vs ablation": "–", "seconds": "–"})
        rows.append({"method": "stronger route", **{f"keep {k}": (routes.get(k) or {}).get("winner", "–") for k in keeps},
                     "AUC": "–", "ρ vs ablation": "–", "seconds": "–"})
    return rows


def recovery_rows(doc: dict[str, Any], task: str) -> list[dict[str, str]]:
    rec = doc["tasks"][task].get("recovery")
    if not rec:
        return []
    rows = []
    # with the merge route, the merged model's re-alignment beside pruning's (a route column)
    routes = [("prune", rec)] + ([(f"merge ({rec['merge']['merge_method']})", rec["merge"])] if rec.get("merge") else [])
    for route, r in routes:
        for n, s in r["strategies"].items():
            rows.append({**({"route": route} if len(routes) > 1 else {}), "strategy": n,
                         "labels to target": labels_text(s["labels_to_target"]), "savings vs random": savings_text(n, s),
                         "AUC": _fmt(s["auc"]), f"retention at {s['labels'][-1]} labels": _fmt(s["final"]) + "%"})
    return rows


def detect_text(rec: dict[str, Any]) -> str | None:
    """The detectability sentence of a task: its best stolen model, traced (docs/trace.md)."""
    d = rec.get("detectability")
    if not d:
        return None
    if "skipped" in d:
        return f"Detectability: not traced ({d['skipped']})."
    from moeguard.report.trace import p_text

    return (f"Detectability: if the attacker's best re-aligned model ({d['strategy']}, {d['labels']} labels, "
            f"{d['retention']:.1f}% retained) were stolen, `moeguard trace` would find it with p = "
            f"{p_text(d['p_value'])} ({d['verdict']}), identifying {d['kept_identified']} of {d['kept_total']} "
            f"kept experts; every re-aligned run traced as derived: {'yes' if d['all_derived'] else 'no'} "
            f"(largest p {p_text(d['largest_p'])}).")


def defense_detect_text(doc: dict[str, Any]) -> list[str]:
    """Per task and keep: the attacker's best model of the hardened release, traced against it."""
    from moeguard.report.trace import p_text

    out = []
    for t, by_keep in ((doc.get("defense") or {}).get("detectability") or {}).items():
        for k, sides in by_keep.items():
            d = sides.get("hardened")
            if not d:
                continue
            if "skipped" in d:
                out.append(f"Detectability, `{t}` at {k} experts: not traced ({d['skipped']}).")
                continue
            out.append(f"Detectability, `{t}` at {k} experts: if the attacker's best model cut from the hardened "
                       f"release ({d.get('mode', '?')}, {d['labels']} labels) were stolen, `moeguard trace` would "
                       f"find it with p = {p_text(d['p_value'])} ({d['verdict']}), identifying {d['kept_identified']} "
                       f"of {d['kept_total']} kept experts; all {d['traced_runs']} attack runs traced as derived: "
                       f"{'yes' if d['all_derived'] else 'no'} (largest p {p_text(d['largest_p'])}).")
    return out


def defense_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    from moeguard.report.defense import extra_labels_text

    d = doc.get("defense")
    if not d:
        return []
    rows = []
    for t, by_keep in d["summaries"].items():
        for k, v in by_keep.items():
            b, h = v["base"], v["hardened"]
            rows.append({"task": t, "keep": k, "pruned base → hardened": f"{_fmt(b['pruned_retention'])} → {_fmt(h['pruned_retention'])}%",
                         "after attack base → hardened": f"{_fmt(b['realigned_retention'])} → {_fmt(h['realigned_retention'])}%",
                         "extra labels": extra_labels_text(d["extra_labels"][t][k], ".1f"),
                         "from scratch": _fmt(h.get("scratch_retention")) + "%"})
    return rows


def defense_utility_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    """The defense's cost to the full model, a table of its own (not under the attack's columns)."""
    d = doc.get("defense")
    return [{"task": t, "metric": u.get("metric", ""), "base": _fmt(u["base"], ".4g"), "hardened": _fmt(u["hardened"], ".4g"),
             "utility cost": _fmt(u["cost_percent"]) + "%"} for t, u in (d or {}).get("utility", {}).items()]


def card_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    m = doc["model"]
    p = m.get("parameters", {})
    facts = [("model", m.get("name")), ("source", m.get("path") or m.get("hub_id")), ("family", m.get("family")),
             ("decoder layers", m.get("num_layers")), ("MoE layers", len(m.get("moe_layers") or [])),
             ("experts per layer", m.get("num_experts")), ("experts per token (top-k)", m.get("top_k")),
             ("shared experts", len(m.get("shared_experts") or [])), ("routing", m.get("gate_normalization")),
             ("parameters", _count(p.get("total"))), ("active per token", _count(p.get("active"))),
             ("routed-expert parameters", _count(p.get("routed_experts"))),
             # JetMoE: its MLP and attention experts differ in size, so each kind's, not their mean
             ("per expert", "; ".join(f"{kind} {_count(n)}" for kind, n in p["per_expert_by_block"].items())
              if p.get("per_expert_by_block") else _count(p.get("per_expert"))),
             # NLLB-MoE: transformers' forward is wrong, and the audit measured the repaired model
             ("upstream repair", m.get("upstream_repair"))]
    return [{"fact": k, "value": str(v)} for k, v in facts if v is not None]


def _count(n) -> str | None:
    if n is None:
        return None
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return str(n)


def repro_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    run = doc["run"]
    rows = [{"item": "command", "value": run.get("command") or "moeguard audit (from Python)"},
            {"item": "git commit", "value": str(run.get("git_commit"))},
            {"item": "backend", "value": ", ".join(f"{k}={v}" for k, v in doc["backend"].items())},
            {"item": "created", "value": doc["created_at"]},
            {"item": "wall time", "value": f"{doc['seconds']:.0f} s (stages: " + ", ".join(
                s["stage"] + (" cached" if s["cached"] else f" {s['seconds']:.0f} s") for s in doc["stages"]) + ")"}]
    rows += [{"item": k, "value": v} for k, v in run["versions"].items()]
    return rows


# --------------------------------------------------------------------------- markdown

def _md_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "_none_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_markdown(doc: dict[str, Any]) -> str:
    f = doc["files"]["plots"]
    m = doc["model"]
    parts = [f"# moeguard audit: {m.get('name')}\n",
             _verdict(doc) + "\n",
             "## Prunability risk\n", _md_table(risk_rows(doc)),
             f"\n![risk](plots/{f['risk']})\n",
             "Definitions: docs/report.md (risk levels, retention, labels to target).\n"]
    for t in doc["tasks"]:
        parts += [f"\n## Task `{t}`\n", f"Risk: **{doc['tasks'][t]['risk']['level']}**: {doc['tasks'][t]['risk']['reason']}.\n",
                  f"\n![importance](plots/{f['importance'][t]})\n", f"\n![retention](plots/{f['retention'][t]})\n",
                  "\n" + _md_table(method_rows(doc, t))]
        if t in f["learning"]:
            rec = doc["tasks"][t]["recovery"]
            parts += [f"\nRecovery at {rec['keep']} experts/layer (experts chosen by `{rec['method']}`):\n",
                      f"\n![learning](plots/{f['learning'][t]})\n", "\n" + _md_table(recovery_rows(doc, t))]
            if detect_text(rec):
                parts += ["\n" + detect_text(rec) + "\n"]
    if f.get("collateral"):
        parts += ["\n## Collateral damage\n", f"\n![collateral](plots/{f['collateral']})\n"]
    if doc.get("scan"):
        parts += ["\n## Expert scan\n", scan_text(doc) + "\n", _md_table(suspect_rows(doc["scan"])),
                  "\n", _md_table(flag_rows(doc["scan"]))]
    if doc.get("defense"):
        parts += ["\n## Defense comparison\n", _md_table(defense_rows(doc)),
                  "\nThe defense's cost to the full model:\n", _md_table(defense_utility_rows(doc))]
        parts += [f"\n![defense](plots/{p})\n" for p in f["defense"]]
        parts += ["\n" + line + "\n" for line in defense_detect_text(doc)]
        parts += ["\nGoals: " + ", ".join(f"{k}: {'met' if v['met'] else 'missed'}" for k, v in doc["defense"]["goals"].items()
                                         if isinstance(v, dict)) + "\n"]
    parts += ["\n## Model card\n", _md_table(card_rows(doc)), "\n## Reproduce\n", _md_table(repro_rows(doc)),
              "\n```yaml\n" + _yaml(doc["config"]) + "```\n"]
    return "".join(parts)


def _yaml(cfg: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)


def _verdict(doc: dict[str, Any]) -> str:
    levels = {t: e["risk"]["level"] for t, e in doc["tasks"].items()}
    high = [t for t, l in levels.items() if l == "high"]
    med = [t for t, l in levels.items() if l == "medium"]
    m = doc["model"]
    text = (f"{len(high)} of {len(levels)} tasks at **high** prunability risk"
            + (f" ({', '.join(high)})" if high else "") + f", {len(med)} at medium"
            + (f" ({', '.join(med)})" if med else "")
            + f". Model: {m.get('family')} with {m.get('num_experts')} experts per layer, top-{m.get('top_k')}.")
    cfg = doc.get("config", {})
    if not cfg.get("recovery", True):
        why = (f" (under `--max-memory {cfg['max_memory']}` it runs only with `--recovery-mode lora`: other modes "
               "train weights that are offloaded)" if cfg.get("max_memory") else "")
        text += (f" The recovery study was not run{why}: these ratings rest on pruning alone, before any "
                 "fine-tuning, and can understate the risk.")
    return text


# --------------------------------------------------------------------------- html

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1c2833;background:#f4f6f7}
main{max-width:1100px;margin:0 auto;padding:24px 28px;background:#fff}
h1{font-size:1.6em;margin:0 0 4px}h2{border-bottom:2px solid #d5dbdb;padding-bottom:4px;margin-top:36px}
h3{margin-top:24px}.verdict{font-size:1.1em;background:#eaf2f8;padding:12px 16px;border-left:5px solid #2e86c1}
table{border-collapse:collapse;margin:10px 0 18px;font-size:.88em;width:100%}
th,td{border:1px solid #d5dbdb;padding:5px 8px;text-align:right}th{background:#f2f3f4}
td:first-child,th:first-child{text-align:left}
.level{color:#fff;font-weight:700;padding:2px 8px;border-radius:3px;text-transform:uppercase;font-size:.85em}
figure{margin:12px 0}figure img{max-width:100%;height:auto;border:1px solid #eaeded}
figcaption{font-size:.85em;color:#566573}.note{color:#566573;font-size:.9em}
nav a{margin-right:12px}code,pre{background:#f4f6f7}pre{padding:10px;overflow-x:auto;font-size:.82em}
"""


def _img(folder: Path, name: str, caption: str) -> str:
    data = base64.b64encode((folder / name).read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}" data-plot="{html.escape(name)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _html_table(rows: list[dict[str, str]], *, cls: str = "") -> str:
    if not rows:
        return '<p class="note">none</p>'
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = str(r.get(c, ""))
            if c == "risk":
                cells.append(f'<td><span class="level" style="background:{LEVEL_COLORS.get(v, "#566573")}">{html.escape(v)}</span></td>')
            else:
                cells.append(f"<td>{html.escape(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def render_html(doc: dict[str, Any], folder: Path) -> str:
    f = doc["files"]["plots"]
    m = doc["model"]
    tasks = list(doc["tasks"])
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content='width=device-width'>"
           f"<title>moeguard audit: {html.escape(str(m.get('name')))}</title><style>{CSS}</style></head><body><main>",
           f"<h1>moeguard audit: {html.escape(str(m.get('name')))}</h1>",
           f'<p class="note">{html.escape(doc["created_at"])} · schema {doc["schema"]}</p>',
           "<nav>" + "".join(f'<a href="#task-{html.escape(t)}">{html.escape(t)}</a>' for t in tasks)
           + ('<a href="#scan">expert scan</a>' if doc.get("scan") else "")
           + '<a href="#card">model card</a><a href="#repro">reproduce</a></nav>',
           f'<p class="verdict">{_inline_md(_verdict(doc))}</p>',
           '<h2 id="risk">Prunability risk</h2>',
           '<p class="note"><b>high</b>: the task keeps ≥ 90% of its score at the attack\'s keep (a quarter of the experts '
           'unless the audit\'s recovery keep says otherwise) after pruning and re-alignment within the label budget; <b>medium</b>: ≥ 90% with half of the experts and no fine-tuning; '
           '<b>low</b>: neither. The attacker\'s best attribution method is used throughout.</p>',
           _html_table(risk_rows(doc), cls="risk"),
           _img(folder, f["risk"], "Best retention per task: half and a quarter of the experts kept, and after re-alignment")]
    for t in tasks:
        e = doc["tasks"][t]
        out += [f'<h2 id="task-{html.escape(t)}">Task {html.escape(t)}</h2>',
                f'<p><span class="level" style="background:{LEVEL_COLORS[e["risk"]["level"]]}">{e["risk"]["level"]}</span> '
                f'{html.escape(e["risk"]["reason"])}. Metric: {html.escape(e["metric"])}; full model '
                f'{_fmt(e["full"]["score"], ".4g")}, trivial baseline ({html.escape(str(e["full"]["baseline_name"]))}) '
                f'{_fmt(e["full"]["baseline"], ".4g")}.</p>',
                _img(folder, f["importance"][t], f"Which experts serve '{t}', per attribution method"),
                _img(folder, f["retention"][t], f"Retention of '{t}' per method against random rankings"),
                "<h3>Attribution methods</h3>", _html_table(method_rows(doc, t), cls="methods")]
        if t in f["learning"]:
            rec = e["recovery"]
            out += [f"<h3>Recovery at {rec['keep']} experts per layer (experts chosen by {html.escape(rec['method'])})</h3>",
                    _img(folder, f["learning"][t], f"Labels an attacker needs to re-align '{t}', per strategy"),
                    _html_table(recovery_rows(doc, t), cls="recovery")]
            if detect_text(rec):
                out += [f'<p class="detect">{html.escape(detect_text(rec))}</p>']
    if f.get("collateral"):
        out += ['<h2 id="collateral">Collateral damage</h2>',
                _img(folder, f["collateral"], "Targeted pruning: the chosen task against the others")]
    if doc.get("scan"):
        out += ['<h2 id="scan">Expert scan</h2>', f"<p>{html.escape(scan_text(doc))}</p>",
                _html_table(suspect_rows(doc["scan"]), cls="scan"), _html_table(flag_rows(doc["scan"]), cls="scan-flags")]
    if doc.get("defense"):
        out += ['<h2 id="defense">Defense comparison</h2>', _html_table(defense_rows(doc), cls="defense"),
                "<p>The defense's cost to the full model:</p>", _html_table(defense_utility_rows(doc), cls="defense-utility")]
        out += [_img(folder, p, "Defense: base against hardened") for p in f["defense"]]
        out += [f'<p class="detect">{html.escape(line)}</p>' for line in defense_detect_text(doc)]
        goals = doc["defense"]["goals"]
        out += ['<p class="note">Goals: ' + html.escape(", ".join(
            f"{k}: {'met' if v['met'] else 'missed'}" for k, v in goals.items() if isinstance(v, dict))) + "</p>"]
    out += ['<h2 id="card">Model card</h2>', _html_table(card_rows(doc), cls="card"),
            '<h2 id="repro">Reproduce</h2>', _html_table(repro_rows(doc), cls="repro"),
            f"<pre>{html.escape(_yaml(doc['config']))}</pre>",
            '<p class="note">Definitions of every number: docs/report.md in the moeguard repository. '
            "Machine-readable results: results.json beside this file.</p></main></body></html>"]
    return "\n".join(out)


def _inline_md(text: str) -> str:
    """**bold** and `code` of one line of the markdown report, as HTML."""
    parts = html.escape(text).split("**")
    bold = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(bold.split("`")))
