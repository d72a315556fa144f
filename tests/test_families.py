"""The shared matrix: every supported family passes every adapter test.

Adding a family = one row in FAMILY_LAYOUT (the on-disk key its public checkpoints use).
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.families import FAMILIES, moe_config
from moeguard.models.hooks import RoutingCapture, mask_experts
from moeguard.models.prune import prune_model
from moeguard.models.routing import pruned_router_params, route, route_module, router_logits
from moeguard.testing import assert_same_safetensors, causal_families, tiny_model

# family -> (a key of its public checkpoint layout, shared-expert module present)
FAMILY_LAYOUT = {
    "mixtral": ("block_sparse_moe.experts.0.w1.weight", False),
    "qwen2_moe": ("mlp.experts.0.gate_proj.weight", True),
    "qwen3_moe": ("mlp.experts.0.gate_proj.weight", False),
    "olmoe": ("mlp.experts.0.gate_proj.weight", False),
    "deepseek_v3": ("mlp.experts.0.gate_proj.weight", True),
    "granitemoe": ("block_sparse_moe.input_linear.weight", False),
    "phimoe": ("block_sparse_moe.experts.0.w1.weight", False),
    "gpt_oss": ("mlp.experts.gate_up_proj", False),
    "glm4_moe": ("mlp.experts.0.gate_proj.weight", True),
    "glm4_moe_lite": ("mlp.experts.0.gate_proj.weight", True),
    "dots1": ("mlp.experts.0.gate_proj.weight", True),
    "qwen3_next": ("mlp.experts.0.gate_proj.weight", True),
    "flex_olmo": ("mlp.experts.0.gate_proj.weight", False),
    "jamba": ("feed_forward.experts.0.gate_proj.weight", False),
    "minimax": ("block_sparse_moe.experts.0.w1.weight", False),
    "granitemoehybrid": ("block_sparse_moe.input_linear.weight", True),
    "deepseek_v2": ("mlp.experts.0.gate_proj.weight", True),
    "granitemoeshared": ("block_sparse_moe.input_linear.weight", True),
    "granitemoe_swa": ("block_sparse_moe.experts.gate_up_proj", True),
    "ernie4_5_moe": ("mlp.moe_statics.e_score_correction_bias", True),
    "minimax_m2": ("block_sparse_moe.e_score_correction_bias", False),
    "lfm2_moe": ("feed_forward.experts.0.w1.weight", False),
    "hunyuan_v1_moe": ("mlp.gate.wg.weight", True),
    "qwen3_5_moe": ("mlp.experts.0.gate_proj.weight", True),
    "mellum": ("mlp.experts.0.gate_proj.weight", False),
    "exaone_moe": ("mlp.e_score_correction_bias", True),
    "solar_open": ("mlp.experts.0.gate_proj.weight", True),
    "mimo_v2_flash": ("mlp.experts.0.gate_proj.weight", False),
    "nemotron_h": ("mixer.experts.0.up_proj.weight", True),
    "llama4": ("feed_forward.experts.gate_up_proj", True),
    "dbrx": ("ffn.experts.mlp.w1", False),
    "jetmoe": ("self_attention.experts.input_linear.weight", False),
}
KEEP4 = [0, 2, 5, 7]  # balanced over DeepSeek's two groups of 4
# Which equalities are exact (docs/attribution-and-pruning.md, "Exactness"):
# - exact, torch.equal / atol=0: the same weights through modules of the same shapes (a pruned model
#   and its reload, vanilla or moeguard), and the pruned tensors themselves (in-memory == streamed);
# - up to float rounding: masked (E experts, routing restricted) vs physically pruned (K experts).
#   The router matmul and the expert dispatch run on tensors of other shapes, and a kernel may
#   block or order its sums by shape (transformers 5.24's expert dispatch does for uneven layers:
#   3e-8 to 9e-8 apart). fp32 logits of order 1: 1e-5 is ~100x that gap and far below any routing
#   difference, which moves logits by 1e-2 or more.
ACROSS_SHAPES = dict(rtol=1e-5, atol=1e-5)


def routed_both_ways(a, h):
    """(transformers' router, moeguard's route()) on hidden states ``h`` with every expert kept:
    each side's (indices, weights), with every token's choices in index order."""
    layer = a.layers[0]
    block_bias = "." not in (a.family.routing.correction_bias or ".")   # MiniMax-M2, LFM2: the block passes it
    out = layer.router(h, layer.correction_bias) if block_bias else layer.router(h)
    # Llama-4's (scores, logits) too, and DBRX's logits, routed by its block's own method
    _, ref_w, ref_idx = layer.unpack(out)
    params = pruned_router_params(a.family, a.moe_config, list(range(8)), 8)
    w, idx = route_module(layer, router_logits(layer, h, a.family.routing), a.family.routing, params,
                          input_dtype=h.dtype)
    order_ref, order = ref_idx.argsort(-1), idx.argsort(-1)
    return (ref_idx.gather(1, order_ref), ref_w.gather(1, order_ref)), (idx.gather(1, order), w.gather(1, order))


def test_matrix_covers_every_registered_family():
    # encoder-decoder families have their own rows (tests/test_encoder_decoder.py)
    assert set(FAMILY_LAYOUT) == set(causal_families())
    assert set(FAMILIES) - set(causal_families()) == {"switch_transformers", "nllb_moe"}   # test_encoder_decoder.py


@pytest.fixture(scope="module", params=sorted(FAMILY_LAYOUT))
def family_model(request):
    return request.param, tiny_model(request.param)


def test_adapter_view(family_model):
    fam, model = family_model
    a = MoEAdapter(model)
    assert a.family.name == fam
    assert a.num_experts == 8 and a.top_k == 2
    assert all(l.num_experts == 8 for l in a.layers)
    assert bool(a.layers[0].shared) == FAMILY_LAYOUT[fam][1]
    counts = a.parameter_counts()
    assert counts["active"] < counts["total"]
    # 6 of 8 experts idle per token
    assert counts["total"] - counts["active"] == counts["routed_experts"] * 6 // 8


def test_route_reproduces_transformers_router(family_model):
    fam, model = family_model
    h = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    a = MoEAdapter(model)
    (ref_idx, ref_w), (idx, w) = routed_both_ways(a, h)
    assert torch.equal(ref_idx, idx)
    torch.testing.assert_close(ref_w.float(), w.float())
    layer = a.layers[0]
    if layer.correction_bias is not None:   # the equality above holds with a bias that moves choices
        params = pruned_router_params(a.family, a.moe_config, list(range(8)), 8)
        _, unbiased = route(router_logits(layer, h, a.family.routing), a.family.routing, params)
        assert not torch.equal(unbiased.sort(-1).values, idx), f"{fam}: the selection bias changed no choice"


def test_capture_counts_exclude_padding_and_change_nothing(family_model, token_batch):
    _, model = family_model
    ids, mask = token_batch
    plain = model(input_ids=ids, attention_mask=mask).logits
    with RoutingCapture(model, norms=True, per_sample=True) as cap:
        captured = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(plain, captured)
    valid = int(mask.sum())
    for layer in cap.stats.layers:
        assert layer.tokens == valid
        assert layer.counts.sum() == valid * 2
        assert torch.all(layer.norm_sum[layer.counts > 0] > 0)
        assert torch.all(layer.norm_sum[layer.counts == 0] == 0)
    assert len(cap.stats.per_sample) == 2
    assert torch.allclose(cap.stats.per_sample[0].sum(-1), torch.ones(len(cap.stats.layers), dtype=torch.float64))
    # the padded row's routing equals that of the same row without its padding
    with RoutingCapture(model) as solo:
        model(input_ids=ids[1:, :8])
    with RoutingCapture(model) as padded:
        model(input_ids=ids[1:], attention_mask=mask[1:])
    for a, b in zip(solo.stats.layers, padded.stats.layers):
        assert a.counts.sum() == 8 * 2 and torch.equal(a.counts, b.counts)   # 8 real tokens, top-2


def test_hooks_are_removed_even_on_error(family_model, token_batch):
    _, model = family_model
    ids, _ = token_batch
    a = MoEAdapter(model)
    with pytest.raises(RuntimeError, match="boom"):
        with RoutingCapture(model, norms=True), mask_experts(model, {a.layers[0].index: KEEP4}):
            raise RuntimeError("boom")
    for layer in a.layers:
        assert not layer.router._forward_hooks
        assert "forward" not in vars(layer.router) and "forward" not in vars(layer.experts)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_masking_equals_physical_pruning_and_vanilla_reload(family_model, token_batch, tmp_path):
    fam, model = family_model
    ids, mask = token_batch
    a = MoEAdapter(model)
    keep = {l.index: KEEP4 for l in a.layers}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with mask_experts(model, keep):
        masked = model(input_ids=ids, attention_mask=mask).logits
    pruned, record = prune_model(model, keep)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model modified"
    physical = pruned(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(masked, physical, **ACROSS_SHAPES)
    assert record["keep"] == {str(l.index): KEEP4 for l in a.layers}

    pa = MoEAdapter(pruned)
    assert pa.num_experts == 4 and all(l.num_experts == 4 for l in pa.layers)
    full, small = a.parameter_counts(), pa.parameter_counts()
    # each dropped expert takes its weights, its router row and any router bias or selection-bias entry
    # (per layer: JetMoE's attention experts are smaller than its MLP experts)
    per_expert = [sum(t.numel() // 8 for _, _, t, _ in l.expert_tensors() if isinstance(t, torch.nn.Parameter))
                  for l in a.layers]
    assert all(p >= l.expert_param_count() // 8 + model.config.hidden_size for p, l in zip(per_expert, a.layers))
    assert full["total"] - small["total"] == 4 * sum(per_expert)
    pruned.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(FAMILY_LAYOUT[fam][0]) for k in keys), keys[:10]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, physical, rtol=0, atol=0)


def test_masking_one_expert_clamps_top_k(family_model, token_batch):
    fam, model = family_model
    ids, mask = token_batch
    a = MoEAdapter(model)
    keep = {l.index: [3] for l in a.layers}
    if a.family.min_experts > 1:
        with pytest.raises(MoeguardError, match="at least 2"):
            prune_model(model, keep)
        return
    with RoutingCapture(model) as cap, mask_experts(model, keep):
        model(input_ids=ids, attention_mask=mask)
    for layer in cap.stats.layers:
        assert layer.tokens == int(mask.sum()) and layer.counts[3] == layer.tokens == layer.counts.sum()


@pytest.mark.parametrize("keep, message", [
    ({"0": [0, 0, 1]}, "repeats"), ({"0": [0, 9]}, "do not exist"), ({"7": [0, 1]}, "not an MoE layer"),
])
def test_bad_keep_maps_are_refused(keep, message):
    model = tiny_model("mixtral")
    with pytest.raises(MoeguardError, match=message):
        prune_model(model, keep)


def test_deepseek_unbalanced_groups_fall_back_to_one_group(token_batch):
    model = tiny_model("deepseek_v3")
    ids, mask = token_batch
    keep = {l.index: [0, 1, 2, 4] for l in MoEAdapter(model).layers}  # 3 in group 0, 1 in group 1
    with mask_experts(model, keep):
        masked = model(input_ids=ids, attention_mask=mask).logits
    pruned, record = prune_model(model, keep)
    assert record["config_changes"]["n_group"] == 1
    torch.testing.assert_close(masked, pruned(input_ids=ids, attention_mask=mask).logits, **ACROSS_SHAPES)


@pytest.mark.parametrize("method, grouped", [("group_limited_greedy", True), ("greedy", False)])
def test_deepseek_v2_groups_only_in_its_group_limited_mode(method, grouped, token_batch):
    """DeepSeek-V2's topk_method switches group-limited choice (a group scores its best expert) on
    or off; route() follows the config, and a pruned greedy model never has groups to keep."""
    model = tiny_model("deepseek_v2", topk_method=method)
    a = MoEAdapter(model)
    assert ("group-limited" in a.describe()["gate_normalization"]) is grouped
    assert (pruned_router_params(a.family, a.moe_config, list(range(8)), 8).n_group == 2) is grouped
    h = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    (ref_idx, ref_w), (idx, w) = routed_both_ways(a, h)
    assert torch.equal(ref_idx, idx)
    torch.testing.assert_close(ref_w, w)
    if grouped:   # with one group of 4 chosen, both experts of every token come from the same group
        assert torch.equal(idx[:, 0] // 4, idx[:, 1] // 4)
    ids, mask = token_batch
    keep = {l.index: [0, 1, 2, 4] for l in a.layers}   # unbalanced groups
    with mask_experts(model, keep):
        masked = model(input_ids=ids, attention_mask=mask).logits
    pruned, record = prune_model(model, keep)
    assert ("n_group" in record["config_changes"]) is grouped
    torch.testing.assert_close(masked, pruned(input_ids=ids, attention_mask=mask).logits, **ACROSS_SHAPES)


def test_vanilla_transformers_loads_every_pruned_family_without_moeguard(tmp_path, token_batch):
    """A fresh interpreter that never imports moeguard reproduces the in-memory logits."""
    ids, mask = token_batch
    expected = {}
    for fam in FAMILY_LAYOUT:
        model = tiny_model(fam)
        pruned, _ = prune_model(model, {l.index: KEEP4 for l in MoEAdapter(model).layers})
        pruned.save_pretrained(tmp_path / fam)
        expected[fam] = pruned(input_ids=ids, attention_mask=mask).logits
    torch.save({"ids": ids, "mask": mask}, tmp_path / "batch.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
b = torch.load({str(tmp_path / 'batch.pt')!r}, weights_only=True)
out = {{}}
for fam in {list(FAMILY_LAYOUT)!r}:
    m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + fam).eval()
    with torch.no_grad():
        out[fam] = m(input_ids=b['ids'], attention_mask=b['mask']).logits
torch.save(out, {str(tmp_path / 'out.pt')!r})
assert 'moeguard' not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for fam in FAMILY_LAYOUT:
        torch.testing.assert_close(got[fam], expected[fam], rtol=0, atol=0)


def test_info_json_reports_expert_counts(tmp_path, capsys):
    for fam in FAMILY_LAYOUT:
        model = tiny_model(fam)
        pruned, _ = prune_model(model, {l.index: KEEP4 for l in MoEAdapter(model).layers})
        pruned.save_pretrained(tmp_path / fam)
        assert main(["info", "--model", str(tmp_path / fam), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["family"] == fam
        assert set(data["experts_per_layer"].values()) == {4}
        assert data["top_k"] == 2
        assert data["parameters"]["total"] == sum(p.numel() for p in pruned.parameters())
    # JetMoE's two sparse blocks per layer: which MoE layer is which block of which decoder layer
    assert main(["info", "--model", str(tmp_path / "jetmoe"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["moe_layers_per_block"] == {"mlp": {"0": 0, "1": 1}, "self_attention.experts": {"2": 0, "3": 1}}
    # each kind's own expert size (4 kept of 8): an MLP expert is gate, up and down (3 x 32 x 32), an
    # attention expert a query and an output projection (2 x 16 x 32)
    assert data["parameters"]["per_expert_by_block"] == {"mlp": 3 * 32 * 32, "self_attention.experts": 2 * 16 * 32}
    assert main(["info", "--model", str(tmp_path / "jetmoe")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "mlp: MoE layers 0, 1 (decoder layers 0, 1); self_attention.experts: MoE layers 2, 3" in out.replace("│ │", "")
    assert "mlp 3,072; self_attention.experts 1,024" in out


def test_budget_pruning_keeps_different_counts_per_layer(family_model, token_batch, tmp_path):
    """A non-uniform (--budget) plan: masked == in-memory == streamed == reloaded by moeguard."""
    from moeguard.models.loading import load_model
    from moeguard.models.prune import PER_LAYER_KEY
    from moeguard.pruning.checkpoint import prune_checkpoint

    fam, model = family_model
    ids, mask = token_batch
    layers = [l.index for l in MoEAdapter(model).layers]
    keep = {layers[0]: [3, 4], layers[-1]: [0, 1, 2, 5, 6, 7]}   # the first layer narrowest: arrays sized by it fail
    if MoEAdapter(model).family.routing.grouped:  # DeepSeek's groups must match across layers
        with pytest.raises(MoeguardError, match="group-limited routing"):
            prune_model(model, keep)
        return
    with torch.no_grad(), mask_experts(model, keep):
        masked = model(input_ids=ids, attention_mask=mask).logits
    small, record = prune_model(model, keep)
    counts = {str(li): len(keep.get(li, range(8))) for li in layers}   # JetMoE: 4 sparse blocks, 2 in the plan
    assert record["experts_per_layer"] == counts
    with torch.no_grad():
        physical = small(input_ids=ids, attention_mask=mask).logits
    # masked (E experts, routing restricted) vs physical (6 and 2 experts): the same arithmetic on
    # tensors of different shapes, so kernels may block or order their sums differently; transformers
    # 5.24's expert dispatch does (3e-8 to 9e-8 apart). Equal up to float rounding, not bit for bit.
    torch.testing.assert_close(physical, masked, **ACROSS_SHAPES)
    model.save_pretrained(tmp_path / "src")
    small.save_pretrained(tmp_path / "mem")
    prune_checkpoint(tmp_path / "src", tmp_path / "streamed", keep)
    assert_same_safetensors(tmp_path / "mem", tmp_path / "streamed")
    reloaded, _, _ = load_model(str(tmp_path / "streamed"), with_tokenizer=False)
    assert getattr(moe_config(reloaded.config), PER_LAYER_KEY) == counts
    assert [l.router_weight.shape[0] for l in MoEAdapter(reloaded).layers] == list(counts.values())
    with torch.no_grad():  # same weights, same shapes, same kernels: exact by construction
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, physical)
    # the routing capture sizes every layer's statistics to the widest layer, zero past a layer's own experts
    from moeguard.models.hooks import RoutingCapture

    # with REAP's expert output norms too (Llama-4's score-scaled experts added a layer-wide sum: a size mismatch)
    with torch.no_grad(), RoutingCapture(reloaded, per_sample=True, norms=True) as cap:
        reloaded(input_ids=ids, attention_mask=mask)
    widest = max(counts.values())
    for stats, n in zip(cap.stats.layers, counts.values()):
        assert stats.counts.numel() == stats.prob_mass.numel() == widest and stats.counts[:n].sum() > 0
        assert not stats.counts[n:].any() and not stats.prob_mass[n:].any(), (fam, stats.layer)
        assert stats.norm_sum[:n].sum() > 0 and not stats.norm_sum[n:].any(), (fam, stats.layer)
    assert cap.stats.per_sample[0].shape == (len(counts), widest)


def test_route_matches_transformers_router_in_bf16(family_model):
    """Real checkpoints are bf16: masking must reproduce each router's own dtype arithmetic bit for
    bit, both for a model cast with .to(bf16) and for one loaded with dtype=bf16 (which keeps the
    tensors the class names in float32: DeepSeek-V3's router weight and correction bias, say)."""
    import copy

    from moeguard.testing import as_loaded_in

    fam, model = family_model
    h = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for how, m16 in (("cast", copy.deepcopy(model).to(torch.bfloat16)), ("loaded", as_loaded_in(model, torch.bfloat16))):
        (ref_idx, ref_w), (idx, w) = routed_both_ways(MoEAdapter(m16), h)
        assert torch.equal(ref_idx, idx), (fam, how)
        assert w.dtype == ref_w.dtype, (fam, how, w.dtype, ref_w.dtype)
        assert torch.equal(ref_w, w), (fam, how)


def test_llama4_traces_and_captures_what_each_expert_adds(token_batch):
    """Llama-4 scales an expert's input by its score: a traced slot times its gate is exactly the
    expert's contribution, the slots sum to the block's routed output, the one-call helper
    reproduces a slot, and the capture's norms are the contributions' norms."""
    from moeguard.models.hooks import expert_outputs, trace_experts

    model = tiny_model("llama4")
    a = MoEAdapter(model)
    layer = a.layers[0]
    ids, mask = token_batch
    seen = {}
    handle = layer.experts.register_forward_hook(lambda m, args, out: seen.update(out=out.detach()))
    try:
        with torch.no_grad(), trace_experts(model, adapter=a) as traces:
            model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    t = traces[layer.index]
    rows = seen["out"].view(8, -1, model.config.hidden_size)                    # [E, N, d]
    torch.testing.assert_close((t.slot_out * t.weights[..., None]).sum(1), rows.sum(0), rtol=1e-5, atol=1e-6)
    first = expert_outputs(a, layer, t.hidden, t.index[:, 0], t.weights[:, 0])
    torch.testing.assert_close(first, t.slot_out[:, 0] * t.weights[:, :1], rtol=1e-5, atol=1e-6)
    with torch.no_grad(), RoutingCapture(model, norms=True, adapter=a) as cap:
        model(input_ids=ids[:1], attention_mask=mask[:1])
    norms = rows.new_zeros(8)
    with torch.no_grad(), trace_experts(model, adapter=a) as traces:
        model(input_ids=ids[:1], attention_mask=mask[:1])
    t = traces[layer.index]
    contrib = (t.slot_out * t.weights[..., None]).norm(dim=-1)                  # [N, k]
    norms.index_add_(0, t.index.reshape(-1), contrib.reshape(-1))
    torch.testing.assert_close(cap.stats.layers[0].weighted_norm_sum.float(), norms, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("p", [1.0, 2.0, None])
def test_dbrx_routing_follows_its_p_norm_and_pruning_writes_ffn_config(p, token_batch, tmp_path):
    """DBRX's block divides the k weights by their p-norm (moe_normalize_expert_weights; None: not
    at all), its router returns logits only, and its MoE keys live in ffn_config: route() follows
    each p, masking equals pruning, and the pruned checkpoint's ffn_config holds the new counts."""
    model = tiny_model("dbrx", ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2,
                                               moe_normalize_expert_weights=p))
    a = MoEAdapter(model)
    assert a.moe_config is model.config.ffn_config and a.layers[0].call == "logits"
    h = torch.randn(40, 32, generator=torch.Generator().manual_seed(4))
    (ref_idx, ref_w), (idx, w) = routed_both_ways(a, h)
    assert torch.equal(ref_idx, idx)
    torch.testing.assert_close(ref_w, w, rtol=0, atol=0)
    norm = w.norm(p=p, dim=-1) if p is not None else w.sum(-1)
    if p is None:
        assert (norm < 1).all()      # softmax shares of the chosen two: never renormalized
    else:
        torch.testing.assert_close(norm, torch.ones_like(norm))
    ids, mask = token_batch
    keep = {l.index: [0, 3, 4] for l in a.layers}
    with torch.no_grad(), mask_experts(model, keep):
        masked = model(input_ids=ids, attention_mask=mask).logits
    pruned, record = prune_model(model, keep)
    assert record["config_changes"] == {"moe_num_experts": 3, "moe_top_k": 2}
    pruned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["ffn_config"]["moe_num_experts"] == 3 and "moe_num_experts" not in saved
    with safe_open(tmp_path / "model.safetensors", "pt") as f:   # the public [E*I, d] layout
        assert f.get_slice("transformer.blocks.0.ffn.experts.mlp.w2").get_shape() == [3 * 16, 32]
        torch.testing.assert_close(f.get_tensor("transformer.blocks.0.ffn.experts.mlp.w1")[16:32],
                                   model.transformer.blocks[0].ffn.experts.mlp.w1[48:64].detach(), rtol=0, atol=0)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, masked, **ACROSS_SHAPES)


