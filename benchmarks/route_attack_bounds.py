"""Why route-attack's prefixes plateau below 90% on the experts that resist (issue 16): bounds
and alternative searches on the targets of ``results/route_attack.json``.

    .venv/bin/python benchmarks/route_attack_bounds.py [--close 5] [--steps 300] [--out JSON]

For every target whose universal prefix stayed under 90% held-out success:
- **stubborn tokens**: with that prefix, which input tokens are never routed to the expert (per
  token id, over the held-out inputs), and the success ceiling they leave if they never move;
- **relaxed prefixes** (same 20 positions, same training inputs, a hinge on the expert's margin
  over the k-th other router logit, Adam, ``--steps``):
  - ``hull``: each position a softmax mixture of usable tokens' embeddings, the convex hull
    whose corners GCG searches; its argmax (the nearest discrete prefix) is measured too;
  - ``free``: unconstrained embedding vectors (their norm against real tokens' is reported).
For the ``--close`` targets nearest 90%, two other discrete searches:
- **PEZ** (Wen et al., 2023): continuous vectors, the forward run at their nearest usable token
  (cosine), the gradient there applied to the vectors (straight-through);
- **per-input GCG**: route-attack's own search on one held-out input at a time (an individual,
  not universal, prefix), on 4 inputs; its success on the input it was made for.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import numpy as np
import torch

from _common import RESULTS, write_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default=str(RESULTS / "route_attack.json"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--close", type=int, default=5)
    ap.add_argument("--per-input", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    import moeguard.monitor.hijack as H
    from moeguard.monitor.routertap import allowed_tokens
    from moeguard.edge import resolve_model, resolve_tasks
    from moeguard.models.adapter import MoEAdapter
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.tokens import bos_ids, encode

    src = json.load(open(args.source))["route_attack"]
    torch.manual_seed(args.seed)
    handle = resolve_model(None)
    task = resolve_tasks([src["task"]])[0]
    cfg0 = H.HijackConfig(**{**src["config"], "layer": 0, "expert": 0})
    model, tok, _ = handle.load()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = MoEAdapter(model)
    k, n = adapter.top_k, cfg0.prefix_tokens
    emb = model.get_input_embeddings()
    W = emb.weight.detach()
    allowed = torch.as_tensor(allowed_tokens(tok, W.shape[0]))
    Wa = W[allowed]
    train = H._Batch(tok, H._inputs(task, "train", cfg0.train_inputs, tok, cfg0.max_input_tokens))
    held = H._Batch(tok, H._inputs(task, "eval", cfg0.eval_inputs, tok, None))
    recs = [r for r in load_records(task, "eval", limit=cfg0.eval_inputs) if r["input"]]

    def route(batch, prefix_emb, slot, e):
        """(margin of e over the k-th other logit per target token, success share)."""
        ids, mask, target, _ = batch.build([[int(allowed[0])] * n])
        x = emb(ids)
        lead = len(batch.head)
        x = torch.cat([x[:, :lead], prefix_emb.expand(ids.shape[0], n, -1), x[:, lead + n:]], dim=1)
        with H.RouterTap(adapter, slot) as tap:
            logits, index = tap.run(model, inputs_embeds=x, attention_mask=mask)
        t = target.reshape(-1)
        lg = logits.float()[t]
        other = lg.clone()
        other[:, e] = -torch.inf
        margin = lg[:, e] - other.topk(k, dim=-1).values[:, -1]
        return margin, float((index[t] == e).any(-1).float().mean())

    def stubborn(t, slot):
        miss, total = collections.Counter(), collections.Counter()
        for r in recs:
            x = encode(tok, r["input"])
            full = bos_ids(tok) + encode(tok, t["prefix_text"] + H.SEPARATOR + r["input"])
            with torch.no_grad(), H.RouterTap(adapter, slot) as tap:
                _, idx = tap.run(model, input_ids=torch.tensor([full]))
            hit = (idx == t["expert"]).any(-1)[len(full) - len(x):].tolist()
            for tid, ok in zip(x, hit):
                total[tid] += 1
                miss[tid] += not ok
        never = {i: total[i] for i in total if miss[i] == total[i]}
        share = sum(never.values()) / sum(total.values())
        return {"never_routed": sorted(([tok.decode([i]), c] for i, c in never.items()), key=lambda z: -z[1])[:8],
                "never_routed_share": round(share, 4), "ceiling_if_they_never_move": round(1 - share, 4)}

    def relaxed(kind, slot, e, seed):
        g = torch.Generator().manual_seed(seed)
        init = torch.randint(0, len(allowed), (n,), generator=g)
        if kind == "hull":
            z = torch.zeros(n, len(allowed))
            z[torch.arange(n), init] = 3.0
            z.requires_grad_(True)
            params, make = [z], (lambda: torch.softmax(z, -1) @ Wa)
        else:
            v = Wa[init].clone().requires_grad_(True)
            params, make = [v], (lambda: v)
        opt = torch.optim.Adam(params, lr=0.1 if kind == "hull" else 0.02)
        for _ in range(args.steps):
            margin, _ = route(train, make(), slot, e)
            loss = torch.relu(1.0 - margin).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = {"train": round(route(train, make(), slot, e)[1], 4), "heldout": round(route(held, make(), slot, e)[1], 4)}
            if kind == "hull":
                p = torch.softmax(z, -1)
                out["argmax_heldout"] = round(route(held, Wa[z.argmax(-1)], slot, e)[1], 4)
                out["entropy_nats"] = round(float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()), 3)
            else:
                out["norm_vs_tokens"] = round(float(v.norm(dim=-1).mean() / Wa.norm(dim=-1).mean()), 2)
        return out

    def pez(slot, e, seed):
        g = torch.Generator().manual_seed(seed)
        v = Wa[torch.randint(0, len(allowed), (n,), generator=g)].clone()
        opt = torch.optim.Adam([v.requires_grad_(True)], lr=0.01)
        Wn = Wa / Wa.norm(dim=-1, keepdim=True)
        best = (-1.0, None)
        for _ in range(400):
            with torch.no_grad():
                j = (v / v.norm(dim=-1, keepdim=True) @ Wn.T).argmax(-1)
            proj = Wa[j].clone().requires_grad_(True)
            margin, s = route(train, proj, slot, e)
            if s > best[0]:
                best = (s, j.clone())
            (grad,) = torch.autograd.grad(torch.relu(1.0 - margin).mean(), proj)
            opt.zero_grad()
            v.grad = grad
            opt.step()
        with torch.no_grad():
            return {"train": round(best[0], 4), "heldout": round(route(held, Wa[best[1]], slot, e)[1], 4)}

    def per_input(layer, e):
        evals, keep = H._inputs(task, "eval", cfg0.eval_inputs, tok, None), H._inputs
        res = []
        try:
            for i in range(args.per_input):
                H._inputs = lambda *a, _x=evals[i], **kw: [_x]
                c = H.HijackConfig(**{**src["config"], "layer": layer, "expert": e, "train_inputs": 1, "seed": i})
                res.append(H.search(model, tok, adapter, task, c, allowed=allowed.numpy())["train_success"])
        finally:
            H._inputs = keep
        return {"inputs": len(res), "success": res, "mean": round(float(np.mean(res)), 4)}

    resist = [t for t in src["targets"] if t["measured"]["success"] < 0.9]
    close = sorted(resist, key=lambda t: -t["measured"]["success"])[:args.close]
    rows, t0 = [], time.perf_counter()
    for t in resist:
        L, e = t["layer"], t["expert"]
        slot = H.check_target(adapter, L, e)
        row = {"layer": L, "expert": e, "gcg_universal_heldout": t["measured"]["success"],
               "stubborn": stubborn(t, slot), "hull": relaxed("hull", slot, e, 100 * L + e),
               "free": relaxed("free", slot, e, 100 * L + e)}
        if t in close:
            row["pez"] = pez(slot, e, 100 * L + e)
            row["gcg_per_input"] = per_input(L, e)
        rows.append(row)
        print(json.dumps({kk: row[kk] for kk in row if kk != "stubborn"}), flush=True)
    seconds = time.perf_counter() - t0
    summary = {
        "targets": len(rows),
        "hull_heldout_ge_0.9": sum(r["hull"]["heldout"] >= 0.9 for r in rows),
        "free_heldout_ge_0.9": sum(r["free"]["heldout"] >= 0.9 for r in rows),
        "hull_argmax_heldout_ge_0.9": sum(r["hull"]["argmax_heldout"] >= 0.9 for r in rows),
        "ceiling_below_0.9": sum(r["stubborn"]["ceiling_if_they_never_move"] < 0.9 for r in rows),
        "close": [{"layer": r["layer"], "expert": r["expert"], "gcg_universal": r["gcg_universal_heldout"],
                   "pez": r["pez"]["heldout"], "gcg_per_input": r["gcg_per_input"]["mean"]} for r in rows if "pez" in r],
    }
    path = write_result("route_attack_bounds", {"source": {"task": src["task"], "config": src["config"]},
                                                "settings": vars(args), "seconds": round(seconds, 1),
                                                "summary": summary, "targets": rows}, args.out)
    print(json.dumps(summary, indent=1))
    print(f"{seconds:.0f} s; written to {path}")


if __name__ == "__main__":
    main()
