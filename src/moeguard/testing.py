"""Test scaffolding: tiny configs and models of every supported family, built offline, for tests
and benchmarks (not used by the runtime package)."""

from __future__ import annotations

from transformers import AutoConfig

_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, head_dim=8,
               tie_word_embeddings=False)

# Per-family settings: 8 experts, top-2, and each family's distinctive routing features on.
TINY_FAMILY_KWARGS: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1,
                      norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16,
                        n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16,
                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
                        num_key_value_heads=4,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16,
                     n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, routed_scaling_factor=2.5,
                     norm_topk_prob=True),
    "glm4_moe_lite": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16,
                          n_shared_experts=1, num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"],
                          routed_scaling_factor=1.8, norm_topk_prob=False, kv_lora_rank=16, q_lora_rank=16,
                          qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
    "dots1": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16,
                  n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, routed_scaling_factor=2.5,
                  norm_topk_prob=True),
    "qwen3_next": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                       decoder_sparse_step=1, norm_topk_prob=True, layer_types=["linear_attention", "full_attention"],
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8),
    "flex_olmo": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, pad_token_id=0, eos_token_id=0),
    # layer 0 Mamba, layer 1 attention, both with an MoE feed-forward
    "jamba": dict(num_experts=8, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
                  attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False, mamba_d_state=4, mamba_dt_rank=4),
    "minimax": dict(num_local_experts=8, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"],
                    block_size=16),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy", moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16, q_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
                        num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    # layer 0 Mamba2, layer 1 attention; a shared MLP on each layer
    "granitemoehybrid": dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=32,
                             layer_types=["linear_attention", "full_attention"], mamba_n_heads=4, mamba_d_state=8,
                             mamba_chunk_size=16, logits_scaling=2.0),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "granitemoeshared": dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=32),
    "granitemoe_swa": dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=32,
                           layer_types=["sliding_attention", "full_attention"], sliding_window=4),
    # layer 0 dense, layers 1-2 sparse; 2 shared experts
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=2,
                         moe_layer_start_index=1, moe_layer_end_index=2, num_hidden_layers=3),
    "minimax_m2": dict(num_local_experts=8, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2),
    # layer 0 dense, layer 1 short convolution, layer 2 attention
    "lfm2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, num_dense_layers=1,
                     num_hidden_layers=3, use_expert_bias=True, routed_scaling_factor=1.5, norm_topk_prob=True,
                     layer_types=["conv", "conv", "full_attention"]),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, num_local_experts=8, num_shared_expert=1),
    "qwen3_5_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                             shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"],
                             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                             linear_value_head_dim=8),
    "mellum": dict(num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                   layer_types=["full_attention"] * 2, mlp_layer_types=["sparse"] * 2),
    "exaone_moe": dict(num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16,
                       num_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, routed_scaling_factor=2.5,
                       norm_topk_prob=True, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                       mlp_layer_types=["dense", "sparse", "sparse"], sliding_window=4),
    "solar_open": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16,
                       n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True),
    # Mamba2, MoE, attention, MoE layers
    "nemotron_h": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16,
                       moe_shared_expert_intermediate_size=32, num_hidden_layers=4, routed_scaling_factor=2.5,
                       layers_block_type=["linear_attention", "moe", "full_attention", "moe"], mamba_num_heads=4,
                       mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=16),
    # layer 0 dense, layers 1-2 MoE
    "llama4": dict(num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=3, moe_layers=[1, 2],
                   intermediate_size_mlp=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "mimo_v2_flash": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16,
                          routed_scaling_factor=2.5, norm_topk_prob=True, num_hidden_layers=3,
                          layer_types=["full_attention", "sliding_attention", "full_attention"],
                          mlp_layer_types=["dense", "sparse", "sparse"], sliding_window=4),
    # DBRX names its sizes itself and keeps the MoE keys in ffn_config; transformers 5.24's default
    # attn_config builds no model (no rope_theta) and clip_qkv=None fails in the forward, so both are given
    "dbrx": dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=128,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2, moe_normalize_expert_weights=1.0)),
    # a mixture of attention heads and of MLP experts in each layer; kv_channels is the head size
    "jetmoe": dict(num_local_experts=8, num_experts_per_tok=2, kv_channels=8),
    # encoder-decoder: 2 encoder and 2 decoder blocks, every one sparse; a capacity of 2 tokens per
    # expert and sequence, so a batch of a few dozen tokens drops some (the rule route() must follow)
    "switch_transformers": dict(d_model=32, d_ff=32, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                                num_experts=8, encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=2,
                                relative_attention_num_buckets=8, decoder_start_token_id=0, dropout_rate=0.0),
    # encoder-decoder, top-2: 2 encoder and 2 decoder layers, every one sparse; in eval each expert takes
    # at most a quarter of the batch's tokens, so second choices are dropped (the rule route() must
    # follow); no dropout, token dropout either (training must be deterministic; its eval scaling is
    # checked in tests/test_encoder_decoder.py)
    "nllb_moe": dict(d_model=32, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4, num_experts=8, encoder_sparse_step=1,
                     decoder_sparse_step=1, max_position_embeddings=64, moe_eval_capacity_token_fraction=0.25,
                     moe_token_dropout=0.0, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     encoder_layerdrop=0.0, decoder_layerdrop=0.0,
                     decoder_start_token_id=2),
}
# families whose configs name their sizes themselves (no hidden_size, num_hidden_layers... keywords)
_OWN_SIZES = {"dbrx", "switch_transformers", "nllb_moe"}


