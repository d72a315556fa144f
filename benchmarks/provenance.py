"""Provenance benchmark: trace the embedded model's derivatives, made by moeguard's own attack
code, and independently trained models of the same architecture.

    .venv/bin/python benchmarks/provenance.py [--negative-steps 200] [--negatives 5] [--workdir DIR]
        [--fingerprint-seeds 0,1,...,9] [--out JSON]

Derivatives (each traced against the embedded model's fingerprint):
- pruning: keep 2, 4, 6 per layer (uniform) and a budget of 4 per layer on average, by three
  attribution methods on arith-compare;
- pruning + re-alignment: keep 4, then every cell of the attack grid (full and LoRA; 0.1x, 1x and
  10x each mode's default learning rate; 4 and 16 epochs over 256 labels), the strongest cell per
  mode (best fine-tuned score) marked; and one long full fine-tune of 10x the grid's largest
  number of steps (160 epochs) at its highest learning rate;
- merging: each layer's 8 experts clustered into 4 by agglomerative clustering of their gate
  sums, averaged uniformly (HC-SMoE) and weighted by routing frequency (M-SMoE);
- quantization: Q8_0 and Q4_0 (ggml's formats, by the gguf package) round trips, and the GGUF
  files themselves; int8 and int4 by PyTorch's own quantization ops (``torch.quantize_per_channel``
  to qint8, per output row, as dynamic int8 quantization of a Linear does; and
  ``torch.fake_quantize_per_channel_affine`` to 4 bits in groups of 32 input values with a zero
  point, the round-to-nearest int4 weight-only scheme of torchao and GPTQ/AWQ checkpoints before
  calibration);
- evasion: expert shuffling, neuron permutation, hidden-dimension permutation with sign flips,
  and all of them on top of pruning.
Negatives: ``--negatives`` models trained by the zoo recipe with other seeds (``--negative-steps``
steps each, against the embedded model's 1000: shorter to fit the machine, recorded), each also
pruned to 2 and 4 random experts per layer; one trained on other data (the stdlib text tasks
only), and a pruned derivative of that one. Pruned copies of one model are not independent
samples of the null; they test the case of fewer suspect experts than the owner's.

Every suspect is traced against the fingerprints of ``--fingerprint-seeds`` (the seed draws the
hidden dimensions H and the anchors): the first seed's traces are the rows and the summary, and
``fingerprint_seeds`` gives each seed's headline figures and the rows whose p-value moves with the
seed. One seed's AUC is one draw; quote the spread.

Models are cached under ``--workdir``; a second run trains only the re-aligned derivatives again.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from _common import write_result

TASK = "arith-compare"
METHODS = ("frequency", "gate", "reap")
KEEP_REALIGN = 4


def _trace(fp, suspect):
    """``suspect``: a callable giving the suspect's weights (read again for each fingerprint)."""
    from moeguard.trace.api import trace

    t0 = time.perf_counter()
    doc = trace(fp, suspect())
    return doc, time.perf_counter() - t0


def _model(model, tok, name):
    from moeguard.trace.weights import from_model

    return lambda: from_model(model, tok, name=name)


