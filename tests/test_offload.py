"""Bigger than memory: ``--max-memory`` loads through accelerate's disk offload (weights on "meta"
except while their module runs), and every number stays the one of the model held in memory."""

from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path

import pytest
import torch

from moeguard.attribution.run import make_context, score
from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.hooks import mask_experts
from moeguard.models.loading import load_model
from moeguard.models.placement import parse_memory
from moeguard.testing import causal_families, tiny_model
from conftest import THREADS

EMBEDDED_BYTES = 15_000_000   # the embedded model in float32, about 15.6 MB


def offload_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("moeguard-offload-*"))


@pytest.fixture(autouse=True)
def own_temp_dir(tmp_path, monkeypatch):
    """Each test's temporary folders in its own place: the other test worker's capped loads made
    offload folders in the shared /tmp while a test counted them."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))


@pytest.fixture(scope="module")
def pair():
    full, tok, _ = load_model(None)
    off, _, _ = load_model(None, max_memory=4 * 2**20, with_tokenizer=False)
    return full, off, tok


def test_memory_sizes_parse_and_bad_ones_say_how_to_write_them():
    assert parse_memory("8GiB") == 8 * 2**30 and parse_memory("512MB") == 512 * 10**6
    assert parse_memory("1.5G") == int(1.5 * 2**30) and parse_memory(" 2 mib ") == 2 * 2**20
    assert parse_memory("4194304") == 4 * 2**20
    for bad, needle in (("lots", "is not a memory size"), ("8 GiBs", "is not a memory size"),
                        ("-1G", "is not a memory size"), ("100KiB", "is 102400 bytes")):
        with pytest.raises(MoeguardError, match=needle) as e:
            parse_memory(bad)
        assert "GiB" in e.value.hint


def test_a_capped_load_keeps_the_weights_off_memory_and_removes_its_folder_with_the_model():
    before = offload_folders()
    m, _, _ = load_model(None, max_memory=4 * 2**20, with_tokenizer=False)
    assert {p.device.type for p in m.parameters()} == {"meta"}   # nothing resident under a cap below its size
    made = offload_folders() - before
    assert len(made) == 1 and any(next(iter(made)).iterdir())
    del m
    gc.collect()
    assert not (offload_folders() - before)


def test_a_capped_load_that_fails_leaves_no_offload_folder(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path / "m")   # no tokenizer files
    before = offload_folders()
    with pytest.raises(MoeguardError, match="cannot load the tokenizer"):
        load_model(str(tmp_path / "m"), max_memory=1000)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(MoeguardError, match="is not a valid safetensors file"):
        load_model(str(tmp_path / "m"), max_memory=1000, with_tokenizer=False)
    assert not (offload_folders() - before)


@pytest.mark.parametrize("method", [m.name for m in __import__("moeguard.attribution.base", fromlist=["x"]).list_methods()])
def test_every_attribution_method_scores_an_offloaded_model_as_the_model_in_memory(pair, method):
    full, off, tok = pair
    scores = []
    for m in (full, off):
        ctx = make_context(m, tok, "arith-compare", samples=8, batch_size=4, seed=0)
        scores.append(score(ctx, method).to_dict()["scores"])
    if method == "frequency":
        assert scores[0] == scores[1]   # routing shares: the same choices
        return
    # an offloaded layer's weights come back from disk in buffers of another alignment; on some CPUs
    # (an AMD EPYC, 2026-12-02) the experts' grouped matmul then takes another kernel and a layer's
    # output moves in the last bit (1.2e-7), which loss-based scores and REAP's expert-output norms
    # carry (5e-8 relative at most), and so do the router scores of the layers after it (gate: 4e-9 in
    # the last layer on the calibration sample drawn from the whole split, 2026-12-04; equal on others)
    for layer in scores[0]:
        torch.testing.assert_close(torch.tensor(scores[1][layer]), torch.tensor(scores[0][layer]),
                                   rtol=1e-6, atol=1e-9)


# families whose transformers forward fails under accelerate's offload, with or without moeguard
_OFFLOAD_BROKEN = {
    "llama4": "transformers' Llama-4 sends input_ids to embed_tokens.weight.device, 'meta' when offloaded",
    "dbrx": "transformers' DbrxExperts reads its mlp's w1/v1/w2 outside the mlp's forward, where accelerate's "
            "per-module hook has them on 'meta'"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.xfail(
    strict=True, raises=NotImplementedError, reason=_OFFLOAD_BROKEN[f]))
    if f in _OFFLOAD_BROKEN else f for f in causal_families()])
def test_masked_routing_runs_inside_accelerates_hooks_on_every_family(family, tmp_path):
    # the masked router replaces the router's forward: offloaded, it must run where the hook has
    # put the weights in place (it used to read "meta")
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "m")
    off, _, _ = load_model(str(tmp_path / "m"), max_memory=1000, with_tokenizer=False)
    assert all(p.device.type == "meta" for p in off.parameters())
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    keep = {layer.index: [0, 1, 2] for layer in MoEAdapter(model).layers}
    with torch.no_grad(), mask_experts(model, keep):
        want = model(input_ids=ids).logits
    with torch.no_grad(), mask_experts(off, keep):
        got = off(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_cli_eval_and_attribute_under_a_cap_write_the_numbers_of_an_uncapped_run(tmp_path, capsys):
    tasks = "arith-compare,stdlib-docs,record-summary"   # log-likelihoods, perplexity, generation
    assert main(["eval", "--tasks", tasks, "--limit", "8", "--out", str(tmp_path / "a.json")]) == 0
    assert main(["eval", "--tasks", tasks, "--limit", "8", "--out", str(tmp_path / "b.json"), "--max-memory", "4MiB"]) == 0
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert {t: r["score"] for t, r in a["tasks"].items()} == {t: r["score"] for t, r in b["tasks"].items()}
    assert b["run"]["settings"]["max_memory"] == 4 * 2**20
    assert main(["attribute", "--task", "arith-compare", "--method", "gate", "--samples", "8", "--max-memory", "4MiB",
                 "--out", str(tmp_path / "s.json")]) == 0
    assert main(["attribute", "--task", "arith-compare", "--method", "gate", "--samples", "8",
                 "--out", str(tmp_path / "s0.json")]) == 0
    capped, whole = (json.loads((tmp_path / f).read_text()) for f in ("s.json", "s0.json"))
    assert capped["scores"].keys() == whole["scores"].keys() and capped["tokens"] == whole["tokens"] > 0
    for layer, row in whole["scores"].items():   # the same routing read under the cap
        assert capped["scores"][layer] == pytest.approx(row, rel=1e-6, abs=1e-9), layer
    capsys.readouterr()
    assert main(["attribute", "--task", "arith-compare", "--method", "gate", "--samples", "8", "--max-memory", "lots",
                 "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-memory 'lots' is not a memory size" in err and "8GiB" in err
    assert not (tmp_path / "t.json").exists()


def test_an_audit_under_a_cap_gives_the_numbers_of_an_uncapped_one_and_refuses_in_memory_stages(tmp_path, capsys):
    from moeguard.audit.results import numbers_only

    args = ["--tasks", "arith-compare", "--methods", "frequency,gate", "--keeps", "2,4", "--random-seeds", "1",
            "--eval-limit", "16", "--samples", "8", "--no-recovery", "--threads", str(THREADS)]
    assert main(["audit", "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["audit", "--out", str(tmp_path / "b"), *args, "--max-memory", "4MiB"]) == 0
    a, b = (json.loads((tmp_path / x / "results.json").read_text()) for x in "ab")
    assert b["config"]["max_memory"] == "4MiB"
    for doc in (a, b):
        doc["config"].pop("max_memory")
    checks = b.pop("physical_checks")
    a.pop("physical_checks")
    assert numbers_only(a) == numbers_only(b)
    # a physical check prunes a copy in memory: skipped under the cap, and saying why
    assert checks and all("offloaded (max_memory)" in c["skipped"] for c in checks)
    # the headline says what the ratings rest on
    assert ("The recovery study was not run (under `--max-memory 4MiB` it runs only with `--recovery-mode lora`"
            in (tmp_path / "b" / "report.md").read_text())
    assert "The recovery study was not run: these ratings rest on pruning alone" in (tmp_path / "a" / "report.md").read_text()
    assert "under <code>--max-memory 4MiB</code>" in (tmp_path / "b" / "report.html").read_text()
    capsys.readouterr()
    # stages that need the model in memory refuse before any work, one line each
    for extra, needles in (
            (["--scan"], ("with the scan stage(s)", "leave out --defense, --hardened and --scan")),
            (["--no-recovery", "--defense", "entangle"], ("with the defense stage(s)",)),
            (["--recovery-mode", "full"], ("recovery mode 'full', which trains weights that are offloaded",
                                           "use --recovery-mode lora", "or --no-recovery")),
            # --no-recovery was the suggested fix, and the sweep stage merges in memory too
            (["--recovery-mode", "lora", "--route", "prune,merge"], ("is set with the merge route",
                                                                     "use --route prune under a cap")),
            (["--no-recovery", "--route", "prune,merge"], ("is set with the merge route", "use --route prune"))):
        assert main(["audit", "--out", str(tmp_path / "c"), "--max-memory", "4MiB", *args[:-3], *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(n in err for n in needles), (extra, err)
        assert not (tmp_path / "c").exists()


def test_an_audit_recovers_under_a_cap_with_lora_as_it_does_in_memory(tmp_path):
    """--recovery-mode lora under --max-memory: the pruned copy is streamed to disk and loaded under
    the cap, the adapters train over its offloaded weights; the numbers equal an uncapped LoRA
    audit's, the trace (which reads every weight) is skipped and says why."""
    import tempfile

    from moeguard.audit.results import numbers_only
    from moeguard.studies.engine import Context

    pruned_folders = lambda: set(Path(tempfile.gettempdir()).glob("moeguard-pruned-*"))  # noqa: E731
    before = pruned_folders()
    args = ["--tasks", "arith-compare", "--methods", "frequency", "--keeps", "2", "--random-seeds", "1",
            "--eval-limit", "16", "--samples", "8", "--threads", str(THREADS), "--recovery-mode", "lora",
            "--strategies", "random", "--budgets", "4,8", "--recovery-seeds", "1", "--pool-size", "16",
            "--recovery-eval-limit", "16"]
    assert main(["audit", "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["audit", "--out", str(tmp_path / "b"), *args, "--max-memory", "4MiB"]) == 0
    a, b = (json.loads((tmp_path / x / "results.json").read_text()) for x in "ab")
    ra, rb = a["tasks"]["arith-compare"]["recovery"], b["tasks"]["arith-compare"]["recovery"]
    assert ra["detectability"]["verdict"] == "derived"
    assert "offloaded (max_memory)" in rb["detectability"]["skipped"] and set(rb["detectability"]) == {"skipped"}
    ra.pop("detectability"), rb.pop("detectability")
    assert b["config"]["recovery_mode"] == "lora" and ra and numbers_only(ra) == numbers_only(rb)
    assert numbers_only(a["tasks"]) == numbers_only(b["tasks"])
    # untraced curves and a sweep with skipped physical checks have stage keys of their own (the cap
    # is in no other key): a rerun without the cap in the same folder recomputes them rather than
    # reporting a skipped trace or skipped checks; the stages the cap changes nothing in are shared
    keys = {x: {s["stage"]: s["key"] for s in d["stages"]} for x, d in (("a", a), ("b", b))}
    assert keys["a"]["sweep"] != keys["b"]["sweep"] and keys["a"]["recovery"] != keys["b"]["recovery"]
    assert keys["a"]["baseline"] == keys["b"]["baseline"] and keys["a"]["attribution"] == keys["b"]["attribution"]
    # the capped pruned copy was written by streaming surgery, not sliced in memory
    rec = {x: json.loads((tmp_path / x / "stages" / "recovery" / "recovery" / "arith-compare.json").read_text())["record"]
           for x in "ab"}
    assert rec["b"].pop("method") == "streaming" and "method" not in rec["a"] and rec["a"] == rec["b"]
    # the copy the curves trained was offloaded, and lives as long as the study engine caches it
    from moeguard.realign.offload import offloaded

    assert Context._derived and all(offloaded(m) for m in Context._derived.values())
    Context._derived.clear()
    Context._models.clear()
    gc.collect()
    assert not (pruned_folders() - before)


def test_a_capped_merge_calibrates_offloaded_and_streams_the_in_memory_merge(tmp_path, capsys, monkeypatch):
    """``merge --max-memory``: calibration on the model loaded under the cap, the plan it computes
    streamed onto the safetensors files; the checkpoint equals the in-memory merge's."""
    from moeguard.testing import checkpoint_tensors

    m, tok, _ = load_model(None)
    src = tmp_path / "src"
    m.save_pretrained(src)
    tok.save_pretrained(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    scores = tmp_path / "scores.json"
    assert main(["attribute", "--model", str(src), "--task", "arith-compare", "--method", "frequency", "--samples", "8",
                 "--out", str(scores)]) == 0
    common = ["merge", "--model", str(src), "--scores", str(scores), "--keep", "4", "--method", "hc-smoe",
              "--samples", "8", "--tokens", "32"]
    assert main([*common, "--in-memory", "--out", str(tmp_path / "mem")]) == 0
    folders = offload_folders()
    capsys.readouterr()
    from moeguard.models import placement

    # as on a GPU machine: a capped load without --device-map is auto, its record says so (it said the CPU)
    with monkeypatch.context() as mp:   # (undo() would also undo own_temp_dir's folder)
        mp.setattr(placement, "placed_on", lambda device_map, capped=False: "cuda")
        assert main([*common, "--max-memory", "4MiB", "--out", str(tmp_path / "cap")]) == 0
    assert "(hc-smoe: hierarchical clustering (average linkage) on mean expert outputs; frequency-weighted average, streaming)" in capsys.readouterr().out
    assert not (offload_folders() - folders)                                     # the offload folder is gone
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before             # the input is only read
    rec = {x: json.loads((tmp_path / x / "moeguard_merging.json").read_text()) for x in ("mem", "cap")}
    assert rec["cap"]["pruning"]["method"] == "streaming" and rec["cap"]["run"]["settings"]["max_memory"] == 4 * 2**20
    assert (rec["cap"]["run"]["settings"]["device_map"], rec["cap"]["run"]["settings"]["placed_on"]) == ("auto", "cuda")
    assert rec["cap"]["plan"] == rec["mem"]["plan"] and rec["cap"]["merges"] == rec["mem"]["merges"]
    assert rec["cap"]["calibration"] == rec["mem"]["calibration"]
    a, b = checkpoint_tensors(tmp_path / "mem"), checkpoint_tensors(tmp_path / "cap")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a capped merge always streams: --in-memory with it is one line, before any weights load
    assert main([*common, "--max-memory", "4MiB", "--in-memory", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-memory streams the merge" in err and "drop --in-memory" in err
    assert not (tmp_path / "x").exists()


def test_a_capped_merge_killed_while_it_writes_resumes_without_calibrating_again(tmp_path, monkeypatch):
    """The capped calibration's plan is kept beside --out until the checkpoint is in place: the rerun
    streams it without loading the model under the cap, and writes the checkpoint an uninterrupted
    run writes."""
    from moeguard.edge import ModelHandle
    from moeguard.pruning import checkpoint
    from moeguard.testing import checkpoint_tensors

    m, tok, _ = load_model(None)
    src = tmp_path / "src"
    m.save_pretrained(src)
    tok.save_pretrained(src)
    scores = tmp_path / "scores.json"
    assert main(["attribute", "--model", str(src), "--task", "arith-compare", "--method", "frequency", "--samples", "8",
                 "--out", str(scores)]) == 0
    common = ["merge", "--model", str(src), "--scores", str(scores), "--keep", "4", "--method", "hc-smoe",
              "--samples", "8", "--tokens", "32", "--max-memory", "4MiB"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / ".whole.merge-plan.json").exists()          # gone once the checkpoint is in place

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "prune_checkpoint", killed)
        assert main([*common, "--out", str(tmp_path / "cut")]) == 130
    assert (tmp_path / ".cut.merge-plan.json").is_file() and not (tmp_path / "cut").exists()

    def no_load(*a, **k):
        raise AssertionError("the model was loaded and calibrated again")

    with monkeypatch.context() as mp:
        mp.setattr(ModelHandle, "load", no_load)
        assert main([*common, "--out", str(tmp_path / "cut")]) == 0
    rec = {x: json.loads((tmp_path / x / "moeguard_merging.json").read_text()) for x in ("whole", "cut")}
    assert rec["cut"]["plan"] == rec["whole"]["plan"] and rec["cut"]["calibration"] == rec["whole"]["calibration"]
    a, b = checkpoint_tensors(tmp_path / "whole"), checkpoint_tensors(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".cut.merge-plan.json").exists()
    # another setting (the calibration's tokens) does not read the kept plan
    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "prune_checkpoint", killed)
        assert main([*common, "--out", str(tmp_path / "other")]) == 130
    loads = []
    with monkeypatch.context() as mp:
        mp.setattr(ModelHandle, "load", lambda *a, **k: (loads.append(1), killed())[1])
        assert main([*common[:-4], "--tokens", "16", "--max-memory", "4MiB", "--out", str(tmp_path / "other")]) == 130
    assert loads == [1]


def _lora_run(model, steps: int = 3):
    """(losses, adapter tensors) of a short LoRA fine-tune of ``model``; the model is given back."""
    from moeguard.realign.engine import FinetuneConfig, finetune
    from moeguard.realign.modes import apply_mode
    from moeguard.tasks.batches import Example

    g = torch.Generator().manual_seed(0)
    ex = [Example(ids=torch.randint(3, model.config.vocab_size, (12,), generator=g).tolist(),
                  labels=[-100] * 10 + [5, 6]) for _ in range(4)]
    tr = apply_mode(model, "lora", seed=0)
    try:
        res = finetune(tr, ex, FinetuneConfig(mode="lora", min_steps=steps, max_steps=steps, batch_size=2), pad_id=0)
        return res.losses, {n: p.detach().clone() for n, p in tr.params.items()}
    finally:
        tr.release()


def test_lora_trains_over_offloaded_weights_as_in_memory_and_modes_that_train_them_refuse(pair):
    from moeguard.realign.modes import apply_mode

    full, off, _ = pair
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = off(input_ids=ids).logits
    flags = {n: (p.device.type, p.requires_grad) for n, p in off.named_parameters()}
    hooks = dict(off.get_input_embeddings()._forward_hooks)
    want_loss, want = _lora_run(full)
    got_loss, got = _lora_run(off)
    assert len(got_loss) == 3 and got_loss == want_loss and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # given back as found: no adapters, no checkpointing, the same weights offloaded, the same outputs
    assert {n: (p.device.type, p.requires_grad) for n, p in off.named_parameters()} == flags
    assert not off.is_activation_checkpointing and {d for d, _ in flags.values()} == {"meta"}
    assert dict(off.get_input_embeddings()._forward_hooks) == hooks   # checkpointing's input hook is gone too
    with torch.no_grad():
        assert torch.equal(off(input_ids=ids).logits, before)
    # modes that train base weights name how many are offloaded: what they train in memory (full: every
    # tensor; the head stays tied to the embeddings through LoRA's release)
    counts = {"full": len(list(off.named_parameters()))}
    for mode in ("router", "experts"):
        tr = apply_mode(full, mode)
        counts[mode] = len(tr.params)
        tr.release()
    assert counts["full"] > counts["experts"] > counts["router"] > 0
    for mode, count in counts.items():
        with pytest.raises(MoeguardError, match=f"mode '{mode}' would train {count} tensors that are offloaded") as e:
            apply_mode(off, mode)
        assert "--recovery-mode lora" in e.value.hint
    tr = apply_mode(off, "lora", seed=0)
    try:
        with pytest.raises(MoeguardError, match="cannot be folded into offloaded base weights"):
            tr.merged()
    finally:
        tr.release()


@pytest.mark.parametrize("family", ["qwen2_moe", "granitemoe", "gpt_oss", "nemotron_h", "deepseek_v3"])
def test_lora_over_offloaded_weights_equals_lora_in_memory_across_expert_layouts(family, tmp_path):
    # fused 3-D experts (peft's parameter LoRA), shared experts, expert biases, a hybrid mixer
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "m")
    off, _, _ = load_model(str(tmp_path / "m"), max_memory=1000, with_tokenizer=False)
    assert all(p.device.type == "meta" for p in off.parameters())
    want_loss, want = _lora_run(model, steps=2)
    got_loss, got = _lora_run(off, steps=2)
    assert got_loss == want_loss and got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_a_failed_lora_setup_over_offloaded_weights_gives_the_model_back(pair, monkeypatch):
    from moeguard.realign import offload
    from moeguard.realign.modes import apply_mode

    _, off, _ = pair
    before = {n: p.requires_grad for n, p in off.named_parameters()}
    for p in off.parameters():   # trainable, so peft's freezing shows if it is not undone
        p.requires_grad_(True)
    hooks = dict(off.get_input_embeddings()._forward_hooks)

    def fail(*_, **__):
        raise RuntimeError("placing failed")

    monkeypatch.setattr(offload, "place_adapters", fail)
    try:
        with pytest.raises(RuntimeError, match="placing failed"):
            apply_mode(off, "lora", seed=0)
        assert all(p.requires_grad for p in off.parameters()) and not any("lora_" in n for n, _ in off.named_parameters())
        assert not off.is_activation_checkpointing and dict(off.get_input_embeddings()._forward_hooks) == hooks
    finally:
        for n, p in off.named_parameters():
            p.requires_grad_(before[n])


def test_the_recovery_command_runs_under_a_cap_with_lora_and_refuses_other_modes(tmp_path, capsys):
    from moeguard.audit.results import numbers_only

    args = ["recovery", "--task", "arith-compare", "--keep", "2", "--strategies", "random", "--budgets", "4,8",
            "--seeds", "1", "--pool-size", "16", "--eval-limit", "16", "--samples", "8", "--method", "frequency",
            "--min-steps", "2", "--mode", "lora"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--max-memory", "4MiB"]) == 0
    a, b = (json.loads((tmp_path / x / "recovery.json").read_text()) for x in "ab")
    assert a["detectability"]["verdict"] == "derived" and "offloaded (max_memory)" in b["detectability"]["skipped"]
    assert b["record"].pop("method") == "streaming" and b["settings"].pop("traced") is False
    assert b["run"]["settings"]["max_memory"] == 4 * 2**20
    for doc in (a, b):
        doc.pop("detectability"), doc.pop("run", None)
        for c in doc["curves"]:
            c.pop("after")
    assert numbers_only(a) == numbers_only(b)
    capsys.readouterr()
    for extra, needle in ((["--mode", "full"], "recovery mode 'full', which trains weights that are offloaded"),
                          (["--route", "merge"], "recovery on the merge route")):
        assert main([*args, *extra, "--out", str(tmp_path / "c"), "--max-memory", "4MiB"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
        assert not (tmp_path / "c").exists()


def test_parameter_counts_under_a_cap_count_tied_embeddings_once(pair):
    # accelerate's offload unties lm_head from the embeddings; the counts (info, the sweep's and the
    # recovery's reduction) are the in-memory model's all the same
    from moeguard.models.adapter import MoEAdapter

    full, off, _ = pair
    with torch.no_grad():   # the offload hooks untie them when they first run
        off(input_ids=torch.tensor([[5, 6, 7]]))
    assert full.lm_head.weight is full.get_input_embeddings().weight
    assert off.lm_head.weight is not off.get_input_embeddings().weight
    assert MoEAdapter(off).parameter_counts() == MoEAdapter(full).parameter_counts()


def test_jetmoe_runs_offloaded_and_its_attention_experts_score_as_in_memory(tmp_path):
    """transformers' own JetMoE forward fails offloaded (its attention reads the experts' bias outside
    their forward); moeguard's loader puts it in place, and the methods that run attention experts
    alone read their weights in place too: the scores equal the model's in memory."""
    from moeguard.models.hooks import place_inner_blocks

    _, tok, _ = load_model(None)
    model = tiny_model("jetmoe", vocab_size=4096, max_position_embeddings=512)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    off, _, _ = load_model(str(tmp_path / "m"), max_memory=1000)
    assert all(p.device.type == "meta" for p in off.parameters())
    assert place_inner_blocks(model) == 0                       # nothing offloaded: nothing wrapped
    for method in ("reap", "gradient", "reconstruction"):
        scores = [score(make_context(m, tok, "arith-compare", samples=8, batch_size=4, seed=0), method).scores
                  for m in (model, off)]
        torch.testing.assert_close(scores[1], scores[0], rtol=1e-6, atol=1e-9, msg=method)


def test_a_sweep_under_a_memory_cap_gives_the_uncapped_numbers_and_skips_the_physical_checks(tmp_path):
    """The audit's sweep stage took --max-memory; `moeguard sweep` had no such option."""
    import json

    from moeguard.cli import main

    args = ["sweep", "--tasks", "arith-compare", "--methods", "gate", "--keep", "4", "--random-seeds", "1",
            "--eval-limit", "16", "--collateral-limit", "8", "--samples", "8"]
    assert main([*args, "--max-memory", "8MiB", "--out", str(tmp_path / "capped")]) == 0
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    capped, plain = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in ("capped", "plain"))
    assert capped["run"]["settings"]["max_memory"] == 8 << 20 and "max_memory" not in plain["run"]["settings"]
    assert [c.get("skipped") is not None for c in capped["physical_checks"]] == [True]
    assert len(plain["physical_checks"]) == 1 and "skipped" not in plain["physical_checks"][0], plain["physical_checks"]
    for key in ("full", "points", "random"):
        assert json.dumps(capped[key], sort_keys=True) == json.dumps(plain[key], sort_keys=True), key


def test_a_capped_sweep_interrupted_and_restarted_under_another_cap_reuses_its_jobs(tmp_path, monkeypatch):
    """The cap's bytes were in the resume stamp: a sweep killed for memory and restarted with a lower
    --max-memory threw its finished jobs away, though the cap changes no number."""
    import moeguard.report.sweep as R
    from moeguard.cli import main
    from moeguard.studies import engine

    args = ["sweep", "--tasks", "arith-compare", "--methods", "gate", "--keep", "4", "--random-seeds", "1",
            "--eval-limit", "16", "--collateral-limit", "8", "--samples", "8", "--out", str(tmp_path / "s")]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    real = R.write_sweep
    monkeypatch.setattr(R, "write_sweep", interrupted)
    assert main([*args, "--max-memory", "16MiB"]) == 130
    ran = []
    real_execute = engine.execute
    monkeypatch.setattr(engine, "execute", lambda job, rt, *a: (ran.append(job.name), real_execute(job, rt, *a))[1])
    monkeypatch.setattr(R, "write_sweep", real)
    assert main([*args, "--max-memory", "8MiB"]) == 0
    assert ran == []                                     # every job came from the interrupted run
    import json

    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert doc["run"]["settings"]["max_memory"] == 8 << 20   # the record says which cap this run had


def test_scan_s_weight_statistics_of_an_offloaded_model_are_the_model_in_memory_s(pair):
    """The weights are read in place, one expert at a time (they sat on "meta": the copy raised
    NotImplementedError, a traceback, under a --device-map that spills to the CPU or disk)."""
    from moeguard.models.adapter import MoEAdapter
    from moeguard.scan.weights import weight_stats

    full, off, _ = pair
    want = weight_stats(full, MoEAdapter(full))
    assert len(want) == 32 and all(r["gate_norm"] > 0 for r in want.values())
    assert weight_stats(off, MoEAdapter(off)) == want


def test_lora_adapters_over_offloaded_bf16_weights_keep_peft_s_dtype(tmp_path):
    """Under a cap the adapters were cast to their base's dtype: a bf16 model trained bf16 adapters
    offloaded and float32 ones in memory (peft's autocast_adapter_dtype), two curves of one attack."""
    from moeguard.realign.modes import apply_mode

    tiny_model("mixtral").to(torch.bfloat16).save_pretrained(tmp_path / "m")
    mem, _, _ = load_model(str(tmp_path / "m"), dtype=torch.bfloat16, with_tokenizer=False)
    off, _, _ = load_model(str(tmp_path / "m"), dtype=torch.bfloat16, max_memory=1000, with_tokenizer=False)
    dtypes = {}
    for name, m in (("memory", mem), ("offloaded", off)):
        tr = apply_mode(m, "lora", seed=0)
        try:
            dtypes[name] = {n: p.dtype for n, p in tr.model.named_parameters() if "lora_" in n}
        finally:
            tr.release()
    assert dtypes["memory"] and dtypes["offloaded"] == dtypes["memory"]
    assert set(dtypes["memory"].values()) == {torch.float32}
    # and they train over the offloaded bf16 weights as in memory
    want_loss, _ = _lora_run(mem, steps=2)
    got_loss, _ = _lora_run(off, steps=2)
    assert got_loss == want_loss
