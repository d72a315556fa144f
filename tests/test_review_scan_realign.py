"""Review of scan/, realign/ and defense/ (helpers): audit scan references checked as the scan
checks them, caches that cannot be cropped, protocols that authorize some experts, seeds, and
dropout under a resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moeguard.cli import main
from moeguard.errors import MoeguardError


def _one_line(code, err, needle):
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


@pytest.fixture(scope="module")
def ref_scan(tmp_path_factory):
    """A scan of another clean model of the embedded model's architecture (a copy with a norm nudged):
    a scan of the embedded model itself is refused as its own reference."""
    from safetensors.torch import load_file, save_file

    from moeguard.models.loading import resolve

    root = tmp_path_factory.mktemp("ref")
    other = root / "other-model"
    shutil.copytree(resolve(None).path, other)
    f = next(other.glob("*.safetensors"))
    tensors = load_file(f)
    head = next(k for k in tensors if k.endswith("norm.weight"))   # the final norm: another model, same shapes
    tensors[head] = tensors[head] * 1.001
    save_file(tensors, f, metadata={"format": "pt"})
    out = root / "scan"
    assert main(["scan", "--model", str(other), "--out", str(out), "--tasks", "arith-compare", "--samples", "4",
                 "--contexts", "2", "--candidates", "2", "--chain", "2"]) == 0
    return out


def test_a_scan_of_the_scanned_model_itself_is_refused_as_its_reference(tmp_path, capsys):
    """Its experts were pooled into their own null (and compared with the references' lower threshold)."""
    mine = tmp_path / "mine"
    args = ["--tasks", "arith-compare", "--samples", "4", "--contexts", "2", "--candidates", "2", "--chain", "2"]
    assert main(["scan", "--out", str(mine), *args]) == 0
    capsys.readouterr()
    code = main(["scan", "--out", str(tmp_path / "s"), *args, "--references", str(mine)])
    _one_line(code, capsys.readouterr().err, "is a scan of the scanned model itself (embedded, by its weights)")
    code = main(["audit", "--out", str(tmp_path / "a"), "--tasks", "arith-compare", "--scan", "--scan-contexts", "2",
                 "--scan-references", str(mine), "--no-recovery"])
    _one_line(code, capsys.readouterr().err, "is a scan of the scanned model itself")
    assert not (tmp_path / "a").exists()
    # weights hashed by samples (over 256 MiB): a base and its fine-tune of a few tensors share the digest, so
    # only the same files (times and all) are the model itself; a scan of files written at another time passes
    from moeguard.models import identity
    from moeguard.scan.run import ScanConfig, check_inputs, load_references
    from moeguard.edge import resolve_model, resolve_tasks

    def recorded(name: str, ident: dict, later: int) -> list[dict]:   # `mine` as if made of files of other times
        d = tmp_path / name
        shutil.copytree(mine, d)
        doc = json.loads((d / "scan.json").read_text())
        doc["run"]["settings"]["model"] = {**ident, "files": [[r[0], r[1], r[2] + later, r[3]] for r in ident["files"]]}
        (d / "scan.json").write_text(json.dumps(doc))
        return load_references([d])

    config = ScanConfig(samples=4, contexts=2, candidates=2, chain=2)
    handle, tasks = resolve_model(None), resolve_tasks(["arith-compare"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(identity, "_WHOLE", 0)
        sampled = identity.weights_identity(None)
        with pytest.raises(MoeguardError, match="is a scan of the scanned model itself"):
            check_inputs(handle, tasks, config=config, references=recorded("same", sampled, 0), reference_models=[])
        assert check_inputs(handle, tasks, config=config, references=recorded("later", sampled, 1), reference_models=[])[0]
        # the same for reference models: the scanned folder itself is refused, a base written at another time (a
        # fine-tune of a few tensors shares the sampled digest with it) is the natural reference and is taken
        with pytest.raises(MoeguardError, match="the reference models include the scanned model itself"):
            check_inputs(handle, tasks, config=config, references=[], reference_models=[resolve_model(None)])
        base = tmp_path / "base"
        shutil.copytree(resolve_model(None).ref.path, base, copy_function=shutil.copy)   # new times
        assert identity.weights_digest(str(base)) == identity.weights_digest(None)
        assert check_inputs(handle, tasks, config=config, references=[], reference_models=[resolve_model(str(base))])[1]
    with pytest.raises(MoeguardError, match="is a scan of the scanned model itself"):   # hashed whole: its digest
        check_inputs(handle, tasks, config=config, references=recorded("copy", identity.weights_identity(None), 1),
                     reference_models=[])


def test_audit_scan_references_are_checked_as_the_scan_checks_them(ref_scan, tmp_path, capsys):
    """`audit --scan --scan-references` raised TypeError (a missing argument) on every run."""
    capsys.readouterr()
    code = main(["audit", "--out", str(tmp_path / "a"), "--tasks", "arith-compare", "--scan",
                 "--scan-references", str(ref_scan), "--no-recovery"])
    _one_line(code, capsys.readouterr().err, "was searched with contexts 2 (this scan: 4)")
    assert not (tmp_path / "a").exists()


def test_a_reference_scan_of_other_expert_counts_is_refused(ref_scan, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(ref_scan, other)
    doc = json.loads((other / "scan.json").read_text())
    doc["experts"] = [r for r in doc["experts"] if not (r["layer"] == doc["experts"][0]["layer"] and r["expert"] == 0)]
    (other / "scan.json").write_text(json.dumps(doc))
    capsys.readouterr()
    code = main(["scan", "--out", str(tmp_path / "s"), "--tasks", "arith-compare", "--samples", "4", "--contexts", "2",
                 "--candidates", "2", "--chain", "2", "--references", str(other)])
    _one_line(code, capsys.readouterr().err, "has [7, 8, 8, 8] experts per MoE layer; the model has [8, 8, 8, 8]")


@pytest.mark.parametrize("family, mode", [("mixtral", "crop"), ("jamba", "copies")])
def test_the_context_cache_answers_for_caches_that_cannot_be_cropped(family, mode):
    """A hybrid (Mamba) cache cannot be cropped back: the scan's screen crashed on 7 families."""
    from moeguard.scan.effects import ContextCache
    from moeguard.testing import tiny_model

    m = tiny_model(family).eval()
    ids = list(range(5, 15))
    c = ContextCache(m, ids, rows=2)
    suffix = torch.tensor([[20, 21], [22, 23]])
    first, again = c.logits(suffix), c.logits(suffix)
    with torch.no_grad():
        full = m(input_ids=torch.cat([torch.tensor([ids] * 2), suffix], 1)).logits[:, -2:].float()
    assert ("copies" if c.copies else "crop") == mode and torch.equal(first, again)
    # the cached prefix computes what the whole sequence does: to float rounding where the cache is the
    # attention's own; Mamba's cached path runs its single-step update, another kernel than the whole
    # sequence's scan (5e-3 apart here, as generation with and without a cache is)
    err = float((first - full).abs().max())
    assert err < (1e-4 if mode == "crop" else 1e-2), err
    assert float(full.abs().max()) > 10 * err   # against logits far larger than the tolerance


def test_lora_under_a_protocol_adapts_only_the_authorized_experts():
    from moeguard.models.loading import load_model
    from moeguard.realign.modes import apply_mode, lora_targets, matching

    m, _, _ = load_model(None)
    only = matching(["model.layers.0.mlp.experts.*"])
    assert lora_targets(m, only)[1] == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]
    t = apply_mode(m, "lora", only=only)
    assert {n.split(".layers.")[1].split(".")[0] for n in t.params} == {"0"}   # every layer's experts were adapted
    t.release()
    # a model type peft has default targets for and no conversion of (qwen2: q_proj and v_proj): target_modules
    # None took those, attention the protocol forbids
    m.config.model_type = "qwen2"
    t = apply_mode(m, "lora", only=only)
    assert t.params and all(".mlp.experts." in n for n in t.params), sorted(t.params)
    t.release()


def test_a_defense_setting_that_cannot_work_is_refused_before_training(tmp_path, capsys):
    from moeguard.defense.harden import config_for

    with pytest.raises(MoeguardError, match="--authorized is used by defenses that write a protocol, and 'entangle'"):
        config_for("entangle", authorized_patterns=("*.q_proj.*",))
    capsys.readouterr()
    code = main(["harden", "--method", "selective", "--authorized", "*.mlp.gate.*", "--steps", "1",
                 "--out", str(tmp_path / "h")])
    _one_line(code, capsys.readouterr().err, "match no module LoRA can adapt")
    assert not (tmp_path / "h").exists()


def test_round_seeds_stay_within_the_seeds_every_setting_accepts():
    from moeguard.config import SEED_MAX
    from moeguard.realign.loop import round_seed

    assert round_seed(0, 3) == 3 and round_seed(7, 1) == 7 * 1009 + 1
    big = [round_seed(5_000_000, r) for r in range(4)]
    assert all(0 <= s <= SEED_MAX for s in big) and len(set(big)) == 4


def test_fine_tuning_with_dropout_draws_the_same_whatever_the_callers_generator():
    from moeguard.realign.engine import FinetuneConfig, finetune
    from moeguard.realign.modes import apply_mode
    from moeguard.tasks.batches import IGNORE, Example
    from moeguard.testing import tiny_model

    g = torch.Generator().manual_seed(0)
    data = [Example(ids := torch.randint(1, 96, (8,), generator=g).tolist(), [IGNORE] * 3 + ids[3:]) for _ in range(8)]
    losses = []
    for outer in (1, 2):
        model = tiny_model("mixtral")
        for mod in model.modules():
            if hasattr(mod, "attention_dropout"):
                mod.attention_dropout = 0.3
        torch.manual_seed(outer)                     # the state a resumed run's caller happens to be in
        t = apply_mode(model, "full")
        losses.append(finetune(t, data, FinetuneConfig(mode="full", min_steps=3, epochs=1, batch_size=4, lr=1e-2),
                               pad_id=0).losses)
        after = torch.rand(1)
    assert losses[0] == losses[1]
    torch.manual_seed(2)
    assert torch.equal(after, torch.rand(1))         # the caller's generator is given back untouched


def test_orphan_on_a_pruning_record_without_its_plan_is_one_line_before_any_load(tmp_path, capsys):
    pruned = tmp_path / "p"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep": {str(l): [0, 1, 2, 3] for l in range(4)}}))
    assert main(["prune", "--plan", str(plan), "--out", str(pruned)]) == 0
    rec = json.loads((pruned / "moeguard_pruning.json").read_text())
    rec.pop("keep")
    (pruned / "moeguard_pruning.json").write_text(json.dumps(rec))
    capsys.readouterr()
    code = main(["realign", "--model", str(pruned), "--task", "arith-compare", "--strategy", "orphan",
                 "--budget", "8", "--out", str(tmp_path / "r")])
    _one_line(code, capsys.readouterr().err, "moeguard_pruning.json has no keep")   # a KeyError traceback


def test_a_protocol_that_leaves_lora_nothing_is_one_line_before_any_load(tmp_path, capsys):
    pruned = tmp_path / "p"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep": {str(l): [0, 1, 2, 3] for l in range(4)}}))
    assert main(["prune", "--plan", str(plan), "--out", str(pruned)]) == 0
    proto = tmp_path / "moeguard_protocol.json"
    proto.write_text(json.dumps({"schema": "moeguard.protocol/1", "modes": ["lora"], "authorized_parameters": ["*.attn.*"]}))
    capsys.readouterr()
    code = main(["realign", "--model", str(pruned), "--task", "arith-compare", "--mode", "lora", "--budget", "8",
                 "--protocol", str(proto), "--out", str(tmp_path / "r")])
    # found after the original had been scored, with "use a mode the protocol allows" (lora was allowed)
    _one_line(code, capsys.readouterr().err, "the protocol's patterns ['*.attn.*'] leave lora nothing to train")


def test_a_scan_of_a_budget_pruned_model_is_refused_before_it_loads(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep": {"0": [0, 1, 2, 3, 4, 5, 6, 7], "1": [0, 1, 2, 3, 4, 5], "2": list(range(8)),
                                         "3": list(range(8))}}))
    assert main(["prune", "--plan", str(plan), "--out", str(tmp_path / "bp")]) == 0
    capsys.readouterr()
    code = main(["scan", "--model", str(tmp_path / "bp"), "--out", str(tmp_path / "s")])
    _one_line(code, capsys.readouterr().err, "different expert counts [8, 6, 8, 8]")


