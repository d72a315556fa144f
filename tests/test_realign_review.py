"""realign, from a read-only review (2026-12-07): protocols of every mode, the original's memory,
the orphan strategy's windows, settings that must not restart a run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moeguard.cli import main

KEEP2 = {"keep": {str(l): [0, 1] for l in range(4)}}
FAST = ["--task", "arith-compare", "--budget", "8", "--query-size", "8", "--min-steps", "5", "--epochs", "1",
        "--eval-limit", "16", "--pool-size", "32"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    d = tmp_path_factory.mktemp("pruned")
    (d / "plan.json").write_text(json.dumps(KEEP2))
    assert main(["prune", "--plan", str(d / "plan.json"), "--out", str(d / "keep2")]) == 0
    return d / "keep2"


@pytest.mark.parametrize("mode, patterns, trained", [
    ("router", ["*.mlp.gate.*"], "block_sparse_moe.gate."),   # on disk: the checkpoint's own names
    ("experts", ["model.layers.1.mlp.experts.*"], "layers.1.block_sparse_moe.experts."),
    ("full", ["*.self_attn.q_proj.*"], "self_attn.q_proj."),
])
def test_a_protocol_of_a_mode_other_than_lora_is_checked_and_trains_what_it_authorizes(pruned, tmp_path, mode, patterns,
                                                                                      trained):
    """The check ran the mode on the meta model, whose every parameter is on "meta", and read them
    all as offloaded to disk: every router, experts or full protocol was refused."""
    proto = tmp_path / "moeguard_protocol.json"
    proto.write_text(json.dumps({"schema": "moeguard.protocol/1", "modes": [mode], "authorized_parameters": patterns}))
    out = tmp_path / "run"
    assert main(["realign", "--model", str(pruned), *FAST, "--mode", mode, "--protocol", str(proto),
                 "--out", str(out)]) == 0
    before, after = load_file(str(pruned / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(trained in n for n in changed), sorted(changed)


def test_orphan_with_an_original_of_other_experts_is_one_line(pruned, tmp_path, capsys):
    """An --original that is not the pruned model's source failed at the first round, after both
    models loaded, with an IndexError traceback."""
    other = tmp_path / "other"
    (tmp_path / "p.json").write_text(json.dumps({"keep": {str(l): [0, 1, 2, 3] for l in range(4)}}))
    assert main(["prune", "--plan", str(tmp_path / "p.json"), "--out", str(other)]) == 0
    capsys.readouterr()
    from moeguard.models.handle import ModelHandle

    loads = []
    real_load = ModelHandle.load
    with pytest.MonkeyPatch.context() as mp:   # refused from the configs: neither model loads (the original did)
        mp.setattr(ModelHandle, "load", lambda self, *a, **k: (loads.append(self.name), real_load(self, *a, **k))[1])
        code = main(["realign", "--model", str(pruned), *FAST, "--strategy", "orphan", "--original", str(other),
                     "--out", str(tmp_path / "run")])
    assert loads == [], loads
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("Loading weights")]
    assert code == 2 and len(err) == 1, err
    assert "is not the model this checkpoint was pruned from" in err[0] and "[4] experts" in err[0], err[0]
    assert not (tmp_path / "run").exists()


def test_orphan_shares_read_the_original_s_positions_only():
    """The orphan strategy's routing shares were read on the task's windows (wikitext's 512 on the
    embedded model's 256 positions)."""
    import dataclasses

    from moeguard.models.loading import load_model
    from moeguard.realign.loop import label_pool
    from moeguard.realign.strategies.orphan import orphan_shares
    from moeguard.tasks.registry import get_task

    model, tok, _ = load_model(None)
    task = get_task("arith-compare")
    pool = label_pool(task, pool_size=8, budget=8, seed=0)
    keep = {str(l): [0, 1] for l in range(4)}
    want = orphan_shares(model, tok, task, keep, 8)(pool)
    with pytest.warns(UserWarning, match="has max_length 4096, and the model has 256 positions"):
        got = orphan_shares(model, tok, dataclasses.replace(task, max_length=4096), keep, 8)(pool)
    assert torch.equal(got, want) and want.shape == (8,) and bool((want > 0).all())


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("was", [False, True])
def test_fine_tuning_gives_the_model_back_in_the_mode_it_had(mode, was):
    """peft's wrapper is made in train mode: LoRA gave the base back training (dropout, router
    jitter on) to a library caller that had it in eval mode."""
    from moeguard.realign.engine import FinetuneConfig, finetune
    from moeguard.realign.modes import apply_mode
    from moeguard.tasks.batches import IGNORE, Example
    from moeguard.testing import tiny_model

    model = tiny_model("mixtral").train(was)
    t = apply_mode(model, mode)
    ex = [Example(list(range(1, 9)), [IGNORE] * 3 + list(range(4, 9))) for _ in range(4)]
    finetune(t, ex, FinetuneConfig(mode=mode, min_steps=2, epochs=1, batch_size=2), pad_id=0)
    base = t.release()
    assert {m.training for m in base.modules()} == {was}


def test_a_negative_gradient_clip_is_refused():
    from moeguard.errors import MoeguardError
    from moeguard.realign.engine import FinetuneConfig

    with pytest.raises(MoeguardError, match="grad_clip"):
        FinetuneConfig(grad_clip=-1.0)
    assert FinetuneConfig(grad_clip=0.0).grad_clip == 0.0


def test_another_save_every_resumes_the_run(pruned, tmp_path):
    """--save-every (how often a running fine-tune is checkpointed) was in the run's key: a rerun
    with another value threw every finished round away."""
    from moeguard.testing import kill_cli_when

    args = ["realign", "--model", str(pruned), "--task", "arith-compare", "--budget", "24", "--query-size", "8",
            "--min-steps", "30", "--epochs", "1", "--eval-limit", "16", "--pool-size", "64", "--seed", "5"]
    straight = tmp_path / "straight"
    assert main([*args, "--save-every", "5", "--out", str(straight)]) == 0
    out = tmp_path / "killed"
    state = tmp_path / ".killed.partial" / "state"

    def in_round_two() -> bool:
        try:
            return (state / "finetune" / "state.json").exists() and \
                len(json.loads((state / "loop.json").read_text())["rounds"]) >= 2
        except (OSError, ValueError):
            return False

    kill_cli_when([*args, "--save-every", "5", "--out", str(out)], in_round_two)
    done = json.loads((state / "loop.json").read_text())["rounds"]
    assert main([*args, "--save-every", "7", "--out", str(out)]) == 0
    a = json.loads((straight / "learning_curve.json").read_text())
    b = json.loads((out / "learning_curve.json").read_text())
    assert [p["score"] for p in b["points"]] == [p["score"] for p in a["points"]]
    # the killed run's rounds were kept as they were, timings included, and the running one resumed
    assert b["points"][:len(done)] == done
    assert any(p.get("finetune", {}).get("resumed_from", 0) > 0 for p in b["points"]), "nothing was resumed"


def test_an_offloaded_model_is_refused_before_the_first_round(pruned, tmp_path, capsys, monkeypatch):
    """Under a device map that spills to the CPU or disk, LoRA trained every round and the merged
    save then failed, on every rerun too."""
    import moeguard.realign.offload as offload

    monkeypatch.setattr(offload, "offloaded", lambda model: True)
    capsys.readouterr()
    code = main(["realign", "--model", str(pruned), *FAST, "--mode", "lora", "--out", str(tmp_path / "run")])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("Loading weights")]
    assert code == 2 and len(err) == 1 and "cannot be done on offloaded ones" in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