def test_dbrx_masking_below_top_k_clamps_the_block_and_restores_it(token_batch):
    """DBRX's block takes its own top-k of the router's logits: kept below it, masking clamps the
    block's top_k as the pruned model's config does (no dropped expert at weight 0), then restores it."""
    from moeguard.models.hooks import trace_experts

    model = tiny_model("dbrx")
    a = MoEAdapter(model)
    ids, mask = token_batch
    keep = {l.index: [5] for l in a.layers}
    with torch.no_grad(), mask_experts(model, keep), trace_experts(model, adapter=a) as traces:
        masked = model(input_ids=ids, attention_mask=mask).logits
        assert all(l.block.top_k == 1 for l in a.layers)
    assert all(l.block.top_k == 2 for l in a.layers)
    assert all(torch.equal(t.index, torch.full_like(t.index, 5)) for t in traces.values())
    pruned, _ = prune_model(model, keep)
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids, attention_mask=mask).logits, masked, **ACROSS_SHAPES)


def test_lora_leaves_every_router_out_even_a_linear_inside_it():
    from moeguard.realign.modes import lora_targets

    for fam, inside in (("dbrx", "router.layer"), ("hunyuan_v1_moe", "gate.wg")):
        modules, experts = lora_targets(tiny_model(fam))
        assert modules and not any(inside in m for m in modules), (fam, modules)
    modules, experts = lora_targets(tiny_model("dbrx"))
    assert any(m.endswith("attn.Wqkv") for m in modules) and experts == []   # peft cannot wrap DBRX's experts


