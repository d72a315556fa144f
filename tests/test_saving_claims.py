"""A strategy 'saves labels' from 10 seeds or more (README's rule, now the code's): a percentile
interval from 2 seeds lies above zero whenever both seeds saved labels, one run in four with no
effect at all, and the audit's table then dropped '(not significant)'."""

import pytest

from moeguard.report.auditrows import best_strategy_text
from moeguard.studies.recoverysummary import MIN_SEEDS, summarize

LABELS = [0, 8, 16, 32]


def _curves(seeds: int) -> list[dict]:
    """orphan reaches 95% at 8 labels on every seed, random at 32: a saving on each seed."""
    out = []
    for seed in range(seeds):
        for strategy, points in (("random", [60.0, 70.0, 80.0, 96.0 + seed % 3]), ("orphan", [60.0, 96.0, 97.0, 98.0])):
            out.append({"strategy": strategy, "seed": seed,
                        "points": [{"labels": l, "retention": r} for l, r in zip(LABELS, points)]})
    return out


@pytest.mark.parametrize("seeds, claim", [(2, None), (MIN_SEEDS - 1, None), (MIN_SEEDS, "orphan")])
def test_a_saving_is_claimed_from_enough_seeds_only(seeds, claim):
    s = summarize(_curves(seeds), ["random", "orphan"], target=95.0)
    o = s["strategies"]["orphan"]
    assert o["savings_vs_random"]["uncertainty"]["ci"]["low"] > 0     # every seed saved labels
    assert o["seeds"] == seeds and s["seeds"] == seeds and s["min_seeds"] == MIN_SEEDS
    assert s["best"] == "orphan" and s["saves_labels"] == claim and o["saves_labels"] is (claim is not None)
    assert s["rule"].endswith(f"from at least {MIN_SEEDS} seeds")


def test_the_audit_table_says_why_the_best_strategy_is_no_claim():
    r = {"best_strategy": "cluster-uncertainty", "best_strategy_saves_labels": False, "recovery_seeds": 2,
         "min_seeds": 10, "strategy_saving_labels": None}
    assert best_strategy_text(r) == "cluster-uncertainty (2 seeds: too few to tell, a claim needs 10)"
    r.update(recovery_seeds=10)
    assert best_strategy_text(r) == "cluster-uncertainty (not significant)"
    # the strategy whose claim holds is named when it is not the largest point saving (it was hidden)
    r.update(strategy_saving_labels="orphan")
    assert best_strategy_text(r) == "cluster-uncertainty (not significant); orphan saves labels"
    r.update(best_strategy="orphan", best_strategy_saves_labels=True)
    assert best_strategy_text(r) == "orphan"
    # a results.json written before the seeds were recorded reads as before
    assert best_strategy_text({"best_strategy": "orphan", "best_strategy_saves_labels": False}) == "orphan (not significant)"
