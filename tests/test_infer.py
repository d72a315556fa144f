"""Automatic family mapping: the inferred spec of a model type with no built-in one, verified
against that type's own router, and what commands do with verified and unverified specs."""

import json
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from moeguard.cli import main
from moeguard.models import infer
from moeguard.models.adapter import MoEAdapter
from moeguard.models.families import FAMILIES
from moeguard.models.hooks import mask_experts
from moeguard.models.loading import model_class
from moeguard.models.prune import prune_model
from moeguard.testing import _COMMON, assert_same_safetensors, tiny_config

# Model types moeguard has no spec for, as tiny configs (8 experts, top-2, every routing feature on)
TINY_INFERRED = {
    # sigmoid scores, a selection bias chosen on sorted scores, renormalized: verified
    "laguna": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32),
    # top-k on logits then softmax, an always-on shared expert: verified
    "cohere2_moe": dict(num_experts=8, num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=16),
    # transposed fused experts [E, d, 2I] (Aria's language model): verified, the gate_up_t layout
    "aria_text": dict(moe_num_experts=8, moe_topk=2, moe_intermediate_size=16, moe_num_shared_experts=1),
    # group-limited softmax run with one group (its default), renormalized in the unsorted choice's
    # order (top-4: the order of a sum of 3 or more weights shows in the last bit); no causal-LM
    # class (built as image-text-to-text): verified
    "mistral4": dict(n_routed_experts=8, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=16,
                     n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5, kv_lora_rank=8,
                     q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=8,
                     num_key_value_heads=4),
}
# Multimodal wrappers: no causal-LM class; moeguard builds their image-text-to-text model (an LM
# head, a forward that takes text alone) and finds the MoE under its language model
_VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, deepstack_visual_indexes=[])
TINY_WRAPPERS = {
    "qwen3_vl_moe": dict(text_config=dict({k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"},
                                          num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                          decoder_sparse_step=1, norm_topk_prob=True),
                         vision_config=_VISION, tie_word_embeddings=False),
    # its checkpoints keep one tensor per expert on disk (transformers' qwen2_moe conversion)
    "glm4v_moe": dict(text_config=dict({k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"},
                                       n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                       moe_intermediate_size=16, first_k_dense_replace=0, n_group=1, topk_group=1,
                                       norm_topk_prob=True, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                       rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                            partial_rotary_factor=0.5, mrope_section=[2, 1, 1])),
                      vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
                      tie_word_embeddings=False),
}
# a routing switch no rule of moeguard's has (Laguna's tanh soft-cap on the logits): unverified
SOFTCAPPED = dict(TINY_INFERRED["laguna"], moe_router_logit_softcapping=2.0)
# Built-in families inference cannot re-derive, and why
NOT_INFERRED = {"gpt_oss": "has_bias", "phimoe": "none of the", "nemotron_h": "no fused experts",
                "llama4": "returns 2 value", "dbrx": "no fused experts", "switch_transformers": "no fused experts",
                "jetmoe": "no fused experts", "nllb_moe": "no fused experts"}
# constants the checks cannot tell apart (x + 1e-20 == x, max(x, 1e-12) == x for sums of order 1)
# and the config values a built-in's router runs (DeepSeek-V2's topk_method): a rule of the config, which
# routing cannot show
INDISTINGUISHABLE = {"renorm_eps": 0.0, "renorm_min_key": None, "requires": ()}


def _tiny(model_type, **kw):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **(kw if model_type in TINY_WRAPPERS else {**_COMMON, **kw}))
    model = model_class(config).from_config(config)
    with torch.no_grad():
        # routers and selection biases away from their zero init (the spec even when unverified;
        # none when nothing could be inferred)
        spec = infer.infer_family(model.config).spec
        for layer in MoEAdapter(model, family=spec).layers if spec is not None else ():
            layer.router_weight.normal_(0, 0.5)
            if layer.correction_bias is not None:
                layer.correction_bias.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES.names()))
