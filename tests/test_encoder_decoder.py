"""The shared family matrix's model-level rows for encoder-decoder families (Switch Transformers,
NLLB-MoE): route() against the family's router (with capacity dropping and padding, fp32 and bf16),
masking == in-memory pruning == streamed surgery == vanilla reload, routing capture, and the
commands that run on them through the seq2seq head. transformers 5.24 runs NLLB-MoE's experts
wrongly: the bug is reproduced here, and moeguard's repair (models/upstream.py) checked."""

import contextlib
import copy
import json
import pickle

import pytest
import torch
from safetensors import safe_open

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.families import FAMILIES
from moeguard.models.hooks import RoutingCapture, mask_experts
from moeguard.models.prune import prune_model
from moeguard.models.routing import pruned_router_params, route_module, router_logits
from moeguard.models.upstream import known_repair, repair
from moeguard.pruning.checkpoint import prune_checkpoint
from moeguard.testing import as_loaded_in, assert_same_safetensors, causal_families, tiny_config, tiny_model

# family -> a key of its public on-disk layout, and one that pruning to 4 experts removes
ENCODER_DECODER_LAYOUT = {
    "switch_transformers": ("decoder.block.1.layer.2.mlp.experts.expert_3.wi.weight",
                            "encoder.block.0.layer.1.mlp.experts.expert_4.wi.weight"),
    "nllb_moe": ("model.decoder.layers.1.ffn.experts.expert_3.fc1.weight",
                 "model.encoder.layers.0.ffn.experts.expert_4.fc1.weight"),
}
# family -> what describe() says of its capacity, and decoder layer 0's sparse block
CAPACITY_TEXT = {"switch_transformers": "capacity 2 tokens per expert and sequence",
                 "nllb_moe": "capacity per expert and batch ceil(0.25 x the batch's tokens) in eval"}


def decoder_block(model, fam):
    return model.decoder.block[0].layer[2].mlp if fam == "switch_transformers" else model.model.decoder.layers[0].ffn


def router_input(fam, h):
    """What the family's block hands its router: Switch's [B, S, d]; NLLB-MoE's flattened [T, d]."""
    return h if fam == "switch_transformers" else h.reshape(-1, h.shape[-1])
KEEP4 = [0, 2, 5, 7]


def test_rows_cover_every_encoder_decoder_family():
    assert set(ENCODER_DECODER_LAYOUT) == set(FAMILIES.names()) - set(causal_families())


