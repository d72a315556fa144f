"""Selective fine-tuning protocol, owner's side: entangled training plus a term that keeps the
authorized adaptation path (by default the attention projections, adapted with LoRA) a good
place to adapt; writes ``moeguard_protocol.json`` naming that path. See docs/defenses.md."""

from moeguard.defense.harden import DefenseSpec, register_defense

# the attention projections: q/k/v/o, and multi-head latent attention's (DeepSeek-V2/V3, Kimi-K2: no q, k or v
# projection, only o_proj matched)
AUTHORIZED = ("*.self_attn.q_proj.*", "*.self_attn.k_proj.*", "*.self_attn.v_proj.*", "*.self_attn.o_proj.*",
              "*.self_attn.q_a_proj.*", "*.self_attn.q_b_proj.*", "*.self_attn.kv_a_proj_with_mqa.*",
              "*.self_attn.kv_b_proj.*")

register_defense(DefenseSpec(
    "selective",
    "entangle's terms + keep LoRA on the authorized modules (attention projections) effective; writes a protocol file",
    {"balance": 0.1, "collapse": 1.0, "adversarial": 1.0, "authorized": 0.5, "authorized_patterns": AUTHORIZED},
    protocol=True))