def test_an_original_of_other_experts_is_refused_for_retention_too(pruned, tmp_path, capsys):
    other = tmp_path / "other"
    (tmp_path / "p.json").write_text(json.dumps({"keep": {str(l): [0, 1, 2, 3] for l in range(4)}}))
    assert main(["prune", "--plan", str(tmp_path / "p.json"), "--out", str(other)]) == 0
    capsys.readouterr()
    code = main(["realign", "--model", str(pruned), *FAST, "--original", str(other), "--out", str(tmp_path / "run")])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("Loading weights")]
    assert code == 2 and len(err) == 1 and "is not the model this checkpoint was pruned from" in err[0], err


def test_an_accelerate_mixed_precision_in_the_environment_is_not_taken(monkeypatch):
    """ACCELERATE_MIXED_PRECISION=fp16 made accelerate scale the loss by ~65536 for backward while
    the clip read the scaled gradients: every step clipped (on a GPU; on the CPU it is not applied,
    so the test reads the precision accelerate was set to)."""
    import accelerate

    from moeguard.realign.engine import FinetuneConfig, finetune
    from moeguard.realign.modes import apply_mode
    from moeguard.tasks.batches import IGNORE, Example
    from moeguard.testing import tiny_model

    made = []

    class Recording(accelerate.Accelerator):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self.mixed_precision)
    monkeypatch.setattr(accelerate, "Accelerator", Recording)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    ex = [Example(list(range(1, 9)), [IGNORE] * 3 + list(range(4, 9))) for _ in range(4)]
    finetune(apply_mode(tiny_model("mixtral"), "full"), ex, FinetuneConfig(mode="full", min_steps=2, epochs=1,
                                                                          batch_size=2), pad_id=0)
    assert made == ["no"]