@pytest.fixture(scope="module", params=sorted(ENCODER_DECODER_LAYOUT))
def family_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture
def batch():
    """Encoder rows (the second right-padded) and decoder rows of another length, so a layer's
    tokens are told apart by stack, not by count."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 96, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    dec = torch.randint(2, 96, (2, 9), generator=g)
    dec_mask = torch.ones_like(dec)
    dec_mask[0, 6:] = 0
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)


def routed_both_ways(layer, a, h, padding_mask=None):
    """(the family's router, moeguard's route()) on hidden states h [B, S, d]: (weights, index) each."""
    x = router_input(a.family.name, h)
    # NLLB-MoE's router keeps the capacity of its last call: route_module starts from what it held before
    held = vars(layer.router).get("expert_capacity")
    _, ref_w, ref_idx = layer.unpack(layer.router(x) if padding_mask is None else layer.router(x, padding_mask))
    layer.router.expert_capacity = held
    params = pruned_router_params(a.family, a.moe_config, list(range(8)), 8)
    w, idx = route_module(layer, router_logits(layer, x, a.family.routing), a.family.routing, params,
                          input_dtype=h.dtype, sequences=h.shape[0], padding_mask=padding_mask)
    return (ref_w, ref_idx), (w, idx)


def test_adapter_view_spans_both_stacks(family_model):
    fam, model = family_model
    a = MoEAdapter(model)
    assert a.family.name == fam and a.family.encoder_decoder
    k = {"switch_transformers": 1, "nllb_moe": 2}[fam]
    assert [l.index for l in a.layers] == [0, 1, 2, 3] and a.top_k == k and a.num_experts == 8
    info = a.describe()
    assert info["moe_layers_per_stack"] == dict.fromkeys(a.family.stacks, [0, 1])
    assert CAPACITY_TEXT[fam] in info["gate_normalization"]
    assert a.layers[2].block is decoder_block(model, fam)   # after the cross-attention
    counts = a.parameter_counts()
    assert counts["total"] - counts["active"] == counts["routed_experts"] * (8 - k) // 8   # top-k of 8


def test_route_reproduces_the_router_with_capacity_dropping(family_model):
    fam, model = family_model
    a = MoEAdapter(model)
    h = torch.randn(3, 16, model.config.d_model, generator=torch.Generator().manual_seed(1))
    for how, m in (("float32", model), ("cast", copy.deepcopy(model).to(torch.bfloat16)),
                   ("loaded", as_loaded_in(model, torch.bfloat16))):
        x = h.to(next(m.parameters()).dtype)
        for layer in MoEAdapter(m).layers:
            (ref_w, ref_idx), (w, idx) = routed_both_ways(layer, a, x)
            assert torch.equal(ref_idx, idx), (how, layer.index)
            assert ref_w.dtype == w.dtype and torch.equal(ref_w, w), (how, layer.index)
            # Switch: 16 tokens of a sequence over 8 experts at capacity 2; NLLB-MoE: 48 tokens of a
            # batch at capacity 12, second choices counted last: some are dropped (weight 0)
            assert 0 < int((w == 0).sum()) < w.numel(), (how, layer.index)
    biased = tiny_model(fam, router_bias=True)   # a router bias is added in float32 too
    with torch.no_grad():
        for layer in MoEAdapter(biased).layers:
            layer.router_bias.normal_(0, 1.0)
        for layer in MoEAdapter(biased).layers:
            (ref_w, ref_idx), (w, idx) = routed_both_ways(layer, a, h)
            assert torch.equal(ref_idx, idx) and torch.equal(ref_w, w), ("bias", layer.index)


def test_masking_equals_pruning_streaming_and_vanilla_reload(family_model, batch, tmp_path):
    fam, model = family_model
    a = MoEAdapter(model)
    keep = {l.index: KEEP4 for l in a.layers}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        full = model(**batch).logits
        with mask_experts(model, keep):
            masked = model(**batch).logits
        assert torch.equal(model(**batch).logits, full), "routing not restored"
        pruned, record = prune_model(model, keep)
        physical = pruned(**batch).logits
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model modified"
    assert not torch.allclose(full, masked), "masking 4 of 8 experts changed nothing"
    # (Switch: the pruned router sees fewer experts, so capacity drops other tokens) still the same model
    torch.testing.assert_close(masked, physical, rtol=1e-5, atol=1e-5)
    assert record["config_changes"] == {"num_experts": 4}   # top-1 has no key to change
    full_n, small_n = a.parameter_counts()["total"], MoEAdapter(pruned).parameter_counts()["total"]
    per_expert = sum(p.numel() for p in a.layers[0].expert(0).parameters()) + model.config.d_model  # + router row
    assert full_n - small_n == len(a.layers) * 4 * per_expert

    pruned.save_pretrained(tmp_path / "mem")
    with safe_open(str(tmp_path / "mem" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    kept_key, gone_key = ENCODER_DECODER_LAYOUT[fam]
    assert kept_key in keys and gone_key not in keys
    model.save_pretrained(tmp_path / "src")
    streamed = prune_checkpoint(tmp_path / "src", tmp_path / "streamed", keep)
    assert streamed["experts_per_layer"] == {str(i): 4 for i in range(4)}
    assert_same_safetensors(tmp_path / "mem", tmp_path / "streamed")

    # vanilla transformers reads the streamed checkpoint (moeguard patches nothing outside its own loader)
    from transformers import AutoModelForSeq2SeqLM

    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "streamed").eval()
    assert type(reloaded.get_encoder()) is type(model.get_encoder())   # transformers' own classes
    if known_repair(model.config.model_type):   # a broken upstream forward: what moeguard runs is the repair
        with torch.no_grad():
            assert not torch.allclose(reloaded(**batch).logits, physical, atol=1e-3)   # not the model's logits
        assert repair(reloaded) == len(a.layers) and repair(reloaded) == 0   # one experts module a layer, once
    with torch.no_grad():
        got = reloaded(**batch).logits
    # the same weights; memory-mapped tensors take other BLAS paths than in-memory copies (2e-6 apart)
    torch.testing.assert_close(got, physical, rtol=1e-5, atol=1e-5)


def test_capture_counts_each_stack_without_padding_or_dropped_tokens(family_model, batch):
    _, model = family_model
    a = MoEAdapter(model)
    dispatched = {}   # slot -> [T, E] 1 where the router dispatched a token to an expert

    def record(slot, out):
        _, w, idx = a.layers[slot].unpack(out)
        dispatched[slot] = torch.zeros(idx.shape[0], a.num_experts).scatter_add_(1, idx, (w != 0).float())
    handles = [l.router.register_forward_hook(lambda m, args, out, slot=slot: record(slot, out))
               for slot, l in enumerate(a.layers)]
    try:
        with torch.no_grad():
            plain = model(**batch).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad(), RoutingCapture(model, norms=True, per_sample=True) as cap:
        captured = model(**batch).logits   # the norms run each expert module here, as the block does
    torch.testing.assert_close(plain, captured, rtol=0, atol=0)
    masks = [batch["attention_mask"]] * 2 + [batch["decoder_attention_mask"]] * 2   # encoder, then decoder layers
    assert len(cap.stats.layers) == 4
    for slot, layer in enumerate(cap.stats.layers):
        valid = masks[slot].reshape(-1).bool()
        assert layer.tokens == int(valid.sum())
        # a token past its expert's capacity reaches no expert and is not counted
        assert torch.equal(layer.counts, dispatched[slot][valid].sum(0).double())
        assert torch.all(layer.norm_sum[layer.counts > 0] > 0) and torch.all(layer.norm_sum[layer.counts == 0] == 0)
    assert any(l.counts.sum() < l.tokens * a.top_k for l in cap.stats.layers), "capacity dropped no token"
    # per sample, each layer's shares of its dispatched tokens: decoder layers from the decoder's rows
    assert len(cap.stats.per_sample) == 2
    for row, shares in enumerate(cap.stats.per_sample):
        for slot in range(4):
            mask = masks[slot][row].bool()
            n_rows = masks[slot].shape[1]
            got = dispatched[slot].view(2, n_rows, -1)[row][mask].sum(0).double()
            assert torch.allclose(shares[slot], got / got.sum().clamp_min(1)), (row, slot)


def test_hooks_are_removed_even_on_error(family_model):
    _, model = family_model
    a = MoEAdapter(model)
    with pytest.raises(RuntimeError, match="boom"):
        with RoutingCapture(model), mask_experts(model, {3: KEEP4}):
            raise RuntimeError("boom")
    for layer in a.layers:
        assert not layer.router._forward_hooks and "forward" not in vars(layer.router)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_per_layer_counts_are_refused_with_the_reason(family_model):
    _, model = family_model
    with pytest.raises(MoeguardError, match="keep the same number of experts in every layer") as e:
        prune_model(model, {0: [0, 1, 2, 5, 6, 7], 3: [3, 4]})
    assert "one module per expert" in str(e.value)
    from moeguard.pruning.merging.operation import merge_experts

    with pytest.raises(MoeguardError, match="keeps one module per expert"):   # no expert axis to average along
        merge_experts(model, {0: [[0, 1], [2, 3], [4, 5], [6, 7]]})


@pytest.fixture(scope="module", params=sorted(ENCODER_DECODER_LAYOUT))
def family_checkpoint(request, tmp_path_factory):
    """(family, a checkpoint directory of it with the embedded tokenizer)."""
    from transformers import AutoTokenizer

    from moeguard.models.loading import EMBEDDED_MODEL_DIR
    from moeguard.models.tokenizer_files import save_tokenizer

    d = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param, vocab_size=4096).save_pretrained(d)   # the embedded tokenizer's vocabulary
    save_tokenizer(AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR), d)
    return request.param, d


def test_the_attack_chain_runs_through_the_seq2seq_head(family_checkpoint, tmp_path, capsys):
    """info, attribute, prune (streamed and in memory, equal) and eval on an encoder-decoder; the
    methods and commands that cannot run on one refuse in one line, before any weights load."""
    fam, checkpoint = family_checkpoint
    assert main(["info", "--model", str(checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == fam and info["moe_layers"] == [0, 1, 2, 3]
    assert info["top_k"] == FAMILIES.get(fam).fixed_top_k
    scores = tmp_path / "reap.json"
    assert main(["attribute", "--model", str(checkpoint), "--task", "arith-compare", "--method", "reap",
                 "--samples", "8", "--out", str(scores)]) == 0
    doc = json.loads(scores.read_text())
    assert doc["layers"] == [0, 1, 2, 3] and set(doc["scores"]) == {"0", "1", "2", "3"}
    assert all(any(v > 0 for v in row) for row in doc["scores"].values())
    for flag, out in (("--streaming", "s"), ("--in-memory", "m")):
        assert main(["prune", "--model", str(checkpoint), "--scores", str(scores), "--keep", "4", flag,
                     "--out", str(tmp_path / out)]) == 0
    assert_same_safetensors(tmp_path / "s", tmp_path / "m")
    capsys.readouterr()
    for name in ("full", "pruned"):
        model = checkpoint if name == "full" else tmp_path / "s"
        assert main(["eval", "--model", str(model), "--tasks", "arith-compare,stdlib-code,code-naming",
                     "--limit", "4", "--out", str(tmp_path / f"{name}.json")]) == 0
    full, pruned = (json.loads((tmp_path / f"{n}.json").read_text())["tasks"] for n in ("full", "pruned"))
    assert full["stdlib-code"]["score"] != pruned["stdlib-code"]["score"]   # the pruned model is another model
    capsys.readouterr()
    for args, says in ((["attribute", "--task", "arith-compare", "--method", "gradient", "--out", str(tmp_path / "g.json")],
                        "does not score encoder-decoders"),
                       (["audit", "--scan", "--out", str(tmp_path / "audit")], "--scan not yet"),
                       (["recovery", "--task", "arith-compare", "--keep", "4", "--out", str(tmp_path / "r")],   # default: ablation
                        "method 'ablation' does not score encoder-decoders"),
                       (["sweep", "--tasks", "arith-compare", "--route", "prune,merge", "--out", str(tmp_path / "w")],
                        "keeps one module per expert"),
                       (["scan", "--out", str(tmp_path / "sc")], f"{fam} encoder-decoder")):
        assert main([*args, "--model", str(checkpoint)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert not any((tmp_path / p).exists() for p in ("g.json", "audit", "r", "w", "sc"))


def test_nllb_moe_upstream_bug_is_reproduced_and_repaired(tmp_path, capsys):
    """transformers 5.24's NLLB-MoE experts index by the top-1 mask's *value*: only experts 0 and 1
    run. moeguard's repair runs the top-2 mixture the router chose (as transformers 4.x did). When a
    locked transformers fixes the bug, this test fails and the repair can go."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    cfg = AutoConfig.for_model("nllb-moe", vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1,
                               encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=4,
                               decoder_attention_heads=4, num_experts=4, encoder_sparse_step=1,
                               decoder_sparse_step=1, max_position_embeddings=64, moe_token_dropout=0.2)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(cfg).eval()
    mlp = model.model.encoder.layers[0].ffn
    torch.nn.init.normal_(mlp.router.classifier.weight, 0, 1)
    h = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = mlp(h[None])[0]
        top1, combine, _ = mlp.router(h)
        # transformers 4.x: each expert on the tokens with a weight in its column, eval-scaled by 1 - 0.2
        mixture = torch.stack([sum(mlp.experts[f"expert_{e}"](h[t:t + 1])[0] * 0.8 * combine[t, e]
                                   for e in range(4) if combine[t, e] != 0) for t in range(6)])
        by_value = torch.stack([sum(mlp.experts[f"expert_{int(top1[t, c])}"](h[t:t + 1])[0] * 0.8 * combine[t, c]
                                    for c in range(4)) for t in range(6)])
    assert set(top1.argmax(-1).tolist()) - {0, 1}, "the check needs a token whose first choice is expert 2 or 3"
    assert ((combine != 0).sum(-1) == 2).all()   # every token dispatched to two experts
    torch.testing.assert_close(out, by_value)          # what transformers computes
    assert not torch.allclose(out, mixture, atol=1e-3)  # not the top-2 mixture the router chose
    assert MoEAdapter(model).family.name == "nllb_moe"   # moeguard's view of a model repairs it
    with torch.no_grad():
        repaired = mlp(h[None])[0]
        torch.testing.assert_close(repaired, mixture)
        with RoutingCapture(model, norms=True) as cap:   # the capture's own expert-by-expert run: the same
            assert torch.equal(mlp(h[None])[0], repaired)
    assert cap.stats.layers[0].counts.sum() == 12 and (cap.stats.layers[0].norm_sum > 0).sum() >= 3
    fresh = AutoModelForSeq2SeqLM.from_config(cfg)   # transformers' classes themselves are not touched
    assert type(fresh.model.encoder.layers[0].ffn.experts).__name__ == "NllbMoeExperts"
    assert type(copy.deepcopy(model).model.encoder.layers[0].ffn.experts) is type(mlp.experts)
    again = pickle.loads(pickle.dumps(model))   # the repaired class is importable by name
    with torch.no_grad():
        assert torch.equal(again.model.encoder.layers[0].ffn(h[None])[0], repaired)
    model.save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "nllb_moe" and "only experts 0 and 1 ever run" in info["upstream_repair"]
    assert main(["info", "--model", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "upstream repair" in table and "model.encoder.layers: 0; model.decoder.layers: 0" in table


def test_nllb_moe_masking_equals_a_fresh_pruned_model_whatever_the_routers_history(batch):
    """NLLB-MoE's router keeps the capacity of its last call: an eval call writes ceil(fraction x T),
    and a training call then uses it instead of expert_capacity. Every router of a masked model, a
    full layer's too, starts from the config's, as a freshly pruned model's do, in eval and in
    training, and the unmasked routers get their own back."""
    model = tiny_model("nllb_moe")   # eval fraction 0.25, expert_capacity 64
    layers = MoEAdapter(model).layers
    every, but_last = {l.index: KEEP4 for l in layers}, {0: KEEP4, 1: KEEP4, 2: KEEP4}   # layer 3 kept whole
    with torch.no_grad():
        model(input_ids=batch["input_ids"][:, :3], decoder_input_ids=batch["decoder_input_ids"][:, :2])
        assert [l.router.expert_capacity for l in layers] == [2, 2, 1, 1]   # ceil(0.25 x 6), ceil(0.25 x 4)
        for train in (False, True):
            model.train(train)
            for keep in (every, but_last):
                held = [l.router.expert_capacity for l in layers]
                with mask_experts(model, keep):
                    masked = model(**batch).logits
                if keep is every:   # a pruned model is built from the config: its routers hold expert_capacity
                    want = prune_model(model, keep)[0](**batch).logits
                else:   # a layer kept whole has no pruned model (one module per expert): a fresh load's routers
                    fresh = copy.deepcopy(model)
                    for l in MoEAdapter(fresh).layers:
                        l.router.expert_capacity = fresh.config.expert_capacity
                    with mask_experts(fresh, keep):
                        want = fresh(**batch).logits
                torch.testing.assert_close(masked, want, rtol=1e-5, atol=1e-5)
                assert [l.router.expert_capacity for l in layers] == held
                assert not any("forward" in vars(l.router) for l in layers)
                assert not torch.allclose(model(**batch).logits, masked)   # the full model, in the same mode
        model.eval()


def test_nllb_moe_routing_settings_padding_and_capacity_state():
    """NLLB-MoE's other routing switches, padding and the capacity its router keeps between calls:
    route() follows the family's router in each, masked routing keeps the unmasked router's state,
    and the stochastic second-expert policies are refused before any weights load."""
    from moeguard.models.loading import check_config

    h = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3))
    additive = torch.zeros(2, 1, 10, 10)
    additive[1, :, :, 7:] = torch.finfo(torch.float32).min       # row 1's last three tokens are padding
    for overrides in ({}, {"batch_prioritized_routing": True}, {"normalize_router_prob_before_dropping": True},
                      {"router_ignore_padding_tokens": True}, {"moe_eval_capacity_token_fraction": 0.0},
                      {"moe_eval_capacity_token_fraction": 0.0, "expert_capacity": 3}):
        model = tiny_model("nllb_moe", **overrides)
        a = MoEAdapter(model)
        for train in (False, True):
            model.train(train)
            for layer in a.layers:
                for mask in (None, additive):
                    (ref_w, ref_idx), (w, idx) = routed_both_ways(layer, a, h, mask)
                    assert torch.equal(ref_idx, idx) and torch.equal(ref_w, w), (overrides, train, layer.index)
                    if mask is not None and not overrides.get("router_ignore_padding_tokens"):
                        assert (w.view(2, 10, 2)[1, 7:] == 0).all()   # padding takes no expert
                    if "expert_capacity" in overrides and mask is None:   # 3 of 20 tokens' 40 choices: drops
                        assert int((w == 0).sum()) > 0, (overrides, train, layer.index)
        model.eval()
    sampling = tiny_model("nllb_moe")
    sampling.config.second_expert_policy = "sampling"   # a model built, not loaded, is refused all the same
    with pytest.raises(MoeguardError, match="second_expert_policy is 'sampling'"):
        MoEAdapter(sampling)
    for key, value, says in (("second_expert_policy", "sampling", "random routing forbids"),
                             ("router_dtype", "bfloat16", "'float32' only")):
        with pytest.raises(MoeguardError, match=f"config {key} is '{value}'.*{says}") as e:
            check_config(tiny_config("nllb_moe", **{key: value}), FAMILIES.get("nllb_moe"), where="m")
        assert e.value.hint.startswith("fix m/config.json: set")
    # DeepSeek-V2's router runs greedy or group_limited_greedy only (another failed at the first forward)
    with pytest.raises(MoeguardError, match="config topk_method is 'noaux_tc'.*'greedy' or 'group_limited_greedy' only"):
        check_config(tiny_config("deepseek_v2", topk_method="noaux_tc"), FAMILIES.get("deepseek_v2"), where="m")
    for ok in ("greedy", "group_limited_greedy"):
        check_config(tiny_config("deepseek_v2", topk_method=ok), FAMILIES.get("deepseek_v2"), where="m")
    # Switch's router computes in router_dtype too, moeguard's in float32: refused as NLLB's
    with pytest.raises(MoeguardError, match="config router_dtype is 'bfloat16'.*'float32' only"):
        check_config(tiny_config("switch_transformers", router_dtype="bfloat16"), FAMILIES.get("switch_transformers"),
                     where="m")


