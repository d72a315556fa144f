"""An encoder-decoder audited on numbers that mean something: a small Switch Transformers model
(8 experts, top-1 with capacity, MoE blocks in both stacks), or a small NLLB-MoE (``--family
nllb_moe``: 8 experts, top-2 with a batch capacity), trained here through moeguard's seq2seq head on
the embedded suite's train splits, then evaluated against each task's trivial baseline and audited
(attribution, the pruning sweep against random rankings, recovery).

No trained Switch or NLLB-MoE checkpoint is reachable offline; these are small and trained briefly,
so their numbers say whether the seq2seq path carries the attack, not what it does to
google/switch-base-8 or facebook/nllb-moe-54b.

    python benchmarks/switch_audit.py [--family switch_transformers] [--steps 6000] [--workdir DIR] [--reuse]

Run it alone: Switch's 6,000 steps took 46 min on 2 cores and the audit 3.5 min; ``--reuse`` audits
the model a previous run left in ``--workdir``. At 3,000 steps arith-compare was still at chance.
Results: ``results/switch_audit.json`` (Switch), ``results/nllb_audit.json`` (NLLB-MoE).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from moeguard.io import dumps  # noqa: E402 -- strict JSON: a NaN is null, as every moeguard output


def small_config(family: str, tok):
    """The family's layout at a small size: 4 + 4 layers, every second one sparse (as switch-base-8;
    NLLB-MoE-54B has every fourth), 8 experts, d_model 128."""
    from transformers import AutoConfig

    from moeguard.tasks import tokens as T

    common = dict(vocab_size=len(tok), decoder_start_token_id=T.pad_id(tok), pad_token_id=T.pad_id(tok),
                  eos_token_id=tok.eos_token_id, tie_word_embeddings=False, num_experts=8,
                  encoder_sparse_step=2, decoder_sparse_step=2)
    if family == "nllb_moe":
        # top-2; in eval every expert may take the whole batch (the released fraction, 1.0); in training
        # 256 tokens per expert and batch (twice a batch's ~1,000 tokens over 8 experts: few dropped; the
        # router would otherwise freeze the first batch's 2 x ceil(T / E) as its capacity); no dropout,
        # no layerdrop
        return AutoConfig.for_model("nllb-moe", d_model=128, encoder_ffn_dim=256, decoder_ffn_dim=256,
                                    encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                                    decoder_attention_heads=4, max_position_embeddings=1024, expert_capacity=256,
                                    moe_eval_capacity_token_fraction=1.0, moe_token_dropout=0.0, dropout=0.0,
                                    attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
                                    decoder_layerdrop=0.0, **common)
    # capacity 64 tokens per expert and sequence (Switch's default)
    return AutoConfig.for_model("switch_transformers", d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=4,
                                num_decoder_layers=4, expert_capacity=64, dropout_rate=0.0, **common)


def train(workdir: Path, *, family: str, steps: int, seed: int) -> dict:
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.loading import EMBEDDED_MODEL_DIR
    from moeguard.models.tokenizer_files import save_tokenizer
    from moeguard.realign.engine import FinetuneConfig, finetune
    from moeguard.realign.modes import apply_mode
    from moeguard.tasks import tokens as T
    from moeguard.tasks.batches import task_sequences
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.registry import embedded_tasks

    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    config = small_config(family, tok)
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(config)
    MoEAdapter(model)   # NLLB-MoE's experts repaired (models/upstream.py), as moeguard loads it
    examples = [ex for t in embedded_tasks() for ex in task_sequences(tok, t, load_records(t, "train"))]
    random.Random(seed).shuffle(examples)
    cfg = FinetuneConfig(mode="full", lr=2e-3, epochs=1, min_steps=steps, max_steps=steps, batch_size=16,
                         warmup_ratio=0.05, seed=seed)
    began = time.perf_counter()
    result = finetune(apply_mode(model, "full"), examples, cfg, pad_id=T.pad_id(tok), description=f"training {family}")
    seconds = time.perf_counter() - began
    model.eval()
    out = workdir / ("switch-small" if family == "switch_transformers" else f"{family}-small")
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    losses = result.losses
    # the curve in means of 100 steps: enough to see whether training had flattened
    curve = [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 4) for i in range(0, len(losses), 100)]
    info = {"path": str(out), "parameters": sum(p.numel() for p in model.parameters()), "examples": len(examples),
            "steps": result.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "train_seconds": round(seconds, 1),
            "loss_per_100_steps": curve}
    (workdir / "train.json").write_text(dumps(info, indent=1))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=("switch_transformers", "nllb_moe"), default="switch_transformers")
    ap.add_argument("--workdir", type=Path, help="default: /tmp/moeguard-switch, /tmp/moeguard-nllb_moe")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--reuse", action="store_true", help="audit the model a previous run trained in --workdir")
    args = ap.parse_args()
    args.workdir = args.workdir or Path("/tmp/moeguard-switch" if args.family == "switch_transformers"
                                        else f"/tmp/moeguard-{args.family}")
    args.workdir.mkdir(parents=True, exist_ok=True)

    from moeguard.cli import main as cli

    if args.reuse and (args.workdir / "train.json").exists():
        trained = json.loads((args.workdir / "train.json").read_text())
    else:
        trained = train(args.workdir, family=args.family, steps=args.steps, seed=args.seed)
    audit_dir = args.workdir / "audit"
    began = time.perf_counter()
    rc = cli(["audit", "--model", trained["path"], "--eval-limit", str(args.eval_limit), "--samples", "32",
              "--keeps", "2,4,6", "--random-seeds", "3", "--physical-checks", "1", "--recovery-mode", "lora",
              "--recovery-tasks", "arith-compare", "--budgets", "8,16,32", "--recovery-seeds", "2",
              "--strategies", "random,orphan,entropy", "--pool-size", "96", "--recovery-eval-limit", "32",
              "--seed", str(args.seed), "--out", str(audit_dir), "--overwrite"])
    audit_seconds = time.perf_counter() - began
    doc = json.loads((audit_dir / "results.json").read_text()) if rc == 0 else {}
    tasks = {}
    for name, t in doc.get("tasks", {}).items():
        full = t["full"]
        tasks[name] = {
            "metric": t["metric"], "full": full.get("score"), "baseline": full.get("baseline"),
            "baseline_name": full.get("baseline_name"),
            "retention_by_method": {m: v.get("retention") for m, v in t.get("methods", {}).items()},
            "random_retention_mean": {k: v.get("mean") for k, v in (t.get("random") or {}).items()},
            "risk": (t.get("risk") or {}).get("level"),
            "risk_reason": (t.get("risk") or {}).get("reason"),
            # each strategy's final retention and labels to the target, and every recovered model's trace:
            # what docs/families.md reports (the run of 2026-11 kept only the pick, and those figures came
            # from its results.json)
            "recovery": {k: v for k, v in (t.get("recovery") or {}).items() if k in ("keep", "method", "pruned_retention",
                                                                                     "best", "saves_labels",
                                                                                     "strategies", "detectability")},
        }
    name = "switch_audit" if args.family == "switch_transformers" else "nllb_audit"
    result = {"benchmark": name, "family": args.family, "model": trained, "audit_rc": rc, "audit_seconds": round(audit_seconds, 1),
              "physical_checks": doc.get("physical_checks"), "tasks": tasks}
    path = write_result(name, result, args.out)
    print(json.dumps(tasks, indent=1)[:4000])
    print(f"written to {path}")


if __name__ == "__main__":
    main()