def test_the_scan_says_where_its_threshold_comes_from(ref_scan):
    from moeguard.scan.run import CALIBRATED, THRESHOLDS

    doc = json.loads((ref_scan / "scan.json").read_text())
    # this scan searched with fewer contexts, candidates and chain tokens than the calibration did
    assert doc["suspicion"]["threshold_source"] == "calibrated at the default search settings and seed, not these"
    assert doc["suspicion"]["threshold"] == 12.1
    assert ("unexplained", "references") in THRESHOLDS and ("unexplained", "references") not in CALIBRATED
    from moeguard.scan.run import ScanConfig, threshold_source

    # a model of another shape than the zoo's 4 x 8 the thresholds were measured on: said, not "calibrated"
    assert threshold_source(ScanConfig(), "chain", "siblings", (4, 8)) == "calibrated"
    assert threshold_source(ScanConfig(), "chain", "siblings", (48, 128)) == (
        "calibrated on 4-layer x 8-expert models, not this model's 48 x 128: a clean model's largest score grows with "
        "its experts")
    assert threshold_source(ScanConfig(threshold=3.0), "chain", "siblings", (48, 128)) == "given"
    assert threshold_source(ScanConfig(), "unexplained", "references", (4, 8)) == "not calibrated (the siblings' value)"
    # the chain's contexts come from the tasks and the seed: other ones are said, not "calibrated"
    from moeguard.tasks.registry import embedded_tasks

    suite = [t.name for t in embedded_tasks()]
    assert threshold_source(ScanConfig(), "chain", "siblings", (4, 8), suite[::-1]) == "calibrated"
    assert threshold_source(ScanConfig(), "chain", "siblings", (4, 8), ["arith-compare"]).startswith(
        "calibrated on the embedded suite's tasks (")
    assert threshold_source(ScanConfig(seed=3), "chain", "siblings", (4, 8)) == \
        "calibrated at the default search settings and seed, not these"


