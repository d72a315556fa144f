"""The period test's false alarms and power on resampled days: is its p-value a p-value?

    .venv/bin/python benchmarks/routing_monitor_day_load.py --identities 24 --out /tmp/x.json --dump /tmp/days.npz
    .venv/bin/python benchmarks/routing_monitor_day_resample.py --dump /tmp/days.npz [--draws 3000] [--out JSON]

``routing_monitor_day_load.py`` tests 17 benign days in sequence: too few to tell a 1% level from a
0.1% one. Here each draw makes ``--baseline`` days and a test day from the benchmark's benign users
(its days' users pooled, drawn without replacement, as many per day as the benchmark's days have),
and tests the day with the monitor's own test (``periods.Baseline.judge``) against them. The test
day is tested as it is (benign), and with a campaign's identities added (the first 2, 8 and all of
one campaign, cycling over the campaigns), and with their controls (the same identities' inputs
without the prefix: a day heavy in one task). The first version of the test (2026-12-05, before its
directions and out-of-sample scale) is run on the same draws for comparison.

Reported per version and kind: the share of draws alerting at 0.001, 0.01 and 0.05. Benign rates
are the test's false alarms (nominal: the level); the campaigns' are its power; the controls' are
what a heavy one-task day costs.

``--cause-draws N`` (about 9 s a draw): on the first N draws, also each day's cause
(``periodclients.py``: its clients' routing beyond their content's, or the mix), in the cells that
alert at each level (at most ``periods.CAUSE_CELLS``, as ``score --period`` seeks it) and, apart, in
the test's top cell alone (``_top``; with the baseline's centre, ``alert_routing_top_baseline_centre``,
the cause as first built), with the draw's baseline days'
requests as the matches and the null; reported as the share of draws alerting and put down to
routing or to the mix at each level, and of ``p_routing`` at most the level alerting or not (its
calibration on benign days). Each also with the null centred on the baseline clients alone
(``_baseline_centre``: the cause before 2026-12-06; the test now centres it on the period's own
clients' median where that is higher, ``Earlier.cause``). Those draws also test a campaign behind a decoy (``decoy_N``): its
first N identities and, beside them, all of the next campaign's control identities (a heavy load of
plain task inputs, which moves a cell of its own). Written as
``results/routing_monitor_day_resample_cause.json`` with ``--draws 200 --cause-draws 200``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import write_result

LEVELS = (0.001, 0.01, 0.05)


def first_version(M: np.ndarray, S: np.ndarray, m: np.ndarray, se2: np.ndarray) -> float:
    """The first period test, for comparison: each cell's raw deviation, its spread floored at the
    baseline's sampling noise, Student t with baseline - 1 degrees of freedom, Sidak over the cells."""
    from scipy.stats import t as student

    n, noise, mu = len(M), S.mean(0), M.mean(0)
    var = np.maximum(M.var(0, ddof=1), noise) * (1 + 1 / n) + np.maximum(0.0, se2 - noise)
    z = (m - mu) / np.sqrt(np.maximum(var, 1e-18))
    p_cell = float(student.sf(z.max(), df=n - 1))
    return float(-np.expm1(m.size * np.log1p(-min(p_cell, 1 - 1e-16))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", required=True, help="routing_monitor_day_load.py --dump's file")
    ap.add_argument("--draws", type=int, default=3000)
    ap.add_argument("--baseline", type=int, default=14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cause-draws", type=int, default=0,
                    help="on the first N draws, also each day's cause (periodclients.py: its clients' routing or the "
                         "mix), in the cells that alert, and a campaign behind a decoy; needs a dump with embeddings (x)")
    ap.add_argument("--out")
    args = ap.parse_args()
    from moeguard.monitor import periodclients, periods

    t0 = time.perf_counter()
    z = np.load(args.dump, allow_pickle=False)
    R = z["resid"].astype(np.float64)                                    # [texts, L, E]
    users: dict[tuple[int, str], list[int]] = {}
    for d, c, i in zip(z["day"], z["client"], z["text"]):
        users.setdefault((int(d), str(c)), []).append(int(i))
    pool = [np.array(v) for v in users.values()]
    per_day = round(len(pool) / (int(z["day"].max()) + 1))
    campaign_of = z["campaign_of"]
    campaigns, controls = ([[z[f"{k}_{i}"] for i in np.flatnonzero(campaign_of == c)] for c in range(campaign_of.max() + 1)]
                           for k in ("clients", "control"))
    sizes = sorted({min(2, len(campaigns[0])), min(8, len(campaigns[0])), len(campaigns[0])})
    if (args.baseline + 1) * per_day > len(pool):
        raise SystemExit(f"{args.baseline + 1} days of {per_day} users need more than the {len(pool)} users dumped")

    def day(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        r = R[idx]
        return r.mean(0), r.var(0, ddof=1) / len(idx), len(idx)

    kinds = ["benign"] + [f"{w}_{n}" for n in sizes for w in ("campaign", "control")]
    # a campaign that hides behind a decoy: its first n identities and, beside them, every identity of the
    # next campaign's control (a heavy load of plain task inputs, which moves its own cell), on the cause draws
    decoys = [f"decoy_{n}" for n in sizes if n < sizes[-1]] if args.cause_draws else []
    got = {v: {k: [] for k in kinds} for v in ("monitor", "first_version")}
    causes: dict[str, list] = {k: [] for k in kinds + decoys}   # per draw: (the test's p, {level or "top": p_routing})
    X = z["x"].astype(np.float64) if args.cause_draws else None
    user = [f"{d}:{c}" for d, c in users]                   # a benign user's name: its day and client
    rng = np.random.default_rng(args.seed)
    for draw in range(args.draws):
        perm = rng.permutation(len(pool))
        days = [day(np.concatenate([pool[j] for j in perm[per_day * i:per_day * (i + 1)]])) for i in range(args.baseline)]
        test = np.concatenate([pool[j] for j in perm[per_day * args.baseline:per_day * (args.baseline + 1)]])
        M, S = np.stack([m.ravel() for m, _, _ in days]), np.stack([s.ravel() for _, s, _ in days])
        c = draw % len(campaigns)
        if draw < args.cause_draws:   # the baseline days' requests as matches; the test day's and identities' matched once
            base_idx = [np.concatenate([pool[j] for j in perm[per_day * i:per_day * (i + 1)]]) for i in range(args.baseline)]
            base_who = [[user[j] for j in perm[per_day * i:per_day * (i + 1)] for _ in pool[j]] for i in range(args.baseline)]
            before = periodclients.Earlier([X[i] for i in base_idx], base_who)
            at = np.concatenate(base_idx)
            test_who = [user[j] for j in perm[per_day * args.baseline:per_day * (args.baseline + 1)] for _ in pool[j]]
            sent = {w: [np.asarray(a) for a in (campaigns if w == "campaign" else controls)[c]] for w in ("campaign", "control")}
            sent["decoy"] = [np.asarray(a) for a in controls[(c + 1) % len(campaigns)]]
            nn = {"test": before.match(X[test]), **{w: [before.match(X[a]) for a in v] for w, v in sent.items()}}
        for kind in kinds + (decoys if draw < args.cause_draws else []):
            idx = test
            if kind.startswith("decoy"):
                n = kind.split("_")[1]
                idx = np.concatenate([test, *campaigns[c][:int(n)], *sent["decoy"]])
            elif kind != "benign":
                w, n = kind.split("_")
                idx = np.concatenate([test, *(campaigns if w == "campaign" else controls)[c][:int(n)]])
            m, se2, n_req = day(idx)
            base = periods.Baseline(baseline=args.baseline, alpha=0.5, layers=list(range(R.shape[1])))
            base.kept = list(days)
            row: dict = {}
            _, l, e, cells = base.judge(row, m, se2, n_req)
            if kind in got["monitor"]:
                got["monitor"][kind].append(row["p"])
                got["first_version"][kind].append(first_version(M, S, m.ravel(), se2.ravel()))
            if draw < args.cause_draws:
                who, matches = list(test_who), [nn["test"]]
                if kind.startswith("decoy"):
                    who += [f"identity-{i}" for i in range(int(n)) for _ in sent["campaign"][i]]
                    who += [f"decoy-{i}" for i, a in enumerate(sent["decoy"]) for _ in a]
                    matches += nn["campaign"][:int(n)] + nn["decoy"]
                elif kind != "benign":
                    who += [f"identity-{i}" for i in range(int(n)) for _ in sent[w][i]]
                    matches += nn[w][:int(n)]
                # at each level, the cells that alert at that level (periods.score_periods's rule), and the
                # top cell alone (the first version of the cause) for comparison; levels that test the
                # same cells (most draws: the top cell at every level) share one call
                # each with the null centred as the test does, and (``_b``) on the baseline clients alone (before 2026-12-06)
                q, by_cells, nn_all = {}, {}, np.concatenate(matches)
                for a in LEVELS + ("top",):
                    use = tuple([(x, y) for x, y, pc in cells if pc <= a] if a != "top" else []) or ((l, e),)
                    if use not in by_cells:
                        ls, es = [x for x, _ in use], [y for _, y in use]
                        by_cells[use] = {}
                        for centre in ("period", "baseline"):
                            got_row: dict = {}
                            before.cause(got_row, r=R[idx[:, None], ls, es], clients=who, pool_r=R[at[:, None], ls, es],
                                         alpha=0.01, nn=nn_all, centre=centre)
                            if got_row["p_routing"] is None:   # not expected with days of ~3,000 requests: say so, at once
                                raise SystemExit(f"draw {draw}, {kind}: no cause given ({got_row['cause_why']})")
                            by_cells[use][centre] = got_row["p_routing"]
                    q[a], q[f"{a}_b"] = by_cells[use]["period"], by_cells[use]["baseline"]
                causes[kind].append((row["p"], q))
        if (draw + 1) % 100 == 0:
            print(f"{draw + 1} draws ({time.perf_counter() - t0:.0f} s)", flush=True)
    rates = {v: {k: {str(a): round(float(np.mean(np.array(ps) <= a)), 4) for a in LEVELS} for k, ps in by.items()}
             for v, by in got.items()}
    for v, by in rates.items():
        for k, r in by.items():
            print(f"{v:14s} {k:12s} " + "  ".join(f"{a}: {r[a]:.3f}" for a in r), flush=True)
    # the cause, on the first --cause-draws draws: at each level, the share of draws alerting and put down
    # to routing (p_routing <= the level) or to the mix; and p_routing alone, alerting or not (its calibration)
    # ("_top": the cause sought in the test's top cell alone; with "_baseline_centre" too, as first built)
    cause = {k: {"draws": len(v), **{str(a): {
        "alert": round(float(np.mean([p <= a for p, _ in v])), 4),
        "alert_routing": round(float(np.mean([p <= a and q[a] <= a for p, q in v])), 4),
        "alert_mix": round(float(np.mean([p <= a and q[a] > a for p, q in v])), 4),
        "routing_any_day": round(float(np.mean([q[a] <= a for _, q in v])), 4),
        "alert_routing_top": round(float(np.mean([p <= a and q["top"] <= a for p, q in v])), 4),
        "routing_any_day_top": round(float(np.mean([q["top"] <= a for _, q in v])), 4),
        "alert_routing_baseline_centre": round(float(np.mean([p <= a and q[f"{a}_b"] <= a for p, q in v])), 4),
        "routing_any_day_baseline_centre": round(float(np.mean([q[f"{a}_b"] <= a for _, q in v])), 4),
        "alert_routing_top_baseline_centre": round(float(np.mean([p <= a and q["top_b"] <= a for p, q in v])), 4),
        } for a in LEVELS}}
        for k, v in causes.items() if v}
    for k, by in cause.items():
        print(f"cause {k:12s} " + "  ".join(f"{a}: alert {r['alert']:.3f} routing {r['alert_routing']:.3f} "
                                            f"(top cell {r['alert_routing_top']:.3f}; baseline centre "
                                            f"{r['alert_routing_baseline_centre']:.3f}) mix {r['alert_mix']:.3f} "
                                            f"(any day {r['routing_any_day']:.3f}; baseline centre "
                                            f"{r['routing_any_day_baseline_centre']:.3f})"
                                            for a, r in by.items() if a != "draws"), flush=True)
    path = write_result("routing_monitor_day_resample", {
        "setting": {"draws": args.draws, "baseline": args.baseline, "users_per_day": per_day, "users": len(pool),
                    "campaigns": len(campaigns), "identities": sizes, "seed": args.seed,
                    **({"cause_draws": args.cause_draws, "cause_k": periodclients.K,
                        "cause_null_clients": periodclients.NULL_CLIENTS, "cause_cells": periods.CAUSE_CELLS}
                       if args.cause_draws else {})},
        "rates": rates, **({"cause": cause} if cause else {}), "seconds": round(time.perf_counter() - t0, 1)}, args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
