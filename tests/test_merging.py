"""Expert merging (issue 20): the shared operation on every family, each method's clusters and
weights, the calibration statistics, and `moeguard merge` end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeguard.attribution.base import Scores
from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.families import experts_first
from moeguard.models.prune import prune_model
from moeguard.pruning.merging.base import MERGE_METHODS
from moeguard.pruning.merging.calibrate import LayerProfile, calibrate
from moeguard.pruning.merging.merge import merge_model, prepare
from moeguard.pruning.merging.operation import merge_experts
from moeguard.tasks.batches import Batch
from moeguard.testing import causal_families, checkpoint_tensors, tiny_model

# centre first; within halves 0-3 and 4-7, so group-limited routers (DeepSeek's n_group=2) can express it
CLUSTERS = [[0, 1], [2, 3], [5, 4], [7, 6]]


@pytest.fixture(scope="module")
def embedded():
    from moeguard.models.loading import load_model

    m, tok, _ = load_model(None)
    return m, tok


def _batches(vocab: int = 96, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(0, vocab, (3, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[2, 6:] = 0
        out.append(Batch(ids, mask, ids.clone()))
    return out


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fam", causal_families())
def test_every_family_merges_each_tensor_to_its_weighted_average(fam):
    model = tiny_model(fam)
    before = _state(model)
    adapter = MoEAdapter(model)
    plan = {"clusters": {str(l.index): CLUSTERS for l in adapter.layers}}
    prepared = prepare(adapter, method="router-weighted", plan=plan)
    assert prepared["needs_data"]   # explicit clusters, weights from the data
    merged, record = merge_model(model, prepared, batches=_batches(), tokens=12, task="t")

    # the input model is untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    new = MoEAdapter(merged)
    assert [l.num_experts for l in new.layers] == [4] * len(adapter.layers)
    for old_layer, new_layer in zip(adapter.layers, new.layers):
        groups = record["merges"][str(old_layer.index)]
        old_t, new_t = old_layer.expert_tensors(), new_layer.expert_tensors()
        assert len(old_t) == len(new_t) > 0
        for (_, name, o, axis), (_, _, n, _) in zip(old_t, new_t):
            ov = experts_first(o, axis, old_layer.num_experts)   # DBRX's [E*I, d] blocks as [E, I, d]
            nv = experts_first(n, axis, new_layer.num_experts)
            for g in groups:
                want = sum(w * ov[e].double() for w, e in zip(g["weights"], g["from"])).to(o.dtype)
                torch.testing.assert_close(nv[g["expert"]], want, rtol=1e-5, atol=1e-6, msg=f"{fam} {name}")
        # router-weighted: each member's share of its cluster's applied gate mass
        assert all(abs(sum(g["weights"]) - 1) < 1e-5 for g in groups)
    assert record["calibration"]["sampled_tokens"] == 12 and record["plan"]["gate"] == "applied"
    with torch.no_grad():
        assert torch.isfinite(merged(torch.randint(0, 96, (2, 7))).logits).all()


@pytest.mark.parametrize("fam", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_sharing_the_unchanged_tensors_gives_the_same_merged_model_without_copying_them(fam):
    """share_unchanged (what `moeguard merge` and the sweep use): every tensor equals the copying
    merge's; attention, embeddings, norms and shared experts are the source's storage, the merged
    experts and routers are new; the source is untouched."""
    model = tiny_model(fam)
    before = _state(model)
    adapter = MoEAdapter(model)
    clusters = {l.index: CLUSTERS for l in adapter.layers}
    copied, _ = merge_experts(model, clusters)
    shared, _ = merge_experts(model, clusters, share_unchanged=True)
    a, b = copied.state_dict(), shared.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    source = {t.data_ptr() for t in model.state_dict().values()}
    per_expert = {id(t) for l in MoEAdapter(shared).layers for _, _, t, _ in l.expert_tensors()}
    for name, t in shared.state_dict(keep_vars=True).items():
        if id(t) in per_expert:
            assert t.data_ptr() not in source, f"{fam}: merged {name} is the source's storage"
        elif not name.endswith("inv_freq"):
            assert t.data_ptr() in source, f"{fam}: {name} was copied"
    assert not any(t.data_ptr() in source for t in a.values() if t.numel())   # the default copies everything
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_experts_with_equal_weights_and_router_rows_merge_exactly_into_one(embedded):
    m, _ = embedded
    dup = copy.deepcopy(m)
    with torch.no_grad():
        for layer in MoEAdapter(dup).layers:
            for _, _, t, axis in layer.expert_tensors():
                t[3] = t[6]
    clusters = {l.index: [[3, 6], [0], [1], [2], [4], [5], [7]] for l in MoEAdapter(dup).layers}
    weights = {l: [[0.3, 0.7], *[[1.0]] * 6] for l in clusters}
    merged, _ = merge_experts(dup, clusters, weights)
    pruned, _ = prune_model(dup, {l: [0, 1, 2, 3, 4, 5, 7] for l in clusters})
    a, b = merged.state_dict(), pruned.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _profile(outputs: torch.Tensor, counts) -> LayerProfile:
    c = torch.tensor(counts, dtype=torch.float64)
    return LayerProfile.from_outputs(layer=0, counts=c, gate_mass=c / 2, raw_gate_mass=c / 3, outputs=outputs)


def test_each_method_groups_and_weighs_as_documented():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, 5, generator=g)
    # experts 4..7 are near copies of 0..3: output similarity must pair them
    outputs = torch.cat([base, base + 0.01 * torch.randn(4, 6, 5, generator=g)])
    p = _profile(outputs, [10, 0, 30, 5, 1, 2, 3, 40])
    scores = [8.0, 7.0, 6.0, 5.0, 1.0, 2.0, 3.0, 4.0]
    M = MERGE_METHODS
    assert M.names() == ["average", "frequency-weighted", "hc-smoe", "router-weighted"]
    pairs = [[0, 4], [1, 5], [2, 6], [3, 7]]
    for name in M.names():
        assert M[name].group(p, scores, 4) == pairs, name
    assert M["average"].weigh(p, [0, 4], "applied") == [0.5, 0.5]
    assert M["frequency-weighted"].weigh(p, [0, 4], "applied") == pytest.approx([10 / 11, 1 / 11])
    assert M["frequency-weighted"].weigh(p, [1, 5], "applied") == pytest.approx([0.0, 1.0])   # never routed: no weight
    assert M["router-weighted"].weigh(p, [2, 6], "raw") == pytest.approx([30 / 33, 3 / 33])
    # hc-smoe: the best-scored member is the centre, whatever the index order
    assert M["hc-smoe"].group(p, [0, 0, 0, 9, 0, 0, 0, 0], 4)[3] == [3, 7]
    # fewer clusters: exactly K, every expert once
    for name in M.names():
        groups = M[name].group(p, scores, 3)
        assert len(groups) == 3 and sorted(e for gr in groups for e in gr) == list(range(8)), name


def test_calibration_counts_gate_mass_and_runs_every_expert_on_the_sampled_tokens(embedded):
    m, _ = embedded
    adapter = MoEAdapter(m)
    batches = _batches(vocab=4096)
    valid = sum(int(b.attention_mask.sum()) for b in batches)
    profiles, cost = calibrate(m, adapter, batches, tokens=16, seed=0)
    assert cost["sampled_tokens"] == 16 and cost["calibration_tokens"] == valid
    for p in profiles:
        assert p.similarity.shape == (8, 8) and p.mean_output.shape == (8, 128)
        assert torch.allclose(p.similarity.diagonal(), torch.ones(8, dtype=torch.float64))
        assert float(p.counts.sum()) == 2 * valid                       # top-2 slots of every valid token
        assert float(p.gate_mass.sum()) == pytest.approx(valid)         # Mixtral renormalizes: 1 per token
        assert (p.raw_gate_mass <= p.gate_mass + 1e-9).all() and float(p.raw_gate_mass.sum()) < valid
    # the same seed samples the same tokens
    again, _ = calibrate(m, adapter, batches, tokens=16, seed=0)
    assert torch.equal(again[0].similarity, profiles[0].similarity)


def test_calibration_never_runs_the_head(embedded):
    # the [B, T, V] logits are never read: at Qwen3's vocabulary they were 2.5 GB a batch of 8 x 1024
    m, _ = embedded
    calls = []
    handle = m.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        profiles, _ = calibrate(m, MoEAdapter(m), _batches(vocab=4096), tokens=16, seed=0)
    finally:
        handle.remove()
    assert calls == [] and len(profiles) == 4 and float(profiles[0].counts.sum()) > 0


def test_merge_centres_are_a_searched_subset_where_the_scores_carry_one(embedded):
    # prune keeps reconstruction's best K-subset; the merge route centres on the same experts
    m, _ = embedded
    a = MoEAdapter(m)
    rows = torch.tensor([[8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]] * 4, dtype=torch.float64)
    subset = {l: [1, 3, 6, 7] for l in range(4)}
    kw = dict(method="reconstruction", task="t", model="m", samples=1, tokens=1, layers=[0, 1, 2, 3], num_experts=8,
              top_k=2, scores=rows)
    searched = prepare(a, method="router-weighted", scores=Scores(**kw, subsets={4: subset}), keep=4)
    plain = prepare(a, method="router-weighted", scores=Scores(**kw), keep=4)
    from moeguard.pruning.merging.cluster import by_score

    assert by_score(searched["rows"][0])[:4] == [1, 3, 6, 7]     # the subset, in its own score order
    assert by_score(searched["rows"][0])[4:] == [0, 2, 4, 5]
    assert by_score(plain["rows"][0])[:4] == [0, 1, 2, 3]
    # another keep count than the subset's: the scores alone
    assert by_score(prepare(a, method="router-weighted", scores=Scores(**kw, subsets={4: subset}),
                            keep=3)["rows"][0])[:3] == [0, 1, 2]


def test_merge_calibration_is_cut_to_the_models_positions(embedded, monkeypatch):
    # as attribution and evaluation cut the task: calibrated past 256 positions, rotary extrapolates
    import dataclasses

    import moeguard.studies.merge_route as route
    from moeguard.tasks.registry import get_task

    m, tok = embedded
    long = dataclasses.replace(get_task("arith-compare"), max_length=4096)
    seen = []

    def stop(tokenizer, task, **kw):
        seen.append(task.max_length)
        raise RuntimeError("stop")

    monkeypatch.setattr(route, "calibration_batches", stop)
    with pytest.warns(UserWarning, match="max_length 4096, and the model has 256 positions"):
        with pytest.raises(RuntimeError, match="stop"):
            route.attack_candidates(m, tok, long, {}, keep=4, merge_methods=("average",), samples=4, eval_limit=4,
                                   seed=0, full_score=1.0)
    assert seen == [256] and m.config.max_position_embeddings == 256


def test_bad_requests_fail_before_calibration(embedded):
    m, _ = embedded
    a = MoEAdapter(m)
    with pytest.raises(MoeguardError, match="unknown merge method 'avrage'.*average"):
        prepare(a, method="avrage", plan={"clusters": {}})
    with pytest.raises(MoeguardError, match="--gate 'soft' is not one of"):
        prepare(a, method="average", gate="soft", plan={"clusters": {}})
    with pytest.raises(MoeguardError, match=r"layer 0: clusters \[\[0, 1\], \[1, 2\]\] do not split its 8 experts"):
        prepare(a, method="average", plan={"clusters": {str(l): [[0, 1], [1, 2]] for l in range(4)}})
    with pytest.raises(MoeguardError, match=r"names layers \[0\]; the model's MoE layers are \[0, 1, 2, 3\]"):
        prepare(a, method="average", plan={"clusters": {"0": CLUSTERS}})
    with pytest.raises(MoeguardError, match="'hc-smoe' clusters on its own"):
        prepare(a, method="hc-smoe", plan={"keep": {str(l): [0, 1, 2, 3] for l in range(4)}})
    scores = Scores(method="frequency", task="t", model="m", samples=1, tokens=1, layers=[0, 1, 2, 3], num_experts=8,
                    top_k=2, scores=torch.rand(4, 8, dtype=torch.float64))
    with pytest.raises(MoeguardError, match="merging to 8 is impossible for 8 experts per layer"):
        prepare(a, method="average", scores=scores, keep=8)
    with pytest.raises(MoeguardError, match="--scores needs --keep"):
        prepare(a, method="average", scores=scores)
    with pytest.raises(MoeguardError, match="needs calibration data and none was given"):
        merge_model(m, prepare(a, method="frequency-weighted", plan={"clusters": {str(l): CLUSTERS for l in range(4)}}))
    # explicit clusters averaged uniformly need no data at all
    merged, record = merge_model(m, prepare(a, method="average", plan={"clusters": {str(l): CLUSTERS for l in range(4)}}))
    assert record["calibration"] == {"forward_passes": 0} and MoEAdapter(merged).num_experts == 4


def test_cli_merge_writes_a_checkpoint_vanilla_transformers_loads(tmp_path, capsys):
    scores = tmp_path / "scores.json"
    assert main(["attribute", "--task", "arith-compare", "--method", "frequency", "--samples", "8",
                 "--out", str(scores)]) == 0
    before = scores.read_bytes()
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", "--scores", str(scores), "--keep", "4", "--method", "router-weighted", "--gate", "raw",
                 "--samples", "8", "--tokens", "32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "merged 8 -> 4 experts per layer (router-weighted: clusters from frequency scores" in text
    assert scores.read_bytes() == before
    record = json.loads((out / "moeguard_merging.json").read_text())
    assert record["schema"] == "moeguard.merging/1" and record["loadable_by"] == "transformers"
    assert record["plan"]["gate"] == "raw" and record["plan"]["task"] == "arith-compare"
    assert record["run"]["settings"]["method"] == "router-weighted"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert MoEAdapter(model).num_experts == 4
    for layer, groups in record["merges"].items():
        assert sorted(e for g in groups for e in g["from"]) == list(range(8))
        assert sorted(g["expert"] for g in groups) == [0, 1, 2, 3]

    # the plan it wrote merges the same way again, without scores
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(record["plan"]))
    again = tmp_path / "again"
    assert main(["merge", "--plan", str(plan), "--method", "router-weighted", "--gate", "raw", "--samples", "8",
                 "--tokens", "32", "--out", str(again)]) == 0
    # explicit weights need no data: streamed from the safetensors files, equal to the in-memory merge
    assert "explicit clusters, streaming" in capsys.readouterr().out
    a, b = checkpoint_tensors(again), checkpoint_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "moeguard_merging.json").read_text())["merges"] == record["merges"]
    # the record itself as --plan replays its plan (its top-level "keep" read it as a pruning plan: merged again
    # from whatever calibration was given)
    capsys.readouterr()
    assert main(["merge", "--plan", str(out / "moeguard_merging.json"), "--method", "router-weighted", "--gate", "raw",
                 "--out", str(tmp_path / "replay")]) == 0
    assert "explicit clusters, streaming" in capsys.readouterr().out
    c = checkpoint_tensors(tmp_path / "replay")
    assert c.keys() == b.keys() and all(torch.equal(c[k], b[k]) for k in c)

    # a plan that needs calibration cannot stream: one line, before any weights load
    capsys.readouterr()
    assert main(["merge", "--scores", str(scores), "--keep", "4", "--method", "router-weighted", "--streaming",
                 "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--streaming cannot merge here" in err and "calibration" in err
    assert not (tmp_path / "s").exists()

    # no overwrite without --overwrite; one line, exit 2
    capsys.readouterr()
    assert main(["merge", "--plan", str(plan), "--method", "average", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "already exists" in err and "--overwrite" in err


@pytest.mark.parametrize("fam", causal_families())
def test_streamed_merge_equals_the_in_memory_merge_on_every_family(fam, tmp_path):
    from moeguard.edge import resolve_model
    from moeguard.pruning.merging.write import write_merged

    model = tiny_model(fam).to(torch.bfloat16) if fam == "mixtral" else tiny_model(fam)
    src = tmp_path / "src"
    model.save_pretrained(src, **({"max_shard_size": "40KB"} if fam in ("mixtral", "deepseek_v3") else {}))
    layers = [l.index for l in MoEAdapter(model).layers]
    g = torch.Generator().manual_seed(0)
    weights = {l: [torch.rand(len(c), generator=g, dtype=torch.float64).add(0.1).tolist() for c in CLUSTERS]
               for l in layers}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"clusters": {str(l): CLUSTERS for l in layers},
                                "weights": {str(l): w for l, w in weights.items()}}))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    record = write_merged(resolve_model(str(src)), tmp_path / "out", method="average", plan=plan)
    assert record["pruning"]["method"] == "streaming"
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before      # the input is only read
    merged, mem = merge_experts(model, {l: CLUSTERS for l in layers}, weights)
    assert record["merges"] == mem["merges"]
    merged.save_pretrained(tmp_path / "memory")
    want, got = checkpoint_tensors(tmp_path / "memory"), checkpoint_tensors(tmp_path / "out")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert json.loads((tmp_path / "out" / "moeguard_merging.json").read_text())["merges"] == mem["merges"]
    # vanilla transformers loads it, and runs it as it runs the in-memory merge saved (bf16: buffers as loaded)
    dtype = next(merged.parameters()).dtype
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype).eval()
    ids = torch.randint(0, 96, (2, 9), generator=g)
    with torch.no_grad():
        want = (merged if dtype == torch.float32 else
                AutoModelForCausalLM.from_pretrained(tmp_path / "memory", dtype=dtype)).eval()(ids).logits
        assert MoEAdapter(loaded).num_experts == 4
        # the tensors are equal (above); weights loaded from disk sit in buffers of another
        # alignment, and on some CPUs (an AMD EPYC, 2026-12-02) the experts' grouped matmul then
        # takes another kernel: logits agree to float rounding, not always to the last bit
        torch.testing.assert_close(loaded(ids).logits, want)


def test_quantized_experts_are_refused_before_anything_is_written(tmp_path):
    from moeguard.edge import resolve_model
    from moeguard.pruning.merging.write import write_merged

    model = tiny_model("mixtral")
    layer = MoEAdapter(model).layers[0]
    layer.experts.down_proj.data = layer.experts.down_proj.data.to(torch.float8_e4m3fn)
    clusters = {l.index: CLUSTERS for l in MoEAdapter(model).layers}
    with pytest.raises(MoeguardError, match=r"layer \d+: down_proj is torch\.float8_e4m3fn \(quantized\); merging averages") as e:
        merge_experts(model, clusters)
    assert "load or convert the model to bf16/fp16/fp32 first" in e.value.hint
    model.save_pretrained(tmp_path / "src")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"clusters": {str(l): g for l, g in clusters.items()}}))
    with pytest.raises(MoeguardError, match=r"stored as F8_E4M3 \(quantized\)"):
        write_merged(resolve_model(str(tmp_path / "src")), tmp_path / "out", method="average", plan=plan)
    assert not (tmp_path / "out").exists()


def test_route_settings_are_checked_before_any_stage(tmp_path, capsys):
    for args, needle in ((["--route", "merge"], "pruning is the sweep's base route"),
                         (["--route", "prune,merge", "--merge-methods", "avg"], "unknown merge method 'avg'")):
        capsys.readouterr()
        assert main(["audit", *args, "--out", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err
        assert not (tmp_path / "a").exists()


def test_merge_methods_lists_every_method(capsys):
    assert main(["merge-methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["average", "frequency-weighted", "hc-smoe", "router-weighted"]
    assert [r["uses_gate"] for r in rows] == [False, False, False, True]


def test_weighted_sum_is_bit_identical_to_the_plain_float64_formula():
    """The buffered average computes exactly sum(w_j * x_j) in float64 in cluster order (signed
    zeros, bf16 and float32 members included): in-memory and streamed merges rely on it."""
    from moeguard.pruning.merging.operation import weighted_sum

    g = torch.Generator().manual_seed(0)
    for dtype, shape in ((torch.float32, (5, 7)), (torch.bfloat16, (300, 500)), (torch.float64, (70000,)),
                         (torch.float32, (3, 40000, 2))):    # one block, several blocks of rows, 1-D
        xs = [torch.randn(*shape, generator=g).to(dtype) for _ in range(3)]
        for x in xs:
            x.view(-1)[0] = -0.0
        w = torch.rand(3, generator=g, dtype=torch.float64)
        w = w / w.sum()
        plain = sum(float(wk) * x.double() for wk, x in zip(w, xs))
        got = weighted_sum(iter(xs), w)
        assert got.dtype == torch.float64 and torch.equal(got, plain)
        into = torch.full(shape, 7.0, dtype=dtype)                        # written in place, rounded as .to() rounds
        assert weighted_sum(xs, w, out=into) is into and torch.equal(into, plain.to(dtype))
        assert torch.equal(torch.signbit(got), torch.signbit(plain))     # -0.0 stays where the formula gives it
    strided = torch.randn(6, 9, generator=g).t()                           # a transposed (non-contiguous) member
    assert torch.equal(weighted_sum([strided, strided * 2], [0.25, 0.75]), 0.25 * strided.double() + 0.75 * (strided * 2).double())


def test_a_merge_plan_is_checked_for_group_routing_on_its_own_centres_before_any_weights_load():
    """DeepSeek's group-limited router (2 groups of 4) takes one setting for every layer: centres
    balanced across the groups in one layer and not in another cannot be expressed. The check ran
    on experts 0..K-1 of every layer, so it passed, and the merge was refused only after the load and
    calibration; prune refused the same plan at once."""
    from moeguard.errors import MoeguardError
    from moeguard.models.loading import meta_model
    from moeguard.pruning.merging.merge import prepare
    from moeguard.testing import tiny_config

    adapter = MoEAdapter(meta_model(tiny_config("deepseek_v3")))
    a, b = [l.index for l in adapter.layers][:2]
    rest = {str(l.index): [0, 1, 4, 5] for l in adapter.layers}
    with pytest.raises(MoeguardError, match="different router settings per layer"):
        prepare(adapter, method="frequency-weighted", plan={"keep": {**rest, str(b): [0, 1, 2, 4]}})
    balanced = prepare(adapter, method="frequency-weighted", plan={"keep": {**rest, str(a): [0, 1, 4, 5]}})
    assert balanced["counts"] == {l.index: 4 for l in adapter.layers}


def test_ernie_merged_to_one_expert_keeps_its_selection_bias_as_the_weighted_average():
    """ERNIE's [1, E] selection bias merged to [1, 1] read as axis 0, and the check raised a traceback."""
    model = tiny_model("ernie4_5_moe")
    adapter = MoEAdapter(model)
    E = adapter.num_experts
    clusters = {l.index: [list(range(E))] for l in adapter.layers}
    merged, record = merge_experts(model, clusters)
    for old, new in zip(adapter.layers, MoEAdapter(merged).layers):
        assert new.num_experts == 1
        for (_, name, o, axis), (_, _, n, _) in zip(old.expert_tensors(), new.expert_tensors()):
            want = experts_first(o, axis, E).double().mean(0).to(o.dtype)
            torch.testing.assert_close(experts_first(n, axis, 1)[0], want, rtol=1e-5, atol=1e-6, msg=name)
    assert record["keep"] == {str(l.index): [0] for l in adapter.layers}