def test_jetmoe_attention_and_mlp_experts_are_two_blocks_per_layer_pruned_to_one_count(token_batch, tmp_path):
    """JetMoE: the MLP blocks are MoE layers 0..n-1 and the attention blocks n..2n-1; the router's
    sorted pairs round-trip through unpack/pack; the experts view computes the block bit for bit;
    and a plan keeping other experts in each kind of block is masked == pruned == reloaded."""
    from moeguard.models.routing import pack_router_output, unpack_router_output

    ids, mask = token_batch
    model = tiny_model("jetmoe")
    a = MoEAdapter(model)
    assert [(l.index, l.layer_index, l.standalone) for l in a.layers] == [(0, 0, True), (1, 1, True),
                                                                         (2, 0, False), (3, 1, False)]
    assert a.describe()["moe_layers_per_block"] == {"mlp": {"0": 0, "1": 1}, "self_attention.experts": {"2": 0, "3": 1}}
    h = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))
    for layer in (a.layer(0), a.layer(2)):
        out = layer.router(h.reshape(-1, 32))
        again = pack_router_output("sorted", *unpack_router_output("sorted", out, 2))
        assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(out, again))
    with torch.no_grad():   # the view is the block without its bias, in the block's own order
        _, w, idx = a.layer(1).unpack(a.layer(1).router(h.reshape(-1, 32)))
        assert torch.equal(a.layer(1).block(h), a.layer(1).experts(h.reshape(-1, 32), idx, w).view(2, 9, 32)
                           + a.layer(1).block.bias)
    with pytest.raises(RuntimeError, match="inside an attention"):
        a.layer(2).experts(h.reshape(-1, 32), idx, w)
    keep = {0: [0, 2, 5, 7], 1: [1, 3, 4, 6], 2: [1, 2, 4, 6], 3: [0, 1, 2, 3]}
    with torch.no_grad(), mask_experts(model, keep):
        masked = model(input_ids=ids, attention_mask=mask).logits
    pruned, record = prune_model(model, keep)
    assert pruned.config.num_local_experts == 4 and record["config_changes"] == {"num_local_experts": 4,
                                                                                 "num_experts_per_tok": 2}
    moa = pruned.model.layers[0].self_attention.experts
    assert torch.equal(moa.input_linear.weight, model.model.layers[0].self_attention.experts.input_linear.weight[[1, 2, 4, 6]])
    assert torch.equal(moa.router.layer.weight, model.model.layers[0].self_attention.experts.router.layer.weight[[1, 2, 4, 6]])
    with torch.no_grad():
        physical = pruned(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(masked, physical, **ACROSS_SHAPES)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, physical)


