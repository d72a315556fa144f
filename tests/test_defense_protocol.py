"""The selective fine-tuning protocol: the file's validation, and modes restricted to authorized parameters;
and the shared matrix every registered defense passes."""

import json
import math

import pytest
import torch

from moeguard.defense.harden import DEFENSES, config_for, get_defense, harden
from moeguard.defense.protocol import Protocol
from moeguard.errors import MoeguardError
from moeguard.realign.engine import FinetuneConfig
from moeguard.realign.modes import apply_mode
from moeguard.testing import causal_families, tiny_model


ATTN = ("*.self_attn.*",)


def test_protocol_round_trips_and_rejects_bad_files(tmp_path):
    p = Protocol(modes=("lora",), patterns=ATTN, model="m")
    p.save(tmp_path / "moeguard_protocol.json")
    assert Protocol.load(tmp_path) == p  # a directory means its moeguard_protocol.json
    for bad, words in [({"schema": "x"}, "not a moeguard protocol"),
                       ({"schema": "moeguard.protocol/1", "modes": [], "authorized_parameters": ["a"]}, "'modes'"),
                       ({"schema": "moeguard.protocol/1", "modes": ["lorra"], "authorized_parameters": ["a"]}, "lora"),
                       ({"schema": "moeguard.protocol/1", "modes": ["lora"], "authorized_parameters": []}, "authorized")]:
        with pytest.raises(MoeguardError, match=words):
            Protocol.from_dict(bad)
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(MoeguardError, match="not valid JSON"):
        Protocol.load(tmp_path / "x.json")
    with pytest.raises(MoeguardError, match="does not authorize --mode full"):
        p.check_mode("full")


@pytest.mark.parametrize("family", causal_families())
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_protocol_restricts_every_mode_to_the_authorized_parameters(family, mode):
    model = tiny_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Nemotron-H's attention is a mixer; DBRX's is norm_attn_norm.attn (Wqkv, out_proj); JetMoE's dense
    # attention part is self_attention.kv_proj (its queries and outputs are experts)
    allowed = FinetuneConfig(mode=mode, only=ATTN + tuple(f"*.mixer.{p}_proj.*" for p in "qkvo")
                             + ("*.norm_attn_norm.attn.*", "*.self_attention.kv_proj.*")).allowed()
    t = apply_mode(model, mode, only=allowed)
    assert t.params and all(_attention(n) for n in t.params)
    with torch.no_grad():
        for p in t.params.values():
            p.add_(0.1)
    merged = t.merged()
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(_attention(n) for n in changed)


def _attention(name: str) -> bool:
    return ("self_attn" in name or any(f"mixer.{p}_proj" in name for p in "qkvo")   # Nemotron-H: attention is a mixer
            or "norm_attn_norm.attn." in name                                      # DBRX
            or "self_attention.kv_proj." in name)                                  # JetMoE


def test_a_protocol_that_authorizes_nothing_a_mode_can_train_is_an_error():
    model = tiny_model("mixtral")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(MoeguardError, match="authorizes"):
        apply_mode(model, "router", only=FinetuneConfig(only=ATTN).allowed())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_unknown_defense_suggests_names():
    with pytest.raises(MoeguardError, match="entangle"):
        get_defense("entangel")


@pytest.fixture(scope="module")
def embedded():
    from moeguard.models.loading import load_model

    m, tok, _ = load_model(None)
    return m, tok