def _row(name, category, doc, seconds, *, keep=None, merges=None, derived=True, extra=None, order=None, quiet=False):
    """``order``: layer -> the position in the sorted keep of each suspect expert ({} when unshuffled)."""
    row = {"name": name, "category": category, "derived": derived, "p_value": doc["p_value"],
           "p_any_dependence": doc.get("p_any_dependence"),
           "verdict": doc["verdict"], "combination": doc["combination"], "trace_s": round(seconds, 3),
           "layer_p": [l["p"] for l in doc["layers"]], "transformations": doc["transformations"], **(extra or {})}
    if keep is not None:
        found = {str(l["layer"]): sorted(l["kept"]) for l in doc["layers"]}
        row["kept_exact"] = found == {str(k): sorted(v) for k, v in keep.items()}
        row["kept_found"] = found
        if order is not None:  # the mapping itself, whatever the labels: suspect expert j <- original
            truth = {l: [sorted(keep[l])[o] for o in order.get(l, range(len(keep[l])))] for l in keep}
            row["mapping_correct"] = sum(e["original"] == truth[l["layer"]][e["expert"]]
                                         for l in doc["layers"] for e in l["experts"])
            row["mapping_total"] = sum(len(v) for v in keep.values())
    if merges is not None:
        truth = {(li, g["expert"]): sorted(g["from"]) for li, gs in merges.items() for g in gs if len(g["from"]) > 1}
        found = {(str(l["layer"]), e["expert"]): sorted(int(i) for i in e["merge"]["weights"])
                 for l in doc["layers"] for e in l["experts"] if e["label"] == "merged"}
        row["merges_true"] = len(truth)
        row["merges_recovered"] = sum(found.get(k) == v for k, v in truth.items())
        # members folded in with under 2% of the weight leave (almost) nothing of themselves to find
        present = {(li, g["expert"]): sorted(e for e, w in zip(g["from"], g["weights"]) if w >= 0.02)
                   for li, gs in merges.items() for g in gs if len(g["from"]) > 1}
        row["merges_recovered_members_over_2pct"] = sum(found.get(k) == v for k, v in present.items()
                                                        if len(v) > 1)
        row["merges_true_members_over_2pct"] = sum(1 for v in present.values() if len(v) > 1)
        row["merges_spurious"] = sum(1 for k in found if k not in truth)
    if not quiet:
        print(f"{name:34s} p={doc['p_value']:.3g} {doc['verdict']}"
              + (f" kept_exact={row['kept_exact']}" if keep is not None else "")
              + (f" merges {row['merges_recovered']}/{row['merges_true']}" if merges is not None else ""), flush=True)
    return row


def _quantized(model, qtype):
    """The model with every expert, attention and embedding matrix quantized to ``qtype`` and back."""
    import copy

    import gguf

    kind = getattr(gguf.GGMLQuantizationType, qtype)
    block = gguf.GGML_QUANT_SIZES[kind][0]
    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if p.dim() >= 2 and p.shape[-1] % block == 0 and ".gate.weight" not in name:
                x = p.detach().float().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, kind), kind)).reshape(p.shape))
    return q


def _torch_quantized(model, bits: int, group: int = 32):
    """The model with every matrix (router, norms and vectors aside) quantized by PyTorch's own
    ops and dequantized: int8 symmetric per output row (qint8 tensors), or int4 asymmetric per
    group of ``group`` input values (fake-quant to [0, 15] with a zero point)."""
    import copy

    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if p.dim() < 2 or ".gate.weight" in name or p.shape[-1] % group:
                continue
            x = p.detach().float().reshape(-1, p.shape[-1])                 # [rows, in]
            if bits == 8:  # PyTorch deprecates its quantized tensors for torchao; the numbers are the same
                warnings.filterwarnings("ignore", message="torch.quantize_per_tensor")
                scale = (x.abs().amax(1) / 127).clamp_min(1e-12).double()
                y = torch.quantize_per_channel(x, scale, torch.zeros(len(x), dtype=torch.long), 0, torch.qint8)
                p.copy_(y.dequantize().reshape(p.shape))
                continue
            g = x.reshape(-1, group)                                       # [rows * in / group, group]
            lo, hi = g.amin(1).clamp_max(0), g.amax(1).clamp_min(0)
            scale = ((hi - lo) / 15).clamp_min(1e-12)
            zero = torch.round(-lo / scale).clamp(0, 15).to(torch.int32)
            y = torch.fake_quantize_per_channel_affine(g, scale, zero, 0, 0, 15)
            p.copy_(y.reshape(p.shape))
    return q


def _clusters(scores_v: np.ndarray, k: int) -> list[list[int]]:
    from scipy.cluster.hierarchy import fcluster, linkage

    z = linkage(scores_v, method="average", metric="cosine")
    labels = fcluster(z, t=k, criterion="maxclust")
    groups = [sorted(np.flatnonzero(labels == c).tolist()) for c in sorted(set(labels))]
    return sorted(groups)