def test_defend_eval_checks_the_protocol_before_its_attack_grid(tmp_path, capsys):
    from moeguard.models.loading import resolve

    proto = tmp_path / "moeguard_protocol.json"
    proto.write_text(json.dumps({"schema": "moeguard.protocol/1", "modes": ["lora"], "authorized_parameters": ["*.attn.*"]}))
    capsys.readouterr()
    code = main(["defend-eval", "--hardened", str(resolve(None).path), "--protocol", str(proto), "--tasks", "arith-compare",
                 "--out", str(tmp_path / "d")])
    _one_line(code, capsys.readouterr().err, "the protocol's patterns ['*.attn.*'] leave lora nothing to train")
    assert not (tmp_path / "d").exists()


def test_a_scan_refuses_itself_as_its_reference_model(tmp_path, capsys):
    """Every chain token would be the model's own choice: nothing flagged, the flag still 'calibrated'."""
    capsys.readouterr()
    code = main(["scan", "--reference-models", "embedded", "--out", str(tmp_path / "s")])
    _one_line(code, capsys.readouterr().err, "the reference models include the scanned model itself")
    # a copy of it, or the same folder named another way: the same weights (the path and times differed)
    import shutil

    from moeguard.models.loading import resolve

    shutil.copytree(resolve(None).path, tmp_path / "copy")
    code = main(["scan", "--model", str(tmp_path / "copy"), "--reference-models", str(resolve(None).path),
                 "--out", str(tmp_path / "s")])
    _one_line(code, capsys.readouterr().err, "the reference models include the scanned model itself")