def test_a_capped_merge_refuses_quantized_experts_before_loading_or_calibrating(tmp_path, monkeypatch):
    """``merge --max-memory`` writes from the files: an FP8 (or MXFP4) release was refused only when the
    merged shards were written, after the offloaded load and every calibration forward."""
    from moeguard.edge import resolve_model
    from moeguard.models.handle import ModelHandle
    from moeguard.pruning.checkpoint import check_merge_files
    from moeguard.pruning.merging.write import write_merged

    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "float")
    check_merge_files(tmp_path / "float")   # float experts pass
    layer = MoEAdapter(model).layers[0]
    layer.experts.down_proj.data = layer.experts.down_proj.data.to(torch.float8_e4m3fn)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(MoeguardError, match=r"stored as F8_E4M3 \(quantized\)"):
        check_merge_files(tmp_path / "src")

    def too_late(*a, **k):
        raise AssertionError("the model was loaded before the files were checked")

    monkeypatch.setattr(ModelHandle, "load", too_late)
    layers = [l.index for l in MoEAdapter(model).layers]
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(Scores(method="frequency", task="arith-compare", model="m", samples=1, tokens=1,
                                        layers=layers, num_experts=8, top_k=2,
                                        scores=torch.rand(len(layers), 8, dtype=torch.float64)).to_dict()))
    with pytest.raises(MoeguardError, match=r"stored as F8_E4M3 \(quantized\)"):   # hc-smoe: calibrates
        write_merged(resolve_model(str(tmp_path / "src")), tmp_path / "out", method="hc-smoe", scores=scores,
                     keep=4, task="arith-compare", max_memory=4 << 20)
    assert not (tmp_path / "out").exists()