def _realigned(model, tok, mode, epochs, lr_scale, seed=0):
    """A fine-tuned copy of ``model`` (full fine-tuning trains in place, so the input is copied)."""
    import copy

    from moeguard.realign.engine import FinetuneConfig
    from moeguard.realign.loop import ALConfig, label_pool, run_active_learning

    base = {"full": 2e-4, "lora": 3e-3}[mode]
    ft = FinetuneConfig(mode=mode, lr=base * lr_scale, epochs=epochs, seed=seed)
    al = ALConfig(strategy="random", schedule=(256,), pool_size=1000, eval_limit=64, seed=seed, finetune=ft)
    pool = label_pool(TASK, pool_size=1000, budget=256, seed=seed)
    t0 = time.perf_counter()
    curve, trainable = run_active_learning(copy.deepcopy(model), tok, TASK, al, pool=pool, keep_trainable=True)
    merged = trainable.merged()
    trainable.release()
    return merged, {"score": curve["points"][-1]["score"], "steps": curve["points"][-1].get("steps"),
                    "train_s": round(time.perf_counter() - t0, 1), "lr": base * lr_scale, "epochs": epochs}


def _train(out: Path, seed: int, steps: int, tasks=None):
    from moeguard.zoo.recipe import EMBEDDED_RECIPE
    from moeguard.zoo.train import train_embedded

    if not (out / "model.safetensors").exists():
        train_embedded(out, recipe=dataclasses.replace(EMBEDDED_RECIPE, seed=seed, steps=steps), tasks=tasks)
    from moeguard.models.loading import load_model

    m, tok, _ = load_model(str(out))
    return m, tok


def _summary(rows: list[dict]) -> tuple[dict, dict]:
    """The benchmark's summary and goals over one fingerprint's rows."""
    pos = [r for r in rows if r["derived"]]
    neg = [r for r in rows if not r["derived"]]
    # AUC of -log p separating derivatives from independents (ties count half)
    auc = np.mean([1.0 if a["p_value"] < b["p_value"] else 0.5 if a["p_value"] == b["p_value"] else 0.0
                   for a in pos for b in neg]) if pos and neg else None
    kept = [r for r in pos if "kept_exact" in r]
    merges = [r for r in pos if "merges_true" in r]
    summary = {
        "auc": auc, "derivatives": len(pos), "independent": len(neg),
        "derivatives_p_le_1e-4": sum(r["p_value"] <= 1e-4 for r in pos),
        "independent_p_ge_0.01": sum(r["p_value"] >= 0.01 for r in neg),
        "largest_derivative_p": max(r["p_value"] for r in pos), "smallest_independent_p": min(r["p_value"] for r in neg),
        "kept_exact": f"{sum(r['kept_exact'] for r in kept)}/{len(kept)}",
        "merges_recovered": f"{sum(r['merges_recovered'] for r in merges)}/{sum(r['merges_true'] for r in merges)}",
        "merges_spurious": sum(r["merges_spurious"] for r in merges),
        "merges_recovered_members_over_2pct": f"{sum(r['merges_recovered_members_over_2pct'] for r in merges)}/"
                                              f"{sum(r['merges_true_members_over_2pct'] for r in merges)}",
        "mapping_correct": f"{sum(r.get('mapping_correct', 0) for r in pos)}/{sum(r.get('mapping_total', 0) for r in pos)}",
        "misses": [r["name"] for r in pos if r["p_value"] > 1e-4] + [r["name"] for r in neg if r["p_value"] < 0.01],
        "kept_wrong": [r["name"] for r in kept if not r["kept_exact"]]}
    auc = float(auc) if auc is not None else None
    summary["auc"] = auc
    goals = {"auc_1": auc == 1.0, "every_derivative_p_le_1e-4": summary["derivatives_p_le_1e-4"] == len(pos),
             "every_independent_p_ge_0.01": summary["independent_p_ge_0.01"] == len(neg),
             "kept_exact_100pct": all(r["kept_exact"] for r in kept),
             "merges_95pct": sum(r["merges_recovered"] for r in merges) >= 0.95 * sum(r["merges_true"] for r in merges)}
    return summary, {k: bool(v) for k, v in goals.items()}


