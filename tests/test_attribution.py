"""Attribution: the shared family x method matrix, and what each method promises."""

import json

import pytest
import torch

from moeguard.attribution.base import Scores, get_method, list_methods
from moeguard.attribution.context import Context
from moeguard.attribution.replay import replay
from moeguard.attribution.run import score
from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.hooks import capture_inputs, mask_experts, trace_experts
from moeguard.tasks.batches import IGNORE, Batch, token_nll
from moeguard.tasks.registry import get_task
from moeguard.testing import causal_families, tiny_model

ALL_METHODS = sorted(m.name for m in list_methods())


def _batches(seed: int, n: int = 2) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (3, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[2, 7:] = 0                      # right padding never counts
        labels = ids.clone()
        labels[:, :3] = IGNORE               # a prompt whose tokens are not targets
        labels[mask == 0] = IGNORE
        out.append(Batch(ids, mask, labels))
    return out


def _ctx(model, **options) -> Context:
    return Context(model=model, tokenizer=None, adapter=MoEAdapter(model), task=get_task("stdlib-code"),
                   batches=_batches(0), reference=_batches(1), options=options)


def _loss(model, batches) -> float:
    total = n = 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
            total += float(token_nll(logits, b.labels).double().sum())
            n += b.n_targets
    return total / n


@pytest.fixture(scope="module", params=causal_families())
def fam_model(request):
    return request.param, tiny_model(request.param)


def test_every_method_is_registered_and_documented():
    assert set(ALL_METHODS) == {"frequency", "gate", "reap", "reap-raw", "reconstruction", "ablation", "gradient",
                                "contrastive", "ablation-screened"}
    assert all(m.description for m in list_methods())


def test_unknown_method_suggests_a_name():
    with pytest.raises(MoeguardError, match="did you mean ablation"):
        get_method("ablaton")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_matrix_every_family_every_method(fam_model, method):
    fam, model = fam_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    s = score(_ctx(model, max_subsets=40), method)
    a = MoEAdapter(model)
    assert s.scores.shape == (len(a.layers), 8)
    assert torch.isfinite(s.scores).all()
    assert s.layers == [l.index for l in a.layers]
    # the model is exactly as it was: weights, grad flags, and no hook left behind
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in model.modules())
    # round trip through the scores file
    again = Scores.from_dict(json.loads(json.dumps(s.to_dict())))
    assert torch.allclose(again.scores, s.scores, atol=1e-8) and again.subsets == s.subsets


def test_replay_from_any_layer_reproduces_the_model(fam_model):
    fam, model = fam_model
    a = MoEAdapter(model)
    b = _batches(0)[0]
    with torch.no_grad(), capture_inputs(dict(enumerate(a.decoder_layers))) as inputs:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
    for start in range(len(a.decoder_layers)):
        with torch.no_grad():
            again = replay(a, inputs, start, copies=2)
        assert torch.allclose(again[:3], logits, atol=1e-5) and torch.allclose(again[3:], logits, atol=1e-5)


def test_ablation_is_the_exact_loss_increase_of_masking(fam_model, monkeypatch):
    from moeguard.attribution import replay as R

    fam, model = fam_model
    # the head in chunks of 5 target rows (large vocabularies' path), checked against the exact loss
    monkeypatch.setattr(R, "LOGITS_PER_CHUNK", 5 * MoEAdapter(model).vocab_size)
    ctx = _ctx(model, masks_per_pass=3)
    s = score(ctx, "ablation")
    base = _loss(model, ctx.batches)
    a = MoEAdapter(model)
    for row, e in [(0, 1), (len(a.layers) - 1, 6)]:
        li = a.layers[row].index
        with mask_experts(model, {li: [x for x in range(8) if x != e]}):
            exact = _loss(model, ctx.batches) - base
        assert abs(float(s.scores[row, e]) - exact) < 1e-5, (fam, row, e)


