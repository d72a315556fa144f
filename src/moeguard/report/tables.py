"""Rich tables rendered from the JSON documents (results are JSON first, tables from JSON)."""

from __future__ import annotations

import re

from rich.table import Table


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.2f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def info_table(d: dict) -> Table:
    t = Table(title=f"{d['name']} ({d['family']})", show_header=False)
    p = d["parameters"]
    rows = [("family / model_type", f"{d['family']} / {d['model_type']}"),
            ("layers (MoE layers)", f"{d['num_layers']} ({len(d['moe_layers'])}: {d['moe_layers']})"),
            ("experts per layer", ", ".join(f"{k}:{v}" for k, v in d["experts_per_layer"].items())),
            ("top-k", str(d["top_k"])),
            ("shared experts", "none" if not d["shared_experts"] else f"{d['shared_experts'][0]['modules']} in {len(d['shared_experts'])} layers"),
            ("gate normalization", d["gate_normalization"]),
            ("family spec", d.get("family_spec", {}).get("status", "built-in")
             + (f": {'; '.join(d['family_spec']['reasons'])}" if d.get("family_spec", {}).get("reasons") else "")
             + (f" ({d['family_spec']['note']})" if d.get("family_spec", {}).get("note") else "")),
            ("parameters total / active", f"{p['total']:,} / {p['active']:,}"),
            ("per expert", f"{p['per_expert']:,}" if not p.get("per_expert_by_block") else
             "; ".join(f"{kind} {n:,}" for kind, n in p["per_expert_by_block"].items())),
            ("path", d.get("path") or d.get("hub_id") or "-")]
    if d.get("moe_layers_per_stack"):   # an encoder-decoder: indices run on across the stacks
        rows.insert(2, ("MoE layers per stack", "; ".join(f"{stack}: {', '.join(map(str, local))}"
                                                          for stack, local in d["moe_layers_per_stack"].items())))
    if d.get("upstream_repair"):   # NLLB-MoE: transformers' forward is wrong, moeguard runs the model's
        rows.insert(-1, ("upstream repair", d["upstream_repair"]))
    if d.get("moe_layers_per_block"):   # JetMoE: two sparse blocks per decoder layer
        rows.insert(2, ("MoE blocks", "; ".join(f"{kind}: MoE layers {', '.join(m)} (decoder layers "
                                                f"{', '.join(str(v) for v in m.values())})"
                                                for kind, m in d["moe_layers_per_block"].items())))
    for k, v in rows:
        t.add_row(k, v)
    return t


def families_tables(data: dict) -> list[Table]:
    """The built-in families, then the installed MoE model types by status."""
    t = Table(title=f"built-in families ({len(data['builtin'])})")
    for c in ("family", "model types", "router", "shared experts", "routing"):
        t.add_column(c, overflow="fold")
    for r in data["builtin"]:
        t.add_row(r["family"], ", ".join(r["model_types"]), f"{r['block']}.{r['router']}",
                  ", ".join(r["shared"]) or "-", r["routing"])
    counts = ", ".join(f"{k} {v}" for k, v in sorted(data["counts"].items()))
    u = Table(title=f"MoE model types in transformers {data['transformers']} ({counts})")
    for c in ("model type", "status", "why"):
        u.add_column(c, overflow="fold")
    order = {"built-in": 0, "verified": 1, "unverified": 2, "unsupported": 3, "dense": 4}
    for r in sorted(data["installed"], key=lambda r: (order.get(r["status"], 9), r["model_type"])):
        u.add_row(r["model_type"], r["status"], "; ".join(r["reasons"] + ([r["note"]] if r.get("note") else [])) or "-")
    return [t, u]


def tasks_table(rows: list[dict]) -> Table:
    t = Table(title="registered tasks")
    for c in ("name", "kind", "source", "metric"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], r["kind"], r["source"], r["metric"])
    return t