def tiny_config(family: str, **overrides):
    """A tiny config of ``family`` (a family name; its first model type is built)."""
    from moeguard.models.families import FAMILIES

    common = dict(vocab_size=_COMMON["vocab_size"], tie_word_embeddings=False) if family in _OWN_SIZES else _COMMON
    kwargs = {**common, **TINY_FAMILY_KWARGS[family], **overrides}
    model_type = FAMILIES.get(family).model_types[0] if family in FAMILIES else family
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(family: str, *, seed: int = 0, **overrides):
    """A randomly initialized tiny model whose routers are not degenerate."""
    import torch

    from moeguard.models.loading import model_class

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = model_class(config).from_config(config)   # the causal LM, or Switch's seq2seq LM
    # Some families init routers to zeros (all experts tie); spread them so routing is informative.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1 and p.abs().sum() == 0 and "norm" not in name:
                p.normal_(0, 0.5)
            elif name.endswith(("router.weight", "gate.weight", "gate.wg.weight", "router.layer.weight",
                                "router.classifier.weight")) and p.dim() == 2:
                p.normal_(0, 0.5)
        # selection biases start at 0 (buffers); trained ones are not, and routing must honour them
        from moeguard.models.adapter import MoEAdapter

        for layer in MoEAdapter(model).layers:
            bias = layer.correction_bias
            if bias is not None and not bias.abs().sum():
                bias.normal_(0, 0.5)
    return model.eval()


def kill_cli_when(args: list[str], ready, *, timeout: float = 300.0, poll: float = 0.05) -> None:
    """Run ``moeguard ARGS`` in a subprocess and SIGKILL it as soon as ``ready()`` is true (the
    resume tests' way of interrupting a run at a chosen point). Fails when the run ends first."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "moeguard.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + timeout
    reached = False
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():   # kept: the point may pass (a state file removed) before a second look
                reached = True
                break
            time.sleep(poll)
        if proc.poll() is not None:
            raise AssertionError(f"`moeguard {' '.join(args[:1])}` ended (exit {proc.returncode}) before it could be killed")
        if not reached:   # killed at the deadline, not at the chosen point: what follows would test nothing
            raise AssertionError(f"`moeguard {' '.join(args[:1])}` did not reach the point to kill it at in {timeout:g} s")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def checkpoint_tensors(directory) -> dict:
    """Every tensor of a checkpoint directory's safetensors files, by name; a name stored in two
    shards fails."""
    from pathlib import Path

    from safetensors import safe_open

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = h.get_tensor(k)
    return out


def assert_same_safetensors(a, b) -> None:
    """Two checkpoint directories hold the same tensors under the same names, bit for bit (the
    streamed pruner's output against a pruned model's save_pretrained)."""
    from pathlib import Path

    import torch
    from safetensors import safe_open

    with safe_open(Path(a) / "model.safetensors", "pt") as x, safe_open(Path(b) / "model.safetensors", "pt") as y:
        assert set(x.keys()) == set(y.keys()), sorted(set(x.keys()) ^ set(y.keys()))[:5]
        different = [k for k in x.keys() if not torch.equal(x.get_tensor(k), y.get_tensor(k))]
        assert not different, different[:5]


def as_loaded_in(model, dtype):
    """A copy of ``model`` in ``dtype`` the way ``from_pretrained(dtype=...)`` leaves it: the
    tensors the model keeps in float32 (``_keep_in_fp32_modules_strict``, e.g. DeepSeek-V3's
    router weight and correction bias) stay float32."""
    import copy

    from moeguard.models.loading import keep_fp32_as_loaded

    out = copy.deepcopy(model).to(dtype)
    # the instance's strict list (merged from its submodules); the plain one applies to fp16 only
    keep_fp32_as_loaded(out, model, getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return out


def causal_families() -> list[str]:
    """The registered families whose tasks run (decoder-only causal LMs), sorted: the matrix rows that
    score a task (attribution, fine-tuning, defenses, merging, offload). Encoder-decoder families run
    the model-level rows in ``tests/test_encoder_decoder.py``; their tasks (the seq2seq head) are not built."""
    from moeguard.models.families import FAMILIES

    return sorted(n for n in FAMILIES.names() if not FAMILIES.get(n).encoder_decoder)
