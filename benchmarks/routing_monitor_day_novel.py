"""New content on a day: do the period tests call a launch a hijack?

    .venv/bin/python benchmarks/routing_monitor_day_novel.py [--topics scitldr,arith-compare] [--test-days 5] [--out JSON]

Written with the defaults as ``results/routing_monitor_day_novel.json`` (1,546 s on the 2-core machine, alone).

The clients' test (``monitor score --period-clients``) and an alert's cause compare each client's
routing with that of the *same content* on the baseline days: each request's nearest baseline
requests in the profile's embedding. Content the deployment has never served has no such match: its
nearest baseline requests are other content, routed otherwise. Does a benign launch then read as
clients whose routing moved (named as hijackers), and how does the load test take it?

- **The deployment before the launch**: ``routing_monitor_own_log.py``'s population (its topics,
  users with habits and stretches of the day) without topic ``T``: the owner's profile of a day-1 log
  of 240 such users (``fromlog.build``: its neighbour references know no ``T`` either), and
  ``BASELINE`` + ``--test-days`` benign days of 96 users over the held-out items, in sequence.
- **Each test day** (one of the last ``--test-days``, each alone, the days before it benign), the
  day's benign users and, at each share of the day's requests (``SHARES``):
  - ``launch``: new single-topic users of ``T`` (an app launched that day), each 16, 32 or 48
    requests, ``T``'s texts not sent twice in a day;
  - ``drift``: the day's own users send ``T`` for that share of their requests (each request, with
    that probability, replaced by a ``T`` text): users who take up new content;
  - ``known``: new single-topic users of a topic the deployment knows (cycling over them by test day),
    as many requests as ``launch``: a heavy one-task day, the control.
- **Tested** as ``monitor score --period 24h --period-clients`` does (``periods.score_periods``, the
  clients' test computed alone for the day as ``routing_monitor_day_load.py``'s ``clients_on``): the
  load test's p and cause (``routing`` or ``mix``), the clients' test's p, and of the clients it finds
  at 0.01 how many are the new users (``launch``/``known``) or others.

Reported per topic, kind and share: the share of test days alerting at 0.001 / 0.01 / 0.05 on each
test, the causes at 0.01, and the clients found; and the benign days' own rates (before any addition).
``carrier_requests_unmatched``: the share of the new content's requests farther from their baseline
matches than 99% of the baseline's own requests are from theirs (a gate on that distance, tried: new
content is not far in the model's embedding, so it would not tell a launch).

**A launch that stays** (``sustained``, at ``SUSTAINED`` shares): new users of ``T`` on every test day,
the days in sequence as daily runs score them (``score_periods``, with the clients' test), without
``--accept`` and with the first launch day accepted (``score --accept``: the owner reviewed it).
An alerting day is held out of later baselines, so without acceptance no baseline ever holds the new
content. Per day: both tests' p, whether each alerts, the cause.
"""

from __future__ import annotations

import argparse
import random
import time
import warnings

import numpy as np

from _common import write_result
from routing_monitor import embedded_and_topics

SHARES = (0.03, 0.10, 0.25)
SUSTAINED = (0.03, 0.10)   # shares of a launch that stays, day after day
KINDS = ("launch", "drift", "known")
LEVELS = (0.001, 0.01, 0.05)
LOG_USERS, DAY_USERS, SLICE = 240, 96, 64


def new_users(texts: list[str], n_requests: int, rng: np.random.Generator, prefix: str) -> list[tuple[str, list[str]]]:
    """Single-topic users, 16, 32 or 48 requests each, until ``n_requests`` (the last one cut to fit),
    ``texts`` not sent twice."""
    order, out, at = rng.permutation(len(texts)), [], 0
    while at < min(n_requests, len(texts)):
        n = min(16 * int(rng.integers(1, 4)), n_requests - at, len(texts) - at)
        out.append((f"{prefix}-{len(out)}", [texts[i] for i in order[at:at + n]]))
        at += n
    return out


