"""How reports word bounds and missing numbers: an upper bound is never shown as exact, a saving
short of 100% never as 100%, a non-finite score as n/a, utility apart from the attack's columns."""

from __future__ import annotations

import io

from rich.console import Console

from moeguard.analysis import savings
from moeguard.report.auditrows import defense_rows, defense_utility_rows
from moeguard.report.defense import extra_labels_text
from moeguard.report.recovery import savings_text
from moeguard.report.tables import scores_table
from moeguard.studies.defend import extra_labels


def _text(table) -> str:
    buf = io.StringIO()
    Console(file=buf, width=200).print(table)
    return buf.getvalue()


def test_extra_labels_say_which_bound_they_are():
    budget = 400
    assert extra_labels_text(extra_labels({"labels_to_target": 100}, {"labels_to_target": 250}, budget)) == "150"
    assert extra_labels_text(extra_labels({"labels_to_target": 100}, {"labels_to_target": None}, budget)) == "≥ 300"
    # the base never reaches the target, the hardened model does at 120: the defense made the attack
    # easier by at least 280 labels, an upper bound on the (negative) extra labels
    assert extra_labels_text(extra_labels({"labels_to_target": None}, {"labels_to_target": 120}, budget)) == "≤ -280"
    assert extra_labels_text(extra_labels({"labels_to_target": None}, {"labels_to_target": None}, budget)) == "neither"
    assert extra_labels_text({"labels": -280.0, "bound": "at most"}, ".1f") == "≤ -280.0"


def test_savings_against_random_are_worded_for_every_case():
    def text(strategy, random, budget=400):
        return savings_text("entropy", {"savings_vs_random": savings(strategy, random, budget=budget)})

    assert text(100, 200) == "50%"
    assert text(100, None) == "≥ 75%"
    assert text(None, 200) == "loses" and text(None, None) == "neither"
    assert text(0, 0) == "– (already at target)"                  # was the bare word "exact"
    assert text(1, 250) == "99.6%" and text(1, 1000, budget=1000) == "99.9%"   # never "100%": one label was needed
    assert text(0, 250) == "100%"
    assert savings_text("random", {"savings_vs_random": savings(1, 1, budget=5)}) == "-"


def test_a_non_finite_attribution_score_is_shown_as_na_and_ranked_last():
    doc = {"method": "gradient", "task": "t", "samples": 8, "seconds": 1.0,
           "scores": {"0": [0.5, None, 0.001, 2.0]}}
    table = scores_table(doc)
    assert "3 (2.00)  0 (0.50)  2 (1.00e-03)  1 (n/a)" in _text(table) and "1 scores not finite" in table.title


def test_the_audit_defense_table_keeps_utility_apart_from_the_attack_columns():
    doc = {"defense": {
        "summaries": {"t": {"2": {"base": {"pruned_retention": 80.0, "realigned_retention": 95.0},
                                  "hardened": {"pruned_retention": 20.0, "realigned_retention": 60.0,
                                               "scratch_retention": 30.0}}}},
        "extra_labels": {"t": {"2": {"labels": -50.0, "bound": "at most"}}},
        "utility": {"t": {"metric": "accuracy", "base": 0.9, "hardened": 0.88, "cost_percent": 2.2}}}}
    rows = defense_rows(doc)
    assert len(rows) == 1 and rows[0]["extra labels"] == "≤ -50.0" and rows[0]["keep"] == "2"
    assert defense_utility_rows(doc) == [{"task": "t", "metric": "accuracy", "base": "0.9", "hardened": "0.88",
                                          "utility cost": "2.2%"}]


def _risk_doc():
    """Two tasks of an 8-expert audit: 'a' re-aligned at --recovery-keep 3, 'b' outside
    --recovery-tasks (attacked by pruning alone at N/4 = 2); 'a' sits just below the 90% line."""
    from moeguard.audit.risk import task_risk

    def entry(recovery):
        methods = {"m": {"retention": {"2": 55.0, "3": 70.0, "4": 89.96}, "retention_above_baseline": {"2": 1.0, "3": 2.0, "4": 3.0}}}
        rec = {"keep": 3, "best": "orphan", "strategies": {
            "random": {"final": 80.0, "labels_to_target": None, "labels": [0, 8]},
            "orphan": {"final": 89.97, "labels_to_target": 0.4, "labels": [0, 8]}}} if recovery else None
        e = {"methods": methods, "recovery": rec, "higher_is_better": True, "metric": "accuracy",
             "full": {"score": 0.9, "baseline": 0.5}}
        return {**e, "risk": task_risk(e, num_experts=8, min_keep=1)}

    return {"tasks": {"a": entry(True), "b": entry(False)}}


def test_the_risk_table_puts_each_tasks_attack_keep_in_its_own_cell_and_never_rounds_onto_the_line():
    """The column was named from each row's keep, and the tables took the first row's names: the
    other task's number was a blank cell (html, md) or sat under the wrong keep (console)."""
    from moeguard.report.audit import _md_table
    from moeguard.report.auditrows import risk_rows

    doc = _risk_doc()
    rows = risk_rows(doc)
    assert list(rows[0]) == list(rows[1])                       # one set of columns for every task
    a, b = rows
    assert a["after attack, its keep"] == "89.9% at 3/layer"     # 89.97 is not printed as the 90.0 of the rule
    assert b["after attack, its keep"] == "55.0% at 2/layer (pruned only)"
    assert a["pruned, 4/layer"] == "89.9%" and a["pruned, 2/layer"] == "55.0%"
    assert a["labels to target"] == "<1" and b["labels to target"] == "–"   # 0.4 labels is not "0"
    md = _md_table(rows)
    assert "89.9% at 3/layer" in md and "55.0% at 2/layer (pruned only)" in md
    r = doc["tasks"]["a"]["risk"]
    assert r["level"] == "low" and "retain 89%" in r["reason"] and "<1 labels" in r["reason"]