@pytest.mark.parametrize("fam", ["mixtral", "qwen2_moe"])
def test_reap_raw_is_reap_with_the_routers_score_before_renormalization(fam):
    from moeguard.models.hooks import trace_experts

    model = tiny_model(fam, **({"norm_topk_prob": False} if fam == "qwen2_moe" else {}))
    ctx = _ctx(model)
    raw, applied = score(ctx, "reap-raw").scores, score(ctx, "reap").scores
    a = MoEAdapter(model)
    num = torch.zeros(len(a.layers), 8, dtype=torch.float64)
    den = torch.zeros_like(num)
    for b in ctx.batches:   # from scratch: softmax of the logits at each chosen expert x its output's norm
        with torch.no_grad(), trace_experts(model, adapter=a) as traces:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        valid = b.attention_mask.reshape(-1).bool()
        for row, layer in enumerate(a.layers):
            t = traces[layer.index]
            p = torch.softmax(t.logits.float(), -1).gather(1, t.index)[valid].double()
            n = t.slot_out.float().norm(dim=-1)[valid].double()
            num[row].index_add_(0, t.index[valid].reshape(-1), (p * n).reshape(-1))
            den[row].index_add_(0, t.index[valid].reshape(-1), torch.ones_like(p).reshape(-1))
    assert torch.allclose(raw, num / den.clamp_min(1), rtol=1e-4, atol=1e-6)
    if fam == "mixtral":   # renormalizing over the top-2 raises every gate: reap >= reap-raw
        assert (applied >= raw).all() and (applied > raw).any()
    else:                  # no renormalization: the same scores
        assert torch.allclose(raw, applied, rtol=1e-5)


def test_frequency_and_gate_are_shares():
    model = tiny_model("mixtral")
    ctx = _ctx(model)
    f = score(ctx, "frequency").scores
    assert torch.allclose(f.sum(1), torch.ones(f.shape[0], dtype=f.dtype))
    g = score(ctx, "gate").scores
    # renormalized top-k weights sum to 1 per token, so the per-token means sum to 1 per layer
    assert torch.allclose(g.sum(1), torch.ones(g.shape[0], dtype=g.dtype), atol=1e-5)
    # and each share from scratch: the slots each expert got, and its gate weights, over the real tokens
    a = MoEAdapter(model)
    slots = torch.zeros(len(a.layers), 8, dtype=torch.float64)
    mass, tokens = torch.zeros_like(slots), 0
    for b in ctx.batches:
        with torch.no_grad(), trace_experts(model, adapter=a) as traces:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        valid = b.attention_mask.reshape(-1).bool()
        tokens += int(valid.sum())
        for row, layer in enumerate(a.layers):
            t = traces[layer.index]
            slots[row].index_add_(0, t.index[valid].reshape(-1), torch.ones(t.index[valid].numel(), dtype=torch.float64))
            mass[row].index_add_(0, t.index[valid].reshape(-1), t.weights[valid].reshape(-1).double())
    assert torch.allclose(f, slots / slots.sum(1, keepdim=True), atol=1e-9)
    assert torch.allclose(g, mass / tokens, atol=1e-5) and not torch.allclose(f, torch.full_like(f, 1 / 8))


def test_reconstruction_searches_subsets_exhaustively_when_small():
    model = tiny_model("qwen3_moe")
    s = score(_ctx(model, max_subsets=1000), "reconstruction")
    assert sorted(s.subsets) == list(range(1, 8))
    for row, layer in enumerate(s.layers):
        # with one expert dropped, the best 7-subset drops the expert whose removal hurts least
        least = min(range(8), key=lambda e: float(s.scores[row, e]))
        assert s.subsets[7][layer] == [e for e in range(8) if e != least]
        assert all(len(s.subsets[k][layer]) == k for k in s.subsets)


def test_reconstruction_greedy_when_too_many_subsets_is_nested():
    s = score(_ctx(tiny_model("mixtral"), max_subsets=1), "reconstruction")
    for layer in s.layers:
        for k in range(1, 7):
            assert set(s.subsets[k][layer]) <= set(s.subsets[k + 1][layer])


def test_contrastive_needs_a_reference():
    model = tiny_model("mixtral")
    ctx = _ctx(model)
    ctx.reference = []
    with pytest.raises(MoeguardError, match="reference"):
        score(ctx, "contrastive")


def test_contrastive_is_zero_when_task_and_reference_route_alike():
    model = tiny_model("mixtral")
    ctx = _ctx(model)
    ctx.reference = ctx.batches
    assert torch.allclose(score(ctx, "contrastive").scores, torch.zeros(1, dtype=torch.float64), atol=1e-9)