def test_a_scan_of_nan_weights_names_the_expert_instead_of_reporting_nothing(tmp_path, capsys):
    import torch

    from moeguard.models.loading import load_model

    m, tok, _ = load_model(None)
    from moeguard.models.adapter import MoEAdapter

    layer = MoEAdapter(m).layers[1]
    with torch.no_grad():
        layer.router_weight[3, 0] = float("nan")
    m.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    code = main(["scan", "--model", str(tmp_path / "m"), "--tasks", "arith-compare", "--samples", "4", "--contexts", "2",
                 "--candidates", "2", "--chain", "2", "--out", str(tmp_path / "s")])
    # found in the loaded weights: transformers' loading bar comes before the one line (a known left-alone item)
    err = "\n".join(l for l in capsys.readouterr().err.splitlines() if not l.startswith("Loading weights"))
    _one_line(code, err, f"layer {layer.index} expert 3 has non-finite weights (router row)")


def test_one_at_a_time_methods_refuse_layers_left_with_the_routers_minimum(tmp_path, capsys):
    """On one expert per layer, ablation scored 'the whole MoE layer removed' (k=0), a state pruning
    never produces; under PhiMoE's sparsemixer at two experts the weights were NaN."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep": {str(l): [0] for l in range(4)}}))
    assert main(["prune", "--plan", str(plan), "--out", str(tmp_path / "one")]) == 0
    for method in ("ablation", "gradient"):
        capsys.readouterr()
        code = main(["attribute", "--model", str(tmp_path / "one"), "--task", "arith-compare", "--method", method,
                     "--samples", "2", "--out", str(tmp_path / f"{method}.json")])
        err = "\n".join(l for l in capsys.readouterr().err.splitlines() if not l.startswith("Loading weights"))
        _one_line(code, err, f"method '{method}' removes one expert at a time, and this model's layers have 1")


def test_a_router_protocol_whose_patterns_miss_the_routers_is_refused_before_the_loads(tmp_path, capsys):
    """Only 'matches some parameter' was checked for modes other than lora: attention patterns passed,
    and router mode failed after the loads (defend-eval: after its whole attack grid)."""
    from moeguard.models.loading import resolve

    proto = tmp_path / "moeguard_protocol.json"
    proto.write_text(json.dumps({"schema": "moeguard.protocol/1", "modes": ["router"],
                                 "authorized_parameters": ["*.self_attn.*"]}))
    capsys.readouterr()
    code = main(["defend-eval", "--hardened", str(resolve(None).path), "--protocol", str(proto), "--tasks", "arith-compare",
                 "--out", str(tmp_path / "d")])
    _one_line(code, capsys.readouterr().err, "leave router nothing to train")
    assert not (tmp_path / "d").exists()


def test_orphan_without_a_source_in_the_record_is_refused_before_the_load(tmp_path, capsys, monkeypatch):
    import moeguard.models.handle as handle

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep": {str(l): [0, 1, 2, 3] for l in range(4)}}))
    pruned = tmp_path / "p"
    assert main(["prune", "--plan", str(plan), "--out", str(pruned)]) == 0
    record = pruned / "moeguard_pruning.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "source": None}))
    monkeypatch.setattr(handle.ModelHandle, "load", lambda *a, **k: pytest.fail("the model loaded"))
    capsys.readouterr()
    code = main(["realign", "--model", str(pruned), "--task", "arith-compare", "--strategy", "orphan", "--budget", "8",
                 "--out", str(tmp_path / "r")])
    _one_line(code, capsys.readouterr().err, "strategy 'orphan' needs the original model")


@pytest.mark.parametrize("change, needle", [
    (lambda doc: doc.update(family="qwen2_moe"), "is of a qwen2_moe model; the model is mixtral"),
    (lambda doc: [r.update(layer=r["layer"] + 10) for r in doc["experts"]], "has MoE layers [10, 11, 12, 13]"),
])
def test_a_reference_scan_of_another_architecture_with_the_same_counts_is_refused(ref_scan, tmp_path, capsys,
                                                                                   change, needle):
    """Only the counts were compared: another family's scan, or MoE layers at other decoder indices,
    was pooled by position into the null."""
    other = tmp_path / "other"
    shutil.copytree(ref_scan, other)
    doc = json.loads((other / "scan.json").read_text())
    assert doc["family"] == "mixtral"                  # scans now say what they scanned
    change(doc)
    (other / "scan.json").write_text(json.dumps(doc))
    capsys.readouterr()
    code = main(["scan", "--out", str(tmp_path / "s"), "--tasks", "arith-compare", "--samples", "4", "--contexts", "2",
                 "--candidates", "2", "--chain", "2", "--references", str(other)])
    _one_line(code, capsys.readouterr().err, needle)


def test_a_scan_to_an_output_another_is_writing_is_refused_before_any_weights_load(tmp_path, capsys, monkeypatch):
    # the model and every reference model loaded in full (minutes at Mixtral's scale) before the lock said no
    from moeguard.io import one_run
    from moeguard.models import handle

    loads = []
    monkeypatch.setattr(handle.ModelHandle, "load", lambda self, **kw: loads.append(self.name))
    out = tmp_path / "s"
    capsys.readouterr()
    from safetensors.torch import load_file, save_file

    from moeguard.models.loading import resolve

    ref = tmp_path / "ref"   # another model of the same architecture (a norm nudged)
    shutil.copytree(resolve(None).path, ref)
    f = next(ref.glob("*.safetensors"))
    tensors = load_file(f)
    norm = next(k for k in tensors if k.endswith("norm.weight"))
    save_file({**tensors, norm: tensors[norm] * 1.001}, f, metadata={"format": "pt"})
    with one_run(out):
        code = main(["scan", "--samples", "4", "--reference-models", str(ref), "--out", str(out)])
    _one_line(code, capsys.readouterr().err, f"another moeguard run is writing {out}")
    assert loads == [] and not out.exists()