def _over_seeds(by_seed: dict[int, list[dict]]) -> dict:
    """Each fingerprint seed's headline figures, and each row's p-value over the seeds."""
    per_seed = {}
    for fseed, rows in by_seed.items():
        summary, _ = _summary(rows)
        per_seed[str(fseed)] = {k: summary[k] for k in ("auc", "derivatives_p_le_1e-4", "independent_p_ge_0.01",
                                                       "largest_derivative_p", "smallest_independent_p", "kept_exact",
                                                       "merges_recovered", "mapping_correct", "misses")}
    aucs = [v["auc"] for v in per_seed.values()]
    first = next(iter(by_seed.values()))
    p_rows = {r["name"]: [rows[i]["p_value"] for rows in by_seed.values()] for i, r in enumerate(first)}
    hard = {name: {"p_min": min(ps), "p_median": float(np.median(ps)), "p_max": max(ps),
                   "derived": first[i]["derived"]}
            for i, (name, ps) in enumerate(p_rows.items())
            # every row whose p-value is not the same at every seed, or that any seed misses
            if len(set(ps)) > 1 and (max(ps) > 1e-4 if first[i]["derived"] else min(ps) < 0.05)}
    return {"seeds": list(by_seed), "per_seed": per_seed,
            "auc": {"min": min(aucs), "median": float(np.median(aucs)), "max": max(aucs)},
            "seeds_auc_1": sum(a == 1.0 for a in aucs),
            "seeds_every_derivative_p_le_1e-4": sum(v["derivatives_p_le_1e-4"] == _count(first, True)
                                                    for v in per_seed.values()),
            "seeds_every_independent_p_ge_0.01": sum(v["independent_p_ge_0.01"] == _count(first, False)
                                                     for v in per_seed.values()),
            "rows_that_move": hard, "p_by_seed": p_rows}


def _count(rows: list[dict], derived: bool) -> int:
    return sum(r["derived"] == derived for r in rows)