def test_contrastive_is_the_task_terms_of_kl_against_a_reference_routed_otherwise():
    """Its one other test has p = q, where every score is 0: a flipped sign, p and q swapped, or the
    task read twice give 0 there too (a flipped sign keeps the experts the task uses least)."""
    model = tiny_model("mixtral")
    ctx = _ctx(model)   # the reference: other batches, routed otherwise
    a = MoEAdapter(model)

    def shares(batches):
        mass = torch.zeros(len(a.layers), 8, dtype=torch.float64)
        for b in batches:
            with torch.no_grad(), trace_experts(model, adapter=a) as traces:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            valid = b.attention_mask.reshape(-1).bool()
            for row, layer in enumerate(a.layers):
                t = traces[layer.index]
                mass[row].index_add_(0, t.index[valid].reshape(-1), t.weights[valid].reshape(-1).double())
        return mass / mass.sum(1, keepdim=True)

    p, q = shares(ctx.batches), shares(ctx.reference)
    assert not torch.allclose(p, q, atol=1e-3)
    s = score(ctx, "contrastive").scores
    assert torch.allclose(s, p * torch.log((p + 1e-6) / (q + 1e-6)), atol=1e-5)
    top = s.argmax(1)
    rows = torch.arange(len(top))
    assert (p[rows, top] > q[rows, top]).all()   # the top expert is one the task uses more than the reference


@pytest.mark.parametrize("fam", ["mixtral", "deepseek_v3", "qwen3_moe"])
def test_screened_ablation_is_exact_on_the_experts_gradient_ranks_highest(fam):
    model = tiny_model(fam)
    ctx = _ctx(model, masks_per_pass=3)
    exact = score(ctx, "ablation").scores
    grad = score(ctx, "gradient").scores
    ctx.options["screen"] = 8
    assert torch.equal(score(ctx, "ablation-screened").scores, exact)   # everything screened
    ctx.options["screen"] = 3
    s = score(ctx, "ablation-screened").scores
    for row in range(exact.shape[0]):
        picked = torch.topk(grad[row], 3).indices
        rest = [e for e in range(8) if e not in picked.tolist()]
        # exact up to float32 noise (the masks share batched passes in other groups)
        assert torch.allclose(s[row, picked], exact[row, picked], rtol=1e-3, atol=1e-6)
        # the rest: below every screened expert, in gradient's order
        assert s[row, rest].max() < s[row, picked].min(), (fam, row)
        assert torch.argsort(s[row, rest]).tolist() == torch.argsort(grad[row, rest]).tolist(), (fam, row)


def test_gradient_tracks_ablation_on_the_embedded_model():
    from moeguard.attribution.run import make_context
    from moeguard.models.loading import load_model
    from moeguard.analysis import spearman

    model, tok, _ = load_model(None)
    ctx = make_context(model, tok, "stdlib-code", samples=16)
    abl = score(ctx, "ablation").scores.flatten().tolist()
    grad = score(ctx, "gradient").scores.flatten().tolist()
    assert spearman(abl, grad) > 0.6


def test_scores_file_errors(tmp_path):
    with pytest.raises(MoeguardError, match="does not exist"):
        Scores.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MoeguardError, match="not valid JSON"):
        Scores.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"keep": {}}))
    with pytest.raises(MoeguardError, match="not a moeguard scores file"):
        Scores.load(tmp_path / "other.json")


def test_patches_nest_and_restore_what_was_there():
    """An outer mask (or accelerate's instance forward) survives an inner attribution run."""
    model = tiny_model("mixtral")
    a = MoEAdapter(model)
    router = a.layers[0].router
    with mask_experts(model, {a.layers[0].index: [0, 1, 2]}):
        outer = router.__dict__["forward"]
        score(_ctx(model), "ablation")
        assert router.__dict__["forward"] is outer
    assert "forward" not in router.__dict__


def test_attribution_refuses_models_with_uneven_layers():
    from moeguard.models.prune import prune_model

    small, _ = prune_model(tiny_model("mixtral"), {0: [0, 1, 2, 3], 1: [0, 1, 2, 3, 4, 5]})
    with pytest.raises(MoeguardError, match="different expert counts"):
        score(_ctx(small), "frequency")


def test_reprune_budget_model_to_uniform():
    from moeguard.models.prune import PER_LAYER_KEY, prune_model

    small, _ = prune_model(tiny_model("mixtral"), {0: [0, 1, 2, 3], 1: [0, 1, 2, 3, 4, 5]})
    again, _ = prune_model(small, {0: [0, 1], 1: [0, 1]})
    assert not getattr(again.config, PER_LAYER_KEY, None)
    assert [l.num_experts for l in MoEAdapter(again).layers] == [2, 2]