@pytest.mark.parametrize("name", sorted(get_defense("entangle") and DEFENSES))  # importing registers them
def test_every_defense_trains_each_of_its_terms_and_logs_them(name, embedded):
    """The shared matrix: a new defense is one file, one registry line and a row here."""
    import copy

    model, tok = copy.deepcopy(embedded[0]), embedded[1]
    spec = DEFENSES[name]
    cfg = config_for(name, steps=2, tasks=("arith-compare", "record-summary"), inner_steps=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    doc = harden(model, tok, cfg)
    logged = set(doc["log"][0]) | set(doc["log"][1])
    terms = {"balance": cfg.balance, "pruned": cfg.collapse, "attack_after": cfg.adversarial,
             "authorized_after": cfg.authorized}
    expect = {"utility"} | {k for k, w in terms.items() if w}
    assert expect <= logged
    for k in expect:   # each weighted term measured, not only named
        vals = [r[k] for r in doc["log"] if k in r]
        assert vals and all(math.isfinite(v) for v in vals) and any(v != 0 for v in vals), (name, k, vals)
    assert {r["task"] for r in doc["log"]} == {"arith-compare", "record-summary"}
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert bool(spec.protocol) == bool(cfg.authorized_patterns)
    # what harden recorded: the parameters its authorized path may train, there exactly when patterns are set
    assert bool(doc["authorized"]) == bool(cfg.authorized_patterns), (name, doc["authorized"])
    json.dumps(doc)  # the log is plain JSON


def test_each_task_meets_both_kinds_of_simulated_attacker_in_turn(embedded):
    """Tasks take turns by step; the attacker's subset alternates on each task's own visits (it used
    to alternate on the step, so with an even number of tasks each task met one kind only)."""
    import copy

    model, tok = copy.deepcopy(embedded[0]), embedded[1]
    cfg = config_for("entangle", steps=8, tasks=("arith-compare", "record-summary"), adversarial=0.0, balance=0.0)
    log = harden(model, tok, cfg)["log"]
    kinds = {t: [r["attacker_subset"] for r in log if r["task"] == t] for t in ("arith-compare", "record-summary")}
    assert kinds == {t: ["random", "frequency", "random", "frequency"] for t in kinds}


def test_an_interrupted_hardening_resumes_to_the_weights_and_log_of_an_uninterrupted_one(embedded, tmp_path):
    import copy

    model, tok = embedded
    cfg = config_for("entangle", steps=6, tasks=("arith-compare", "record-summary"), inner_steps=2)
    whole = copy.deepcopy(model)
    ref = harden(whole, tok, cfg)
    state = tmp_path / "state"

    def stop(step, row):
        if step == 5:
            raise KeyboardInterrupt
    broken = copy.deepcopy(model)
    with pytest.raises(KeyboardInterrupt):
        harden(broken, tok, cfg, checkpoint=state, save_every=2, on_step=stop)
    assert json.loads((state / "state.json").read_text())["step"] == 4      # the last save before the stop
    resumed = copy.deepcopy(model)      # a fresh process: the starting weights, the state beside them
    doc = harden(resumed, tok, cfg, checkpoint=state, save_every=2)
    assert doc["resumed_from"] == 4 and doc["log"] == ref["log"]
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    # a state of other settings is not resumed from
    with pytest.raises(KeyboardInterrupt):
        harden(copy.deepcopy(model), tok, cfg, checkpoint=state, save_every=2, on_step=stop)
    other = config_for("entangle", steps=6, tasks=("arith-compare", "record-summary"), inner_steps=2, seed=1)
    assert harden(copy.deepcopy(model), tok, other, checkpoint=state, save_every=2)["resumed_from"] == 0
    (state / "state.safetensors").write_bytes(b"torn")     # a crash mid-write: started over, not trusted
    assert harden(copy.deepcopy(model), tok, other, checkpoint=state, save_every=2)["resumed_from"] == 0


def test_harden_refuses_layers_with_different_expert_counts_before_training():
    from moeguard.models.prune import prune_model

    small, _ = prune_model(tiny_model("mixtral"), {0: [0, 1, 2, 3], 1: [0, 1, 2, 3, 4, 5]})
    with pytest.raises(MoeguardError, match=r"same number of experts in every MoE layer; this model has \{0: 4, 1: 6\}"):
        harden(small, None, config_for("entangle", steps=1, tasks=("arith-compare",)))


def test_a_non_finite_hardening_gradient_stops_before_the_step(tmp_path, monkeypatch, capsys):
    """Only the outer loss was checked: a diverged simulated attack's meta-gradient went into
    opt.step(), wrote NaN into every weight, and the state saved next resumed into them."""
    import torch

    from moeguard.cli import main

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(float("nan")))
    capsys.readouterr()
    code = main(["harden", "--method", "entangle", "--tasks", "arith-compare", "--steps", "2", "--out", str(tmp_path / "h")])
    err = capsys.readouterr().err
    assert code == 2 and "the hardening gradient became nan at step 1" in err, err
    assert not (tmp_path / "h").exists()