def test_inference_rederives_every_builtin_family(family):
    """With the built-in spec hidden, inference finds the same pieces and a rule that reproduces
    the family's router exactly; the built-ins it cannot re-derive fail for a stated reason."""
    config = tiny_config(family)
    model = infer._meta(config)
    if family in NOT_INFERRED:
        with nullcontext() if family == "phimoe" else pytest.raises(infer._NotSkeleton, match=NOT_INFERRED[family]):
            found = infer._structure(model, config)
            spec, reasons, _ = infer._verify(config, found)
            assert reasons and NOT_INFERRED[family] in reasons[0]
        return
    found = infer._structure(model, config)
    spec, reasons, checks = infer._verify(config, found)
    assert reasons == [], reasons
    built = FAMILIES.get(family)
    assert spec.layers_path == built.layers_path and spec.block_attrs[0] in built.block_attrs
    assert (spec.router_attr, spec.router_weight_attr) == (built.router_attr, built.router_weight_attr)
    # the same config values (a key may be the other's attribute_map alias)
    for key, built_key in ((spec.num_experts_key, built.num_experts_key), (spec.top_k_key, built.top_k_key)):
        assert getattr(config, key) == getattr(config, built_key)
    assert spec.final_norm_path == built.final_norm_path
    # shared experts in the block are found; one on the decoder layer (Granite hybrid) is not looked for
    assert set(spec.shared_attrs) <= set(built.shared_attrs)
    assert replace(spec.routing, **INDISTINGUISHABLE) == replace(built.routing, **INDISTINGUISHABLE)


@pytest.mark.parametrize("model_type", sorted(TINY_INFERRED) + sorted(TINY_WRAPPERS))
def test_an_inferred_family_masks_prunes_streams_and_reloads_like_a_builtin(model_type, token_batch, tmp_path):
    from moeguard.pruning.checkpoint import prune_checkpoint

    model = _tiny(model_type, **{**TINY_INFERRED, **TINY_WRAPPERS}[model_type])
    a = MoEAdapter(model)
    assert a.family.name == model_type and model_type not in FAMILIES.names()
    assert infer.infer_family(model.config).status == "verified"
    ids, mask = token_batch
    keep = {l.index: [0, 2, 5, 7] for l in a.layers}
    with torch.no_grad(), mask_experts(model, keep):
        masked = model(input_ids=ids, attention_mask=mask).logits
    pruned, record = prune_model(model, keep)
    with torch.no_grad():
        physical = pruned(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(masked, physical, rtol=1e-5, atol=1e-5)
    assert record["family"] == model_type
    model.save_pretrained(tmp_path / "src")
    pruned.save_pretrained(tmp_path / "mem")
    prune_checkpoint(tmp_path / "src", tmp_path / "streamed", keep)
    assert_same_safetensors(tmp_path / "mem", tmp_path / "streamed")
    # vanilla transformers, through the auto class the model type has (a wrapper's is image-text-to-text)
    reloaded = model_class(model.config).from_pretrained(tmp_path / "streamed").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, physical)


def test_a_multimodal_wrapper_is_found_under_its_language_model_and_runs_the_commands(tmp_path, capsys):
    """Qwen3-VL-MoE has no causal-LM class: the spec is inferred on its image-text-to-text model
    (the MoE under model.language_model, the keys in its text config) and verified; attribution,
    pruning and eval run on its checkpoint, and the pruned one keeps its type, its vision tower and
    the new count in the text config."""
    from moeguard.models.loading import EMBEDDED_MODEL_DIR
    from moeguard.models.tokenizer_files import save_tokenizer
    from transformers import AutoTokenizer

    kw = TINY_WRAPPERS["qwen3_vl_moe"]
    kw = dict(kw, text_config=dict(kw["text_config"], vocab_size=4096))   # the embedded tokenizer's vocabulary
    d = tmp_path / "vl"
    _tiny("qwen3_vl_moe", **kw).save_pretrained(d)
    save_tokenizer(AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR), d)
    capsys.readouterr()
    assert main(["info", "--model", str(d), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["family"] == "qwen3_vl_moe" and data["family_spec"]["status"] == "verified"
    assert "multimodal wrapper" in data["family_spec"]["note"]
    assert data["family_spec"]["spec"]["layers_path"] == "model.language_model.layers"
    assert data["moe_layers"] == [0, 1] and data["top_k"] == 2
    scores = tmp_path / "scores.json"
    assert main(["attribute", "--model", str(d), "--task", "arith-compare", "--method", "frequency", "--samples", "8",
                 "--out", str(scores)]) == 0
    assert main(["prune", "--model", str(d), "--scores", str(scores), "--keep", "4", "--out", str(tmp_path / "p")]) == 0
    pruned = json.loads((tmp_path / "p" / "config.json").read_text())
    assert pruned["model_type"] == "qwen3_vl_moe" and pruned["vision_config"]["depth"] == 1
    assert AutoConfig.from_pretrained(tmp_path / "p").text_config.num_experts == 4
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "p")
    assert MoEAdapter(reloaded).num_experts == 4
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "p"), "--tasks", "arith-compare", "--limit", "8",
                 "--out", str(tmp_path / "eval.json")]) == 0
    r = json.loads((tmp_path / "eval.json").read_text())["tasks"]["arith-compare"]
    assert r["n_samples"] == 8 and r["metric"] == "accuracy" and isinstance(r["score"], float) and 0 <= r["score"] <= 100