@pytest.mark.parametrize("fam", sorted(ENCODER_DECODER_LAYOUT))
def test_trace_finds_a_pruned_derivative_and_its_kept_experts(fam, tmp_path, capsys):
    """After theft: a suspect cut from the model is traced back with the experts it kept, and an
    independent model of the same shape is not."""
    from transformers import AutoTokenizer

    from moeguard.models.loading import EMBEDDED_MODEL_DIR
    from moeguard.models.tokenizer_files import save_tokenizer

    # big enough for a fingerprint (1% of the model)
    shape = {"switch_transformers": dict(d_model=256, d_ff=512, vocab_size=4096, d_kv=64),
             "nllb_moe": dict(d_model=256, encoder_ffn_dim=512, decoder_ffn_dim=512, vocab_size=4096)}[fam]
    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    original = tiny_model(fam, **shape)
    suspects = {"derived": prune_model(original, {i: [1, 3, 4, 6] for i in range(4)})[0],
                "independent": tiny_model(fam, seed=5, **shape)}
    for name, m in (("original", original), *suspects.items()):
        m.save_pretrained(tmp_path / name)
        save_tokenizer(tok, tmp_path / name)
    for name in suspects:
        assert main(["trace", "--suspect", str(tmp_path / name), "--original", str(tmp_path / "original"),
                     "--out", str(tmp_path / f"trace-{name}"), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["verdict"] == name, doc["verdict"]
        if name == "derived":
            assert doc["p_value"] < 1e-6
            assert doc["layers"] and all(l["kept"] == [1, 3, 4, 6] for l in doc["layers"]), doc["layers"]


@pytest.mark.parametrize("fam", sorted(ENCODER_DECODER_LAYOUT))
def test_the_seq2seq_head_scores_what_the_model_computes(fam):
    """The encoder reads the context, the decoder the target after its start token; batched and
    padded, every score and loss is the one its example has alone."""
    from transformers import AutoTokenizer

    from moeguard.models.loading import EMBEDDED_MODEL_DIR
    from moeguard.realign.engine import task_loss
    from moeguard.tasks import tokens as T
    from moeguard.tasks.batches import IGNORE, Example, collate
    from moeguard.tasks.evaluate import loglikelihoods

    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    # NLLB-MoE's capacity is the batch's: below a fraction of 1 a token's experts depend on the other
    # rows (the model's design, not the head's), so this check runs its released setting, 1.0
    model = tiny_model(fam, vocab_size=len(tok), **({"moe_eval_capacity_token_fraction": 1.0} if fam == "nllb_moe" else {}))
    start = T.decoder_start(model)
    requests = [("2 + 3 =", " 5"), ("def load_json(path): a longer context, so rows pad", " yes it does")]

    def alone(context, continuation):
        ctx, cont = T.bos_ids(tok) + T.encode(tok, context), T.encode(tok, continuation)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx]), decoder_input_ids=torch.tensor([[start, *cont]])).logits
        return float(logits[0, :len(cont)].log_softmax(-1).gather(-1, torch.tensor(cont)[:, None]).sum())

    with torch.no_grad():
        got = loglikelihoods(model, tok, requests, max_length=64, batch_size=2)
    assert got == pytest.approx([alone(*r) for r in requests], rel=1e-5)

    rows = [Example([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9]), Example([5, 6, 7], [IGNORE, 6, 7])]
    b = collate(rows, pad_id=0, decoder_start=start)
    assert b.input_ids.tolist() == [[5, 6], [5, 0]] and b.decoder_input_ids.tolist() == [[start, 7, 8, 9], [start, 6, 7, 0]]
    assert b.labels.tolist() == [[IGNORE, 7, 8, 9], [IGNORE, 6, 7, IGNORE]] and b.n_targets == 5
    with torch.no_grad():
        batched = task_loss(model(**b.inputs()).logits, b.labels)
        nll = []
        for r in rows:
            one = collate([r], pad_id=0, decoder_start=start)
            nll.append(float(task_loss(model(**one.inputs()).logits, one.labels)) * one.n_targets)
    assert float(batched) == pytest.approx(sum(nll) / 5, rel=1e-5)