def eval_table(results: dict) -> Table:
    t = Table(title=f"evaluation of {results['model']}")
    for c in ("task", "kind", "metric", "score", "baseline", "baseline score", "n"):
        t.add_column(c, justify="right" if c in ("score", "baseline score", "n") else "left", no_wrap=True)
    for name, r in results["tasks"].items():
        b = r.get("baseline") or {}
        arrow = "↑" if r["higher_is_better"] else "↓"
        kind = {"language_modeling": "LM", "classification": "class.", "summarization": "summ."}.get(r["kind"], r["kind"])
        t.add_row(name, kind, f"{r['metric']} {arrow}", _fmt(r["score"]), b.get("name", "-"),
                  _fmt(b.get("score")), _fmt(r["n_samples"]))
    return t


def merge_table(record: dict) -> Table:
    """Per layer: each merged expert, the originals averaged into it and their weights."""
    plan = record["plan"]
    t = Table(title=f"merge ({plan['method']}{', gate ' + plan['gate'] if plan.get('gate') else ''}"
                    f"{', task ' + plan['task'] if plan.get('task') else ''})")
    t.add_column("layer", justify="right")
    t.add_column("merged expert <- originals (weights)")
    for layer, groups in record["merges"].items():
        t.add_row(layer, "  ".join(f"{g['expert']} <- {'+'.join(map(str, g['from']))}"
                                   + (f" ({'/'.join(f'{w:.2f}' for w in g['weights'])})" if len(g["from"]) > 1 else "")
                                   for g in sorted(groups, key=lambda g: g["expert"])))
    return t


def monitor_score_table(summary: dict) -> Table:
    """``monitor score``'s summary: per level, what was tested, how many alerted, and the smallest
    p-value it can give (a floor above alpha means that level cannot alert)."""
    t = Table(title=f"monitor score: {summary['requests']} requests from {summary['clients']} clients "
                    f"(alert at p <= {summary['alpha']:g})")
    for c in ("level", "tested", "alerts", "p floor"):
        t.add_column(c, justify="left" if c == "level" else "right")
    a, floor = summary["alerts"], summary.get("p_floor", {})

    def p(level):
        return f"{floor[level]:.2g}" if isinstance(floor.get(level), (int, float)) else "-"

    t.add_row("request", str(summary["requests"]), str(a["request"]), p("request"))
    t.add_row(f"client window ({summary['window']})", f"{summary['windows']} looks, {summary['blocks']} windows",
              str(a["window"]), p("window"))
    if "slice" in a:
        t.add_row(f"slice of all traffic ({summary['slice']})", str(summary["slices"]), str(a["slice"]), p("slice"))
    if "period" in a:
        t.add_row(f"period ({summary['period']})", f"{summary['periods_tested']} of {summary['periods']}",
                  str(a["period"]), "-")
    if "period_clients" in a:
        t.add_row("period: clients' test", f"{summary['periods_clients_tested']} of {summary['periods']}",
                  str(a["period_clients"]), "-")
        t.add_row("period: small clients' test", f"{summary['periods_small_tested']} of {summary['periods']}",
                  str(a["period_small_clients"]), "-")
    return t


def zoo_train_table(card: dict) -> Table:
    """``zoo train``'s summary: per MoE layer, how specialized routing became (the task-expert mutual
    information at initialization and after training) and each task's most-used expert."""
    loss = card["loss_curve"]
    t = Table(title=f"trained {card['parameters']:,} parameters for {card['recipe']['steps']} steps "
                    f"(loss {loss[0]:.3f} -> {loss[-1]:.3f})")
    t.add_column("layer", justify="right")
    t.add_column("I(task; expert) at init", justify="right")
    t.add_column("trained", justify="right")
    t.add_column("top expert of each task")   # one column: six tasks' own columns squeezed their names to "stdl…"
    tops = card["specialization"].get("top_experts", {})
    spec, init = card["specialization"]["per_layer"], card["specialization_at_init"]["per_layer"]
    for i, (a, b) in enumerate(zip(init, spec)):
        t.add_row(str(i), f"{a:.3f}", f"{b:.3f}", ", ".join(f"{n} {tops[n][i]}" for n in tops))
    return t