def test_console_tables_print_data_with_brackets_as_it_is():
    """rich read `x[i]` as a style (dropped) and `[/INST]` as a closing tag (a MarkupError traceback
    after the scan's files were written)."""
    from rich.table import Table

    from moeguard.cli.app import _console

    t = Table("token", "continuation")
    t.add_row("x[i]", "[/INST] :x: d[key]")
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _console().print(t)
    text = buf.getvalue()
    assert "x[i]" in text and "[/INST] :x: d[key]" in text


def test_a_recovery_point_no_seed_measured_is_null_not_nan():
    import json

    from moeguard.studies.recoverysummary import summarize

    curves = [{"strategy": "random", "seed": s, "points": [{"labels": 0, "retention": None}, {"labels": 8, "retention": None}]}
              for s in range(2)]
    s = summarize(curves, ["random"], target=95.0)["strategies"]["random"]
    assert s["mean"] == [None, None] and s["final"] is None and s["min"] == [None, None]
    json.dumps(s, allow_nan=False)   # valid JSON: NaN is not


def test_a_scanned_model_s_text_and_a_path_cannot_become_markup_in_the_markdown_reports(tmp_path):
    """A suspect's continuation reached scan.md and report.md as Markdown/HTML (an <img> fetched by a preview),
    a path with a newline split the audit's table rows, and a "$" in a model path failed the heat map's
    savefig (matplotlib read it as math) after every hijack search."""
    from moeguard.report.scan import render_markdown
    from moeguard.report.tables import md_table

    doc = {"model": "/ckpts/run|1\nx", "tasks": ["arith-compare"], "ranking": ["0:1"],
           "suspicion": {"null": "siblings", "threshold": 12.1, "score": "chain"}, "flagged": {},
           "experts": [{"layer": 0, "expert": 1, "suspicion": 20.0, "flags": ["backdoor-suspect"],
                        "effect": {"score": 3.0, "start_token": "`x", "continuation": '<img src="https://a/x">![](https://a/p)'}}]}
    md = render_markdown(doc)
    assert "# moeguard scan: /ckpts/run\\|1\\nx\n" in md
    row = next(l for l in md.splitlines() if l.startswith("| 0:1 |"))
    assert "| ``'`x'`` |" in row and "| `'<img src=\"https://a/x\">![](https://a/p)'` |" in row, row   # code spans
    assert md_table([{"model": "a\nb", "why": "<1 labels"}]).splitlines()[2] == "| a\\nb | &lt;1 labels |"
    from moeguard.report.tables import md_code

    assert md_code("/m/a|b") == "`/m/a|b`" and md_code("/m/a|b", table=True) == "`/m/a\\|b`"   # spans take no escapes
    from moeguard.report.routing import hijack_heatmap

    heat = {"model": "/m/$a^^b$", "task": "arith-compare", "config": {"prefix_tokens": 20},
            "targets": [{"layer": 0, "expert": e, "measured": {"success": 0.5, "success_without_prefix": 0.1}}
                        for e in range(2)]}
    hijack_heatmap(heat, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_an_attack_whose_every_run_diverged_is_drawn_as_such_and_each_mode_and_route_has_its_own_line():
    """max() of no labels was a ValueError at the end of the run, again on every resume (its jobs cached);
    every mode but full was drawn in LoRA's colour, and both routes alike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moeguard.report.defense import draw_attack

    def run(mode, route, points):
        return {"kind": "attack", "strategy": "random", "mode": mode, "route": route, "lr": 1e-3, "epochs": 1,
                "seed": 0, "points": points}

    base = {"full": {"score": 0.8}, "higher_is_better": True, "task": "t", "keep": 2, "metric": "accuracy",
            "summary": {"auc": None, "target": 90.0}}
    fig, ax = plt.subplots()
    draw_attack(ax, {**base, "runs": [run("full", "prune", [])] * 3, "worst_case": {"labels": [], "retention": []}})
    assert [t.get_text() for t in ax.texts] == ["every attacker run diverged (3 runs): no curve"]
    plt.close(fig)
    pts = [{"labels": 0, "score": 0.4}, {"labels": 8, "score": 0.6}]
    doc = {**base, "runs": [run("full", "prune", pts), run("router", "prune", pts), run("router", "merge", pts)],
           "worst_case": {"labels": [0, 8], "retention": [50.0, 75.0]}}
    fig, ax = plt.subplots()
    draw_attack(ax, doc)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:4] == ["one attacker run (full)", "one attacker run (router)", "route: prune", "route: merge"]
    drawn = [(l.get_color(), l.get_linestyle()) for l in ax.get_lines() if len(l.get_xdata()) == 2][:3]
    assert drawn == [("C0", "-"), ("C4", "-"), ("C4", "-.")]
    plt.close(fig)
