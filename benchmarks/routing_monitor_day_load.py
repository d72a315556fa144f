"""A day's routing load over all traffic, against a campaign of window-screening identities spread
over the day as users are: does the campaign's pull on its expert show where no window and no slice
sees it?

    .venv/bin/python benchmarks/routing_monitor_day_load.py [--identities 8] [--days 20] [--campaign-days 5] [--out JSON]

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
  3 blocks of 16, added to a benign day (each identity over its own stretch of the day, as a user).
  Its **control** is the same identities sending the same inputs without the prefix: a benign day
  heavy in the attacked task, which a day statistic must not alert on.
- **Day statistics**, each the largest over the 32 (layer, expert) cells:
  - ``max_S`` / ``max_S_raw``: the slice sums above, with the topic mix / raw (campaigns on the
    first ``--campaign-days`` days);
  - ``max_Z``: each cell's day mean of the fitted-mix residual, standardized by its spread over the
    *other* benign days (leave one out) instead of one day's slices;
  - ``max_K``: the same for each request's residual from its 16 nearest neighbours in the profile's
    neighbour references (``neighbours.Neighbours``);
  - ``monitor``: the monitor's own test (``monitor score --period``, ``periods.score_periods``): the
    days in sequence, each against the 14 days before it that did not alert; a campaign (and, apart,
    its control) on each of the last ``--campaign-days`` days in turn. p-values, the cell and how many
    of the 5 named clients are campaign identities; the share of days alerting at 0.001, 0.01, 0.05.
    With ``--cause``, each alerting day's cause too (``periodclients.py``: the clients' routing or the
    day's mix, in the cells that alert), its ``p_routing``, and how many of the clients it finds
    routing-moved among the named are the campaign's; ``monitor.causes_at_0.01`` counts them.
    With ``--period-clients``, the clients' test too (``monitor score --period-clients``): on every
    benign day and each campaign and control day, its p, and how many of the clients it finds at 0.01
    are the campaign's (``monitor.clients_test``). Written as ``results/routing_monitor_day_load_i2_clients.json``
    and ``_i8_clients.json`` with ``--identities 2`` and ``8 --period-clients``.
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
    ap.add_argument("--cause", action="store_true",
                    help="also give each alerting day of the monitor's test its cause (periodclients: the clients' "
                         "routing or the day's mix), with the embeddings: about 10 s an alert")
    ap.add_argument("--period-clients", action="store_true",
                    help="also the clients' test (monitor score --period-clients, periodclients.clients_test) on every "
                         "benign day and each campaign and control day: about 5 s a day")
    ap.add_argument("--dump", help="also save each request's residual, embedding and who sent it (.npz) "
                                   "for routing_monitor_day_resample.py")
    args = ap.parse_args()
    from routing_monitor_own_log import interleave, users

    from moeguard.models.adapter import MoEAdapter
    from moeguard.monitor import periodclients, periods, slices
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
            ix = nrng.choice(len(own), size=POOL, replace=False)
            hp = [tg["prefix_text"] + SEPARATOR + own[i] for i in ix]
            hij = Observed(m, tok, surrogate, hp, adapter)
            clients, control = [], []
            for i in range(args.identities):
                stream = screened_stream(surrogate, hij, fill, 3, np.random.default_rng(nrng.integers(2**32)), 0.05, 0.05)
                cid = f"{f[:-5]}:{tg['layer']}.{tg['expert']}:{i}"
                clients.append((cid, [hp[j] if k == "hijack" else fill_prompts[j] for k, j in stream], sum(k == "hijack" for k, _ in stream)))
                # The control: the same identities sending the same inputs without the prefix, so that
                # what the day statistic sees is the hijack and not the campaign's topic mix.
                control.append((cid, [own[ix[j]] if k == "hijack" else fill_prompts[j] for k, j in stream], 0))
            if any(n for *_, n in clients):   # a prefix none of whose candidates passes sends filler only
                campaigns.append({"run": f[:-5], "layer": tg["layer"], "expert": tg["expert"], "clients": clients,
                                  "control": control})
    print(f"{len(campaigns)} campaigns of {args.identities} identities ({time.perf_counter() - t0:.0f} s)", flush=True)

    days = [day2] + [users(held, 96, np.random.default_rng(100 + d), "user") for d in range(args.days - 1)]
    prompts = sorted({r["prompt"] for r in log1} | {p for day in days for _, ps in day for p in ps}
                     | {p for c in campaigns for k in ("clients", "control") for _, ps, _ in c[k] for p in ps})
    h, sums, ntok, _ = observe(m, tok, prompts, tokens=owner.tokens, adapter=adapter, batch_size=64)   # each text once
    X, at = owner.space(sums, ntok), {p: i for i, p in enumerate(prompts)}
    T = {t: np.asarray(v) for t, v in owner.topics.items()}
    slot = {l.index: i for i, l in enumerate(adapter.layers)}
    print(f"{len(prompts)} texts observed ({time.perf_counter() - t0:.0f} s)", flush=True)
    # Each request's routing less that of its nearest benign requests in the profile's embedding space
    # (the profile's neighbour references, periods.py): what a request's own content predicts, finer
    # than a slice's fitted mix of the profile's topics (a log profile's topics are a few clusters).
    resid = owner.neighbours.residual(X, h)

    def per_slice(recs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """[slices, L, E]: each slice's mean routing share less its fitted topic mix's; and the share itself."""
        fitted, raw = [], []
        for k in range(len(recs) // SLICE):
            ix = [at[r["prompt"]] for r in recs[k * SLICE:(k + 1) * SLICE]]
            mix = slices.score(owner, X[ix], [r["client"] for r in recs[k * SLICE:(k + 1) * SLICE]])["mix"]
            raw.append(h[ix].mean(0))
            fitted.append(raw[-1] - sum(v * T[t] for t, v in mix.items()) / sum(mix.values()))
        return np.array(fitted), np.array(raw)

    cal = per_slice(log1)                                     # the owner's day-1 log standardizes each cell
    norm = [(a.mean(0), a.std(0) + 1e-9) for a in cal]

    def day(recs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[L, E] each: the day's standardized sum over its slices, with the topic mix and raw; and the
        day's mean residual (with the topic mix), for the day-to-day standardization."""
        parts = per_slice(recs)
        return tuple(((a - mu) / sd).sum(0) / np.sqrt(len(a)) for a, (mu, sd) in zip(parts, norm)) + (
            np.stack([parts[0].mean(0), resid[[at[r["prompt"]] for r in recs]].mean(0)]),)

    day_recs = [interleave(d, np.random.default_rng(args.seed + 1 + i), "") for i, d in enumerate(days)]
    benign = [day(recs) for recs in day_recs]
    top, top_raw = max(float(S.max()) for S, *_ in benign), max(float(R.max()) for _, R, _ in benign)
    # Standardizing each cell by its slice-to-slice spread on one day treats a day's slices as
    # independent draws; benign days differ by more than that (their users differ), so Z instead
    # standardizes each cell's day mean by its spread across the owner's other days. Each day is
    # scored against the other benign days only (leave one out), a campaign day against the benign
    # days but the one it was added to.
    M = np.array([m for *_, m in benign])                    # [days, 2 (fitted mix, neighbours), L, E]

    def day_z(m: np.ndarray, leave: int) -> list[tuple[float, str]]:
        """Per residual: the largest cell's z against the benign days but ``leave``, and that cell as
        "layer.expert"."""
        ref = np.delete(M, leave, 0)
        z = (m - ref.mean(0)) / (ref.std(0, ddof=1) + 1e-12)
        out = []
        for v in z:
            k, e = np.unravel_index(int(v.argmax()), v.shape)
            out.append((float(v.max()), f"{adapter.layers[k].index}.{e}"))
        return out

    benign_z = [[z for z, _ in day_z(M[i], i)] for i in range(len(M))]
    top_z = [max(b[v] for b in benign_z) for v in range(2)]
    VARIANTS = ("Z", "K")      # the day's mean residual of the fitted topic mix / of the neighbours, z across days
    rows = []
    for c in campaigns:
        row = {k: c[k] for k in ("run", "layer", "expert")}
        row.update(hijacked=int(sum(n for *_, n in c["clients"])), requests=int(sum(len(ps) for _, ps, _ in c["clients"])),
                   max_S=[], max_S_raw=[], S_target=[])
        row.update({f"{w}{v}": [] for v in VARIANTS for w in ("max_", "cell_", "p_", "control_max_", "control_cell_")})
        for i in range(min(args.campaign_days, len(days))):
            S, R, mean = day(interleave(days[i] + [(cid, ps) for cid, ps, _ in c["clients"]], np.random.default_rng(args.seed + 1 + i), ""))
            row["max_S"].append(round(float(S.max()), 2))
            row["max_S_raw"].append(round(float(R.max()), 2))
            row["S_target"].append(round(float(S[slot[c["layer"]], c["expert"]]), 2))
            *_, control = day(interleave(days[i] + [(cid, ps) for cid, ps, _ in c["control"]], np.random.default_rng(args.seed + 1 + i), ""))
            for v, (z, cell), (cz, ccell) in zip(range(2), day_z(mean, i), day_z(control, i)):
                n = VARIANTS[v]
                row[f"max_{n}"].append(round(z, 2))
                row[f"cell_{n}"].append(cell)
                # p: the campaign day's rank among the other benign days' leave-one-out statistics
                row[f"p_{n}"].append(round((1 + sum(b[v] >= z for j, b in enumerate(benign_z) if j != i)) / len(benign_z), 4))
                row[f"control_max_{n}"].append(round(cz, 2))
                row[f"control_cell_{n}"].append(ccell)
        row["days_above_benign_max"] = round(float(np.mean(np.array(row["max_S"]) > top)), 4)
        row["days_above_benign_max_raw"] = round(float(np.mean(np.array(row["max_S_raw"]) > top_raw)), 4)
        for v, n in enumerate(VARIANTS):
            row[f"days_above_benign_max_{n}"] = round(float(np.mean(np.array(row[f"max_{n}"]) > top_z[v])), 4)
            row[f"control_days_above_benign_max_{n}"] = round(float(np.mean(np.array(row[f"control_max_{n}"]) > top_z[v])), 4)
        rows.append(row)
        print(f"{row['run']}:{row['layer']}.{row['expert']}: {row['hijacked']} hijacked of {row['requests']}; max_S "
              f"{row['max_S']} (benign max {top:.2f}); own expert {row['S_target']}; "
              + "; ".join(f"max_{n} {row[f'max_{n}']} control {row[f'control_max_{n}']} (benign max {top_z[v]:.2f})"
                          for v, n in enumerate(VARIANTS)), flush=True)
    # The monitor's own test (`monitor score --period`, periods.score_periods): the days in sequence,
    # each against the BASELINE days before it that did not alert; a campaign on each of the last
    # --campaign-days days in turn (and its control), the other days benign.
    def sequence(recs_by_day: list[list[dict]], clients_test: bool = False) -> list[dict]:
        t = np.concatenate([d + np.arange(len(rs)) / len(rs) for d, rs in enumerate(recs_by_day)])
        flat = [r for rs in recs_by_day for r in rs]
        ix = [at[r["prompt"]] for r in flat]
        return periods.score_periods(t, resid[ix], [r["client"] for r in flat], period=1.0, baseline=periods.BASELINE,
                                     alpha=0.01, layers=list(slot), x=X[ix] if args.cause or clients_test else None,
                                     clients_test=clients_test)

    def clients_on(recs_by_day: list[list[dict]], before_rows: list[dict], i: int) -> dict:
        """Day i's clients' test as ``sequence(..., clients_test=True)`` gives it, computed alone: the days
        before it are ``before_rows``' (which of them join the baseline: those with a state that alerted
        on neither test), so each campaign day costs one test, not a sequence of them. Checked equal to
        the sequence's own on the benign days."""
        kept = [j for j in range(i) if "state" in before_rows[j] and not before_rows[j].get("alert")
                and not before_rows[j].get("clients_alert")][-periods.BASELINE:]
        ix = [[at[r["prompt"]] for r in recs_by_day[j]] for j in kept]
        before = periodclients.Earlier([X[a] for a in ix], [[r["client"] for r in recs_by_day[j]] for j in kept])
        day_ix, got = [at[r["prompt"]] for r in recs_by_day[i]], {}
        pool = np.concatenate(ix) if ix else np.zeros(0, dtype=np.int64)
        periodclients.clients_test(got, before, before.match(X[day_ix]) if before.why is None else None,
                                   r=resid[day_ix].reshape(len(day_ix), -1), clients=[r["client"] for r in recs_by_day[i]],
                                   pool_r=resid.reshape(len(resid), -1)[pool], alpha=0.01,
                                   cells=[[layer, e] for layer in slot for e in range(resid.shape[2])])
        return got

    if args.dump:   # the benign days' requests (day, client, text) and each campaign's and control's
        rec = [(d, r["client"], at[r["prompt"]]) for d, rs in enumerate(day_recs) for r in rs]
        sent = {k: [np.array([at[p] for p in ps]) for c in campaigns for _, ps, _ in c[k]] for k in ("clients", "control")}
        np.savez_compressed(args.dump, resid=resid.astype(np.float32), x=X.astype(np.float32), day=np.array([d for d, _, _ in rec]),
                            client=np.array([c for _, c, _ in rec]), text=np.array([i for *_, i in rec]),
                            campaign_of=np.repeat(np.arange(len(campaigns)), args.identities),
                            **{f"{k}_{i}": a for k, v in sent.items() for i, a in enumerate(v)})
    benign_rows = sequence(day_recs, clients_test=args.period_clients)
    benign_p = [r["p"] for r in benign_rows if r["p"] is not None]
    last = range(len(days) - min(args.campaign_days, len(days)), len(days))
    if args.period_clients:   # the shortcut gives the sequence's own numbers (on the days campaigns are added to)
        for i in last:
            alone = clients_on(day_recs, benign_rows, i)
            if alone.get("clients_p") != benign_rows[i].get("clients_p"):
                raise SystemExit(f"day {i}: the clients' test alone gave {alone.get('clients_p')}, the sequence "
                                 f"{benign_rows[i].get('clients_p')}")
        # a benign day held out of a baseline by the clients' test would change later days' load tests, which
        # the campaign days below take from sequences without it: say so (not seen on the committed runs)
        held_out = [i for i, r in enumerate(benign_rows) if r.get("clients_alert") and not r.get("alert")]
        if held_out:
            print(f"benign days held out of baselines by the clients' test alone: {held_out}; the campaign days' "
                  f"load p's are from sequences without it", flush=True)
    for c, row in zip(campaigns, rows):
        row.update(monitor_p=[], monitor_cell=[], monitor_named_campaign=[], control_monitor_p=[])
        if args.period_clients:
            row.update(monitor_clients_p=[], monitor_clients_campaign=[], monitor_clients_other=[],
                       control_monitor_clients_p=[])
        if args.cause:   # per alerting day (None where the day did not alert at 0.01)
            row.update(monitor_cause=[], monitor_p_routing=[], monitor_routing_named=[], monitor_routing_named_campaign=[],
                       control_monitor_cause=[], control_monitor_p_routing=[])
        for i in last:
            for kind in ("clients", "control"):
                recs = interleave(days[i] + [(cid, ps) for cid, ps, _ in c[kind]], np.random.default_rng(args.seed + 1 + i), "")
                got = sequence(day_recs[:i] + [recs] + day_recs[i + 1:])[i]
                if args.period_clients:   # the clients' p, and whom it finds at 0.01: the campaign's identities or others
                    cl = clients_on(day_recs[:i] + [recs], benign_rows, i)
                    ids = {cid for cid, _, _ in c["clients"]}
                    if kind == "control":
                        row["control_monitor_clients_p"].append(cl["clients_p"])
                    else:
                        found = [t["client"] for t in cl.get("clients_routing", [])]
                        row["monitor_clients_p"].append(cl["clients_p"])
                        row["monitor_clients_campaign"].append(sum(f in ids for f in found))
                        row["monitor_clients_other"].append(sum(f not in ids for f in found))
                if args.cause:
                    pre = "control_" if kind == "control" else ""
                    row[f"{pre}monitor_cause"].append(got.get("cause"))
                    row[f"{pre}monitor_p_routing"].append(got.get("p_routing"))
                if kind == "control":
                    row["control_monitor_p"].append(got["p"])
                    continue
                row["monitor_p"].append(got["p"])
                row["monitor_cell"].append(f"{got['layer']}.{got['expert']}")
                ids = {cid for cid, _, _ in c["clients"]}
                row["monitor_named_campaign"].append(sum(t["client"] in ids for t in got["top_clients"]))
                if args.cause:   # the named clients whose own routing is beyond their content's, and how many are the campaign's
                    small = [t["client"] for t in got["top_clients"] if t.get("p_routing") is not None and t["p_routing"] <= 0.01]
                    row["monitor_routing_named"].append(len(small) if got.get("alert") else None)
                    row["monitor_routing_named_campaign"].append(sum(c in ids for c in small) if got.get("alert") else None)
        print(f"{row['run']}:{row['layer']}.{row['expert']}: monitor p {[f'{p:.2g}' for p in row['monitor_p']]} "
              f"(control {[f'{p:.2g}' for p in row['control_monitor_p']]})", flush=True)
    monitor = {"baseline": periods.BASELINE, "benign_days_tested": len(benign_p),
               "benign_p": sorted(round(p, 4) for p in benign_p),
               **{f"{w}_days_alerting_at_{a}": round(float(np.mean([p <= a for r in rows for p in r[k]])), 4)
                  for a in (0.001, 0.01, 0.05) for w, k in (("campaign", "monitor_p"), ("control", "control_monitor_p"))},
               **{f"benign_days_alerting_at_{a}": round(float(np.mean([p <= a for p in benign_p])), 4) for a in (0.001, 0.01, 0.05)}}
    if args.period_clients:   # the clients' test (its p at each level), and either test alerting
        bc = [r["clients_p"] for r in benign_rows if r.get("clients_p") is not None]
        both = [(r["p"], r["clients_p"]) for r in benign_rows if r["p"] is not None and r.get("clients_p") is not None]
        monitor["clients_test"] = {
            "benign_days_tested": len(bc), "benign_clients_p": sorted(round(p, 4) for p in bc),
            **{f"{w}_days_alerting_at_{a}": round(float(np.mean([p is not None and p <= a for r in rows for p in r[k]])), 4)
               for a in (0.001, 0.01, 0.05) for w, k in (("campaign", "monitor_clients_p"), ("control", "control_monitor_clients_p"))},
            **{f"benign_days_alerting_at_{a}": round(float(np.mean([p <= a for p in bc])), 4) for a in (0.001, 0.01, 0.05)},
            # the load test or the clients' test, each at the level: what an owner running both sees
            **{f"{w}_days_either_at_{a}": round(float(np.mean([(p <= a) or (q is not None and q <= a) for r in rows
                                                                for p, q in zip(r[k], r[f"{pre}monitor_clients_p"])])), 4)
               for a in (0.001, 0.01, 0.05) for w, k, pre in (("campaign", "monitor_p", ""), ("control", "control_monitor_p", "control_"))},
            **{f"benign_days_either_at_{a}": round(float(np.mean([p <= a or q <= a for p, q in both])), 4) for a in (0.001, 0.01, 0.05)},
            "campaign_identities_found_at_0.01": sum(sum(r["monitor_clients_campaign"]) for r in rows),
            "other_clients_found_at_0.01": sum(sum(r["monitor_clients_other"]) for r in rows),
            "benign_days_held_out": [i for i, r in enumerate(benign_rows) if r.get("clients_alert") and not r.get("alert")]}
    if args.cause:
        def causes(values: list) -> dict[str, int]:
            return {k: sum(v == k for v in values) for k in ("routing", "mix")} | {"none": sum(v is None for v in values)}
        monitor["causes_at_0.01"] = {
            "campaign": causes([c for r in rows for c, p in zip(r["monitor_cause"], r["monitor_p"]) if p is not None and p <= 0.01]),
            "control": causes([c for r in rows for c, p in zip(r["control_monitor_cause"], r["control_monitor_p"]) if p is not None and p <= 0.01]),
            "benign": causes([r.get("cause") for r in benign_rows if r.get("alert")]),
            "benign_p_routing": sorted(round(r["p_routing"], 4) for r in benign_rows if r.get("p_routing") is not None)}
    print(f"monitor --period: {monitor}", flush=True)
    path = write_result("routing_monitor_day_load" + (f"_i{args.identities}" if args.identities != 8 else ""), {
        "setting": {"identities": args.identities, "days": args.days, "campaign_days": args.campaign_days, "slice": SLICE,
                    "log_users": 240, "day_users": 96, "calibration_slices": len(cal[0]),
                    "route_attack": list(FILES), "screen": "surrogate task profile, p >= 0.05",
                    "neighbours": {"count": len(owner.neighbours.x), "k": owner.neighbours.k},
                    "seed": args.seed, **({"cause": True} if args.cause else {}),
                    **({"period_clients": True} if args.period_clients else {})},
        "results": {"benign_days": {"max_S": sorted(round(float(S.max()), 2) for S, *_ in benign),
                                    "max_S_raw": sorted(round(float(R.max()), 2) for _, R, _ in benign),
                                    **{f"max_{n}": sorted(round(b[v], 2) for b in benign_z) for v, n in enumerate(VARIANTS)}},
                    "campaigns": rows, "monitor": monitor,
                    "campaign_days_above_benign_max": round(float(np.mean([r["days_above_benign_max"] for r in rows])), 4),
                    **{f"{w}_days_above_benign_max_{n}": round(float(np.mean([r[f"{k}days_above_benign_max_{n}"] for r in rows])), 4)
                       for n in VARIANTS for w, k in (("campaign", ""), ("control", "control_"))}},
        "seconds": round(time.perf_counter() - t0, 1)}, args.out)
    print(f"written to {path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