def prune_table(record: dict) -> Table:
    """Per layer: the experts kept and dropped; the caption: the checkpoint's size before and after."""
    plan = record.get("plan") or {}
    size = ""
    if record.get("bytes_in") and record.get("bytes_out") is not None:
        size = (f"; {record['bytes_in'] / 2**20:,.1f} MiB -> {record['bytes_out'] / 2**20:,.1f} MiB "
                f"({100 * record['bytes_out'] / record['bytes_in']:.0f}%)")
    t = Table(title=f"pruned {record['original_num_experts']} experts per layer ({plan.get('rule', 'plan')}"
                    f"{', ' + plan['method'] + ' scores' if plan.get('method') else ''}){size}",
              caption=f"loadable by {record.get('loadable_by', '?')}")
    t.add_column("layer", justify="right")
    t.add_column("kept", justify="right")
    t.add_column("experts kept")
    t.add_column("dropped")
    n = record["original_num_experts"]

    def ids(xs: list[int], most: int = 16) -> str:   # DeepSeek's 256 experts: a line per layer, not a page
        return " ".join(map(str, xs[:most])) + (f" ... (+{len(xs) - most})" if len(xs) > most else "")

    # a budget-pruned source has its own count per layer (one that had 4 experts lists no 4-7 as dropped)
    per_layer = record.get("original_experts_per_layer") or {}
    for layer, kept in record["keep"].items():
        had = int(per_layer.get(str(layer), n))
        t.add_row(str(layer), f"{len(kept)}/{had}", ids(list(kept)), ids([e for e in range(had) if e not in kept]))
    return t


def scores_table(doc: dict) -> Table:
    """Per layer: the experts from most to least important, with their scores."""
    # a score that was NaN or infinite is stored as null (Scores.to_dict): shown as n/a, ranked last
    missing = sum(x is None for row in doc["scores"].values() for x in row)
    t = Table(title=f"{doc['method']} scores for '{doc['task']}' ({doc['samples']} samples, {doc['seconds']:.1f} s)"
                    + (f"; {missing} scores not finite (n/a)" if missing else ""))
    t.add_column("layer", justify="right")
    t.add_column("experts, most important first (score)")

    def cell(x):
        return "n/a" if x is None else _fmt(x) if abs(x) >= 0.01 else f"{x:.2e}"

    for layer, row in doc["scores"].items():
        order = sorted(range(len(row)), key=lambda e: (-(row[e] if row[e] is not None else float("-inf")), e))
        t.add_row(layer, "  ".join(f"{e} ({cell(row[e])})" for e in order))
    return t


# --------------------------------------------------------------------------- markdown tables

def md_cell(value) -> str:
    """A value as text in a Markdown table cell: its pipes escaped, its line breaks written as \\n (a
    path or argument with a newline split the row), and "<" as an entity (a renderer that allows
    inline HTML took a model's own text for a tag)."""
    text = str(value).replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
    return text.replace("|", "\\|").replace("<", "&lt;")


def md_code(value, *, table: bool = False) -> str:
    """Untrusted text (a scanned model's continuation) as a code span: nothing in it is Markdown or HTML.
    The fence is one backtick longer than any run inside. ``table``: in a table cell, whose pipes GFM
    reads before the span (escaped there; elsewhere a backslash would show, as spans take no escapes)."""
    text = str(value).replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
    text = text.replace("|", "\\|") if table else text
    run = max((len(m) for m in re.findall("`+", text)), default=0)
    fence = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_table(rows: list[dict], *, code: tuple[str, ...] = ()) -> str:
    """A Markdown table of ``rows`` (the first row's keys are the columns); ``code``: columns of
    untrusted text, written as code spans."""
    if not rows:
        return "_none_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(md_cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(md_code(r.get(c, ""), table=True) if c in code else md_cell(r.get(c, "")) for c in cols)
              + " |" for r in rows]
    return "\n".join(lines) + "\n"