def test_a_resumed_log_s_non_finite_values_summarize_as_the_uninterrupted_run_s():
    """The saved log goes through JSON, which writes inf as null: summing it raised after a resume."""
    from moeguard.defense.harden import summarize_log

    straight = [{"step": i, "pruned": float("inf") if i == 1 else 1.0, "task": 0.5} for i in range(4)]
    resumed = [{**r, "pruned": None} if r["pruned"] == float("inf") else r for r in straight]
    assert summarize_log(resumed, window=2) == summarize_log(straight, window=2)
    assert summarize_log(resumed, window=2)["pruned"] == {"first": float("inf"), "last": 1.0}


def test_a_diverged_simulated_attack_adds_nothing_and_the_run_goes_on(embedded, monkeypatch):
    """Its NaN meta-gradient stopped the run; a resume restored the same random state and stopped at the
    same step, and the hint named learning rates no flag sets. An attacker would not use a diverged run."""
    import torch

    from moeguard.defense import harden as H

    real = H.simulate_adaptation
    calls = []

    def diverging(model, adaptation, draw, loss):
        g, pre, post = real(model, adaptation, draw, loss)
        calls.append(1)
        if len(calls) == 1:   # the first step's simulated attack diverges
            return {n: torch.full_like(t, float("nan")) for n, t in g.items()}, pre, float("inf")
        return g, pre, post

    import copy

    monkeypatch.setattr(H, "simulate_adaptation", diverging)
    model, tok = copy.deepcopy(embedded[0]), embedded[1]
    with pytest.warns(UserWarning, match="1 of 3 hardening steps had a simulated adaptation that diverged"):
        out = harden(model, tok, config_for("entangle", steps=3, tasks=("arith-compare",), inner_steps=2))
    assert out["diverged_steps"] == 1 and out["log"][0]["diverged"] == ["attack"]
    assert all("diverged" not in r for r in out["log"][1:]) and len(calls) == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # its loss after is in no summary (a NaN mean; inf after a resume read it back as null)
    assert "attack_after" not in out["log"][0] and "attack_before" in out["log"][0]
    assert "diverged" not in out["summary"] and math.isfinite(out["summary"]["attack_after"]["first"])


def test_the_authorized_term_adapts_what_lora_adapts_under_the_protocol_and_mla_attention_is_authorized():
    """Qwen2-MoE's q/k/v biases (and a router a pattern matched) were trained at full rank by the authorized
    term, a path no user under the LoRA protocol can take; on DeepSeek-V3's latent attention the default
    patterns matched o_proj alone."""
    from moeguard.defense.harden import preflight

    qwen = tiny_model("qwen2_moe")
    got = preflight(qwen, config_for("selective", steps=1, tasks=("arith-compare",)))["authorized"]
    assert got and all(n.endswith(".weight") for n in got), got
    assert any(n.endswith("q_proj.bias") for n, _ in qwen.named_parameters())   # matched by '*.q_proj.*', left out
    with_router = config_for("selective", steps=1, tasks=("arith-compare",),
                             authorized_patterns=("*.self_attn.q_proj.*", "*.mlp.gate.*"))
    assert all(".mlp.gate." not in n for n in preflight(qwen, with_router)["authorized"])
    ds = preflight(tiny_model("deepseek_v3"), config_for("selective", steps=1, tasks=("arith-compare",)))["authorized"]
    kinds = {n.split(".self_attn.")[1].split(".")[0] for n in ds}
    assert kinds >= {"kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} and len(kinds) > 1, kinds


def test_a_fixed_length_setting_of_another_length_is_one_error():
    """inner_lr=(1e-4,) raised IndexError at preflight (a traceback); a third value was silently ignored."""
    from moeguard.config import coerce
    from moeguard.defense.harden import HardenConfig

    for bad in ((1e-4,), (1e-4, 1e-3, 1e-2)):
        with pytest.raises(MoeguardError, match=f"inner_lr has {len(bad)} value\\(s\\), expected 2"):
            config_for("entangle", inner_lr=bad)
    with pytest.raises(MoeguardError, match=r"setting 'inner_lr' has 1 value\(s\), expected 2"):
        coerce(HardenConfig, "inner_lr", "1e-4")
    assert coerce(HardenConfig, "inner_lr", "1e-4,1e-4") == (1e-4, 1e-4)   # LOW may equal HIGH
    # a list setting given as a tuple of any length is not a fixed-length one (AuditConfig(tasks=(a, b)) was refused)
    from moeguard.audit.config import AuditConfig

    assert AuditConfig(tasks=("arith-compare", "stdlib-code"), keeps=(2, 4)).tasks == ("arith-compare", "stdlib-code")
