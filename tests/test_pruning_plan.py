"""Scores -> plan: keep, keep-ratio, budget and explicit plans, and their errors."""

import json

import pytest
import torch

from moeguard.attribution.base import Scores
from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.loading import meta_model
from moeguard.pruning.plan import PrunePlan, check_plan, plan_from_scores
from moeguard.testing import tiny_config


def _scores(rows, *, comparable=False, subsets=None) -> Scores:
    rows = torch.tensor(rows, dtype=torch.float64)
    return Scores(method="m", task="t", model="x", samples=1, tokens=1, layers=list(range(rows.shape[0])),
                  num_experts=rows.shape[1], top_k=2, scores=rows, comparable_across_layers=comparable,
                  subsets=subsets or {})


def test_keep_takes_the_top_scored_experts_per_layer():
    s = _scores([[0.1, 0.9, 0.5, 0.2], [0.4, 0.3, 0.2, 0.8]])
    plan = plan_from_scores(s, keep=2)
    assert plan.keep == {0: [1, 2], 1: [0, 3]}
    assert plan.uniform and plan.kept_total == 4
    doc = plan.to_dict()
    assert doc["dropped"] == {"0": [0, 3], "1": [1, 2]} and doc["rule"] == "keep=2"


def test_keep_ratio_rounds_to_a_count():
    s = _scores([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert plan_from_scores(s, keep_ratio=0.5).keep == {0: [4, 5, 6, 7]}


def test_searched_subsets_win_over_ranking():
    s = _scores([[0.1, 0.9, 0.5, 0.2]], subsets={2: {0: [0, 3]}})
    plan = plan_from_scores(s, keep=2)
    assert plan.keep == {0: [0, 3]} and "search" in plan.why
    assert plan_from_scores(s, keep=3).keep == {0: [1, 2, 3]}  # no subset stored for 3


def test_budget_is_exact_and_non_uniform():
    # layer 0 has one dominant expert, layer 1 spreads evenly: shares favour layer 1's experts
    s = _scores([[10.0, 0.1, 0.1, 0.1], [1.0, 1.0, 1.0, 0.9]])
    plan = plan_from_scores(s, budget=5)
    assert plan.kept_total == 5 and not plan.uniform
    assert plan.keep[0] == [0] and plan.keep[1] == [0, 1, 2, 3]


def test_budget_on_comparable_scores_compares_raw_values():
    rows = [[10.0, 5.0, 0.15, 0.1], [0.3, 0.01, 0.0, 0.0]]
    assert plan_from_scores(_scores(rows, comparable=True), budget=4).keep == {0: [0, 1, 2], 1: [0]}
    # the same numbers as per-layer shares: layer 1's second expert outranks layer 0's third
    assert plan_from_scores(_scores(rows), budget=4).keep == {0: [0, 1], 1: [0, 1]}


def test_budget_respects_the_router_minimum():
    # by shares alone layer 1 keeps one expert (its first holds 97% of its score); its router needs two
    s = _scores([[1.0, 1.0, 1.0, 1.0], [10.0, 0.1, 0.1, 0.1]])
    assert plan_from_scores(s, budget=4, min_keep=1).keep == {0: [0, 1, 2], 1: [0]}
    assert plan_from_scores(s, budget=4, min_keep=2).keep == {0: [0, 1], 1: [0, 1]}


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep=0), "at least 1"), (dict(keep=5), "layers have 4"), (dict(keep_ratio=1.5), "ratio"),
    (dict(budget=1), "cannot be split"), (dict(budget=9), "cannot be split"), (dict(), "exactly one"),
    (dict(keep=2, budget=4), "exactly one")])
def test_impossible_plans_are_refused(kwargs, match):
    with pytest.raises(MoeguardError, match=match):
        plan_from_scores(_scores([[1, 2, 3, 4], [1, 2, 3, 4]]), **kwargs)


def test_nan_scores_are_refused():
    with pytest.raises(MoeguardError, match="NaN"):
        plan_from_scores(_scores([[1, float("nan"), 3, 4]]), keep=2)


def test_explicit_plan_round_trip_and_errors(tmp_path):
    plan = PrunePlan.from_dict({"keep": {"0": [3, 1], "1": [0, 2]}})
    assert plan.keep == {0: [3, 1], 1: [0, 2]}
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan_from_scores(_scores([[1, 2, 3, 4]]), keep=2).to_dict()))
    assert PrunePlan.load(p).keep == {0: [2, 3]}
    for bad, match in [({"keep": {}}, "no 'keep'"), ({"keep": {"0": ["a"]}}, "not a list of expert"),
                       ({"keep": {"0": []}}, "keeps no expert"), ([1, 2], "no 'keep'")]:
        with pytest.raises(MoeguardError, match=match):
            PrunePlan.from_dict(bad)


def test_check_plan_against_the_model():
    adapter = MoEAdapter(meta_model(tiny_config("deepseek_v3")))   # layer 0 is dense; min 2 experts
    layers = [l.index for l in adapter.layers]
    ok = PrunePlan.from_dict({"keep": {str(l): [0, 1, 4, 5] for l in layers}})
    assert check_plan(ok, adapter) == {l: [0, 1, 4, 5] for l in layers}
    with pytest.raises(MoeguardError, match="does not name MoE layers"):
        check_plan(PrunePlan.from_dict({"keep": {str(layers[0]): [0, 1]}}), adapter)
    with pytest.raises(MoeguardError, match="do not exist"):
        check_plan(PrunePlan.from_dict({"keep": {str(l): [0, 9] for l in layers}}), adapter)
    with pytest.raises(MoeguardError, match="leaves no valid"):
        check_plan(PrunePlan.from_dict({"keep": {str(l): [3] for l in layers}}), adapter)
    with pytest.raises(MoeguardError, match="not an MoE layer"):
        check_plan(PrunePlan.from_dict({"keep": {"0": [0, 1], **{str(l): [0, 1] for l in layers}}}), adapter)
