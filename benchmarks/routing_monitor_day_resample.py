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
alert at each level (every one, as ``score --period`` seeks it since 2026-12-06; ``_cap4``: the first 4
of them, as it did before) and, apart, in
the test's top cell alone (``_top``; with the baseline's centre, ``alert_routing_top_baseline_centre``,
the cause as first built), with the draw's baseline days'
requests as the matches and the null; reported as the share of draws alerting and put down to
routing or to the mix at each level, and of ``p_routing`` at most the level alerting or not (its
calibration on benign days). Each also with the null centred on the baseline clients alone
(``_baseline_centre``: the cause before 2026-12-06; the test now centres it on the period's own
clients' median where that is higher, ``Earlier.cause``). Those draws also test a campaign behind a decoy (``decoy_N``): its
first N identities and, beside them, all of the next campaign's control identities (a heavy load of
plain task inputs, which moves a cell of its own); and behind a decoy that moves several cells
(``wide_N``, ``wide_decoy``: benign content of 5 regions, each of which the neighbours get wrong in a
cell of its own). ``more_than_4_cells`` and ``cells_mean_alerting_days``: how many cells alert (the mean
over alerting days); ``own_cell_past_4th``: how often the campaign's own cell (``own_cells``: the test's
top cell on days with the whole campaign) alerts past the 4th, where the cap did not seek the cause.
``clients_test``: the clients' test as an alarm of its own (``score --period-clients``: every cell, the
null's scale at least its upper tail's), the share of days with its p at most the level, alerting or not;
``either_test``: the period test or it. Written as ``results/routing_monitor_day_resample_cause.json``
with ``--draws 200 --cause-draws 200`` (before the clients' test fields), and
``results/routing_monitor_day_resample_clients.json`` with ``--draws 200 --cause-draws 100``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, NamedTuple

import numpy as np

from _common import write_result

LEVELS = (0.001, 0.01, 0.05)
REGIONS = 12          # k-means regions of content the wide decoy is drawn from
WIDE_CELLS = 5        # cells the wide decoy moves, one region each
WIDE_IDENTITIES = 10  # its identities per region, each of
OWN_DRAWS = 9         # resampled days that name a campaign's own cell (``own_cells``)
WIDE_REQUESTS = 48    # requests: 50 identities, 2,400 requests, twice the one-task decoy's load (240 a region
                      # and 5 identities alerted on 1 of 6 smoke draws)


def wide_decoy(X: np.ndarray, R: np.ndarray, z, own_cell: list[int], seed: int) -> dict:
    """A decoy that moves several cells: benign content whose routing the neighbours get wrong in a cell.
    The dumped benign texts are cut into ``REGIONS`` regions of content (k-means on the embedding); each
    (region, cell) is scored by the region's mean residual there, standardized by the cell's spread over
    the dumped days' means (what an attacker who holds the model and the neighbour references can
    estimate). Per campaign, the ``WIDE_CELLS`` best pairs of distinct regions and cells, the campaign's
    own cell (``own_cells``) left out: the decoy sends those regions' texts. Regions are fixed; which
    texts, per draw."""
    texts = np.unique(z["text"])
    rng = np.random.default_rng([seed, 11])
    centres = X[rng.choice(texts, REGIONS, replace=False)]
    for _ in range(50):                          # Lloyd's k-means
        label = ((X[texts][:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([X[texts[label == k]].mean(0) if (label == k).any() else centres[k] for k in range(REGIONS)])
    regions = [texts[label == k] for k in range(REGIONS)]
    day_means = np.stack([R[z["text"][z["day"] == d]].mean(0).ravel() for d in np.unique(z["day"])])
    mu, sd = day_means.mean(0), day_means.std(0, ddof=1)
    score = np.stack([(R[t].mean(0).ravel() - mu) / sd if len(t) >= WIDE_REQUESTS else np.full(mu.size, -np.inf)
                      for t in regions])                                   # [regions, cells]
    by_campaign = []
    for own in own_cell:
        picked, cells_used = [], {own}
        for k, j in zip(*np.unravel_index(np.argsort(-score, axis=None, kind="stable"), score.shape)):
            if k not in picked and j not in cells_used and np.isfinite(score[k, j]):
                picked.append(int(k)), cells_used.add(int(j))
            if len(picked) == WIDE_CELLS:
                break
        by_campaign.append(picked)
    return {"regions": regions, "region_sizes": [len(t) for t in regions], "by_campaign": by_campaign, "own_cell": own_cell,
            "score": [[round(float(score[k, j]), 2) for j in range(score.shape[1])] for k in range(REGIONS)]}


def day_stats(R: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """A day's per-cell mean residual, its squared standard error and its request count."""
    r = R[idx]                                                           # [requests, L, E]
    return r.mean(0), r.var(0, ddof=1) / len(idx), len(idx)


def own_cells(R: np.ndarray, pool: list, per_day: int, campaigns: list, baseline: int, seed: int) -> list[int]:
    """Each campaign's own cell, as the monitor's test reads it: the top cell of ``periods.Baseline.judge``
    on ``OWN_DRAWS`` resampled days with all of the campaign's identities added, the most frequent one
    (flat index over [layers, experts]). Before 2026-12-06 (twelfth session) this was the cell where the
    campaign's mean residual stood furthest above the texts', raw, not over the cell's spread: it agreed
    with the test's cell for 3 of 11 campaigns."""
    from moeguard.monitor import periods

    own = []
    for c, v in enumerate(campaigns):
        tops = []
        for t in range(OWN_DRAWS):
            perm = np.random.default_rng([seed, 13, c, t]).permutation(len(pool))
            days = [day_stats(R, np.concatenate([pool[j] for j in perm[per_day * i:per_day * (i + 1)]])) for i in range(baseline)]
            test = np.concatenate([pool[j] for j in perm[per_day * baseline:per_day * (baseline + 1)]] + list(v))
            base = periods.Baseline(baseline=baseline, alpha=0.5, layers=list(range(R.shape[1])))
            base.kept = list(days)
            _, l, e, _ = base.judge({}, *day_stats(R, test))
            tops.append(int(np.ravel_multi_index((l, e), R.shape[1:])))
        own.append(max(set(tops), key=lambda x: (tops.count(x), -x)))
    return own


class Dump(NamedTuple):
    """``routing_monitor_day_load.py --dump``'s file, read: ``z`` the file, ``R`` each text's residual [texts,
    L, E] (float64), ``users`` each benign (day, client)'s texts and ``pool`` the same as arrays, ``per_day``
    users a day, ``campaigns`` and ``controls``: per campaign, each identity's texts (with and without its
    prefix)."""
    z: Any
    R: np.ndarray
    users: dict[tuple[int, str], list[int]]
    pool: list[np.ndarray]
    per_day: int
    campaigns: list[list[np.ndarray]]
    controls: list[list[np.ndarray]]


def read_dump(path: str) -> Dump:
    """The dump's benign user-days, campaigns and controls (``Dump``); this benchmark's and
    ``routing_monitor_day_sybil.py``'s."""
    z = np.load(path, allow_pickle=False)
    users: dict[tuple[int, str], list[int]] = {}
    for d, c, i in zip(z["day"], z["client"], z["text"]):
        users.setdefault((int(d), str(c)), []).append(int(i))
    pool = [np.array(v) for v in users.values()]
    campaign_of = z["campaign_of"]
    campaigns, controls = ([[z[f"{k}_{i}"] for i in np.flatnonzero(campaign_of == c)] for c in range(campaign_of.max() + 1)]
                           for k in ("clients", "control"))
    return Dump(z=z, R=z["resid"].astype(np.float64), users=users, pool=pool,
                per_day=round(len(pool) / (int(z["day"].max()) + 1)), campaigns=campaigns, controls=controls)


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
    z, R, users, pool, per_day, campaigns, controls = read_dump(args.dump)             # R: [texts, L, E]
    sizes = sorted({min(2, len(campaigns[0])), min(8, len(campaigns[0])), len(campaigns[0])})
    if (args.baseline + 1) * per_day > len(pool):
        raise SystemExit(f"{args.baseline + 1} days of {per_day} users need more than the {len(pool)} users dumped")

    kinds = ["benign"] + [f"{w}_{n}" for n in sizes for w in ("campaign", "control")]
    # a campaign that hides behind a decoy: its first n identities and, beside them, every identity of the
    # next campaign's control (a heavy load of plain task inputs, which moves its own cell), on the cause draws;
    # and behind a decoy that moves several cells (``wide_n``, ``wide_decoy``)
    decoys = [f"{w}_{n}" for w in ("decoy", "wide") for n in sizes if n < sizes[-1]] if args.cause_draws else []
    got = {v: {k: [] for k in kinds} for v in ("monitor", "first_version")}
    causes: dict[str, list] = {k: [] for k in kinds + decoys}   # per draw: (the test's p, {level or "top": p_routing})
    X = z["x"].astype(np.float64) if args.cause_draws else None
    if args.cause_draws:
        own_cell = own_cells(R, pool, per_day, campaigns, args.baseline, args.seed)
        wide = {**wide_decoy(X, R, z, own_cell, args.seed), "own_cell": own_cell}
    user = [f"{d}:{c}" for d, c in users]                   # a benign user's name: its day and client
    every_cell = tuple((x, y) for x in range(R.shape[1]) for y in range(R.shape[2]))
    rng = np.random.default_rng(args.seed)
    for draw in range(args.draws):
        perm = rng.permutation(len(pool))
        days = [day_stats(R, np.concatenate([pool[j] for j in perm[per_day * i:per_day * (i + 1)]])) for i in range(args.baseline)]
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
            wrng = np.random.default_rng([args.seed, draw, 7])   # its own stream: the other kinds' draws are unchanged
            sent["wide"] = [wrng.choice(wide["regions"][k], size=WIDE_REQUESTS) for k in wide["by_campaign"][c]
                            for _ in range(WIDE_IDENTITIES)]
            nn = {"test": before.match(X[test]), **{w: [before.match(X[a]) for a in v] for w, v in sent.items()}}
        for kind in kinds + (decoys if draw < args.cause_draws else []):
            idx = test
            if kind.startswith(("decoy", "wide")):
                w, n = kind.split("_")
                idx = np.concatenate([test, *campaigns[c][:int(n)], *sent[w]])
            elif kind != "benign":
                w, n = kind.split("_")
                idx = np.concatenate([test, *(campaigns if w == "campaign" else controls)[c][:int(n)]])
            m, se2, n_req = day_stats(R, idx)
            base = periods.Baseline(baseline=args.baseline, alpha=0.5, layers=list(range(R.shape[1])))
            base.kept = list(days)
            row: dict = {}
            _, l, e, cells = base.judge(row, m, se2, n_req)
            if kind in got["monitor"]:
                got["monitor"][kind].append(row["p"])
                got["first_version"][kind].append(first_version(M, S, m.ravel(), se2.ravel()))
            if draw < args.cause_draws:
                who, matches = list(test_who), [nn["test"]]
                if kind.startswith(("decoy", "wide")):
                    who += [f"identity-{i}" for i in range(int(n)) for _ in sent["campaign"][i]]
                    who += [f"{w}-{i}" for i, a in enumerate(sent[w]) for _ in a]
                    matches += nn["campaign"][:int(n)] + nn[w]
                elif kind != "benign":
                    who += [f"identity-{i}" for i in range(int(n)) for _ in sent[w][i]]
                    matches += nn[w][:int(n)]
                # at each level, the cells that alert at that level (periods.score_periods's rule: every one
                # since 2026-12-06), the first 4 of them (``_4``: the cap before), and the top cell alone (the
                # first version of the cause) for comparison; levels that test the same cells (most draws: the
                # top cell at every level) share one call. Each with the null centred as the test does, and
                # (``_b``) on the baseline clients alone (before 2026-12-06)
                q, by_cells, nn_all = {}, {}, np.concatenate(matches)

                def p_routing(use: tuple, centre: str, tail: bool = False) -> float:
                    if (use, centre, tail) not in by_cells:
                        ls, es = [x for x, _ in use], [y for _, y in use]
                        got_row: dict = {}
                        before.cause(got_row, r=R[idx[:, None], ls, es], clients=who, pool_r=R[at[:, None], ls, es],
                                     alpha=0.01, nn=nn_all, centre=centre, tail=tail)
                        if got_row["p_routing"] is None:   # not expected with days of ~3,000 requests: say so, at once
                            raise SystemExit(f"draw {draw}, {kind}: no cause given ({got_row['cause_why']})")
                        by_cells[use, centre, tail] = got_row["p_routing"]
                    return by_cells[use, centre, tail]

                # where the alerting cells miss the campaign's (a decoy's load dilutes it below alerting): the
                # cause sought in every cell that moved at all (Sidak p <= 0.5, about an unadjusted 0.02 over 32
                # cells; ``_loose``) and in every cell of the model (``_every``), for comparison
                q["loose"] = p_routing(tuple((x, y) for x, y, _ in cells), "period")
                q["every"] = p_routing(every_cell, "period")
                # the clients' test (score --period-clients): every cell, the null's scale at least its upper tail's
                q["clients"] = p_routing(every_cell, "period", True)
                mine = tuple(int(v) for v in np.unravel_index(own_cell[c], R.shape[1:]))   # the campaign's own cell
                for a in LEVELS + ("top",):
                    use = tuple([(x, y) for x, y, pc in cells if pc <= a] if a != "top" else []) or ((l, e),)
                    q[a], q[f"{a}_b"] = p_routing(use, "period"), p_routing(use, "baseline")
                    if a != "top":
                        # cells alerting at a: 0 where none does (``use`` then falls back to the top cell)
                        q[f"{a}_4"], q[f"{a}_cells"] = p_routing(use[:4], "period"), sum(pc <= a for *_, pc in cells)
                        q[f"{a}_past_4th"] = kind != "benign" and not kind.startswith("control") and mine in use[4:]
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
        # the cause sought in at most 4 alerting cells (before 2026-12-06), how often more than 4 alert, and how
        # often a campaign's own cell alerts past the 4th (the cap would not have tested it)
        "alert_routing_cap4": round(float(np.mean([p <= a and q[f"{a}_4"] <= a for p, q in v])), 4),
        "alert_mix_cap4": round(float(np.mean([p <= a and q[f"{a}_4"] > a for p, q in v])), 4),
        "routing_any_day_cap4": round(float(np.mean([q[f"{a}_4"] <= a for _, q in v])), 4),
        "alert_routing_loose": round(float(np.mean([p <= a and q["loose"] <= a for p, q in v])), 4),
        "routing_any_day_loose": round(float(np.mean([q["loose"] <= a for _, q in v])), 4),
        "alert_routing_every_cell": round(float(np.mean([p <= a and q["every"] <= a for p, q in v])), 4),
        "routing_any_day_every_cell": round(float(np.mean([q["every"] <= a for _, q in v])), 4),
        # the clients' test as an alarm of its own (periodclients.clients_test), and either test alerting
        "clients_test": round(float(np.mean([q["clients"] <= a for _, q in v])), 4),
        "either_test": round(float(np.mean([p <= a or q["clients"] <= a for p, q in v])), 4),
        "more_than_4_cells": round(float(np.mean([q[f"{a}_cells"] > 4 for _, q in v])), 4),
        # over the days that alert at a (before 2026-12-06's twelfth session, ``cells_mean`` over every day,
        # a day with no alerting cell counted as 1)
        "cells_mean_alerting_days": (round(float(np.mean([q[f"{a}_cells"] for p, q in v if p <= a])), 3)
                                     if any(p <= a for p, _ in v) else None),
        "own_cell_past_4th": round(float(np.mean([q[f"{a}_past_4th"] for _, q in v])), 4),
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
                        "cause_null_clients": periodclients.NULL_CLIENTS, "cause_cells": periods.CAUSE_CELLS,
                        "wide_decoy": {k: v for k, v in wide.items() if k != "regions"}}
                       if args.cause_draws else {})},
        "rates": rates, **({"cause": cause} if cause else {}), "seconds": round(time.perf_counter() - t0, 1)}, args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