def _seed_table(doc: dict) -> str:
    lines = [f"{'fp seed':>7}  {'AUC':>6}  {'deriv p<=1e-4':>13}  {'indep p>=0.01':>13}  {'largest deriv p':>15}  "
             f"{'smallest indep p':>16}  merges  mapping"]
    for fseed, v in doc["per_seed"].items():
        lines.append(f"{fseed:>7}  {v['auc']:6.3f}  {v['derivatives_p_le_1e-4']:>13}  {v['independent_p_ge_0.01']:>13}  "
                     f"{v['largest_derivative_p']:15.3g}  {v['smallest_independent_p']:16.3g}  "
                     f"{v['merges_recovered']:>6}  {v['mapping_correct']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--negatives", type=int, default=5)
    ap.add_argument("--negative-steps", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "moeguard-provenance")
    ap.add_argument("--skip-realign", action="store_true", help="leave out the fine-tuned derivatives (quick runs)")
    ap.add_argument("--fingerprint-seeds", type=lambda v: [int(x) for x in v.split(",")], default=list(range(10)),
                    help="comma-separated fingerprint seeds; the first gives the rows, all give the spread")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    from moeguard.attribution.run import make_context, score
    from moeguard.models.loading import load_model
    from moeguard.models.prune import prune_model
    from moeguard.pruning.plan import plan_from_scores
    from moeguard.trace import evasion
    from moeguard.trace.fingerprint import build, checkpoint_bytes
    from moeguard.trace.gguf import export_gguf, load_gguf
    from moeguard.trace.weights import f64, from_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    m, tok, _ = load_model(None)
    size = checkpoint_bytes(None)
    t0 = time.perf_counter()
    fp = build(from_model(m, tok, name="embedded"), checkpoint_bytes=size, seed=args.fingerprint_seeds[0])
    fp_s = time.perf_counter() - t0
    fp.save(args.workdir / "fp", overwrite=True)
    fp_bytes = sum(f.stat().st_size for f in (args.workdir / "fp").iterdir())
    cases = []  # (name, category, suspect, row arguments): every suspect is built once, traced per fingerprint

    with torch.no_grad():
        ctx = make_context(m, tok, TASK, samples=32, batch_size=8, seed=0)
        scores = {meth: score(ctx, meth) for meth in METHODS}
    # pruning
    for meth, s in scores.items():
        for k in (2, 4, 6):
            plan = plan_from_scores(s, keep=k, min_keep=1)
            pm, _ = prune_model(m, plan.keep)
            cases.append((f"prune {meth} keep {k}", "pruning", _model(pm, tok, "p"), dict(keep=plan.keep, order={})))
        plan = plan_from_scores(s, budget=16, min_keep=1)
        pm, _ = prune_model(m, plan.keep)
        cases.append((f"prune {meth} budget 16", "pruning", _model(pm, tok, "p"), dict(keep=plan.keep, order={})))
    base_plan = plan_from_scores(scores["frequency"], keep=KEEP_REALIGN, min_keep=1)
    pruned, _ = prune_model(m, base_plan.keep)
    from moeguard.tasks.evaluate import evaluate_task

    scores_ref = {"full": evaluate_task(m, tok, TASK, limit=64, batch_size=32).score,
                  "pruned_keep_4": evaluate_task(pruned, tok, TASK, limit=64, batch_size=32).score}
    # pruning + re-alignment: the attack grid (its default modes, learning-rate scales and epochs), each
    # cell traced; the strongest cell per mode is the one whose fine-tuned model scores best
    if not args.skip_realign:
        cells = []
        for mode in ("full", "lora"):
            for lr_scale in (0.1, 1.0, 10.0):
                for epochs in (4.0, 16.0):
                    rm, info = _realigned(pruned, tok, mode, epochs, lr_scale)
                    info["mode"], info["lr_scale"] = mode, lr_scale
                    cells.append((f"prune keep 4 + {mode} x{lr_scale:g} lr, {epochs:g} epochs", "pruning+realign",
                                  _model(rm, tok, "r"), dict(keep=base_plan.keep, extra={"finetune": info}, order={})))
        for mode in ("full", "lora"):
            best = max((c for c in cells if c[3]["extra"]["finetune"]["mode"] == mode),
                       key=lambda c: c[3]["extra"]["finetune"]["score"])
            best[3]["extra"]["strongest_cell"] = True
        cases.extend(cells)
        rm, info = _realigned(pruned, tok, "full", 160.0, 10.0)
        cases.append(("prune keep 4 + long full fine-tune (10x the grid's steps, its highest lr)", "pruning+realign", _model(rm, tok, "r"), dict(keep=base_plan.keep, extra={"finetune": info}, order={})))
    # merging
    freq = scores["frequency"].scores.numpy()
    # float64 gate sums, as when from_model held float64 copies (it now holds views of the model)
    v = {l.index: f64(l.gate).sum(axis=1) for l in from_model(m, tok, name="e").layers}
    clusters = {li: _clusters(v[li], 4) for li in v}
    for name, weights in (("uniform (HC-SMoE)", None),
                          ("frequency-weighted (M-SMoE)", {li: [[max(float(freq[i][e]), 1e-6) for e in g] for g in gs]
                                                           for i, (li, gs) in enumerate(clusters.items())})):
        mm, rec = evasion.merge_experts(m, clusters, weights)
        cases.append((f"merge 8->4 {name}", "merging", _model(mm, tok, "m"), dict(merges=rec["merges"],
                         extra={"clusters": {str(k): v for k, v in clusters.items()}})))
    # quantization
    for q in ("Q8_0", "Q4_0"):
        cases.append((f"quantized {q} (round trip)", "quantization", _model(_quantized(m, q), tok, "q"), dict()))
        path = args.workdir / f"pruned4_{q}.gguf"
        export_gguf(pruned, tok, path, qtype=q)
        cases.append((f"prune keep 4 -> GGUF {q}", "quantization", lambda path=path: load_gguf(path),
                      dict(keep=base_plan.keep, extra={"gguf_bytes": path.stat().st_size}, order={})))
    for bits in (8, 4):
        what = "int8 per row (torch qint8)" if bits == 8 else "int4 per group of 32 (torch fake-quant)"
        cases.append((f"prune keep 4 -> {what}", "quantization", _model(_torch_quantized(pruned, bits), tok, "q"),
                      dict(keep=base_plan.keep, order={})))
    # evasion
    shuffled, orders = evasion.shuffle_experts(pruned, seed=1)
    shuffled_keep = {li: base_plan.keep[li] for li in base_plan.keep}
    cases.append(("prune 4 + shuffled experts", "evasion", _model(shuffled, tok, "e"), dict(keep=shuffled_keep,
                     order=orders)))
    cases.append(("permuted neurons", "evasion", _model(evasion.permute_neurons(m, seed=2), tok, "e"), dict(keep={l: list(range(8)) for l in range(4)}, order={})))
    cases.append(("permuted hidden + sign flips", "evasion", _model(evasion.permute_hidden(m, seed=3, flip_signs=True), tok, "e"), dict(keep={l: list(range(8)) for l in range(4)}, order={})))
    allof = evasion.permute_hidden(evasion.permute_neurons(shuffled, seed=4), seed=5, flip_signs=True)
    cases.append(("prune 4 + all evasions", "evasion", _model(allof, tok, "e"), dict(keep=shuffled_keep,
                     order=orders)))
    q4 = _quantized(allof, "Q4_0")
    cases.append(("prune 4 + all evasions + Q4_0", "evasion", _model(q4, tok, "e"), dict(keep=shuffled_keep,
                     order=orders)))
    # negatives
    train_s = {}
    for seed in range(1, args.negatives + 1):
        t0 = time.perf_counter()
        nm, ntok = _train(args.workdir / f"zoo-seed{seed}-{args.negative_steps}", seed, args.negative_steps)
        train_s[f"seed{seed}"] = round(time.perf_counter() - t0, 1)
        cases.append((f"independent zoo seed {seed} ({args.negative_steps} steps)", "independent", _model(nm, ntok, "n"), dict(derived=False)))
        # the same model pruned: fewer suspect experts than the owner's is where a row effect would show
        rng = np.random.default_rng(seed)
        for k in (2, 4):
            keep = {l: sorted(rng.choice(8, size=k, replace=False).tolist()) for l in range(4)}
            cases.append((f"independent zoo seed {seed}, pruned to {k}", "independent", _model(prune_model(nm, keep)[0], ntok, "n"), dict(derived=False)))
    other = ["stdlib-docs", "stdlib-code"]
    om, otok = _train(args.workdir / f"zoo-other-{args.negative_steps}", 11, args.negative_steps, tasks=other)
    cases.append((f"independent, other data ({'+'.join(other)})", "independent", _model(om, otok, "o"), dict(derived=False)))
    opm, _ = prune_model(om, {l: [0, 2, 4, 6] for l in range(4)})
    cases.append(("pruned derivative of the other-data model", "independent", _model(opm, otok, "o"), dict(derived=False)))

    # every suspect traced against fingerprints of each seed: the first seed's rows are the
    # benchmark's rows; the others show how much the hard cases depend on which hidden dimensions
    # the seeded draw put in H (build takes milliseconds, a trace of every suspect seconds)
    by_seed = {}
    for i, fseed in enumerate(args.fingerprint_seeds):
        fps = fp if i == 0 else build(from_model(m, tok, name="embedded"), checkpoint_bytes=size, seed=fseed)
        by_seed[fseed] = [_row(name, cat, *_trace(fps, suspect), **kw, quiet=i > 0) for name, cat, suspect, kw in cases]
    rows = by_seed[args.fingerprint_seeds[0]]
    ranks = sorted([(r["p_value"], r["derived"]) for r in rows])
    summary, goals = _summary(rows)
    seeds_doc = _over_seeds(by_seed)
    path = write_result("provenance", {
        "fingerprint": {"bytes": fp_bytes, "checkpoint_bytes": size, "share": fp_bytes / size, "m": int(fp.H.size),
                        "anchors": int(fp.tensors["anchors"].shape[0]), "build_s": round(fp_s, 3)},
        "task_scores": {"task": TASK, "eval_limit": 64, **scores_ref},
        "negative_training": {"steps": args.negative_steps, "embedded_steps": 1000, "seconds": train_s},
        "summary": summary, "goals": goals, "fingerprint_seeds": seeds_doc, "rows": rows, "ranks": ranks,
        "seconds": round(time.perf_counter() - started, 1)}, args.out)
    print(summary, goals, f"written to {path}")
    print(_seed_table(seeds_doc))


if __name__ == "__main__":
    main()
