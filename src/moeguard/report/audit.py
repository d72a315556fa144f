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

from moeguard.analysis import floored
from moeguard.io import atomic_dir, dumps, write_text
from moeguard.report import plots
from moeguard.report.plots import _plt
from moeguard.report.auditrows import (_fmt, card_rows, defense_detect_text, defense_rows, defense_utility_rows,
                                       detect_text, method_rows, recovery_rows, repro_rows, risk_rows)
from moeguard.report.scan import UNTRUSTED, flag_rows, scan_text, suspect_rows
from moeguard.report.tables import md_cell, md_table

LEVEL_COLORS = {"high": "#c0392b", "medium": "#d68910", "low": "#1e8449", "unmeasured": "#7f8c8d",
                "undefined": "#7f8c8d"}


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
    # rendered whole before anything is replaced: a report that fails to render leaves the three files and
    # the plots of the last run as they were (the old report.md links plots/ by name), not new plots or
    # a new results.json beside an old report. The texts are rendered from the new plots' temporary folder.
    with atomic_dir(out / "plots", overwrite=True) as tmp:
        files = make_plots(doc, stages, tmp)
        doc["files"] = {"plots": files, "results": "results.json", "report_md": "report.md",
                        "report_html": "report.html"}
        texts = {"results.json": dumps(doc, indent=2, sort_keys=False) + "\n", "report.md": render_markdown(doc),
                 "report.html": render_html(doc, tmp)}
    for name, text in texts.items():
        write_text(out / name, text)


# --------------------------------------------------------------------------- markdown

def _md_table(rows: list[dict[str, str]]) -> str:
    # the scan's start tokens and continuations are the scanned model's own text: code spans
    return md_table(rows, code=UNTRUSTED)


def render_markdown(doc: dict[str, Any]) -> str:
    f = doc["files"]["plots"]
    m = doc["model"]
    parts = [f"# moeguard audit: {md_cell(m.get('name'))}\n",
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
        parts += ["\nGoals: " + ", ".join(f"{k}: {_goal(v['met'])}" for k, v in doc["defense"]["goals"].items()
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
            + ("".join(f", {len(un)} unmeasured ({', '.join(un)}: half the experts per layer never pruned; add N/2 to "
                       "--keeps)" for un in [[t for t, l in levels.items() if l == "unmeasured"]] if un))
            + ("".join(f", {len(un)} undefined ({', '.join(un)}: the full model scores 0 or not a number there, so no "
                       "retention is defined)" for un in [[t for t, l in levels.items() if l == "undefined"]] if un))
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
           '<b>low</b>: neither. The attacker\'s best attribution method is used throughout. Where a quarter or half '
           'of the experts was not measured, the next keep measured above it stands in: the column names it.</p>',
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
            f"{k}: {_goal(v['met'])}" for k, v in goals.items() if isinstance(v, dict))) + "</p>"]
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


def _goal(met: bool | None) -> str:
    """A goal's state: None is a goal that was not measured (a defense compared without the
    from-scratch baseline), not one it missed."""
    return "not measured" if met is None else "met" if met else "missed"