def drifted(day: list[tuple[str, list[str]]], texts: list[str], share: float, rng: np.random.Generator):
    """The day's users, each request replaced by a ``texts`` item with probability ``share`` (not sent twice)."""
    order, at, out = rng.permutation(len(texts)), 0, []
    for cid, ps in day:
        new = []
        for p in ps:
            if at < len(texts) and rng.random() < share:
                new.append(texts[order[at]])
                at += 1
            else:
                new.append(p)
        out.append((cid, new))
    return out


def distance(pool: np.ndarray, x: np.ndarray, nn: np.ndarray) -> np.ndarray:
    """[len(x)]: each row's mean distance to its matches ``nn`` [len(x), K] in ``pool`` (-1: none)."""
    ok = nn >= 0
    d = np.sqrt(((x[:, None, :] - pool[np.maximum(nn, 0)]) ** 2).sum(-1))
    return np.where(ok, d, 0.0).sum(1) / np.maximum(ok.sum(1), 1)


def rates(ps: list, levels=LEVELS) -> dict[str, float | None]:
    return {f"at_{a}": (round(float(np.mean([p is not None and p <= a for p in ps])), 4) if ps else None) for a in levels}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topics", default="scitldr,arith-compare", help="topics held out of the deployment, each in turn")
    ap.add_argument("--test-days", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    from routing_monitor_own_log import interleave, pools, users
    from routing_monitor_window_evasion import EARLY, WINDOW

    from moeguard.models.adapter import MoEAdapter
    from moeguard.monitor import fromlog, periodclients, periods
    from moeguard.monitor.fit import observe

    t0 = time.perf_counter()
    warnings.simplefilter("ignore")
    _, m, tok, _ = embedded_and_topics(args.seed)
    adapter = MoEAdapter(m)
    slot = {l.index: i for i, l in enumerate(adapter.layers)}
    topics = pools(random.Random(args.seed))
    out = {}
    for ti, T in enumerate(args.topics.split(",")):
        if T not in topics:
            raise SystemExit(f"--topics: {T!r} is not a topic of this deployment; topics: {', '.join(sorted(topics))}")
        known = {k: v for k, v in topics.items() if k != T}
        log = interleave(users({k: v[0] for k, v in known.items()}, LOG_USERS, np.random.default_rng([args.seed, ti]), "day1"),
                         np.random.default_rng([args.seed, ti, 1]), "")
        owner = fromlog.build(m, tok, log, window=WINDOW, seed=args.seed, name="embedded", early=EARLY, slice_len=SLICE)
        in_log = {r["prompt"] for r in log}
        spare = {k: v[1] + [x for x in v[0] if x not in in_log] for k, v in known.items()}   # texts the profile never saw
        new_texts = topics[T][0] + topics[T][1]
        new_set = set(new_texts)
        n_days = periods.BASELINE + args.test_days
        days = [users({k: v[1] for k, v in known.items()}, DAY_USERS, np.random.default_rng([args.seed, ti, 2, d]), "user")
                for d in range(n_days)]
        def test_days_of(day: list, d: int, s: float) -> list:
            """Day d's users and, at share s of its requests, new single-topic users of T (``launch``)."""
            n = int(round(s / (1 - s) * sum(len(ps) for _, ps in day)))
            return day + new_users(new_texts, n, np.random.default_rng([args.seed, ti, 3, d, int(1000 * s)]), "launch")

        tests = {}   # (kind, share, day) -> the day's clients
        for d in range(periods.BASELINE, n_days):
            size = sum(len(ps) for _, ps in days[d])
            for s in SHARES:
                n = int(round(s / (1 - s) * size))
                rng = np.random.default_rng([args.seed, ti, 5, d, int(1000 * s)])
                tests["launch", s, d] = test_days_of(days[d], d, s)
                tests["drift", s, d] = drifted(days[d], new_texts, s, rng)
                # a topic with texts enough for the share (scitldr's 619 texts all went to the day-1 log)
                roomy = sorted(k for k in spare if len(spare[k]) >= n)
                k = roomy[(d - periods.BASELINE) % len(roomy)]
                tests["known", s, d] = days[d] + new_users(spare[k], n, rng, f"known-{k}")
        recs = [interleave(day, np.random.default_rng([args.seed, ti, 4, d]), "") for d, day in enumerate(days)]
        test_recs = {key: interleave(day, np.random.default_rng([args.seed, ti, 4, key[2]]), "") for key, day in tests.items()}
        prompts = sorted({r["prompt"] for rs in recs for r in rs} | {r["prompt"] for rs in test_recs.values() for r in rs})
        h, sums, ntok, _ = observe(m, tok, prompts, tokens=owner.tokens, adapter=adapter, batch_size=64)
        X, at = owner.space(sums, ntok), {p: i for i, p in enumerate(prompts)}
        resid = owner.neighbours.residual(X, h)
        flat = resid.reshape(len(resid), -1)
        cells = [[layer, e] for layer in slot for e in range(resid.shape[2])]
        print(f"{T}: profile and {len(prompts)} texts observed ({time.perf_counter() - t0:.0f} s)", flush=True)

        def sequence(by_day: list[list[dict]], clients_test: bool, accept=()) -> list[dict]:
            t = np.concatenate([d + np.arange(len(rs)) / len(rs) for d, rs in enumerate(by_day)])
            fl = [r for rs in by_day for r in rs]
            ix = [at[r["prompt"]] for r in fl]
            return periods.score_periods(t, resid[ix], [r["client"] for r in fl], period=1.0, baseline=periods.BASELINE,
                                         alpha=0.01, layers=list(slot), x=X[ix], clients_test=clients_test,
                                         accept=accept)

        cached: dict[int, tuple] = {}

        def clients_alone(by_day: list[list[dict]], before_rows: list[dict], i: int) -> dict:
            """Day i's clients' test as the sequence gives it (``routing_monitor_day_load.py``'s ``clients_on``),
            the baseline's matches built once per day; and which of the day's requests are ``unmatched``: farther
            from their matches than 99% of the baseline's own requests are from theirs on the other days."""
            if i not in cached:
                kept = [j for j in range(i) if "state" in before_rows[j] and not before_rows[j].get("alert")
                        and not before_rows[j].get("clients_alert")][-periods.BASELINE:]
                ix = [[at[r["prompt"]] for r in by_day[j]] for j in kept]
                before = periodclients.Earlier([X[a] for a in ix], [[r["client"] for r in by_day[j]] for j in kept])
                far = np.quantile(distance(before.pool, before.pool[before._rows], before._nn), 0.99)
                cached[i] = (before, np.concatenate(ix) if ix else np.zeros(0, dtype=np.int64), far)
            before, pool, far = cached[i]
            day_ix, got = [at[r["prompt"]] for r in by_day[i]], {}
            nn = before.match(X[day_ix]) if before.why is None else None
            periodclients.clients_test(got, before, nn, r=flat[day_ix], clients=[r["client"] for r in by_day[i]],
                                       pool_r=flat[pool], alpha=0.01, cells=cells)
            if nn is not None:
                got["unmatched"] = distance(before.pool, X[day_ix], nn) > far
            return got

        benign = sequence(recs, clients_test=True)
        first_start = benign[periods.BASELINE]["start"]
        last = range(periods.BASELINE, n_days)
        for i in last:   # the shortcut gives the sequence's own numbers
            if clients_alone(recs, benign, i).get("clients_p") != benign[i].get("clients_p"):
                raise SystemExit(f"{T} day {i}: the clients' test alone differs from the sequence's")
        held = [i for i, r in enumerate(benign) if r.get("clients_alert") and not r.get("alert")]
        rows = {}
        for (kind, s, d), rs in test_recs.items():
            got = sequence(recs[:d] + [rs], clients_test=False)[d]
            cl = clients_alone(recs[:d] + [rs], benign, d)
            # the clients that carry the new content (or, for ``known``, the heavy topic's new users)
            carriers = {r["client"] for r in rs if (r["prompt"] in new_set if kind == "drift"
                                                    else str(r["client"]).startswith(("launch-", "known-")))}
            row = rows.setdefault(f"{kind}_{s}", {k: [] for k in (
                "p", "cause", "cell", "clients_p", "clients_cell", "found_carriers", "found_other", "carriers",
                "added_requests", "share", "carrier_requests_unmatched", "other_requests_unmatched")})
            row["p"].append(got["p"]), row["cause"].append(got.get("cause") if got.get("alert") else None)
            row["cell"].append(f"{got['layer']}.{got['expert']}" if got.get("layer") is not None else None)
            row["clients_p"].append(cl.get("clients_p")), row["clients_cell"].append(cl.get("clients_cell"))
            found = [c["client"] for c in cl.get("clients_routing", [])]
            row["found_carriers"].append(sum(c in carriers for c in found))
            row["found_other"].append(sum(c not in carriers for c in found))
            un = cl.get("unmatched", np.zeros(len(rs), dtype=bool))
            is_carrier = np.array([r["client"] in carriers and (kind != "drift" or r["prompt"] in new_set) for r in rs])
            row["carrier_requests_unmatched"].append(round(float(un[is_carrier].mean()), 4) if is_carrier.any() else None)
            row["other_requests_unmatched"].append(round(float(un[~is_carrier].mean()), 4))
            row["carriers"].append(len(carriers))
            row["added_requests"].append(int(is_carrier.sum()))
            row["share"].append(round(float(is_carrier.mean()), 4))   # below the nominal share where T has too few texts
        for name, row in rows.items():
            row.update(load=rates(row["p"]), clients=rates(row["clients_p"]),
                       either=rates([min(p, q if q is not None else 1.0) for p, q in zip(row["p"], row["clients_p"])]),
                       causes_at_0_01={k: sum(c == k for c, p in zip(row["cause"], row["p"]) if p <= 0.01) for k in ("routing", "mix")})
            print(f"{T} {name} (share {np.mean(row['share']):.3f}): load {row['load']} causes {row['causes_at_0_01']}; clients {row['clients']} found carriers "
                  f"{row['found_carriers']} of {row['carriers']}, other {row['found_other']}; unmatched "
                  f"carriers' requests {row['carrier_requests_unmatched']}, others' {row['other_requests_unmatched']}", flush=True)
        # a launch that stays: new users of T at the share every day from the first test day on, the days in
        # sequence as a daily run scores them; without --accept, and with the first launch day accepted
        sustained = {}
        for s in SUSTAINED:
            launched = [rs if d < periods.BASELINE else test_recs["launch", s, d] for d, rs in enumerate(recs)]
            for name, accept in (("no_accept", ()), ("accept_first", (first_start,))):
                seq = sequence(launched, clients_test=True, accept=accept)[periods.BASELINE:]
                sustained[f"{s}_{name}"] = {"p": [r["p"] for r in seq], "clients_p": [r.get("clients_p") for r in seq],
                                            "alert": [bool(r.get("alert")) for r in seq],
                                            "clients_alert": [bool(r.get("clients_alert")) for r in seq],
                                            "cause": [r.get("cause") if r.get("alert") else None for r in seq],
                                            "accepted": [bool(r.get("accepted")) for r in seq]}
                print(f"{T} sustained {s} {name}: p {[f'{p:.2g}' for p in sustained[f'{s}_{name}']['p']]} clients_p "
                      f"{[None if q is None else f'{q:.2g}' for q in sustained[f'{s}_{name}']['clients_p']]}", flush=True)
        tested = benign[periods.BASELINE:]
        out[T] = {"profile_requests": len(log), "texts_of_topic": len(new_texts),
                  "day_requests": [sum(len(ps) for _, ps in day) for day in days],
                  "benign": {"days": len(tested), "p": [r["p"] for r in tested], "clients_p": [r.get("clients_p") for r in tested],
                             "load": rates([r["p"] for r in tested]), "clients": rates([r.get("clients_p") for r in tested]),
                             "all_days_p": [r["p"] for r in benign], "all_days_clients_p": [r.get("clients_p") for r in benign],
                             "held_out_by_clients_test_alone": held},
                  "tests": rows, "sustained": sustained}
    path = write_result("routing_monitor_day_novel", {
        "setting": {"topics": args.topics.split(","), "test_days": args.test_days, "baseline": periods.BASELINE,
                    "shares": list(SHARES), "sustained": list(SUSTAINED), "kinds": list(KINDS), "log_users": LOG_USERS, "day_users": DAY_USERS,
                    "seed": args.seed},
        "results": out, "seconds": round(time.perf_counter() - t0, 1)}, args.out)
    print(f"written to {path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
