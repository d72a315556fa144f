"""Fine-tuning engine and modes: the shared family x mode matrix, resume, NaN guard, aux loss."""

import pytest
import torch

from moeguard.models.adapter import MoEAdapter
from moeguard.realign.engine import FinetuneConfig, TrainingDiverged, finetune
from moeguard.realign.modes import MODES, apply_mode
from moeguard.tasks.batches import IGNORE, Example
from moeguard.tasks.tokens import both_stacks
from moeguard.testing import tiny_model

from moeguard.models.families import FAMILIES as FAMILY_REGISTRY  # noqa: E402

FAMILIES = FAMILY_REGISTRY.names()  # every registered family, so a new one is covered without an edit here


def examples(n=12, seed=0, vocab=96):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, vocab, (6 + i % 5,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * 3 + ids[3:]))  # targets after a 3-token "prompt"
    return out


def owned(model, mode):
    """Names of the base parameters a mode may change."""
    a = MoEAdapter(model)
    if mode == "router":
        mods = [l.router for l in a.layers]
    elif mode == "experts":
        mods = [l.experts for l in a.layers]
    else:
        return {n for n, _ in model.named_parameters()}
    ids = {id(p) for m in mods for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_mode_trains_only_its_parameters_and_releases_the_model(family, mode):
    model = tiny_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = model(**both_stacks(model, ids)).logits
    t = apply_mode(model, mode)
    assert t.params, "a mode must train something"
    r = finetune(t, examples(), FinetuneConfig(mode=mode, min_steps=4, epochs=1, batch_size=4, lr=1e-2), pad_id=0)
    assert r.steps == 4 and len(r.losses) == 4 and all(map(torch.isfinite, torch.tensor(r.losses)))
    with torch.no_grad():
        tuned_logits = t.model(**both_stacks(model, ids)).logits
    assert not torch.allclose(tuned_logits, ref_logits), "training changed nothing the model computes"
    if mode == "lora":
        merged = t.merged()
        with torch.no_grad():
            gap = (merged(**both_stacks(merged, ids)).logits - tuned_logits).abs().max()
        # folding B@A into W only reorders float sums: far below what training moved
        assert gap < 0.1 * (tuned_logits - ref_logits).abs().max()
        return
    base = t.release()
    after = dict(base.named_parameters())
    may = owned(base, mode)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= may, f"{mode} changed {sorted(changed - may)[:3]}"
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_release_gives_back_the_untouched_base(family):
    model = tiny_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = apply_mode(model, "lora")
    finetune(t, examples(), FinetuneConfig(mode="lora", min_steps=3, epochs=1, batch_size=4, lr=1e-2), pad_id=0)
    base = t.release()
    after = dict(base.named_parameters())
    assert set(after) == set(before), "peft layers left behind"
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_a_new_adapter_mode_is_folded_released_and_capped_as_lora_by_its_spec():
    """LoRA was named in five places (fold to save, unload to release, the study's fold, the protocol
    check, the cap): a mode registered with adapters=True (a peft DoRA, say) saved its adapter keys,
    left its layers in the model and was refused under --max-memory."""
    import dataclasses

    from moeguard.realign.modes import ModeSpec, get_mode, register_mode
    from moeguard.studies.recovery import check_capped

    lora = get_mode("lora")
    register_mode(ModeSpec("adapters-test", "LoRA under another name", lora.default_lr,
                           lambda model, **o: dataclasses.replace(lora.apply(model, **o), mode="adapters-test"),
                           adapters=True))
    try:
        model = tiny_model("mixtral")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        t = apply_mode(model, "adapters-test")
        assert t.adapters and t.mode == "adapters-test"
        check_capped("8MiB", mode="adapters-test")   # trains in memory over offloaded weights, as LoRA
        finetune(t, examples(), FinetuneConfig(mode="adapters-test", min_steps=2, epochs=1, batch_size=4, lr=1e-2), pad_id=0)
        base = t.release()
        assert set(dict(base.named_parameters())) == set(before), "peft layers left behind"
        folded = apply_mode(base, "adapters-test").merged()   # what is saved: the adapters folded in
        assert set(dict(folded.named_parameters())) == set(before), "adapter keys saved"
    finally:
        MODES.remove("adapters-test")
    with pytest.raises(Exception, match="use --mode lora"):
        check_capped("8MiB", mode="full")


def test_resume_after_interruption_is_bitwise_identical(tmp_path):
    cfg = FinetuneConfig(mode="full", min_steps=12, epochs=1, batch_size=4, save_every=5, seed=3)
    model = tiny_model("mixtral")
    t = apply_mode(model, "full")
    init = t.state()
    finetune(t, examples(), cfg, pad_id=0)
    straight = t.state()

    t.load(init)

    class Killed(Exception):
        pass

    def die(step, loss):
        if step == 8:
            raise Killed

    with pytest.raises(Killed):
        finetune(t, examples(), cfg, pad_id=0, checkpoint=tmp_path / "ck", on_step=die)
    assert (tmp_path / "ck" / "state.safetensors").exists()
    t.load(init)  # the process died: nothing of the first attempt survives but the checkpoint
    r = finetune(t, examples(), cfg, pad_id=0, checkpoint=tmp_path / "ck")
    assert r.resumed_from == 5 and len(r.losses) == 7
    assert all(torch.equal(straight[n], v) for n, v in t.state().items())
    assert not (tmp_path / "ck").exists(), "a finished run removes its checkpoint"


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    model = tiny_model("mixtral")
    t = apply_mode(model, "full")
    init = t.state()
    cfg = FinetuneConfig(mode="full", min_steps=10, epochs=1, batch_size=4, save_every=4)

    def die(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    import shutil

    with pytest.raises(KeyboardInterrupt):
        finetune(t, examples(), cfg, pad_id=0, checkpoint=tmp_path / "ck", on_step=die)
    assert (tmp_path / "ck" / "state.safetensors").exists()   # a checkpoint to refuse
    shutil.copytree(tmp_path / "ck", tmp_path / "ck-copy")
    t.load(init)
    other = FinetuneConfig(mode="full", min_steps=10, epochs=1, batch_size=4, save_every=4, lr=1e-3)
    assert finetune(t, examples(), other, pad_id=0, checkpoint=tmp_path / "ck").resumed_from == 0
    t.load(init)   # the same checkpoint with its own settings is resumed: the refusal above was the settings'
    assert finetune(t, examples(), cfg, pad_id=0, checkpoint=tmp_path / "ck-copy").resumed_from > 0


def test_same_seed_same_weights_other_seed_other_weights():
    def run(seed):
        t = apply_mode(tiny_model("olmoe"), "full")
        finetune(t, examples(), FinetuneConfig(mode="full", min_steps=6, epochs=1, batch_size=4, seed=seed), pad_id=0)
        return t.state()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_nan_guard_stops_and_names_the_step():
    model = tiny_model("mixtral")
    t = apply_mode(model, "full")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"step 1 of 5.*lower the learning rate"):
        finetune(t, examples(), FinetuneConfig(mode="full", min_steps=5, epochs=1, batch_size=4), pad_id=0)


@pytest.mark.parametrize("family", ["mixtral", "nllb_moe"])   # NLLB-MoE computes its terms only given labels
def test_load_balancing_loss_is_used_where_the_family_has_one(family):
    from moeguard.realign.engine import _aux_coef

    cfg = FinetuneConfig(mode="router", min_steps=5, epochs=1, batch_size=4, lr=1e-2)

    def router_after(aux):
        model = tiny_model(family, router_aux_loss_coef=1.0)
        t = apply_mode(model, "router")
        assert _aux_coef(t, FinetuneConfig(aux_loss=aux)) == (1.0 if aux else 0.0)
        finetune(t, examples(), FinetuneConfig(**{**cfg.__dict__, "aux_loss": aux}), pad_id=0)
        return t.state()

    with_aux, without = router_after(True), router_after(False)
    assert any(not torch.allclose(with_aux[n], without[n]) for n in with_aux)
    if family == "nllb_moe":
        from moeguard.realign.engine import _stack_aux_loss
        from moeguard.tasks.batches import collate

        # the terms moeguard adds are the ones the model's forward adds when given labels
        model = tiny_model(family, router_aux_loss_coef=1.0).train()
        batch = collate(examples()[:4], pad_id=0, decoder_start=model.config.decoder_start_token_id)
        aux = _stack_aux_loss(MoEAdapter(model))
        with torch.no_grad():
            own = model(**batch.inputs(), labels=batch.labels, output_router_logits=True)
            mine = aux(model(**batch.inputs(), output_router_logits=True), batch)
        torch.testing.assert_close(mine, own.encoder_aux_loss + own.decoder_aux_loss, rtol=0, atol=0)
        # layerdrop skipping every decoder layer leaves that stack no term (the forward's own would fail)
        model = tiny_model(family, router_aux_loss_coef=1.0, decoder_layerdrop=1.0).train()
        with torch.no_grad():
            out = model(**batch.inputs(), output_router_logits=True)
            assert out.decoder_router_logits == () and len(out.encoder_router_logits) == 2
            assert float(aux(out, batch)) > 0   # the encoder's term
        r = finetune(apply_mode(model, "router"), examples(), cfg, pad_id=0)
        assert r.steps == 5 and all(map(torch.isfinite, torch.tensor(r.losses)))
    deepseek = apply_mode(tiny_model("deepseek_v3"), "full")
    assert _aux_coef(deepseek, FinetuneConfig()) == 0.0  # aux-loss-free routing


def test_bad_settings_are_user_errors():
    from moeguard.errors import MoeguardError

    with pytest.raises(MoeguardError, match="unknown fine-tuning mode 'loar'.*lora"):
        FinetuneConfig(mode="loar")
    with pytest.raises(MoeguardError, match="learning rate"):
        FinetuneConfig(lr=0)
    with pytest.raises(MoeguardError, match="no labeled examples"):
        finetune(apply_mode(tiny_model("mixtral"), "full"), [], FinetuneConfig(), pad_id=0)