def test_jetmoe_attention_experts_run_alone_as_the_model_runs_them(token_batch):
    """What an attention expert adds for a token it was not routed to (gradient's fall-back term) is
    what the model computes once routing sends the token there: the layer's keys and values do not
    depend on which experts the queries come from."""
    from moeguard.models.hooks import expert_outputs, trace_experts

    ids, mask = token_batch
    model = tiny_model("jetmoe")
    a = MoEAdapter(model)
    layer = a.layer(2)                                  # the attention experts of decoder layer 0
    with torch.no_grad(), trace_experts(model, adapter=a) as traces:
        model(input_ids=ids, attention_mask=mask)
    t = traces[2]
    N = ids.numel()
    rows = torch.arange(N).repeat_interleave(2)
    routed = expert_outputs(a, layer, t.hidden[rows], t.index.reshape(-1), torch.ones(2 * N), rows=rows, context=t.context)
    torch.testing.assert_close(routed.view(N, 2, -1), t.slot_out, rtol=1e-5, atol=1e-7)
    # experts 3 and 6 only: every token now reaches both; their outputs are what ran alone said
    elsewhere = torch.tensor([3, 6])
    alone = expert_outputs(a, layer, t.hidden.repeat_interleave(2, 0), elsewhere.repeat(N), torch.ones(2 * N),
                           rows=rows, context=t.context).view(N, 2, -1)
    with torch.no_grad(), mask_experts(model, {2: [3, 6]}), trace_experts(model, adapter=a) as forced:
        model(input_ids=ids, attention_mask=mask)
    f = forced[2]
    order = f.index.argsort(-1)                         # slots in expert order: 3, then 6
    got = f.slot_out.gather(1, order[..., None].expand_as(f.slot_out))
    valid = mask.reshape(-1).bool()
    torch.testing.assert_close(got[valid], alone[valid], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="recorded batch"):
        expert_outputs(a, layer, t.hidden[:2], elsewhere, torch.ones(2))