def test_a_budget_pruned_original_passes_the_original_check(tmp_path):
    """Pruning an already budget-pruned checkpoint records original_num_experts (the widest layer's)
    and each layer's own count: the check compared every layer with the widest and refused it."""
    from moeguard.models.prune import prune_model
    from moeguard.realign.api import check_original
    from moeguard.testing import tiny_model
    from moeguard.models.adapter import MoEAdapter
    from moeguard.errors import MoeguardError

    model = tiny_model("mixtral")
    layers = [l.index for l in MoEAdapter(model).layers]
    budget, _ = prune_model(model, {layers[0]: [0, 1], layers[1]: [0, 1, 2, 3, 4, 5]})
    counts = {str(l.index): l.num_experts for l in MoEAdapter(budget).layers}
    budget.save_pretrained(tmp_path / "budget")   # checked as realign checks it: by its handle, from the config
    from moeguard.edge import resolve_model

    budget = resolve_model(str(tmp_path / "budget"), tasks=False)
    record = {"original_num_experts": 8, "original_experts_per_layer": counts,
              "keep": {str(layers[0]): [1], str(layers[1]): [0, 5]}}
    check_original(budget, record, "again")
    with pytest.raises(MoeguardError, match="is not the model this checkpoint was pruned from"):
        check_original(budget, {**record, "keep": {str(layers[0]): [3]}}, "again")   # layer 0 has 2 experts