@pytest.mark.parametrize("fam", sorted(ENCODER_DECODER_LAYOUT))
def test_every_attribution_method_scores_or_refuses_in_one_line(fam):
    """The matrix's attribution row for an encoder-decoder: the routing-statistics methods score
    every layer of both stacks and leave the model as it was; the rest refuse and say why."""
    from transformers import AutoTokenizer

    from moeguard.attribution.base import list_methods
    from moeguard.attribution.run import make_context, score
    from moeguard.models.loading import EMBEDDED_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    model = tiny_model(fam, vocab_size=len(tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = make_context(model, tok, "arith-compare", samples=8, batch_size=4, reference=["stdlib-code"])
    assert ctx.batches[0].decoder_input_ids is not None   # the verbalizer goes to the decoder
    ran = []
    for m in list_methods():
        if m.causal_only:
            with pytest.raises(MoeguardError, match="does not score encoder-decoders"):
                score(ctx, m.name)
            continue
        s = score(ctx, m.name)
        assert s.layers == [0, 1, 2, 3] and s.scores.shape == (4, 8) and torch.isfinite(s.scores).all(), m.name
        assert (s.scores != 0).any(dim=1).all(), m.name
        ran.append(m.name)
    assert set(ran) >= {"frequency", "gate", "reap", "contrastive"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fam", sorted(ENCODER_DECODER_LAYOUT))
def test_every_active_learning_strategy_reads_an_encoder_decoder(fam):
    """The recovery's strategies read uncertainty, embeddings and routing through the seq2seq head
    (generation too, for summarization): each picks k distinct unlabeled samples, deterministically."""
    import random

    from transformers import AutoTokenizer

    from moeguard.models.loading import EMBEDDED_MODEL_DIR
    from moeguard.realign.features import routing_shares, unlabeled
    from moeguard.realign.strategies.base import Query, get_strategy, list_strategies
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.registry import get_task

    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    model = tiny_model(fam, vocab_size=len(tok))
    for name in ("arith-compare", "stdlib-docs", "record-summary"):
        task = get_task(name)
        pool = unlabeled(task, load_records(task, "train", limit=8))
        shares = routing_shares(model, tok, task, pool, batch_size=4)
        assert shares.shape == (8, 4, 8) and torch.allclose(shares.sum(-1), torch.ones(8, 4, dtype=shares.dtype))
        ran = 0
        for strategy in list_strategies():
            if task.kind not in strategy.kinds:
                continue
            ran += 1

            def picks():
                q = Query(model=model, tokenizer=tok, task=task, pool=pool, candidates=list(range(2, 8)),
                          labeled=[0, 1], k=3, rng=random.Random(0), batch_size=8,
                          orphan_share=(lambda: torch.linspace(0, 1, 8)) if strategy.needs_original else None)
                return get_strategy(strategy.name, task).select(q)

            a = picks()
            assert a == picks() and len(set(a)) == 3 and not set(a) & {0, 1}, (name, strategy.name, a)
        assert ran >= 2, (name, ran)   # random and at least one selecting strategy for every kind


def test_an_audit_runs_on_an_encoder_decoder(family_checkpoint, tmp_path):
    """Baseline, attribution, the sweep with its physical check, recovery (LoRA through the seq2seq
    head) and the report, on each encoder-decoder family; masked and physically pruned scores agree."""
    fam, checkpoint = family_checkpoint
    args = ["audit", "--model", str(checkpoint), "--tasks", "arith-compare", "--methods", "frequency,reap",
            "--keeps", "4", "--recovery-keep", "4", "--random-seeds", "1", "--eval-limit", "4", "--samples", "8",
            "--physical-checks", "1", "--no-deletion-curves", "--recovery-mode", "lora", "--strategies", "random,orphan",
            "--budgets", "4", "--recovery-seeds", "1", "--pool-size", "8", "--recovery-eval-limit", "4",
            "--out", str(tmp_path / "a")]
    assert main(args) == 0
    doc = json.loads((tmp_path / "a" / "results.json").read_text())
    # what the audit measured is recorded: NLLB-MoE's repaired experts, on its card too
    assert ("upstream_repair" in doc["model"]) == (fam == "nllb_moe")
    assert ("upstream repair" in (tmp_path / "a" / "report.html").read_text()) == (fam == "nllb_moe")
    check = doc["physical_checks"][0]
    assert check["abs_diff"] == 0 and check["params_physical"] == check["params_expected"]
    rec = doc["tasks"]["arith-compare"]["recovery"]
    assert set(rec["strategies"]) == {"random", "orphan"} and rec["strategies"]["random"]["labels"] == [0, 4]


@pytest.mark.parametrize("fam", sorted(ENCODER_DECODER_LAYOUT))
def test_masked_routing_runs_offloaded_as_in_memory(fam, batch, tmp_path):
    """Under accelerate's offload (--max-memory) the masked router runs where the hooks put the
    weights, and NLLB-MoE's repaired experts run inside their hooks: the logits are the in-memory ones."""
    from moeguard.models.loading import load_model

    model = tiny_model(fam)
    model.save_pretrained(tmp_path / "m")
    off, _, _ = load_model(str(tmp_path / "m"), max_memory=1000, with_tokenizer=False)
    assert all(p.device.type == "meta" for p in off.parameters())
    keep = {layer.index: KEEP4 for layer in MoEAdapter(model).layers}
    with torch.no_grad():
        for masked in (False, True):
            with mask_experts(model, keep) if masked else contextlib.nullcontext():
                want = model(**batch).logits
            with mask_experts(off, keep) if masked else contextlib.nullcontext():
                got = off(**batch).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