def test_reconstruction_gram_error_equals_the_block_replay(fam_model):
    """The Gram-matrix error (no block re-run) is the masked block's squared output change, on every family."""
    from moeguard.attribution import reconstruction as R

    family, model = fam_model
    adapter = MoEAdapter(model)
    if adapter.family.call == "scaled_input":
        pytest.skip("input-scaled experts keep the block replay")
    inputs = R._Inputs(adapter, per_batch=10**6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in _batches(0):
            inputs.add(model, b)
        # every layer reaches the Gram path (JetMoE's MLP once fell back to replaying its block: 13x slower)
        assert all(inputs.layer(l.index)["experts"] is not None for l in adapter.layers if l.standalone)
        layer = adapter.layers[-1]
        seen = inputs.layer(layer.index)
        if layer.standalone:
            x = seen["block"][None]

            def run():
                return R._block_out(layer.block, x)
            fast = R._FastError(adapter, layer, seen["router"], seen["experts"])
        else:   # JetMoE's attention experts: the attention around them replayed on each batch's valid tokens
            calls = []
            for b in _batches(0):
                with capture_inputs({0: layer.outer}) as c:
                    model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
                calls.append((c[0], b.attention_mask.reshape(-1).bool()))

            def run():
                return torch.cat([layer.outer(*a, **kw)[0].reshape(v.numel(), -1)[v] for (a, kw), v in calls]).float()
            assert seen["experts"] is None and seen["gram"].shape == (seen["router"].shape[0], 8, 8)
            fast = R._FastError(adapter, layer, seen["router"], None, gram=seen["gram"])
        full = run()
        g = torch.Generator().manual_seed(1)
        for k in (7, 4, 2):
            kept = sorted(torch.randperm(8, generator=g)[:k].tolist())
            with mask_experts(model, {layer.index: kept}, adapter=adapter):
                slow = float((run() - full).pow(2).sum(-1).mean())
            assert fast(kept) == pytest.approx(slow, rel=1e-4, abs=1e-9), (family, kept)
        assert fast(list(range(8))) == pytest.approx(0.0, abs=1e-9)


def test_reconstruction_bounds_its_tokens_and_says_so():
    model = tiny_model("mixtral")
    ctx = _ctx(model, reconstruction_memory=8 * 8 * 8 * 5)   # Gram matrices of 5 tokens
    total = sum(int(b.attention_mask.sum()) for b in ctx.batches)
    with pytest.warns(UserWarning, match=f"reconstruction: 5 of {total} calibration tokens per layer used "
                                         r"\(the Gram matrices of 8 experts fill reconstruction_memory\)"):
        s = score(ctx, "reconstruction")
    assert s.scores.shape == (2, 8) and bool((s.scores > 0).any())
    # the same 5 tokens asked for directly score the same: the bound picks tokens, it does not change the method
    with pytest.warns(UserWarning, match=f"reconstruction: 5 of {total} calibration tokens per layer used"):
        direct = score(_ctx(model, reconstruction_tokens=5), "reconstruction")
    torch.testing.assert_close(s.scores, direct.scores)
    assert all(len(s.subsets[k][layer]) == k for k in s.subsets for layer in s.layers)


def test_a_task_longer_than_the_model_s_positions_is_attributed_within_them(monkeypatch):
    """Evaluation cuts a task's sequences to the model's positions; attribution (and realign's and
    harden's training) took the task's own max_length, past the positions the model was trained on."""
    import dataclasses
    import warnings

    from moeguard.attribution.run import make_context
    from moeguard.models.loading import load_model

    model, tok, _ = load_model(None)
    positions = model.config.max_position_embeddings
    long = dataclasses.replace(get_task("stdlib-docs"), max_length=4 * positions)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ctx = make_context(model, tok, long, samples=16, reference=[dataclasses.replace(get_task("stdlib-code"),
                                                                                         max_length=4 * positions)])
    assert ctx.task.max_length == positions
    widths = [b.input_ids.shape[1] for b in ctx.batches + ctx.reference]
    assert max(widths) <= positions, widths
    assert any(f"has max_length {4 * positions}, and the model has {positions} positions" in str(w.message) for w in said)