def test_hunyuan_s_top_k_given_per_layer_is_read_pruned_and_written_back_as_a_list(tmp_path, capsys):
    """Hunyuan-A13B's config gives moe_topk one value per layer (transformers: int | list): it was refused as
    'expected a positive integer' (int() of the list elsewhere: a traceback)."""
    import json

    from moeguard.cli import main
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.prune import prune_model

    m = tiny_model("hunyuan_v1_moe", moe_topk=[2] * 2)
    assert MoEAdapter(m).top_k == 2
    small, _ = prune_model(m, {l: [0, 1, 2, 3] for l in range(len(MoEAdapter(m).layers))})
    assert small.config.moe_topk == [2, 2]
    src = tmp_path / "hy"
    m.save_pretrained(src)
    from moeguard.models.loading import load_model

    _, tok, _ = load_model(None)
    tok.save_pretrained(src)
    capsys.readouterr()
    assert main(["info", "--model", str(src), "--json"]) == 0 and json.loads(capsys.readouterr().out)["top_k"] == 2
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "moe_topk": [2, 1]}))
    assert main(["info", "--model", str(src)]) == 2
    err = capsys.readouterr().err
    assert "gives its layers different top-k [2, 1]" in err and len(err.strip().splitlines()) == 1, err
    # a list of another length than the layers: transformers indexes it per layer (an IndexError in the load)
    (src / "config.json").write_text(json.dumps({**cfg, "moe_topk": [2]}))
    assert main(["info", "--model", str(src)]) == 2
    assert "lists 1 values for 2 layers" in capsys.readouterr().err