def test_a_recorded_source_missing_here_is_not_needed_with_a_full_score_and_named_when_it_is(pruned, tmp_path, capsys):
    """A checkpoint copied to another machine names a source path that is not there: with --full-score
    (and a strategy that does not read the original) it is not needed; orphan says where it came from."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(pruned, moved)
    rec = json.loads((moved / "moeguard_pruning.json").read_text())
    rec["source"] = str(tmp_path / "gone")
    (moved / "moeguard_pruning.json").write_text(json.dumps(rec))
    capsys.readouterr()
    assert main(["realign", "--model", str(moved), *FAST, "--full-score", "90", "--strategy", "random",
                 "--out", str(tmp_path / "r")]) == 0
    assert main(["realign", "--model", str(moved), *FAST, "--strategy", "orphan", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"moeguard_pruning.json names its source '{tmp_path / 'gone'}', which cannot be used here" in err, err
    assert "--original PATH" in err


def test_kept_state_a_power_loss_left_empty_is_started_over_not_a_traceback(tmp_path):
    """The round's weights were renamed into place unsynced: after a power loss an empty
    current.safetensors beside loop.json failed every rerun in load_file (a SafetensorError); a
    scan part left empty failed in json.loads."""
    from moeguard.realign.loop import _load_state
    from moeguard.scan.run import _part

    (tmp_path / "loop.json").write_text(json.dumps({"tag": "t", "rounds": [{"labels": 0}, {"labels": 8}]}))
    (tmp_path / "current.safetensors").write_bytes(b"")
    # with two rounds done the next selection reads the trained weights: they must be there
    assert _load_state(tmp_path, "t", lambda done: done > 1) == {"tag": "t", "rounds": []}
    from moeguard.studies.engine import digest

    (tmp_path / f"part-x-{digest({'a': 1})}.json").write_text("")
    assert _part(tmp_path, "x", lambda: {"v": 2}, {"a": 1}) == {"v": 2}


def test_an_out_holding_the_recorded_source_is_refused_even_when_it_is_not_read(pruned, tmp_path, capsys):
    """With --full-score and a strategy that does not read the original, the check that --out is not the
    recorded source was skipped: --overwrite then replaced the unpruned checkpoint."""
    import shutil

    moved, source = tmp_path / "moved", tmp_path / "source"
    shutil.copytree(pruned, moved)
    source.mkdir()
    (source / "config.json").write_text("{}")
    rec = json.loads((moved / "moeguard_pruning.json").read_text())
    rec["source"] = str(source)
    (moved / "moeguard_pruning.json").write_text(json.dumps(rec))
    capsys.readouterr()
    assert main(["realign", "--model", str(moved), *FAST, "--full-score", "90", "--strategy", "random",
                 "--out", str(source), "--overwrite"]) == 2
    assert "is (or holds) the input" in capsys.readouterr().err
    assert (source / "config.json").read_text() == "{}"


def test_a_full_score_that_is_no_score_is_refused(pruned, tmp_path, capsys):
    """--full-score nan, inf or 0 (a higher-is-better metric) made every retention null, written with
    exit 0, and the original was never evaluated."""
    for bad in ("nan", "inf", "0"):
        capsys.readouterr()
        assert main(["realign", "--model", str(pruned), *FAST, "--full-score", bad, "--out", str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert "--full-score is" in err and "expected the original's finite score" in err, err
        assert not (tmp_path / bad).exists()
    # a perplexity (lower is better) of 0 or below: every retention was 0% or negative, with exit 0
    for bad in ("0", "-5"):
        capsys.readouterr()
        assert main(["realign", "--model", str(pruned), *FAST, "--task", "stdlib-docs", "--full-score", bad,
                     "--out", str(tmp_path / f"lm{bad}")]) == 2
        err = capsys.readouterr().err
        assert f"--full-score is {float(bad)}; expected the original's finite score on stdlib-docs, above 0" in err, err
        assert err.count("\n") == 1 and not (tmp_path / f"lm{bad}").exists()


def test_gradient_accumulation_in_the_environment_is_not_taken_and_steps_round_first(monkeypatch):
    """ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4 made backward divide every loss by 4 with nothing
    accumulated; epochs 1.1 of 50 examples was 55.00000000000001 steps, which ceil made 56."""
    from moeguard.realign.engine import FinetuneConfig, finetune
    from moeguard.realign.modes import apply_mode
    from moeguard.tasks.batches import IGNORE, Example
    from moeguard.testing import tiny_model

    assert FinetuneConfig(mode="full", epochs=1.1, batch_size=1, min_steps=0).steps_for(50) == 55
    ex = [Example(list(range(1, 9)), [IGNORE] * 3 + list(range(4, 9))) for _ in range(4)]
    cfg = FinetuneConfig(mode="full", min_steps=3, epochs=1, batch_size=2)

    def run():
        m = apply_mode(tiny_model("mixtral"), "full")
        finetune(m, ex, cfg, pad_id=0)
        return [p.detach().clone() for p in m.model.parameters()]

    plain = run()
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    accumulated = run()
    assert all(torch.equal(a, b) for a, b in zip(plain, accumulated))


def test_a_model_whose_outputs_are_not_finite_is_one_error_for_every_strategy_that_reads_them(monkeypatch):
    """cluster-uncertainty's weighted draw raised ValueError (a traceback, on every rerun); the others
    ranked NaN in an arbitrary order."""
    import random

    from moeguard.errors import MoeguardError
    from moeguard.realign import features
    from moeguard.realign.strategies.base import STRATEGIES, Query
    from moeguard.tasks.registry import get_task

    task = get_task("arith-compare")
    n = 12
    monkeypatch.setattr(features, "embeddings", lambda *a, **k: torch.full((n, 4), float("nan")))
    monkeypatch.setattr(features, "class_probs", lambda *a, **k: torch.full((n, 2), float("nan")))
    monkeypatch.setattr(features, "sequence_uncertainty", lambda *a, **k: (torch.full((n,), float("nan")),) * 2)
    pool = [{"input": f"x{i}"} for i in range(n)]
    for name in ("least-confidence", "margin", "entropy", "coreset", "cluster-uncertainty"):
        q = Query(model=None, tokenizer=None, task=task, pool=pool, candidates=list(range(n)), labeled=[], k=4,
                  rng=random.Random(0))
        with pytest.raises(MoeguardError, match=r"are not finite \(NaN or inf\): the strategy cannot rank"):
            STRATEGIES[name].select(q)
    # random reads no outputs
    assert len(STRATEGIES["random"].select(Query(model=None, tokenizer=None, task=task, pool=pool,
                                                 candidates=list(range(n)), labeled=[], k=4, rng=random.Random(0)))) == 4


def test_a_token_the_model_rules_out_adds_nothing_to_the_entropy():
    from moeguard.realign.features import _token_means

    logp = torch.log_softmax(torch.tensor([[[0.0, 0.0, float("-inf")]]]), -1)   # [1, 1, 3]: two tokens at 1/2
    nll, ent = _token_means(logp, torch.tensor([[0]]), torch.ones(1, 1))
    assert float(ent) == pytest.approx(float(torch.log(torch.tensor(2.0)))) and float(nll) == pytest.approx(0.6931, abs=1e-4)


def test_a_merged_checkpoint_is_re_aligned_against_its_recorded_source_and_keeps_its_record(tmp_path, capsys):
    """Only moeguard_pruning.json was read: a merged checkpoint had no original (retention silently null),
    orphan was refused with a hint to prune, and the output carried no record of where it came from."""
    plan = tmp_path / "clusters.json"
    plan.write_text(json.dumps({"clusters": {str(l): [[0, 4], [1, 5], [2, 6], [3, 7]] for l in range(4)}}))
    merged = tmp_path / "merged"
    assert main(["merge", "--plan", str(plan), "--method", "average", "--out", str(merged)]) == 0
    written = json.loads((merged / "moeguard_merging.json").read_text())
    out = tmp_path / "realigned"
    capsys.readouterr()
    assert main(["realign", "--model", str(merged), *FAST, "--strategy", "orphan", "--out", str(out)]) == 0
    curve = json.loads((out / "learning_curve.json").read_text())
    assert curve["points"] and all(p["retention"] is not None for p in curve["points"]), curve["points"]
    assert json.loads((out / "moeguard_merging.json").read_text()) == written
    assert not (out / "moeguard_pruning.json").exists()