def test_a_text_sub_config_verifies_on_its_base_model_and_commands_say_to_load_its_wrapper():
    """qwen3_vl_moe_text has no class with an LM head: its router is verified on the base model,
    the note says so, and loading such a config names what is missing."""
    from moeguard.errors import MoeguardError
    from moeguard.models.loading import model_class

    config = AutoConfig.for_model("qwen3_vl_moe_text", **TINY_WRAPPERS["qwen3_vl_moe"]["text_config"])
    found = infer.infer_family(config)
    assert found.status == "verified" and "no class with an LM head" in found.note
    with pytest.raises(MoeguardError, match="neither a causal-LM nor an image-text-to-text class"):
        model_class(config)


def _saved(tmp_path, model_type, kw):
    d = tmp_path / model_type
    _tiny(model_type, **kw).save_pretrained(d)
    return d


def test_info_says_how_the_family_spec_was_found(tmp_path, capsys):
    d = _saved(tmp_path, "cohere2_moe", TINY_INFERRED["cohere2_moe"])
    assert main(["info", "--model", str(d), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["family"] == "cohere2_moe" and data["family_spec"]["status"] == "verified"
    spec = data["family_spec"]["spec"]   # every FamilySpec field, to copy into a built-in spec
    assert spec["routing"]["select_on"] == "logits" and spec["shared_attrs"] == ["shared_experts"]
    assert spec["expert_layout"] == "gate_up" and spec["num_experts_key"] == "num_experts"


def test_a_router_no_rule_reproduces_is_refused_even_when_trusted(tmp_path, capsys):
    d = _saved(tmp_path, "laguna", SOFTCAPPED)
    capsys.readouterr()   # drop what saving printed
    for argv in (["info", "--model", str(d)], ["--trust-inferred-family", "info", "--model", str(d)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "could not infer one" in err[0] and "routing rules" in err[0], err
        assert "no checked rule to trust" in err[0]


def test_a_spec_right_in_fp32_only_is_refused_unless_trusted(tmp_path, capsys, monkeypatch):
    """A rule that matches in float32 but not bit for bit in bfloat16 is unverified: refused, or
    used with --trust-inferred-family for that call only (no dtype handling at all stands in for
    a bf16 mismatch here)."""
    d = _saved(tmp_path, "laguna", TINY_INFERRED["laguna"])
    monkeypatch.setattr(infer, "_DTYPES", [])
    monkeypatch.setattr(infer, "_CACHE", {})
    capsys.readouterr()
    assert main(["info", "--model", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not verified" in err[0] and "bit for bit in bfloat16" in err[0]
    assert "--trust-inferred-family before the command" in err[0]
    assert main(["--trust-inferred-family", "info", "--model", str(d), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["family"] == "laguna" and data["family_spec"]["status"] == "unverified"
    assert main(["info", "--model", str(d)]) == 2   # the flag holds for that call only
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not verified" in err[0] and "--trust-inferred-family before the command" in err[0], err
    # a library caller's own setting: not used by a CLI call without the flag, and left as it was
    from moeguard.models.families import _POLICY, trust_inferred_families

    trust_inferred_families(True)
    try:
        assert main(["info", "--model", str(d)]) == 2 and _POLICY["trust_inferred"] is True
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not verified" in err[0] and "--trust-inferred-family before the command" in err[0]
    finally:
        trust_inferred_families(False)


def test_families_lists_builtins_and_why_each_type_is_or_is_not_supported(capsys):
    types = "mixtral,cohere2_moe,longcat_flash,jetmoe,switch_transformers,nllb-moe"
    assert main(["families", "--json", "--model-types", types]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["family"] for r in data["builtin"]] == FAMILIES.names()
    assert all(r["routing"] for r in data["builtin"])
    # a family's keys are read where it keeps them: DBRX's rule from its ffn_config (p-norm 1.0: renormalized)
    dbrx = next(r for r in data["builtin"] if r["family"] == "dbrx")
    assert dbrx["count_key"] == "ffn_config.moe_num_experts" and "renormalized" in dbrx["routing"]
    rows = {r["model_type"]: r for r in data["installed"]}
    assert rows["mixtral"]["status"] == "built-in" and rows["cohere2_moe"]["status"] == "verified"
    assert rows["longcat_flash"]["status"] == "unsupported" and "no config key" in rows["longcat_flash"]["reasons"][0]
    assert rows["jetmoe"]["status"] == "built-in"
    assert rows["switch_transformers"]["status"] == "built-in"
    assert rows["nllb-moe"]["status"] == "built-in"
    assert data["counts"] == {"built-in": 4, "verified": 1, "unsupported": 1}
    assert main(["families", "--model-types", "cohere2_moe"]) == 0
    out = capsys.readouterr().out
    assert "built-in families" in out and "cohere2_moe" in out and "verified" in out
    assert main(["families", "--model-types", "mixtrl"]) == 2
    err = capsys.readouterr().err
    assert "does not know" in err and "did you mean mixtral" in err


def test_a_multimodal_wrapper_runs_every_attribution_method_and_fine_tuning_mode():
    """The shared matrix's other checks on a wrapper: every attribution method scores its layers and
    leaves it as it was; every fine-tuning mode trains and changes what it computes."""
    from moeguard.attribution.base import list_methods
    from moeguard.attribution.context import Context
    from moeguard.attribution.run import score
    from moeguard.realign.engine import FinetuneConfig, finetune
    from moeguard.realign.modes import MODES, apply_mode
    from moeguard.tasks.batches import IGNORE, Batch, Example
    from moeguard.tasks.registry import get_task

    model = _tiny("qwen3_vl_moe", **TINY_WRAPPERS["qwen3_vl_moe"])
    a = MoEAdapter(model)
    for l in a.layers:
        with torch.no_grad():
            l.router_weight.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(0, 96, (3, 10), generator=g)
        labels = ids.clone()
        labels[:, :3] = IGNORE
        return Batch(ids, torch.ones_like(ids), labels)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = Context(model=model, tokenizer=None, adapter=a, task=get_task("stdlib-code"), batches=[batch(), batch()],
                  reference=[batch()], options={"max_subsets": 40})
    for method in list_methods():
        s = score(ctx, method.name)
        assert s.scores.shape == (2, 8) and torch.isfinite(s.scores).all(), method.name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(0, 96, (2, 10), generator=g)
    data = [Example(x, [IGNORE] * 3 + x[3:]) for x in torch.randint(1, 96, (8, 8), generator=g).tolist()]
    for mode in sorted(MODES):
        fresh = _tiny("qwen3_vl_moe", **TINY_WRAPPERS["qwen3_vl_moe"])
        with torch.no_grad():
            ref = fresh(input_ids=ids).logits
        t = apply_mode(fresh, mode)
        r = finetune(t, data, FinetuneConfig(mode=mode, min_steps=2, epochs=1, batch_size=4, lr=1e-2), pad_id=0)
        assert r.steps == 2 and all(map(torch.isfinite, torch.tensor(r.losses))), mode
        with torch.no_grad():
            assert not torch.allclose(t.model(input_ids=ids).logits, ref), f"{mode} changed nothing"


def test_a_wrapper_s_positions_and_hidden_size_are_its_language_model_s():
    """Qwen3-VL-MoE's and GLM-4.5V's top-level config has neither: tasks were not cut to the model's
    positions, serve's 413 guard was off and the monitor split long prompts at a default 4,096 tokens, and
    a monitor profile of another hidden size was not refused."""
    import dataclasses

    from moeguard.models.families import text_config
    from moeguard.tasks.evaluate import fit_to_model
    from moeguard.tasks.registry import get_task

    kw = TINY_WRAPPERS["qwen3_vl_moe"]
    config = AutoConfig.for_model("qwen3_vl_moe", **dict(kw, text_config=dict(kw["text_config"], max_position_embeddings=64)))
    assert getattr(config, "max_position_embeddings", None) is None and getattr(config, "hidden_size", None) is None
    assert text_config(config).max_position_embeddings == 64 and text_config(config).hidden_size == _COMMON["hidden_size"]
    model = type("M", (), {"config": config})()
    long = dataclasses.replace(get_task("arith-compare"), max_length=512)
    with pytest.warns(UserWarning, match="the model has 64 positions"):
        assert fit_to_model(long, model).max_length == 64
    assert text_config(AutoConfig.for_model("mixtral")).hidden_size == 4096   # a plain config is its own
