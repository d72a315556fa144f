"""Review of attribution/: a reference corpus that is the task itself, --reference for a method that
reads none, a budget-pruned model in the sweep, and the sweep's rank correlation with ablation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from moeguard.cli import main


def _one_line(code, err, needle):
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_a_reference_that_is_the_task_itself_is_refused(tmp_path, capsys):
    out = tmp_path / "s.json"
    code = main(["attribute", "--task", "arith-compare", "--method", "contrastive", "--reference",
                 "arith-compare,stdlib-code", "--samples", "4", "--out", str(out)])
    # every contrastive score was 0 (p = q), and the plan kept experts 0..k-1 by index
    _one_line(code, capsys.readouterr().err, "the reference corpus includes the task 'arith-compare' itself")
    assert not out.exists()


def test_reference_for_a_method_that_reads_none_is_refused(tmp_path, capsys):
    code = main(["attribute", "--task", "arith-compare", "--method", "frequency", "--reference", "stdlib-code",
                 "--out", str(tmp_path / "s.json")])
    _one_line(code, capsys.readouterr().err, "--reference is read only by methods that compare with a reference corpus")


def test_hints_name_every_registered_method_that_fits(tmp_path, capsys, monkeypatch):
    """They named one built-in each (contrastive, router-weighted): a registered method with the same
    flag was never suggested."""
    import dataclasses

    from moeguard.attribution.base import METHODS, get_method
    from moeguard.pruning.merging.base import MERGE_METHODS, get_merge_method

    monkeypatch.setitem(METHODS._items, "contrastive-2", dataclasses.replace(get_method("contrastive"), name="contrastive-2"))
    monkeypatch.setitem(MERGE_METHODS._items, "gate-mine", dataclasses.replace(get_merge_method("router-weighted"),
                                                                              name="gate-mine"))
    code = main(["attribute", "--task", "arith-compare", "--method", "frequency", "--reference", "stdlib-code",
                 "--out", str(tmp_path / "s.json")])
    _one_line(code, capsys.readouterr().err, "use a method that does: contrastive, contrastive-2")
    plan = tmp_path / "plan.json"
    plan.write_text('{"keep": {"0": [0, 1], "1": [0, 1], "2": [0, 1], "3": [0, 1]}}')
    code = main(["merge", "--plan", str(plan), "--method", "average", "--gate", "raw", "--out", str(tmp_path / "m")])
    _one_line(code, capsys.readouterr().err, "use a method that does: gate-mine, router-weighted")


def test_the_sweep_refuses_a_budget_pruned_model_before_the_baseline(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep": {"0": [0, 1, 2, 3], "1": [0, 1, 2, 3, 4, 5], "2": [0, 1, 2, 3], "3": [0, 1, 2, 3]}}))
    assert main(["prune", "--plan", str(plan), "--out", str(tmp_path / "bp")]) == 0
    capsys.readouterr()
    code = main(["sweep", "--model", str(tmp_path / "bp"), "--tasks", "arith-compare", "--methods", "frequency",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    _one_line(code, err, "different expert counts [4, 6]")
    assert "baseline" not in err and not (tmp_path / "run").exists()


def test_the_rank_correlation_with_ablation_is_within_layers():
    """Rescaling one method's layers changes no plan, so it must change no correlation."""
    from moeguard.studies.sweep import SweepConfig, _summaries

    g = torch.Generator().manual_seed(0)
    abl = torch.rand(4, 8, generator=g, dtype=torch.float64)
    noisy = abl + 0.3 * torch.rand(4, 8, generator=g, dtype=torch.float64)
    scaled = noisy * torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=torch.float64)[:, None]
    cfg = SweepConfig(tasks=["t"], methods=["ablation", "reap"], keeps=[2], random_seeds=1)
    task = SimpleNamespace(name="t")

    def rho(reap):
        scores = {"t": {"ablation": SimpleNamespace(scores=abl), "reap": SimpleNamespace(scores=reap)}}
        return _summaries(cfg, [task], [2], [], [], scores)["faithfulness"]["t"]["reap"]["spearman_vs_ablation"]

    assert rho(noisy) == rho(scaled) and 0.5 < rho(noisy) < 1.0


def test_reconstruction_uses_its_whole_token_budget_and_reports_what_it_used():
    """Equal shares per batch left the short batches' unused share out (564 of 600 used, 1226
    reported); shares in proportion to each batch's tokens use the budget whole."""
    import warnings

    from moeguard.attribution.reconstruction import _shares
    from moeguard.attribution.run import make_context, score
    from moeguard.models.loading import load_model

    assert _shares([662, 283, 167, 114], 600) == [324, 138, 82, 56] and sum(_shares([5, 5, 5], 7)) == 7
    m, tok, _ = load_model(None)
    ctx = make_context(m, tok, "stdlib-code", samples=16, options={"reconstruction_tokens": 600})
    total = sum(int(b.attention_mask.sum()) for b in ctx.batches)
    assert total > 600
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = score(ctx, "reconstruction")
    assert s.tokens == 600
    assert any(f"600 of {total} calibration tokens per layer used" in str(w.message) for w in caught)


def test_the_routing_statistics_methods_run_the_head_on_one_position_only():
    from moeguard.attribution.run import make_context, score
    from moeguard.models.loading import load_model

    m, tok, _ = load_model(None)
    seen = []
    handle = m.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    try:
        s = score(make_context(m, tok, "arith-compare", samples=8), "frequency")
    finally:
        handle.remove()
    assert seen and set(seen) == {1} and s.scores.sum() > 0


def test_a_method_removing_one_expert_is_refused_before_the_weights_load(tmp_path, monkeypatch, capsys):
    """ablation, ablation-screened and gradient on a model whose layers cannot lose an expert: the
    refusal came in score(), after the weights loaded and the calibration was tokenized."""
    from moeguard.attribution.run import check_removable
    from moeguard.cli import main
    from moeguard.errors import MoeguardError
    from moeguard.models.families import FAMILIES
    from moeguard.models.handle import ModelHandle
    from moeguard.models.loading import load_model
    from moeguard.testing import tiny_model

    least = FAMILIES.get("phimoe").min_experts
    check_removable("frequency", least, least)
    with pytest.raises(MoeguardError, match="one fewer is below"):
        check_removable("gradient", least, least)
    model = tiny_model("phimoe", num_local_experts=least)
    model.save_pretrained(tmp_path / "m")
    _, tok, _ = load_model(None)
    tok.save_pretrained(tmp_path / "m")

    def too_late(*a, **k):
        raise AssertionError("the weights loaded before the refusal")

    monkeypatch.setattr(ModelHandle, "load", too_late)
    capsys.readouterr()
    assert main(["attribute", "--model", str(tmp_path / "m"), "--task", "arith-compare", "--method", "ablation",
                 "--out", str(tmp_path / "s.json")]) == 2
    assert "removes one expert at a time" in capsys.readouterr().err


def test_a_plan_record_keeps_its_scores_digits():
    """round(x, 9) made a mean-NLL delta of 5e-10 a 0.0 and cut 1e-7 to two digits in the plan a
    pruned checkpoint records: experts ranked apart looked tied."""
    from moeguard.pruning.plan import PrunePlan

    plan = PrunePlan(keep={0: [0]}, num_experts=2, rule="uniform", scores={0: [5.123456789e-10, 1.23456789e-7]})
    assert plan.to_dict()["scores"]["0"] == [5.12345678900e-10, 1.23456789e-7]
