"""A day's routing load over all traffic, against a campaign of window-screening identities spread
over the day as users are: does the campaign's pull on its expert show where no window and no slice
sees it?

    .venv/bin/python benchmarks/routing_monitor_day_load.py [--identities 8] [--days 20] [--out JSON]

The attacker's goal is to move load to its expert. Each of its identities keeps its windows
benign-looking (``routing_monitor_window_evasion.py``'s attacker, screening with a task profile it
built, at p >= 0.05), but every hijacked request pushes the same expert, all day.

- **Setting**: ``routing_monitor_window_evasion.py --owner log``'s deployment: the owner's profile of
  day 1's log (240 users with habits, slices of 64).
- **The statistic**: for each slice of 64 consecutive requests, the mean routing share [L, E] less
  the routing of the benign topic mix its embeddings fit best (the slices' own fit,
  ``slices.score``), each (layer, expert) standardized by the owner's day-1 log's slices. A day's
  score is the sum over its slices over their root count, the largest over the experts (``max_S``);
  ``max_S_raw`` standardizes the raw share instead, without the topic mix.
- **Benign days**: ``--days`` days of 96 users each over the held-out items (the first is the
  window-evasion benchmark's; the others are new users, drawn with seeds 100, 101, ...).
- **Campaigns**: for each evasion-trained prefix (``route_attack_evading*.json``, >= 90% held-out
  success) that gets a hijacked request through, ``--identities`` identities with that prefix, each
  3 blocks of 16, added to each of the first ``--campaign-days`` benign days (each identity over its
  own stretch of the day, as a user). Reported: each day's ``max_S`` and ``max_S_raw``, the hijacked
  expert's own sum, and the share of the campaign's days above the largest benign day.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

from _common import write_result
from routing_monitor import embedded_and_topics
from routing_monitor_window_evasion import EARLY, POOL, RESULTS, Observed, log_deployment, screened_stream

FILES = ("route_attack_evading.json", "route_attack_evading_hijack_first.json")
SLICE = 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--identities", type=int, default=8, help="identities per campaign (one prefix)")
    ap.add_argument("--days", type=int, default=20, help="benign days")
    ap.add_argument("--campaign-days", type=int, default=5, help="benign days each campaign is added to")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    from routing_monitor_own_log import interleave, users

    from moeguard.models.adapter import MoEAdapter
    from moeguard.monitor import slices
    from moeguard.monitor.fit import build, observe
    from moeguard.monitor.routertap import SEPARATOR

    t0 = time.perf_counter()
    warnings.simplefilter("ignore")
    _, m, tok, _ = embedded_and_topics(args.seed)
    adapter = MoEAdapter(m)
    topics, log1, day2, owner = log_deployment(m, tok, args.seed, 240, SLICE)
    surrogate = build(m, tok, {k: v[0][:200] for k, v in topics.items()}, window=16, seed=args.seed + 1,
                      name="embedded", early=EARLY)
    held = {k: v[1] for k, v in topics.items()}
    task_inputs = [x for t in held if t not in ("sst2", "wikitext", "shakespeare", "scitldr") for x in held[t]]
    nrng = np.random.default_rng(args.seed)
    fill_prompts = [task_inputs[i] for i in nrng.choice(len(task_inputs), size=POOL, replace=False)]
    fill = Observed(m, tok, surrogate, fill_prompts, adapter)

    campaigns = []
    for f in FILES:
        doc = json.loads((RESULTS / f).read_text())
        doc = doc.get("route_attack", doc)
        for tg in doc["targets"]:
            if tg["measured"]["success"] < 0.9:
                continue
            own = held.get(doc.get("task"), task_inputs)
            hp = [tg["prefix_text"] + SEPARATOR + own[i] for i in nrng.choice(len(own), size=POOL, replace=False)]
            hij = Observed(m, tok, surrogate, hp, adapter)
            clients = []
            for i in range(args.identities):
                stream = screened_stream(surrogate, hij, fill, 3, np.random.default_rng(nrng.integers(2**32)), 0.05, 0.05)
                clients.append((f"{f[:-5]}:{tg['layer']}.{tg['expert']}:{i}",
                                [hp[j] if k == "hijack" else fill_prompts[j] for k, j in stream], sum(k == "hijack" for k, _ in stream)))
            if any(n for *_, n in clients):   # a prefix none of whose candidates passes sends filler only
                campaigns.append({"run": f[:-5], "layer": tg["layer"], "expert": tg["expert"], "clients": clients})
    print(f"{len(campaigns)} campaigns of {args.identities} identities ({time.perf_counter() - t0:.0f} s)", flush=True)

    days = [day2] + [users(held, 96, np.random.default_rng(100 + d), "user") for d in range(args.days - 1)]
    prompts = sorted({r["prompt"] for r in log1} | {p for day in days for _, ps in day for p in ps}
                     | {p for c in campaigns for _, ps, _ in c["clients"] for p in ps})
    h, sums, ntok, _ = observe(m, tok, prompts, tokens=owner.tokens, adapter=adapter, batch_size=64)   # each text once
    X, at = owner.space(sums, ntok), {p: i for i, p in enumerate(prompts)}
    T = {t: np.asarray(v) for t, v in owner.topics.items()}
    slot = {l.index: i for i, l in enumerate(adapter.layers)}
    print(f"{len(prompts)} texts observed ({time.perf_counter() - t0:.0f} s)", flush=True)

    def per_slice(recs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """[slices, L, E]: each slice's mean routing share less its fitted topic mix's; and the share itself."""
        fitted, raw = [], []
        for k in range(len(recs) // SLICE):
            ix = [at[r["prompt"]] for r in recs[k * SLICE:(k + 1) * SLICE]]
            mix = slices.score(owner, X[ix], [r["client"] for r in recs[k * SLICE:(k + 1) * SLICE]])["mix"]
            raw.append(h[ix].mean(0))
            fitted.append(raw[-1] - sum(v * T[t] for t, v in mix.items()) / sum(mix.values()))
        return np.array(fitted), np.array(raw)

    ref = per_slice(log1)                                     # the owner's day-1 log standardizes each cell
    norm = [(a.mean(0), a.std(0) + 1e-9) for a in ref]

    def day(recs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """[L, E] each: the day's standardized sum over its slices, with the topic mix and raw."""
        return tuple(((a - mu) / sd).sum(0) / np.sqrt(len(a)) for a, (mu, sd) in zip(per_slice(recs), norm))

    benign = [day(interleave(d, np.random.default_rng(args.seed + 1 + i), "")) for i, d in enumerate(days)]
    top, top_raw = max(float(S.max()) for S, _ in benign), max(float(R.max()) for _, R in benign)
    rows = []
    for c in campaigns:
        row = {k: c[k] for k in ("run", "layer", "expert")}
        row.update(hijacked=int(sum(n for *_, n in c["clients"])), requests=int(sum(len(ps) for _, ps, _ in c["clients"])),
                   max_S=[], max_S_raw=[], S_target=[])
        for i in range(min(args.campaign_days, len(days))):
            S, R = day(interleave(days[i] + [(cid, ps) for cid, ps, _ in c["clients"]], np.random.default_rng(args.seed + 1 + i), ""))
            row["max_S"].append(round(float(S.max()), 2))
            row["max_S_raw"].append(round(float(R.max()), 2))
            row["S_target"].append(round(float(S[slot[c["layer"]], c["expert"]]), 2))
        row["days_above_benign_max"] = round(float(np.mean(np.array(row["max_S"]) > top)), 4)
        row["days_above_benign_max_raw"] = round(float(np.mean(np.array(row["max_S_raw"]) > top_raw)), 4)
        rows.append(row)
        print(f"{row['run']}:{row['layer']}.{row['expert']}: {row['hijacked']} hijacked of {row['requests']}; max_S "
              f"{row['max_S']} (benign max {top:.2f}); own expert {row['S_target']}", flush=True)
    path = write_result("routing_monitor_day_load" + (f"_i{args.identities}" if args.identities != 8 else ""), {
        "setting": {"identities": args.identities, "days": args.days, "campaign_days": args.campaign_days, "slice": SLICE,
                    "log_users": 240, "day_users": 96, "calibration_slices": len(ref[0]), "route_attack": list(FILES),
                    "screen": "surrogate task profile, p >= 0.05", "seed": args.seed},
        "results": {"benign_days": {"max_S": sorted(round(float(S.max()), 2) for S, _ in benign),
                                    "max_S_raw": sorted(round(float(R.max()), 2) for _, R in benign)},
                    "campaigns": rows,
                    "campaign_days_above_benign_max": round(float(np.mean([r["days_above_benign_max"] for r in rows])), 4)},
        "seconds": round(time.perf_counter() - t0, 1)}, args.out)
    print(f"written to {path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
