"""Routing-capture overhead in every built-in family: forward with :class:`RoutingCapture` vs
without, on a small model of each family (hidden 256, 8 experts, top-2, the family's routing
features and layer kinds on), the same batch, in one run.

    .venv/bin/python benchmarks/capture_overhead_families.py [--repeats 21] [--batch 8] [--seq 256]

The capture is hooks on the routers (statistics reduced as they stream); its cost per token does
not depend on the family's attention or mixer, so the ratio should stay flat across families
(goal: at most 1.05x plain in each). Plain and captured forwards alternate so drift hits both;
a family's ratio still moves by about 4% run to run on this machine (three runs put three different
families at the top), so a single family just over 1.05 is within noise, and a family's cost would
show as the same family on top run after run.
Run it alone: two torch jobs on two cores slow each other 10-20x.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _common import alternating_medians, write_result
from moeguard.models.families import FAMILIES
from moeguard.models.hooks import RoutingCapture
from moeguard.tasks.tokens import both_stacks
from moeguard.testing import TINY_FAMILY_KWARGS, tiny_model

# The tiny test configs, scaled up so a forward does real work: every size key the family's tiny
# config sets is raised with the hidden size (8 experts, top-2 and the layer pattern are kept).
SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
             vocab_size=4096, max_position_embeddings=512)
SCALED = {"moe_intermediate_size": 128, "shared_expert_intermediate_size": 256, "shared_intermediate_size": 256,
          "moe_shared_expert_intermediate_size": 256, "kv_lora_rank": 64, "q_lora_rank": 64, "qk_rope_head_dim": 16,
          "qk_nope_head_dim": 16, "v_head_dim": 32, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
          "mamba_head_dim": 32, "mamba_d_state": 16, "ssm_state_size": 16, "kv_channels": 32}


def build(family: str):
    if family == "dbrx":   # DBRX names its sizes itself, and keeps its MoE sizes in ffn_config
        return tiny_model(family, vocab_size=SIZES["vocab_size"], d_model=SIZES["hidden_size"],
                          n_heads=SIZES["num_attention_heads"], max_seq_len=SIZES["max_position_embeddings"],
                          attn_config=dict(kv_n_heads=SIZES["num_key_value_heads"], rope_theta=10000.0, clip_qkv=8.0),
                          ffn_config=dict(ffn_hidden_size=SCALED["moe_intermediate_size"], moe_num_experts=8,
                                          moe_top_k=2, moe_normalize_expert_weights=1.0))
    if family == "switch_transformers":   # T5-style sizes; Switch's default capacity of 64 tokens per expert
        return tiny_model(family, vocab_size=SIZES["vocab_size"], d_model=SIZES["hidden_size"],
                          d_ff=SIZES["intermediate_size"], num_heads=SIZES["num_attention_heads"],
                          d_kv=SIZES["head_dim"], expert_capacity=64)
    if family == "nllb_moe":   # fairseq-style sizes; NLLB-MoE's released eval capacity (the whole batch)
        return tiny_model(family, vocab_size=SIZES["vocab_size"], d_model=SIZES["hidden_size"],
                          encoder_ffn_dim=SIZES["intermediate_size"], decoder_ffn_dim=SIZES["intermediate_size"],
                          encoder_attention_heads=SIZES["num_attention_heads"],
                          decoder_attention_heads=SIZES["num_attention_heads"],
                          max_position_embeddings=SIZES["max_position_embeddings"], moe_eval_capacity_token_fraction=1.0)
    over = dict(SIZES, **{k: v for k, v in SCALED.items() if k in TINY_FAMILY_KWARGS[family]})
    if "kv_lora_rank" in TINY_FAMILY_KWARGS[family]:   # multi-head latent attention: one kv head per head
        over.update(num_key_value_heads=over["num_attention_heads"], head_dim=SCALED["qk_rope_head_dim"])
    return tiny_model(family, **over)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--families", help="comma-separated; default: every built-in family")
    ap.add_argument("--out")
    args = ap.parse_args()
    names = args.families.split(",") if args.families else FAMILIES.names()
    unknown = [n for n in names if n not in FAMILIES.names()]
    if unknown:   # before any model is built (a typo ended in max() of nothing, after the others' work)
        raise SystemExit(f"unknown families {unknown}; known: {', '.join(FAMILIES.names())}")
    rows = {}
    for family in names:
        torch.manual_seed(0)
        ids = torch.randint(0, SIZES["vocab_size"], (args.batch, args.seq))
        mask = torch.ones_like(ids)
        mask[args.batch // 2:, args.seq * 3 // 4:] = 0   # padding, so the capture's masking path runs
        try:
            model = build(family)

            inputs = both_stacks(model, ids, mask)   # an encoder-decoder runs both stacks

            def fwd(model=model, inputs=inputs):
                model(**inputs, use_cache=False)

            with torch.no_grad():
                for _ in range(2):
                    fwd()
        except Exception as e:   # reported, never hidden: a family this script cannot scale up
            rows[family] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            print(f"{family:18s} cannot build: {rows[family]['error']}", flush=True)
            continue
        def captured(model=model, fwd=fwd):
            with RoutingCapture(model):
                fwd()

        with torch.no_grad():
            med = alternating_medians({"plain": fwd, "capture": captured}, args.repeats)
        ratio = med["capture"] / med["plain"]
        rows[family] = {"params": sum(p.numel() for p in model.parameters()), "median_seconds": med,
                        "ratio_capture_vs_plain": ratio}
        print(f"{family:18s} plain {med['plain'] * 1e3:7.1f} ms  capture {med['capture'] * 1e3:7.1f} ms  "
              f"{ratio:.3f}x", flush=True)
        del model
    ratios = [r["ratio_capture_vs_plain"] for r in rows.values() if "ratio_capture_vs_plain" in r]
    failed = sorted(f for f, r in rows.items() if "error" in r)
    # "every family": one that failed to build is not measured, so the goal is not met (it read met without it)
    result = {"batch": args.batch, "seq": args.seq, "repeats": args.repeats, "sizes": SIZES, "families": rows,
              "ratio_max": max(ratios) if ratios else None,
              "ratio_median": statistics.median(ratios) if ratios else None,
              "goal": "capture <= 1.05x plain in every family",
              "goal_met": bool(ratios) and not failed and max(ratios) <= 1.05,
              **({"goal_note": f"not measured on {', '.join(failed)} (failed to build)"} if failed else {}),
              "failed_to_build": failed}
    path = write_result("capture_overhead_families", result, args.out)
    if ratios:
        print(f"max {result['ratio_max']:.3f}x, median {result['ratio_median']:.3f}x over {len(ratios)} families"
              + (f" ({len(failed)} failed to build: goal not met)" if failed else "") + f"; {path}")
    else:
        print(f"no family could be built; {path}")


if __name__ == "__main__":
    main()
