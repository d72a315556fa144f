"""How reports word bounds and missing numbers: an upper bound is never shown as exact, a saving
short of 100% never as 100%, a non-finite score as n/a, utility apart from the attack's columns."""

from __future__ import annotations

import io

from rich.console import Console

from moeguard.analysis import savings
from moeguard.report.audit import defense_rows, defense_utility_rows
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
